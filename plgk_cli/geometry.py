"""The kernel-geometry pass of a replay (paper sections 4, 6.2, 6.3, A.7, A.8; Algorithm 1).

At each kernel checkpoint (default: every epoch boundary, and the final checkpoint) it evaluates
the loss gradients of every training example in chunks, never holding M x P, and feeds the
accumulators of kernel.py: the PLGK Gram blocks (optionally weighted by the optimizer's
preconditioner, eq. 29), the temporal kernel sketch (A.7), the online Oja modes (A.8), the
cancellation ratio of the reference modes held fixed, and the kernel-regime metrics. Reference
modes (Algorithm 1) come first, from a streamed randomized SVD at each --modes-at checkpoint.
Checkpoints are visited forwards, so Oja's projector from one kernel checkpoint is used on the
next one's gradients, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.func import functional_call
from tqdm import tqdm

from plgk_cli import kernel as K
from plgk_cli import modes as M

REGIME_SAMPLE = 256  # training examples for the kernel-regime metrics (fixed, seeded subsample)
SUBSPACE_K = 10  # paper 6.3 (ii): top-10 subspace overlap


@dataclass
class GeometryResult:
    """Arrays (numpy, float64) and attributes for the store's /kernel and /modes groups."""

    kernel: dict = field(default_factory=dict)
    kernel_attrs: dict = field(default_factory=dict)
    modes: dict = field(default_factory=dict)  # name -> {array name -> array}, attrs under "attrs"
    warnings: list = field(default_factory=list)  # one line each: modes that missed their tolerance or energy


def kernel_steps(total: int, stride: int) -> list[int]:
    return list(range(0, total, stride)) + [total]


