"""`plgk replay`: walk the checkpoint pairs backwards and write the complete training-data audit.

For every update t -> t+1 the audit-side gradient h_n(t) is the quadrature average of ∇q_n over the
segment θ_t -> θ_{t+1} (euler, trapezoid, composite trapezoid; paper 5.1 and A.2.7). Walking the
updates from the last to the first carries one adjoint column per audited quantity,
W(s) = lr_s p_s ⊙ h(s) + μ_{s+1} W(s+1) (optimizers.StepCoefficients.adjoint), so that momentum is
exact over the whole run and each step costs one GEMM between the minibatch's per-sample gradients
and the adjoints (DESIGN.md). Each step also re-derives the recorded update from the same
coefficients (the update check); what no sample owns goes to the residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from plgk_cli.arguments import ReplayArguments, resolve_audit_set, resolve_train_subset
from plgk_cli.audit import AuditAccumulator, completeness
from plgk_cli.errors import TrajectoryError
from plgk_cli.gradients import GradientComputer, ParameterLayout
from plgk_cli.run import Run, load_run
from plgk_cli.store import TargetResult, check_writable, write_influences
from plgk_cli.train import resolve_device

ROUNDINGS_PER_UPDATE = 2


@dataclass(frozen=True)
class ReplaySummary:
    path: Path
    metrics: dict  # target -> {"mre", "lc", "rmre", "attribution_gap"}
    max_update_error: float
    steps: int


def flat_state(layout: ParameterLayout, state: dict, path: str, device) -> dict:
    """Optimizer state by key as flat float64 vectors in layout order."""
    keys = set.intersection(*(set(state.get(n, {})) for n in layout.names)) if layout.names else set()
    partial = set().union(*(set(state.get(n, {})) for n in layout.names)) - keys
    if partial:
        raise TrajectoryError(f"{path}: optimizer state {sorted(partial)} recorded for some "
                              "parameters only; the run's optimizer state is inconsistent")
    return {k: torch.cat([state[n][k].reshape(-1).to(device=device, dtype=torch.float64)
                          for n in layout.names]) for k in keys}


def _relative_error(predicted: torch.Tensor, recorded: torch.Tensor, recorded_values: torch.Tensor,
                    dtype: torch.dtype) -> float:
    """‖predicted − recorded‖ / ‖recorded‖, not counting what the record's own rounding explains.

    torch's in-place update in the training dtype rounds twice per element (the scaled operand and
    the result; AdamW's factor 1 − lr·λ is itself rounded), so the recorded difference is only known
    to about two units in the last place (ulp) of the stored values. A float32 run that steps by a
    few ulp(θ) (the tail of a cosine schedule) would otherwise show its rounding, not a modelling
    error. In float64 the allowance is ~4e-16 relative to θ and changes nothing measurable.
    """
    stored = recorded_values.to(dtype).abs()
    ulp = (torch.nextafter(stored, torch.full_like(stored, torch.inf)) - stored).to(torch.float64)
    allowance = ROUNDINGS_PER_UPDATE * ulp
    excess = ((predicted - recorded).abs() - allowance).clamp_min(0).norm()
    scale = recorded.norm()
    return float(excess / scale) if scale > 0 else float(excess)


def _row_mapping(run: Run, subset: torch.Tensor | None, group_by: str | None):
    """(row_of, train_index, train_label, group) for full, partial and grouped audits."""
    y = run.dataset.y_train
    m = len(y)
    audited = torch.arange(m) if subset is None else subset
    row_of = torch.full((m,), -1, dtype=torch.int64)
    if group_by == "label":
        groups = torch.unique(y[audited])
        row_of[audited] = torch.searchsorted(groups, y[audited])
        return row_of, audited, y[audited], groups
    row_of[audited] = torch.arange(len(audited))
    return row_of, audited, y[audited], None


def replay(args: ReplayArguments, *, progress: bool = True) -> ReplaySummary:
    out = Path(args.out)
    check_writable(out, args.overwrite)
    run = load_run(args.ckpts)
    steps = run.steps
    if run.manifest.get("checkpoint_every", 1) != 1:
        raise TrajectoryError(f"{run.path}: checkpoints every {run.manifest['checkpoint_every']} steps; "
                              "this plgk replays stride-1 trajectories only")
    total = steps[-1]
    if total == 0:
        raise TrajectoryError(f"{run.path}: only step 0 is recorded; there is no update to audit")
    data = run.dataset
    audit_set = resolve_audit_set(args.audit_set, data)
    subset = resolve_train_subset(args.train_subset, len(data.y_train))
    device = resolve_device(args.device, where="--device")

    # Gradients in the training dtype (what training computed); adjoints, coefficients, the
    # update check and every accumulator in float64, where sums over steps would drift.
    compute = run.dtype
    model = run.build_model().to(device=device, dtype=compute)
    layout = ParameterLayout.of(model)
    gradients = GradientComputer(model, layout, data.num_classes, args.chunk_size)
    decomposition = run.decomposition
    x_train = data.x_train.to(device=device, dtype=compute)
    y_train = data.y_train.to(device)
    x_audit = audit_set.x.to(device=device, dtype=compute)
    y_audit = audit_set.y.to(device)
    n_audit, targets = len(y_audit), args.targets
    q = gradients.target_columns(targets)
    row_of, train_index, train_label, group = _row_mapping(run, subset, args.group_by)
    num_rows = len(group) if group is not None else len(train_index)
    epochs = run.epoch_of(total - 1) + 1
    acc = AuditAccumulator(row_of, num_rows, n_audit * q, total, epochs, layout.layers, device)

    def theta_of(ck):
        return layout.flatten(ck.params, device=device)

    def audit_side(theta):
        values, grads = gradients.audit_gradients(theta.to(compute), x_audit, y_audit, targets)
        f64 = torch.float64
        return values.reshape(-1).to(f64), grads.reshape(n_audit * q, -1).T.to(f64)  # (NQ,), (P, NQ)

    sub_intervals = args.quadrature_points
    boundaries = list(range(0, total, args.stride)) + [total]
    values_at = {}
    update_error = np.zeros(total)

    ck_next = run.checkpoint(total)
    theta_end = theta_of(ck_next)
    values_at[total], a_end = audit_side(theta_end)
    w = torch.zeros(layout.size, n_audit * q, dtype=torch.float64, device=device)
    decay_next = 0.0
    bar = tqdm(total=total, desc="replay", unit="step", disable=not progress, dynamic_ncols=True)
    for seg_start, seg_end in reversed(list(zip(boundaries, boundaries[1:]))):
        ck_start = run.checkpoint(seg_start)
        theta_start = theta_of(ck_start)
        values_at[seg_start], a_start = audit_side(theta_start)
        h = _quadrature(sub_intervals, a_start, a_end, theta_start, theta_end, audit_side)
        for t in range(seg_end - 1, seg_start - 1, -1):
            ck = ck_start if t == seg_start else run.checkpoint(t)
            theta_t = theta_of(ck)
            theta_next = theta_of(ck_next)
            before = flat_state(layout, ck.optim_state, f"{run.path}/step_{t:08d}", device)
            after = flat_state(layout, ck_next.optim_state, f"{run.path}/step_{t + 1:08d}", device)
            batch = ck_next.batch.to(device)
            lr, clip, step_after = ck_next.lr, ck_next.clip_coef, ck_next.optim_step

            coeffs = decomposition.coefficients(before, after, lr, clip, step_after)
            w, v = coeffs.adjoint(w, decay_next, h)
            decay_next = coeffs.decay

            audited = batch[acc.row_of[batch] >= 0]
            g, _ = gradients.loss_gradients(theta_t.to(compute), x_train[audited], y_train[audited])
            g = g.to(torch.float64)
            if len(audited) == len(batch):
                batch_grad = g.sum(0) / len(batch)
            else:  # partial audit: the update still saw the whole batch
                batch_grad = gradients.mean_loss_gradient(theta_t.to(compute), x_train[batch],
                                                          y_train[batch]).to(torch.float64)
            acc.add_samples(audited, g, clip / len(batch), v, run.epoch_of(t))
            acc.add_residual(coeffs.residual(theta_t, v, h))

            delta, predicted_state, _ = decomposition.simulate(before, theta_t, batch_grad, lr, clip,
                                                               step_after)
            recorded_delta = theta_next - theta_t
            errors = [_relative_error(delta, recorded_delta, theta_next, run.dtype)]
            errors += [_relative_error(predicted_state[k], after[k], after[k], run.dtype)
                       for k in predicted_state if k in after]
            update_error[t] = max(errors)
            acc.record_step(t, recorded_delta, h, update_error[t])
            ck_next = ck
            bar.update(1)
        theta_end, a_end = theta_start, a_start
    bar.close()

    results = _target_results(acc, values_at, boundaries, targets, n_audit, gradients.num_classes,
                              complete=subset is None)
    write_influences(
        out, arguments=args.to_dict(), manifest=run.manifest, rule=args.rule, targets=list(targets),
        train_index=train_index.numpy(), train_label=train_label.numpy(),
        group=None if group is None else group.numpy(),
        audit_index=None if audit_set.index is None else audit_set.index.numpy(),
        audit_split=audit_set.split, audit_source=audit_set.source, audit_label=audit_set.y.numpy(),
        results=results, update_error=update_error, layers=[name for name, _ in layout.layers],
        complete_audit=subset is None, overwrite=args.overwrite)
    metrics = {r.name: {"mre": r.mre, "lc": r.lc, "rmre": r.rmre, "attribution_gap": r.attribution_gap}
               for r in results}
    return ReplaySummary(out, metrics, float(update_error.max()), total)


def _quadrature(sub_intervals: int, a_start, a_end, theta_start, theta_end, audit_side):
    """h over the segment: euler (0), or the composite trapezoid on `sub_intervals` pieces."""
    if sub_intervals == 0:
        return a_start
    h = 0.5 * (a_start + a_end)
    for j in range(1, sub_intervals):
        theta = theta_start + (j / sub_intervals) * (theta_end - theta_start)
        h = h + audit_side(theta)[1]
    return h / sub_intervals


def _target_results(acc: AuditAccumulator, values_at: dict, boundaries: list, targets: tuple,
                    n_audit: int, num_classes: int, complete: bool) -> list:
    q = sum(num_classes if t == "logits" else 1 for t in targets)
    cols = lambda x: x.reshape(*x.shape[:-1], n_audit, q)  # noqa: E731 (columns -> (N, Q))
    values = torch.stack([values_at[b] for b in boundaries])  # (K, N*Q)
    true_change = values - values[0]
    steps_done = torch.cumsum(acc.step_change, 0)
    reconstructed = torch.cat([torch.zeros_like(values[:1]), steps_done[[b - 1 for b in boundaries[1:]]]])
    attributed = acc.influence.sum(0) + acc.residual
    results, offset = [], 0
    for target in targets:
        width = num_classes if target == "logits" else 1
        sl = slice(offset, offset + width)
        offset += width

        def pick(x, sl=sl, width=width):
            y = cols(x)[..., sl].cpu().numpy()
            return y if width > 1 else y[..., 0]

        metrics = completeness(cols(attributed)[..., sl].reshape(-1), cols(true_change[-1])[..., sl].reshape(-1))
        gap = (cols(attributed - steps_done[-1])[..., sl]).abs().max() / \
            max(float(cols(steps_done[-1])[..., sl].abs().max()), 1e-300)
        results.append(TargetResult(
            name=target, influence=pick(acc.influence), residual=pick(acc.residual),
            initial=pick(values[0]), final=pick(values[-1]), trace_step=np.array(boundaries),
            trace_true_change=pick(true_change), trace_reconstructed=pick(reconstructed),
            layer_epoch_signed=pick(acc.layer_epoch_signed), layer_epoch_abs=pick(acc.layer_epoch_abs),
            mre=metrics.mre, lc=metrics.lc, rmre=metrics.rmre,
            attribution_gap=float(gap) if complete else float("nan")))
    return results
