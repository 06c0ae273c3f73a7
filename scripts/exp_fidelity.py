"""Paper A.11 / Table 4: fidelity of the audit (trapezoid, euler, adaptive) against TracIn on one run.

On the recorded config (default configs/demo.toml), for the audit set test[0:N]:
- plgk replay with the rules trapezoid, euler, adaptive (tolerance 3e-3) and adaptive:1e-2
  (--rules): MRE, LC (paper eqs. 22-23) and wall time;
- TracIn, implemented here with a checkpoint at every step (the record's θ_{t-1}, minibatch B_t,
  learning rate lr_t): influence[m, n] = −Σ_{t: m∈B_t} lr_t/|B_t| g(m, θ_{t-1})·g(n, θ_{t-1}),
  the minus sign matching plgk's convention (negative = pushed the audited loss down), in two
  variants: the last layer only (as in the TracIn paper) and all layers (≈ in-run data Shapley's
  first-order term). Its reconstruction Σ_m influence[m, n] is scored with the same MRE/LC
  against the true loss change L(θ_T) − L(θ_0) that the audit uses.
- TRAK (the `traker` package, paper A.12), with traker's default image-classification output
  (the margin log p/(1−p)), the CPU BasicProjector (normal entries; traker's CUDA projector
  fast_jl needs a GPU), float32 and --trak-proj-dim (default 64, the value scripts/exp_lds.py
  chose on its development subsets; traker's 2048 exceeds the 1438 training rows, so its XᵀX
  would be singular): on θ_T of the run (1 checkpoint) and on 5 checkpoints of the same run
  (steps T/5, 2T/5, …, T: TRAK's ensemble over checkpoints). τ[m, n] > 0 means m raises n's
  margin, i.e. lowers its loss, so the reconstruction scored is Σ_m −τ[m, n] against the same
  true loss change. traker rescales (XᵀX)⁻¹ by its mean absolute entry, so the absolute scale of
  τ (and with it the MRE) is traker's choice; LC does not depend on it.

    python scripts/exp_fidelity.py
    python scripts/exp_fidelity.py --quick
"""

from __future__ import annotations

import argparse
import time

import exp_common as C
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from plgk_cli import trajectory
from plgk_cli.arguments import ReplayArguments
from plgk_cli.audit import completeness
from plgk_cli.models import build_model
from plgk_cli.replay import replay
from plgk_cli.store import InfluenceFile


def tracin(run, x_audit, y_audit, last_layer_only: bool):
    """TracIn-CP with every step as a checkpoint; returns (M, N) influence (float64)."""
    manifest = trajectory.read_manifest(run)
    d = manifest["dataset"]
    data = C.load_run_data(run)
    model = build_model(manifest["model"]["name"], manifest["model"]["kwargs"], tuple(d["in_shape"]), d["num_classes"])
    names = [n for n, _ in model.named_parameters()]
    tracked = names[-2:] if last_layer_only else names  # the last Linear: weight, bias
    influence = torch.zeros(len(data.y_train), len(y_audit), dtype=torch.float64)

    def per_sample(params, x1, y1):
        def loss(p_tr):
            return F.cross_entropy(functional_call(model, {**params, **p_tr}, (x1[None],)), y1[None])
        g = grad(loss)({n: params[n] for n in tracked})
        return torch.cat([g[n].reshape(-1) for n in tracked])

    for t in range(1, manifest["total_steps"] + 1):
        prev = trajectory.read_checkpoint(run, t - 1)
        rec = trajectory.read_checkpoint(run, t)
        params = {k: v.to(torch.float32) for k, v in prev.params.items()}
        batch = rec.batch.long()
        g_train = vmap(per_sample, in_dims=(None, 0, 0))(params, data.x_train[batch], data.y_train[batch])
        g_audit = vmap(per_sample, in_dims=(None, 0, 0))(params, x_audit, y_audit)
        scale = rec.lr * rec.clip_coef / len(batch)
        influence.index_add_(0, batch, -scale * (g_train.double() @ g_audit.double().T))
    return influence


