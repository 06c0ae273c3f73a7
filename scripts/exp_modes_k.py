"""Paper Table 3: energy concentration of the training-gradient modes, standard vs PGD-AT.

K@X% = the number of SVD modes of Φ_train(T) (rows: per-example loss gradients at the final
checkpoint) that capture X% of its energy ‖Φ‖_F², read from replay --modes K or --modes
auto[:ENERGY] (/modes/step_XXXXXXXX attrs k_at_90/95/99; -1 = not reached within K modes).

Standard model: the recorded config (default configs/demo.toml). PGD-AT model: the same
architecture, optimizer, seeds and batches, trained for --at-epochs (default 20) with a plain
PyTorch loop on L∞ PGD adversarial versions of each minibatch (Madry et al.: --eps, default 0.1,
--iters steps of eps/4, random start) and recorded with plgk_cli.recorder.Recorder. (Its loss is
not the clean cross-entropy that replay re-derives, so its audit reports a large update error;
the modes only use θ_T and the clean training gradients, which are exact.)

Also reported per model, on the whole test split: clean accuracy, PGD accuracy (--eps,
--eval-iters steps of eps/8), and the adversarial-to-clean gradient-energy ratio
mean ‖∇θ ℓ(x_adv)‖² / mean ‖∇θ ℓ(x)‖² (the paper's "≈120× → ≈53×"; its exact definition is
not given).

    python scripts/exp_modes_k.py
    python scripts/exp_modes_k.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import exp_common as C
import numpy as np
import torch
import torch.nn.functional as F

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


def grad_energy(model, x, y) -> torch.Tensor:
    """‖∇θ ℓ(f(x_i), y_i)‖² per example at the model's parameters."""
    from torch.func import functional_call, grad, vmap
    params = {k: p.detach() for k, p in model.named_parameters()}

    def one(x1, y1):
        g = grad(lambda p: F.cross_entropy(functional_call(model, p, (x1[None],)), y1[None]))(params)
        return sum((v * v).sum() for v in g.values())
    return vmap(one)(x, y)


def parse_modes(text: str):
    """--modes: an int K, or auto[:ENERGY] (passed to replay as is)."""
    return text if text.startswith("auto") else int(text)


