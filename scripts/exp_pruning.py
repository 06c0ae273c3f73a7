"""Paper A.4 (data pruning) on the bundled digits (or MNIST with --mnist DIR).

1. Train and record the config (default configs/demo.toml: digits CNN, Adam lr 1e-2, 10 epochs).
2. Audit the whole training set's influence on the loss of test[0:A] (A = --audit-n, default 180)
   with --rule (default adaptive: the ranking uses every s_m, so the audit should be accurate).
3. Score each training example m by s_m = Σ_n influence[m, n] (negative = helped the audit loss
   down) and a_m = Σ_n |influence[m, n]|. Pruning strategies, each dropping p% of the training set
   (A.4 lists them by name only; the reading of each name is ours):
     least-sum      drop the p% with the smallest |s_m|: "cutting the least influential data
                    (audit influence, by sum)" of A.4 (Figure 21).
     least-abs      drop the p% with the smallest a_m (A.4's "abs sum" variant).
     least-abs-cb   least-abs within each class (p% of every class): A.4's class-balanced variant.
     random         drop p% at random (selection seed s).
     most-harmful   drop the p% with the largest s_m (the audit's most harmful: A.4 "the most
                    harmful data", left out of Figure 21 for "very low performance").
     most-helpful   drop the p% with the smallest s_m (Figure 22's "helpful").
     most-abs       drop the p% with the largest a_m (Figure 22's "most influential, abs sum").
4. Retrain from scratch on the kept rows with training seeds 0..S-1 (--seeds S, default 5: init
   and shuffles; random pruning pairs selection seed s with training seed s) and report the
   accuracy on the held-out rest of the test split, test[A:] (never audited), as mean ± sd over
   the seeds, and each strategy's paired difference to random (mean ± standard error over the
   seeds; seed s of a strategy against random seed s).
   Two budgets (--budget): "steps" keeps the number of optimizer updates of the full run (the
   epochs over a pruned set are repeated until the count is reached), "epochs" keeps the epochs
   (so p% pruning also cuts p% of the updates), as `plgk train` of the pruned config would.

For every pruned set the script writes an npz dataset (kept training rows, original test rows)
and a TOML config pointing at it under OUT/pruning/, so any epochs-budget row can be re-run with
`plgk train`. The retrain itself follows `plgk train`'s loop exactly (seed, init, shuffles, lr)
without writing checkpoints (--retrain plgk records it with `plgk train` instead: epochs budget
only, same numbers, much slower).

    python scripts/exp_pruning.py                      # digits, demo config
    python scripts/exp_pruning.py --quick              # smoke test
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import exp_common as C
import numpy as np
import torch

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


STRATEGIES = ("least_sum", "least_abs", "least_abs_cb", "random", "most_harmful", "most_helpful", "most_abs")
LABELS = {"least_sum": "least |sum|", "least_abs": "least abs-sum", "least_abs_cb": "least abs, cl-bal",
          "random": "random", "most_harmful": "most harmful", "most_helpful": "most helpful",
          "most_abs": "most abs-sum"}


def class_balanced_smallest(score: np.ndarray, labels: np.ndarray, frac: float) -> np.ndarray:
    """The round(frac * n_c) rows of smallest score within each class c."""
    drop = []
    for c in np.unique(labels):
        rows = np.nonzero(labels == c)[0]
        drop.append(rows[np.argsort(score[rows], kind="stable")[:round(frac * len(rows))]])
    return np.concatenate(drop)


def main(argv=None) -> int:
    p = C.common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--audit-n", type=int, default=None, help="audit set = test[0:N] (default 180; quick 16)")
    p.add_argument("--rule", default="adaptive", help="replay's quadrature rule for the audit")
    p.add_argument("--fractions", type=float, nargs="*", default=[0.1, 0.3, 0.5])
    p.add_argument("--seeds", type=int, default=5, help="training seeds 0..S-1 (and random-pruning seeds)")
    p.add_argument("--budget", nargs="*", choices=["steps", "epochs"], default=["steps", "epochs"],
                   help="retrain with the full run's number of updates, or with its epochs")
    p.add_argument("--retrain", choices=["plain", "plgk"], default="plain")
    args = p.parse_args(argv)
    out = C.out_dir(args)
    config = C.make_config(args)
    audit_n = args.audit_n or (16 if args.quick else 180)
    seeds = list(range(2 if args.quick and args.seeds == 5 else args.seeds))
    if args.retrain == "plgk" and (args.budget != ["epochs"] or seeds != [0]):
        p.error("--retrain plgk needs --budget epochs --seeds 1 (plgk train has no steps budget)")

    run = C.base_run(config, out)
    data = C.load_run_data(run)
    x_eval, y_eval = data.x_test[audit_n:], data.y_test[audit_n:]
    h5 = out / f"pruning-{run.name}-{args.rule.replace(':', '')}-audit{audit_n}.h5"
    t0 = time.perf_counter()
    if not h5.is_file():
        replay(ReplayArguments(ckpts=str(run), audit_set=f"test[0:{audit_n}]", out=str(h5), device="cpu",
                               overwrite=True, rule=args.rule), progress=False)
    audit_s = time.perf_counter() - t0
    with InfluenceFile(h5) as f:
        infl = f.influence("loss").astype(np.float64)  # (M, N)
        metrics = f.metrics("loss")
        train_index = f.train_index
    print(f"audit of test[0:{audit_n}] over {infl.shape[0]} training examples (rule {args.rule}): "
          f"MRE {metrics['mre']:.2e} LC {metrics['lc']:.6f} ({audit_s:.0f}s)")
    score = np.zeros(len(data.y_train))
    score_abs = np.zeros(len(data.y_train))
    score[train_index] = infl.sum(1)
    score_abs[train_index] = np.abs(infl).sum(1)
    m = len(score)
    full_steps = C.steps_of(config, m)

    base = C.retrain(config, data)
    full_test = C.accuracy(base, data.x_test, data.y_test)
    recorded = C.trajectory.read_manifest(run)["final"]["test_accuracy"]
    print(f"retrain check: unrecorded retrain on all rows gives full-test accuracy {full_test:.4f}, "
          f"the recorded run {recorded:.4f}")
    t_retrain = time.perf_counter()
    no_pruning = C.mean_sd_se([C.accuracy(C.retrain(config, data, seed=s), x_eval, y_eval) for s in seeds])

    pdir = out / "pruning" / run.name
    pdir.mkdir(parents=True, exist_ok=True)

    def write_set(name: str, keep: np.ndarray) -> None:
        npz = pdir / f"{name}.npz"
        np.savez(npz, x_train=data.x_train[keep].numpy(), y_train=data.y_train[keep].numpy(),
                 x_test=data.x_test.numpy(), y_test=data.y_test.numpy())
        (pdir / f"{name}.toml").write_text(toml_for(config, npz.resolve()))

    def evaluate(name: str, keep: np.ndarray, seed: int, budget: str) -> float:
        if args.retrain == "plgk":
            from plgk_cli.config import load_config
            from plgk_cli.data import load_dataset
            cfg = load_config(pdir / f"{name}.toml")
            rd = pdir / f"{name}-run"
            import shutil
            shutil.rmtree(rd, ignore_errors=True)
            C.train(cfg, rd, progress=False)
            model = C.final_model(rd)
            d2 = load_dataset(f"npz:{(pdir / f'{name}.npz').resolve()}", cfg.data.seed, torch.float32)
            return C.accuracy(model, d2.x_test[audit_n:], d2.y_test[audit_n:])
        model = C.retrain(config, data, keep, seed=seed, total_steps=full_steps if budget == "steps" else None)
        return C.accuracy(model, x_eval, y_eval)

    order = np.argsort(score, kind="stable")  # most helpful (most negative) first
    labels = data.y_train.numpy()
    tables = {}
    for budget in args.budget:
        rows = []
        for frac in args.fractions:
            k = round(frac * m)
            tag = f"p{round(frac * 100)}"
            drops = {"least_sum": np.argsort(np.abs(score), kind="stable")[:k],
                     "least_abs": np.argsort(score_abs, kind="stable")[:k],
                     "least_abs_cb": class_balanced_smallest(score_abs, labels, frac),
                     "most_harmful": order[::-1][:k], "most_helpful": order[:k],
                     "most_abs": np.argsort(score_abs, kind="stable")[::-1][:k]}
            r = {"p": frac, "dropped": k, "kept": m - k,
                 "updates": full_steps if budget == "steps" else C.steps_of(config, m - k)}
            for name, drop in drops.items():
                keep = np.setdiff1d(np.arange(m), drop)
                write_set(f"{name.replace('_', '-')}-{tag}", keep)
                r[name] = C.mean_sd_se([evaluate(f"{name.replace('_', '-')}-{tag}", keep, s, budget) for s in seeds])
                r[name]["dropped"] = len(drop)
            rand = []
            for s in seeds:
                keep = np.setdiff1d(np.arange(m), np.random.default_rng(s).permutation(m)[:k])
                write_set(f"random{s}-{tag}", keep)
                rand.append(evaluate(f"random{s}-{tag}", keep, s, budget))
            r["random"] = C.mean_sd_se(rand)
            r["minus_random"] = {name: C.mean_sd_se(np.subtract(r[name]["all"], rand))  # paired by seed
                                 for name in drops}
            rows.append(r)
            print(f"  {budget} budget, p={frac:.0%} done", flush=True)
        tables[budget] = rows
    retrain_s = time.perf_counter() - t_retrain

    print(f"\nData pruning (paper A.4): {run.name}, audit test[0:{audit_n}], accuracy on test[{audit_n}:] "
          f"({len(y_eval)} points), mean ± sd over training seeds {seeds}; no pruning: "
          f"{no_pruning['mean']:.4f} ± {no_pruning['sd']:.4f}")
    for budget, rows in tables.items():
        what = f"the full run's {full_steps} updates" if budget == "steps" else "the config's epochs"
        print(f"budget: {what}")
        print(f"{'p':>5} " + " ".join(f"{LABELS[s]:>17}" for s in STRATEGIES))
        for r in rows:
            print(f"{r['p']:>5.0%} " + " ".join(f"{r[s]['mean']:>10.4f}±{r[s]['sd']:.4f}" for s in STRATEGIES))
            print(f"{'−rand':>5} " + " ".join(f"{'':>17}" if s == "random" else
                                             f"{r['minus_random'][s]['mean']:>+10.4f}±{r['minus_random'][s]['se']:.4f}"
                                             for s in STRATEGIES) + "  (paired, ± se)")
        for s in ("least_sum", "least_abs", "least_abs_cb"):
            verdict = ", ".join(f"{r['p']:.0%}: {'yes' if r['minus_random'][s]['mean'] > 0 else 'no'} "
                                f"({r['minus_random'][s]['mean']:+.3f} ± {r['minus_random'][s]['se']:.3f} se)"
                                for r in rows)
            print(f"Does pruning by {LABELS[s]} beat random? {verdict}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(tables), figsize=(5 * len(tables), 3.5), squeeze=False)
    for ax, (budget, rows) in zip(axes[0], tables.items()):
        ps = [0] + [r["p"] * 100 for r in rows]
        for s, fmt in zip(STRATEGIES, ("o-", "s-", "D-", "^--", "v:", "<:", ">:")):
            ax.errorbar(ps, [no_pruning["mean"]] + [r[s]["mean"] for r in rows],
                        yerr=[no_pruning["sd"]] + [r[s]["sd"] for r in rows], fmt=fmt, capsize=3, label=LABELS[s])
        ax.set_xlabel("training data pruned (%)")
        ax.set_ylabel(f"test accuracy (test[{audit_n}:])")
        ax.set_title(f"pruning by audit influence ({budget} budget, {len(seeds)} seeds)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = out / "pruning.png"
    fig.savefig(png, dpi=120)
    print(f"[wrote {png}]")
    C.save_json(out / "pruning.json", {"command": C.command_line(), "run": str(run), "audit_n": audit_n,
                                       "rule": args.rule, "audit_mre": metrics["mre"], "audit_lc": metrics["lc"],
                                       "audit_s": audit_s, "retrain_s": retrain_s, "seeds": seeds,
                                       "full_updates": full_steps, "no_pruning": no_pruning,
                                       "retrain_full_test": full_test, "recorded_full_test": recorded,
                                       "tables": tables})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