def _penultimate(model: torch.nn.Module):
    """The last Linear layer, whose input is the final hidden layer's activation (6.3 (iii))."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1] if linears else None


def compute_geometry(plan, progress: bool = True) -> GeometryResult:
    """The kernel pass, with the model in eval mode (dropout off, BatchNorm on the recorded
    buffers of each checkpoint), as the audited quantities are."""
    model = plan.gradients.model
    was_training = model.training
    model.eval()
    try:
        return _geometry(plan, progress)
    finally:
        model.train(was_training)


def _geometry(plan, progress: bool) -> GeometryResult:
    args, run, layout, grads = plan.args, plan.run, plan.layout, plan.gradients
    device, compute, total = plan.device, plan.compute, plan.total
    stride = args.kernel_stride or run.manifest["steps_per_epoch"]
    steps = kernel_steps(total, stride)
    x_train, y_train = plan.x_train, plan.y_train
    m_train = len(y_train)
    chunk = grads.chunk_size  # --chunk-size or what --memory-budget allows

    def theta_at(t):  # and the model's buffers as training had them there
        plan.load_buffers(plan.buffers(t))
        return plan.theta(t)

    def train_grads(theta, rows):
        return grads.loss_gradients(theta.to(compute), x_train[rows], y_train[rows])[0].to(torch.float64)

    def audit_grads(theta):  # loss gradients with the audit labels (paper Remark 4.3)
        return grads.loss_gradients(theta.to(compute), plan.x_audit, plan.y_audit)[0].to(torch.float64)

    def chunks():
        for start in range(0, m_train, chunk):
            yield torch.arange(start, min(start + chunk, m_train), device=device)

    def preconditioner(t):
        # A_t of the update that starts at θ_t (from the state after it), the last update's at T
        if not args.precondition:
            return None
        after = min(t + 1, total)
        step = plan.trajectory.flat(after)
        return run.decomposition.preconditioner(step.state, run.update_hyper(step.checkpoint, device))

    bar = tqdm(total=len(steps) + len(args.modes_steps(total)), desc="kernel", unit="ckpt",
               disable=not progress, dynamic_ncols=True)
    result = GeometryResult()

    # Reference modes (Algorithm 1) at each --modes-at checkpoint: streamed passes until converged.
    reference = {}
    if args.modes and args.modes_method == "svd":
        for t_ref in args.modes_steps(total):
            theta = theta_at(t_ref)
            rank = None if args.modes_energy else min(args.modes, m_train, layout.size)
            # below ~10 units in the last place of the gradients' dtype a value is their rounding
            svd = M.StreamedSVD(m_train, rank, energy=args.modes_energy, device=device,
                                noise_floor=max(M.NUMERICAL_ZERO, 10 * torch.finfo(compute).eps))
            while not svd.done:
                bar.set_postfix_str(f"modes at step {t_ref}: pass {svd.passes + 1}, K {svd.rank}")
                for rows in chunks():
                    svd.feed(rows, train_grads(theta, rows))
                svd.end_pass()
            reference[t_ref] = modes = svd.result(audit_grads(theta), keep_v=True)
            result.warnings.extend(_modes_warnings(t_ref, modes))
            bar.set_postfix_str("")
            bar.update(1)

    # References at the final checkpoint for the kernel-regime metrics (fixed subsample).
    sample = torch.randperm(m_train, generator=torch.Generator().manual_seed(0))[:REGIME_SAMPLE]
    sample = sample.sort().values.to(device)
    last_linear = _penultimate(plan.gradients.model)
    theta_final = theta_at(total)
    g_sample_final = train_grads(theta_final, sample)
    top_final = torch.linalg.svd(g_sample_final, full_matrices=False)[2][:SUBSPACE_K].T
    act_final = _activations(plan, last_linear, theta_final, x_train[sample])

    n_audit = plan.n_audit
    plgk = K.PLGKAccumulator(n_audit, m_train, train_gram=args.kernel_train, device=device)
    sketch = K.TemporalKernelSketch(len(steps), m_train, layout.size, device=device)
    oja = M.OjaModes(layout.size, min(args.modes, layout.size), device=device) \
        if args.modes and args.modes_method == "oja" else None
    k_cr = {t: torch.full((len(steps), n_audit, len(m.s)), torch.nan, dtype=torch.float64)
            for t, m in reference.items()}
    oja_cr = torch.full((len(steps), n_audit, oja.rank), torch.nan, dtype=torch.float64) if oja else None
    oja_captured = np.full(len(steps), np.nan)
    feature, subspace, activation = (np.full(len(steps), np.nan) for _ in range(3))

    for i, t in enumerate(steps):
        theta = theta_at(t)
        g_audit = audit_grads(theta)
        plgk.begin_checkpoint(g_audit, preconditioner(t))
        sum_gradient = torch.zeros(layout.size, dtype=torch.float64, device=device)
        for rows in chunks():
            g = train_grads(theta, rows)
            if not args.kernel_train:
                plgk.add_train_chunk(rows, g)
            sketch.add_chunk(i, rows, g)
            sum_gradient += g.sum(0)
            if oja is not None:
                oja.observe(g)
        if args.kernel_train:  # train x train needs every pair of chunks
            K.feed_training_rows(plgk, lambda rows: train_grads(theta, rows), chunk)
        plgk.end_checkpoint()
        for t_ref, modes in reference.items():  # CR(K) with the reference modes held fixed
            k_cr[t_ref][i] = M.cancellation_ratio(M.mode_drive(modes.v, sum_gradient),
                                                  g_audit @ modes.v).cpu()
        if oja is not None:
            captured = oja.end_epoch()
            oja_captured[i] = np.nan if captured is None else captured.energy_fraction
            v = oja.projector
            oja_cr[i] = M.cancellation_ratio(M.mode_drive(v, sum_gradient), g_audit @ v).cpu()
        g_sample = train_grads(theta, sample)
        feature[i] = float(torch.nanmean(K.row_cosines(g_sample, g_sample_final)))
        top = torch.linalg.svd(g_sample, full_matrices=False)[2][:SUBSPACE_K].T
        if top.shape[1] >= SUBSPACE_K and top_final.shape[1] >= SUBSPACE_K:
            subspace[i] = K.subspace_overlap(top, top_final, SUBSPACE_K)
        if act_final is not None:
            activation[i] = float(torch.nanmean(K.row_cosines(
                _activations(plan, last_linear, theta, x_train[sample]), act_final)))
        bar.update(1)
    bar.close()

    spectrum = K.temporal_spectrum(sketch.gram)
    audit_ips, audit_train_ips = plgk.audit_ips(), plgk.audit_train_ips()
    with torch.no_grad():
        theta_final = theta_at(total)
        logits = functional_call(plan.gradients.model, layout.unflatten(theta_final.to(compute)),
                                 (plan.x_audit,)).to(torch.float64)
    kernel = {
        "step": np.array(steps), "audit_gram": plgk.audit_gram, "audit_norm_sq": plgk.audit_sq_norms(),
        "audit_ips": audit_ips, "audit_train_gram": plgk.audit_train, "train_norm_sq": plgk.train_sq_norms,
        "audit_train_ips": audit_train_ips, "audit_logits": logits, "train_label": y_train,
        "temporal/gram": sketch.gram, "temporal/eigenvalues": spectrum.eigenvalues,
        "temporal/prefix_participation_ratio": K.prefix_participation_ratios(sketch.gram),
        "regime/feature_overlap": feature, "regime/subspace_overlap": subspace,
        "regime/activation_overlap": activation,
    }
    if args.kernel_train:
        kernel["train_gram"], kernel["train_ips"] = plgk.train_gram, plgk.train_ips()
    result.kernel = {k: _np(v) for k, v in kernel.items()}
    result.kernel_attrs = {"stride": stride, "precondition": bool(args.precondition),
                           "weights": "1 per kernel checkpoint",
                           "temporal_participation_ratio": spectrum.participation_ratio,
                           "temporal_kernel": f"CountSketch, dim {sketch.dim}",
                           "regime_sample": len(sample)}
    for t_ref, modes in reference.items():
        curve = modes.energy_curve
        kat = modes.k_at_energy()
        arrays = {"s": modes.s, "a": modes.a, "drive": modes.drive, "energy_curve": curve,
                  "coefficients": modes.coefficients, "cancellation": k_cr[t_ref]}
        if args.save_modes:
            arrays["v"] = modes.v
        result.modes[f"step_{t_ref:08d}"] = {
            **{k: _np(v) for k, v in arrays.items()},
            "attrs": {"method": "svd", "step": t_ref, "total_energy": modes.total_energy, "k": len(modes.s),
                      "energy_target": modes.energy_target or 0.0, "converged": modes.converged,
                      "estimated_error": modes.estimated_error, "passes": modes.passes,
                      **{f"k_at_{int(round(f * 100))}": (-1 if k is None else k) for f, k in kat.items()}}}
    if oja is not None:
        arrays = {"captured_energy": oja_captured, "cancellation": oja_cr}
        if args.save_modes:
            arrays["v"] = oja.projector
        result.modes["oja"] = {**{k: _np(v) for k, v in arrays.items()},
                               "attrs": {"method": "oja", "rank": oja.rank}}
    return result


def _modes_warnings(step: int, modes: M.SVDModes) -> list:
    """What the user must hear about modes that are not what was asked: values short of the SVD's
    tolerance, or an energy share auto could not reach."""
    out = []
    if not modes.converged:
        out.append(f"modes at step {step}: the SVD did not converge in {modes.passes} passes (estimated "
                   f"relative error {modes.estimated_error:.1e} > {M.SVD_TOLERANCE:g}); the values are lower "
                   "bounds of the exact ones")
    if modes.energy_target is not None and float(modes.energy_curve[-1]) < modes.energy_target:
        out.append(f"modes at step {step}: the {len(modes.s)} modes found hold {float(modes.energy_curve[-1]):.4f} "
                   f"of the energy, short of --modes auto:{modes.energy_target!r}")
    return out


def _activations(plan, last_linear, theta, x):
    """Inputs of the last Linear layer (the final hidden layer's activations) at θ, or None."""
    if last_linear is None:
        return None
    captured = []
    handle = last_linear.register_forward_pre_hook(lambda mod, inp: captured.append(inp[0].detach()))
    try:
        with torch.no_grad():
            functional_call(plan.gradients.model, plan.layout.unflatten(theta.to(plan.compute)), (x,))
    finally:
        handle.remove()
    return captured[0].reshape(len(x), -1).to(torch.float64)


def _np(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
