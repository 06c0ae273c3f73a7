"""Paper A.4 (data pruning) on the bundled digits (or MNIST with --mnist DIR).

1. Train and record the config (default configs/demo.toml: digits CNN, Adam, 5 epochs).
2. Audit the whole training set's influence on the loss of test[0:A] (A = --audit-n, default 180).
3. Score each training example m by s_m = Σ_n influence[m, n] (negative = helped the audit loss
   down). Pruning strategies, each dropping p% of the training set:
     least-sum   drop the p% with the largest s_m: the least helpful (incl. harmful) ones; the
                 most helpful are kept. This is "cutting the least influential (by sum)" of A.4.
     least-abs   drop the p% with the smallest Σ_n |influence[m, n]| (A.4's "abs sum" variant).
     random      drop p% at random (5 seeds: mean ± sd).
     most-sum    drop the p% with the smallest s_m: the most helpful ones.
4. Retrain from scratch with the same config on the kept rows and report the accuracy on the
   held-out rest of the test split, test[A:] (never audited, so the selection cannot overfit it).

For every pruned set the script writes an npz dataset (kept training rows, original test rows)
and a TOML config pointing at it under OUT/pruning/, so any row can be re-run with `plgk train`.
The retrain itself follows `plgk train`'s loop exactly (seed, init, shuffles, lr) without writing
checkpoints (--retrain plgk records it with `plgk train` instead: same numbers, much slower).

    python scripts/exp_pruning.py                      # digits, demo config
    python scripts/exp_pruning.py --quick              # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

import exp_common as C
from plgk_cli.arguments import ReplayArguments
from plgk_cli.replay import replay
from plgk_cli.store import InfluenceFile


def toml_for(config, npz: Path) -> str:
    c = config.to_dict()
    lines = ["# written by scripts/exp_pruning.py", "[data]", f'dataset = "npz:{npz}"', f"seed = {c['data']['seed']}",
             "", "[model]", f'name = "{c["model"]["name"]}"', "", "[optim]", f'name = "{c["optim"]["name"]}"',
             f"lr = {c['optim']['lr']}", "", "[train]", f"epochs = {c['train']['epochs']}",
             f"batch_size = {c['train']['batch_size']}", f"seed = {c['train']['seed']}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = C.common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--audit-n", type=int, default=None, help="audit set = test[0:N] (default 180; quick 16)")
    p.add_argument("--fractions", type=float, nargs="*", default=[0.1, 0.3, 0.5])
    p.add_argument("--seeds", type=int, default=5, help="random-pruning seeds")
    p.add_argument("--retrain", choices=["plain", "plgk"], default="plain")
    args = p.parse_args(argv)
    out = C.out_dir(args)
    config = C.make_config(args)
    audit_n = args.audit_n or (16 if args.quick else 180)
    seeds = 2 if args.quick and args.seeds == 5 else args.seeds

    run = C.base_run(config, out)
    data = C.load_run_data(run)
    x_eval, y_eval = data.x_test[audit_n:], data.y_test[audit_n:]
    h5 = out / f"pruning-{run.name}-audit{audit_n}.h5"
    t0 = time.perf_counter()
    if not h5.is_file():
        replay(ReplayArguments(ckpts=str(run), audit_set=f"test[0:{audit_n}]", out=str(h5), device="cpu",
                               overwrite=True), progress=False)
    with InfluenceFile(h5) as f:
        infl = f.influence("loss").astype(np.float64)  # (M, N)
        metrics = f.metrics("loss")
        train_index = f.train_index
    print(f"audit of test[0:{audit_n}] over {infl.shape[0]} training examples: MRE {metrics['mre']:.2e} "
          f"LC {metrics['lc']:.6f} ({time.perf_counter() - t0:.0f}s)")
    score = np.zeros(len(data.y_train))
    score_abs = np.zeros(len(data.y_train))
    score[train_index] = infl.sum(1)
    score_abs[train_index] = np.abs(infl).sum(1)
    m = len(score)

    base = C.retrain(config, data)
    base_acc = C.accuracy(base, x_eval, y_eval)
    full_test = C.accuracy(base, data.x_test, data.y_test)
    recorded = C.trajectory.read_manifest(run)["final"]["test_accuracy"]
    print(f"retrain check: unrecorded retrain on all rows gives full-test accuracy {full_test:.4f}, "
          f"the recorded run {recorded:.4f}")

    pdir = out / "pruning" / run.name
    pdir.mkdir(parents=True, exist_ok=True)

    def evaluate(name: str, drop: np.ndarray) -> float:
        keep = np.setdiff1d(np.arange(m), drop)
        npz = pdir / f"{name}.npz"
        np.savez(npz, x_train=data.x_train[keep].numpy(), y_train=data.y_train[keep].numpy(),
                 x_test=data.x_test.numpy(), y_test=data.y_test.numpy())
        (pdir / f"{name}.toml").write_text(toml_for(config, npz.resolve()))
        if args.retrain == "plgk":
            from plgk_cli.config import load_config
            from plgk_cli.data import load_dataset
            cfg = load_config(pdir / f"{name}.toml")
            rd = pdir / f"{name}-run"
            import shutil
            shutil.rmtree(rd, ignore_errors=True)
            C.train(cfg, rd, progress=False)
            model = C.final_model(rd)
            d2 = load_dataset(f"npz:{npz.resolve()}", cfg.data.seed, torch.float32)
            return C.accuracy(model, d2.x_test[audit_n:], d2.y_test[audit_n:])
        return C.accuracy(C.retrain(config, data, keep), x_eval, y_eval)

    rows = []
    for frac in args.fractions:
        k = int(round(frac * m))
        order = np.argsort(score, kind="stable")  # most helpful (most negative) first
        r = {"p": frac, "dropped": k,
             "least_sum": evaluate(f"least-sum-p{int(frac*100)}", order[::-1][:k]),
             "least_abs": evaluate(f"least-abs-p{int(frac*100)}", np.argsort(score_abs, kind="stable")[:k]),
             "most_sum": evaluate(f"most-sum-p{int(frac*100)}", order[:k])}
        rand = [evaluate(f"random{s}-p{int(frac*100)}", np.random.default_rng(s).permutation(m)[:k])
                for s in range(seeds)]
        r["random_mean"], r["random_sd"], r["random_all"] = float(np.mean(rand)), float(np.std(rand)), rand
        r["least_minus_random"] = r["least_sum"] - r["random_mean"]
        rows.append(r)
        print(f"  p={frac:.0%} done", flush=True)

    print(f"\nData pruning (paper A.4): {run.name}, audit test[0:{audit_n}], accuracy on test[{audit_n}:] "
          f"({len(y_eval)} points), no pruning: {base_acc:.4f}")
    print(f"{'p':>5} {'least (sum)':>12} {'least (abs)':>12} {'random ±sd':>16} {'most (sum)':>11} {'least−random':>13}")
    for r in rows:
        print(f"{r['p']:>5.0%} {r['least_sum']:>12.4f} {r['least_abs']:>12.4f} "
              f"{r['random_mean']:>9.4f} ±{r['random_sd']:.4f} {r['most_sum']:>11.4f} {r['least_minus_random']:>+13.4f}")
    verdict = ", ".join(f"{r['p']:.0%}: {'yes' if r['least_sum'] > r['random_mean'] else 'no'} "
                        f"({r['least_sum']:.3f} vs {r['random_mean']:.3f})" for r in rows)
    print(f"Does pruning the least influential beat random? {verdict}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ps = [0] + [r["p"] * 100 for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ps, [base_acc] + [r["least_sum"] for r in rows], "o-", label="least influential (sum)")
    ax.plot(ps, [base_acc] + [r["least_abs"] for r in rows], "s-", label="least influential (abs sum)")
    ax.errorbar(ps, [base_acc] + [r["random_mean"] for r in rows], yerr=[0] + [r["random_sd"] for r in rows],
                fmt="^--", capsize=3, label=f"random ({seeds} seeds)")
    ax.plot(ps, [base_acc] + [r["most_sum"] for r in rows], "v:", label="most influential (sum)")
    ax.set_xlabel("training data pruned (%)")
    ax.set_ylabel(f"test accuracy (test[{audit_n}:])")
    ax.set_title("Data pruning by audit influence")
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = out / "pruning.png"
    fig.savefig(png, dpi=120)
    print(f"[wrote {png}]")
    C.save_json(out / "pruning.json", {"command": C.command_line(), "run": str(run), "audit_n": audit_n,
                                       "audit_mre": metrics["mre"], "audit_lc": metrics["lc"],
                                       "no_pruning": base_acc, "retrain_full_test": full_test,
                                       "recorded_full_test": recorded, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