def main(argv=None) -> int:
    p = C.common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--modes", type=parse_modes, default=None,
                   help="K modes, or auto[:ENERGY] (K grown until ENERGY, default 0.99, is held; default "
                        "auto; quick 10)")
    p.add_argument("--rule", default="trapezoid", help="replay's rule (the modes do not depend on it)")
    p.add_argument("--audit-n", type=int, default=None, help="audit set test[0:N] (default 4; quick 2)")
    p.add_argument("--eps", type=float, default=0.1, help="PGD L∞ radius (training and evaluation)")
    p.add_argument("--step", type=float, default=None, help="PGD-AT step (default eps/4)")
    p.add_argument("--iters", type=int, default=None, help="PGD-AT iterations (default 7; quick 2)")
    p.add_argument("--at-epochs", type=int, default=None, help="PGD-AT epochs (default 20; quick: --epochs)")
    p.add_argument("--eval-iters", type=int, default=40)
    p.add_argument("--seeds", type=int, default=None, help="training seeds 0..S-1 of both models (default 5; quick 1)")
    args = p.parse_args(argv)
    out = C.out_dir(args)
    config = C.make_config(args)
    k = args.modes or (10 if args.quick else "auto")
    audit_n = args.audit_n or (2 if args.quick else 4)
    iters = args.iters or (2 if args.quick else 7)
    step = args.step or args.eps / 4
    at_epochs = args.at_epochs or (config.train.epochs if args.quick else 20)
    at_config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=at_epochs))

    seeds = list(range(args.seeds or (1 if args.quick else 5)))
    per_seed = []
    for seed in seeds:
        cfg = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
        at_cfg = dataclasses.replace(at_config, train=dataclasses.replace(at_config.train, seed=seed))
        t0 = time.perf_counter()
        runs = {"Standard": C.base_run(cfg, out)}
        at = out / "runs" / f"{C.config_tag(at_cfg)}-pgdat-eps{args.eps:g}-st{step:g}-it{iters}"
        runs["PGD-AT"] = train_pgd_at(at_cfg, at, args.eps, step, iters)
        print(f"[seed {seed}: runs ready in {time.perf_counter() - t0:.0f}s]", flush=True)
        data = C.load_run_data(runs["Standard"])
        x_eval, y_eval = data.x_test, data.y_test
        res = {}
        for name, run in runs.items():
            model = C.final_model(run)
            x_adv = C.pgd(model, x_eval, y_eval, args.eps, args.eps / 8, args.eval_iters, seed=0)
            for prm in model.parameters():
                prm.requires_grad_(False)
            energy_ratio = float(grad_energy(model, x_adv, y_eval).mean() / grad_energy(model, x_eval, y_eval).mean())
            h5 = out / f"modes-{run.name}-K{str(k).replace(':', '')}.h5"
            t1 = time.perf_counter()
            replay(ReplayArguments(ckpts=str(run), audit_set=f"test[0:{audit_n}]", out=str(h5), device="cpu",
                                   overwrite=True, modes=k, rule=args.rule,
                                   # trained on PGD examples, not the recorded rows: the audit is not
                                   # this run's, only the modes at the reference checkpoint are used
                                   max_update_error=1e300), progress=False)  # no gate (must be finite)
            with InfluenceFile(h5) as f:
                mode_name = f.modes[-1]
                attrs = f.mode_attrs(mode_name)
                curve = f.mode(mode_name, "energy_curve")
            res[name] = {"k90": int(attrs["k_at_90"]), "k95": int(attrs["k_at_95"]), "k99": int(attrs["k_at_99"]),
                         "k_computed": len(curve), "adv_clean_energy_ratio": energy_ratio,
                         **{a: attrs[a] for a in ("converged", "estimated_error", "passes", "energy_target")
                            if a in attrs},
                         "total_energy": float(attrs["total_energy"]), "energy_curve": np.asarray(curve).tolist(),
                         "clean_acc": C.accuracy(model, x_eval, y_eval), "robust_acc": C.accuracy(model, x_adv, y_eval),
                         "replay_s": time.perf_counter() - t1, "run": str(run)}
            print(f"[seed {seed} {name}: replay --modes {k} in {res[name]['replay_s']:.0f}s]", flush=True)
        per_seed.append(res)

    keys = ("k90", "k95", "k99", "clean_acc", "robust_acc", "adv_clean_energy_ratio")
    summary = {name: {key: C.mean_sd_se([r[name][key] for r in per_seed]) for key in keys}
               for name in ("Standard", "PGD-AT")}
    summary["Ratio"] = {key: C.mean_sd_se([r["PGD-AT"][key] / r["Standard"][key] for r in per_seed])
                        for key in ("k90", "k95", "k99") if all(r["Standard"][key] > 0 and r["PGD-AT"][key] > 0
                                                                for r in per_seed)}
    res = per_seed[0]

    def cell(name, key, digits=1):
        st = summary[name][key]
        if any(v < 0 for v in st["all"]):
            return f">{min(r[name]['k_computed'] for r in per_seed)} (some seeds)"
        return f"{st['mean']:.{digits}f}±{st['sd']:.{digits}f}" if len(seeds) > 1 else f"{st['mean']:.{digits}f}"

    print(f"\nTable 3 analogue: energy concentration of Φ_train(T) (standard {C.config_tag(config)}, PGD-AT "
          f"{at_epochs} epochs, eps={args.eps}, {iters} iters of {step:g}; --modes {k}; training seeds {seeds}, "
          f"mean ± sd)")
    print(f"{'':<10} {'Standard':>14} {'PGD-AT':>14} {'Ratio':>14}   per seed (Standard / PGD-AT)")
    for key, label in (("k90", "K@90%"), ("k95", "K@95%"), ("k99", "K@99%")):
        ratio = (f"{summary['Ratio'][key]['mean']:.2f}±{summary['Ratio'][key]['sd']:.2f}x" if len(seeds) > 1
                 else f"{summary['Ratio'][key]['mean']:.2f}x") if key in summary["Ratio"] else "n/a"
        each = " ".join(f"{r['Standard'][key]}/{r['PGD-AT'][key]}" for r in per_seed)
        print(f"{label:<10} {cell('Standard', key):>14} {cell('PGD-AT', key):>14} {ratio:>14}   {each}")
    print(f"{'clean acc':<10} {cell('Standard', 'clean_acc', 3):>14} {cell('PGD-AT', 'clean_acc', 3):>14}")
    print(f"{'PGD acc':<10} {cell('Standard', 'robust_acc', 3):>14} {cell('PGD-AT', 'robust_acc', 3):>14}   "
          f"(whole test split, eps={args.eps}, {args.eval_iters} iters of eps/8)")
    print(f"{'adv/clean':<10} {cell('Standard', 'adv_clean_energy_ratio'):>14} "
          f"{cell('PGD-AT', 'adv_clean_energy_ratio'):>14}   (mean ‖∇θℓ(x_adv)‖² / mean ‖∇θℓ(x)‖²)")

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
    ax.set_title(f"Φ_train(T) energy vs modes (seed {seeds[0]})")
    fig.tight_layout()
    png = out / "modes_k.png"
    fig.savefig(png, dpi=120)
    print(f"[wrote {png}]")
    C.save_json(out / "modes_k.json", {"command": C.command_line(), "modes": k, "eps": args.eps,
                                       "at_iters": iters, "at_step": step, "at_epochs": at_epochs,
                                       "eval_iters": args.eval_iters, "seeds": seeds, "results": res,
                                       "per_seed": per_seed, "summary": summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
