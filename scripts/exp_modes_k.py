"""Paper Table 3: energy concentration of the training-gradient modes, standard vs PGD-AT.

K@X% = the number of SVD modes of Φ_train(T) (rows: per-example loss gradients at the final
checkpoint) that capture X% of its energy ‖Φ‖_F², read from replay --modes K
(/modes/step_XXXXXXXX attrs k_at_90/95/99; -1 = not reached within K modes).

Standard model: the recorded config (default configs/demo.toml). PGD-AT model: the same
architecture, optimizer, seeds and batches, trained with a plain PyTorch loop on L∞ PGD
adversarial versions of each minibatch (Madry et al.) and recorded with plgk_cli.recorder.Recorder.
(Its loss is not the clean cross-entropy that replay re-derives, so its audit reports a large
update error; the modes only use θ_T and the clean training gradients, which are exact.)

    python scripts/exp_modes_k.py
    python scripts/exp_modes_k.py --quick
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import exp_common as C
from plgk_cli import trajectory
from plgk_cli.arguments import ReplayArguments
from plgk_cli.data import load_dataset
from plgk_cli.models import build_model
from plgk_cli.recorder import Recorder
from plgk_cli.replay import replay
from plgk_cli.store import InfluenceFile
from plgk_cli.train import Schedule, build_optimizer


def train_pgd_at(config, run: Path, eps: float, step: float, iters: int) -> Path:
    if (run / trajectory.MANIFEST).is_file() and trajectory.read_manifest(run).get("complete"):
        return run
    import shutil
    shutil.rmtree(run, ignore_errors=True)
    data = load_dataset(config.data.dataset, config.data.seed, torch.float32)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model.name, config.model.kwargs, data.in_shape, data.num_classes)
    optimizer = build_optimizer(config, model)
    m = len(data.y_train)
    bs = min(config.train.batch_size, m)
    total = config.train.epochs * -(-m // bs)
    gen = torch.Generator().manual_seed(config.train.seed)
    schedule = Schedule(config, optimizer, total)
    with Recorder(run, model, optimizer, model_name=config.model.name, model_kwargs=config.model.kwargs,
                  dataset=data, data_seed=config.data.seed, batch_size=bs, epochs=config.train.epochs) as rec:
        for _ in range(config.train.epochs):
            for batch in torch.randperm(m, generator=gen).split(bs):
                schedule.before_update(rec.step_count)
                x_adv = C.pgd(model, data.x_train[batch], data.y_train[batch], eps, step, iters,
                              seed=rec.step_count)
                optimizer.zero_grad(set_to_none=True)
                logits = model(x_adv)
                loss = F.cross_entropy(logits, data.y_train[batch])
                loss.backward()
                optimizer.step()
                schedule.after_update()
                rec.step(batch, loss, logits)
    return run


def main(argv=None) -> int:
    p = C.common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--modes", type=int, default=None, help="K modes (default 100; quick 10)")
    p.add_argument("--audit-n", type=int, default=None, help="audit set test[0:N] (default 16; quick 4)")
    p.add_argument("--eps", type=float, default=0.15, help="PGD L∞ radius (training and evaluation)")
    p.add_argument("--step", type=float, default=0.03)
    p.add_argument("--iters", type=int, default=None, help="PGD-AT iterations (default 7; quick 2)")
    p.add_argument("--eval-iters", type=int, default=40)
    args = p.parse_args(argv)
    out = C.out_dir(args)
    config = C.make_config(args)
    k = args.modes or (10 if args.quick else 100)
    audit_n = args.audit_n or (4 if args.quick else 16)
    iters = args.iters or (2 if args.quick else 7)

    t0 = time.perf_counter()
    runs = {"Standard": C.base_run(config, out)}
    at = out / "runs" / f"{C.config_tag(config)}-pgdat-eps{args.eps}-it{iters}"
    runs["PGD-AT"] = train_pgd_at(config, at, args.eps, args.step, iters)
    print(f"[runs ready in {time.perf_counter() - t0:.0f}s]", flush=True)
    data = C.load_run_data(runs["Standard"])
    x_eval, y_eval = data.x_test[audit_n:], data.y_test[audit_n:]
    res = {}
    for name, run in runs.items():
        model = C.final_model(run)
        x_adv = C.pgd(model, x_eval, y_eval, args.eps, args.eps / 8, args.eval_iters, seed=0)
        h5 = out / f"modes-{run.name}-K{k}.h5"
        t1 = time.perf_counter()
        replay(ReplayArguments(ckpts=str(run), audit_set=f"test[0:{audit_n}]", out=str(h5), device="cpu",
                               overwrite=True, modes=k,
                               # trained on PGD examples, not the recorded rows: the audit is not
                               # this run's, only the modes at the reference checkpoint are used
                               max_update_error=1e300), progress=False)  # no gate (the option must be finite)
        with InfluenceFile(h5) as f:
            mode_name = f.modes[-1]
            attrs = f.mode_attrs(mode_name)
            curve = f.mode(mode_name, "energy_curve")
        res[name] = {"k90": int(attrs["k_at_90"]), "k95": int(attrs["k_at_95"]), "k99": int(attrs["k_at_99"]),
                     "total_energy": float(attrs["total_energy"]), "energy_curve": np.asarray(curve).tolist(),
                     "clean_acc": C.accuracy(model, x_eval, y_eval), "robust_acc": C.accuracy(model, x_adv, y_eval),
                     "replay_s": time.perf_counter() - t1, "run": str(run)}
        print(f"[{name}: replay --modes {k} in {res[name]['replay_s']:.0f}s]", flush=True)

    def fmt(v):
        return f">{k}" if v < 0 else str(v)

    print(f"\nTable 3 analogue: energy concentration of Φ_train(T) ({C.config_tag(config)}, K={k} modes; "
          f"PGD eps={args.eps}, AT {iters} iters)")
    print(f"{'':<10} {'Standard':>9} {'PGD-AT':>9} {'Ratio':>7}")
    for key, label in (("k90", "K@90%"), ("k95", "K@95%"), ("k99", "K@99%")):
        a, b = res["Standard"][key], res["PGD-AT"][key]
        ratio = f"{b / a:.1f}x" if a > 0 and b > 0 else "n/a"
        print(f"{label:<10} {fmt(a):>9} {fmt(b):>9} {ratio:>7}")
    print(f"{'clean acc':<10} {res['Standard']['clean_acc']:>9.3f} {res['PGD-AT']['clean_acc']:>9.3f}")
    print(f"{'PGD acc':<10} {res['Standard']['robust_acc']:>9.3f} {res['PGD-AT']['robust_acc']:>9.3f}   "
          f"(test[{audit_n}:], eps={args.eps}, {args.eval_iters} iters)")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in res:
        c = res[name]["energy_curve"]
        ax.plot(np.arange(1, len(c) + 1), c, label=name)
    for level in (0.9, 0.95, 0.99):
        ax.axhline(level, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("modes K")
    ax.set_ylabel("captured energy fraction")
    ax.set_xscale("log")
    ax.legend()
    ax.set_title("Φ_train(T) energy vs modes")
    fig.tight_layout()
    png = out / "modes_k.png"
    fig.savefig(png, dpi=120)
    print(f"[wrote {png}]")
    C.save_json(out / "modes_k.json", {"command": C.command_line(), "modes": k, "eps": args.eps,
                                       "at_iters": iters, "results": res})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