def main(argv=None) -> int:
    p = C.common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--audit-n", type=int, default=None, help="audit set test[0:N] (default 64; quick 8)")
    p.add_argument("--rules", nargs="*", default=["trapezoid", "euler", "adaptive", "adaptive:1e-2"])
    p.add_argument("--trak-proj-dim", type=int, default=64, help="TRAK's projection dimension")
    args = p.parse_args(argv)
    out = C.out_dir(args)
    config = C.make_config(args)
    audit_n = args.audit_n or (8 if args.quick else 64)
    run = C.base_run(config, out)
    rows, true_change = [], None
    for rule in args.rules:
        h5 = out / f"fidelity-{run.name}-{rule.replace(':', '')}-audit{audit_n}.h5"
        t0 = time.perf_counter()
        s = replay(ReplayArguments(ckpts=str(run), audit_set=f"test[0:{audit_n}]", out=str(h5), device="cpu",
                                   overwrite=True, rule=rule), progress=False)
        secs = time.perf_counter() - t0
        with InfluenceFile(h5) as f:
            true_change = f.array("loss", "final") - f.array("loss", "initial")
        m = s.metrics["loss"]
        rows.append({"method": f"Audit ({rule})", "mre": m["mre"], "rmre": m["rmre"], "lc": m["lc"], "time_s": secs})
        print(f"[{rule}: {secs:.0f}s]", flush=True)
    data = C.load_run_data(run)
    x_a, y_a = data.x_test[:audit_n], data.y_test[:audit_n]
    true_t = torch.as_tensor(true_change, dtype=torch.float64)
    for last, label in ((True, "TracIn (last layer)"), (False, "TracIn (all layers)")):
        t0 = time.perf_counter()
        infl = tracin(run, x_a, y_a, last)
        secs = time.perf_counter() - t0
        m = completeness(infl.sum(0), true_t)
        rows.append({"method": label, "mre": m.mre, "rmre": m.rmre, "lc": m.lc, "time_s": secs})
        print(f"[{label}: {secs:.0f}s]", flush=True)

    import numpy as np
    from exp_lds import trak_scores
    total = trajectory.read_manifest(run)["total_steps"]
    steps = sorted({int(s) for s in np.linspace(total / 5, total, 5).round()} - {0})
    model = C.final_model(run)
    trak_rows = [([total], "TRAK (1 ckpt: θ_T)")] + ([(steps, f"TRAK ({len(steps)} ckpts of the run)")]
                                                       if len(steps) > 1 else [])  # a run of < 2 updates: θ_T only
    for ckpts, label in trak_rows:
        t0 = time.perf_counter()
        states = [{k: v.to(torch.float32) for k, v in trajectory.read_checkpoint(run, t).params.items()} for t in ckpts]
        tau = trak_scores(model, states, data, x_a, y_a, args.trak_proj_dim, out / "fidelity-trak", C.Stopwatch(),
                          [len(states)])[len(states)]
        secs = time.perf_counter() - t0
        m = completeness(torch.as_tensor(-tau, dtype=torch.float64).sum(0), true_t)
        rows.append({"method": label, "mre": m.mre, "rmre": m.rmre, "lc": m.lc, "time_s": secs, "steps": ckpts})
        print(f"[{label}: {secs:.0f}s]", flush=True)

    print(f"\nTable 4 analogue ({run.name}, audit test[0:{audit_n}]; true loss change mean "
          f"{float(true_t.mean()):+.4f}, mean |.| {float(true_t.abs().mean()):.4f})")
    print(f"{'Method':<22} {'MRE':>10} {'rel. MRE':>9} {'LC':>10} {'time (s)':>9}")
    for r in rows:
        print(f"{r['method']:<22} {r['mre']:>10.3e} {r['rmre']:>9.2e} {r['lc']:>10.6f} {r['time_s']:>9.1f}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [r["method"] for r in rows]
    axes[0].bar(names, [r["mre"] for r in rows])
    axes[0].set_yscale("log")
    axes[0].set_title("MRE (lower is better)")
    axes[1].bar(names, [r["lc"] for r in rows])
    axes[1].set_title("LC (higher is better)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30, labelsize=7)
    fig.tight_layout()
    png = out / "fidelity.png"
    fig.savefig(png, dpi=120)
    print(f"[wrote {png}]")
    C.save_json(out / "fidelity.json", {"command": C.command_line(), "run": str(run), "audit_n": audit_n,
                                        "rows": rows, "trak_proj_dim": args.trak_proj_dim})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
