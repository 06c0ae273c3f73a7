"""Paper 6.3 (adversarial analysis) and Table 2 (mode-aware cure, Algorithm 2 of A.9) on digits.

1. Train and record the config (default configs/demo.toml), take θ_T.
2. Pick the first N test points θ_T classifies correctly; build three audit sets (npz, x and y =
   true labels): clean, L∞ PGD adversarial (written here: --eps, --step, --iters, random start)
   and random ±eps sign perturbations (the same L∞ budget).
3. Replay each set with --modes K (one replay of the three sets stacked, by default: the columns
   of an audit are independent, so this equals three replays at a third of the cost; --separate
   replays them one by one). Report per group: net S_n and gross G_n influence at the end of
   training (/audit/loss/by_epoch/net, gross), G/|S|, and the mode cancellation ratio CR_n(K).
4. Mode-aware cure (Algorithm 2, label-free branch: y* = argmax f(x), λ_loss = 0): PGD in input
   space on ½‖c(x) − c_tgt‖² + λ_ortho cos²(δ, δ_ref) with c_k(x) = v_k·∇θ ℓ(f(x), y*) over the
   top-K modes v_k of Φ_train(T) (replay's save_modes), c_tgt = c(x_adv) − τ sign(λ_k),
   ‖δ‖∞ ≤ --cure-eps, sign steps. τ = --tau-rel × mean_k |c_k(x_adv)| per example unless --tau.
   Control: a fresh random ±cure-eps perturbation of the adversarial inputs.
5. Table 2 analogue: accuracy (true labels) of clean / random / adversarial / cured adversarial /
   cured random / adversarial + random, all with the same model.

    python scripts/exp_adversarial.py
    python scripts/exp_adversarial.py --quick
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import exp_common as C
from plgk_cli.arguments import ReplayArguments
from plgk_cli.replay import replay
from plgk_cli.store import InfluenceFile

GROUPS = ("clean", "adversarial", "random")


def mode_cure(model, v, drive, x_start, x_clean, tau, tau_rel, eps, alpha, steps, lam_match=1.0,
              lam_ortho=1.0):
    """Algorithm 2 (label-free, λ_loss = 0) for a batch; returns x_cure and the final match loss."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    names = list(params)
    v = v.to(torch.float32)
    sign_drive = torch.sign(drive.to(torch.float32))

    def coeffs(x1, y1):
        def loss(p):
            return F.cross_entropy(functional_call(model, p, (x1[None],)), y1[None])
        g = grad(loss)(params)
        return torch.cat([g[n].reshape(-1) for n in names]) @ v

    with torch.no_grad():
        y_star = model(x_start).argmax(1)  # pseudo-label: Algorithm 2 line 10
    c_adv = vmap(coeffs)(x_start, y_star).detach()
    if tau is None:
        tau_n = tau_rel * c_adv.abs().mean(1, keepdim=True)
    else:
        tau_n = torch.full((len(x_start), 1), float(tau))
    c_tgt = c_adv - tau_n * sign_drive[None, :]
    d_ref = (x_start - x_clean) if x_clean is not None else torch.zeros_like(x_start)

    def objective(x1, y1, ct, x0, dref):
        c = coeffs(x1, y1)
        l_match = 0.5 * ((c - ct) ** 2).sum()
        d = (x1 - x0).reshape(-1)
        r = dref.reshape(-1)
        cos = (d @ r) / (torch.sqrt((d * d).sum() + 1e-12) * torch.sqrt((r * r).sum() + 1e-12))
        return lam_match * l_match + lam_ortho * cos ** 2, l_match

    step_grad = vmap(grad(objective, has_aux=True))
    x = x_start.clone()
    last = None
    for _ in range(steps):
        gx, last = step_grad(x, y_star, c_tgt, x_start, d_ref)
        x = x - alpha * gx.sign()
        x = torch.min(torch.max(x, x_start - eps), x_start + eps).clamp(0, 1).detach()
    return x, c_adv, tau_n.squeeze(1), last


def main(argv=None) -> int:
    p = C.common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--n", type=int, default=None, help="clean points (default 32; quick 6)")
    p.add_argument("--eps", type=float, default=0.15, help="PGD L∞ radius (pixels in [0, 1])")
    p.add_argument("--step", type=float, default=0.02)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--modes", type=int, default=None, help="K modes (default 20; quick 5)")
    p.add_argument("--cure-eps", type=float, default=None, help="cure L∞ radius (default: --eps)")
    p.add_argument("--cure-steps", type=int, default=50)
    p.add_argument("--cure-alpha", type=float, default=None, help="default cure-eps/10")
    p.add_argument("--tau", type=float, default=None)
    p.add_argument("--tau-rel", type=float, default=1.0)
    p.add_argument("--lam-ortho", type=float, default=1.0)
    p.add_argument("--separate", action="store_true", help="replay the three sets one by one")
    args = p.parse_args(argv)
    out = C.out_dir(args)
    config = C.make_config(args)
    n = args.n or (6 if args.quick else 32)
    k_modes = args.modes or (5 if args.quick else 20)
    cure_eps = args.cure_eps if args.cure_eps is not None else args.eps
    alpha = args.cure_alpha or cure_eps / 10
    steps = 10 if args.quick and args.cure_steps == 50 else args.cure_steps

    run = C.base_run(config, out)
    data = C.load_run_data(run)
    model = C.final_model(run)
    for prm in model.parameters():
        prm.requires_grad_(False)
    with torch.no_grad():
        correct = (model(data.x_test).argmax(1) == data.y_test).nonzero().squeeze(1)
    idx = correct[:n]
    x_clean, y = data.x_test[idx], data.y_test[idx]
    x_adv = C.pgd(model, x_clean, y, args.eps, args.step, args.iters, seed=0)
    x_rand = C.random_sign_perturbation(x_clean, args.eps, seed=1)
    sets = {"clean": x_clean, "adversarial": x_adv, "random": x_rand}
    adir = out / "adversarial"
    adir.mkdir(parents=True, exist_ok=True)
    for g, x in sets.items():
        np.savez(adir / f"{g}.npz", x=x.numpy(), y=y.numpy())

    t0 = time.perf_counter()
    results = {}
    if args.separate:
        jobs = [(g, adir / f"{g}.npz") for g in GROUPS]
    else:
        np.savez(adir / "all.npz", x=torch.cat([sets[g] for g in GROUPS]).numpy(), y=y.repeat(3).numpy())
        jobs = [("all", adir / "all.npz")]
    for name, npz in jobs:
        h5 = adir / f"{name}-{run.name}-K{k_modes}.h5"
        replay(ReplayArguments(ckpts=str(run), audit_set=str(npz), out=str(h5), device="cpu", overwrite=True,
                               modes=k_modes, save_modes=True), progress=False)
        with InfluenceFile(h5) as f:
            mode_name = f.modes[-1]
            results[name] = dict(net=f.array("loss", "by_epoch/net"), gross=f.array("loss", "by_epoch/gross"),
                                 cr=f.mode(mode_name, "cancellation")[-1], v=f.mode(mode_name, "v"),
                                 drive=f.mode(mode_name, "drive"), metrics=f.metrics("loss"),
                                 initial=f.array("loss", "initial"), final=f.array("loss", "final"))
    replay_s = time.perf_counter() - t0

    def group(name, key):
        if args.separate:
            return results[name][key]
        a = results["all"][key]
        i = GROUPS.index(name)
        return a[..., i * n:(i + 1) * n] if key in ("net", "gross") else a[i * n:(i + 1) * n]

    any_res = next(iter(results.values()))
    print(f"replayed {'3 sets' if args.separate else 'the 3 sets stacked'} ({3 * n} points, K={k_modes} modes) in "
          f"{replay_s:.0f}s; MRE {any_res['metrics']['mre']:.2e} LC {any_res['metrics']['lc']:.6f}")
    stats = {}
    print(f"\nNet vs gross influence at the end of training ({run.name}, PGD eps={args.eps}, {args.iters} iters; "
          f"mean over {n} points per group)")
    print(f"{'group':<12} {'loss T':>8} {'net S':>10} {'gross G':>10} {'G/|S|':>8} {f'CR({k_modes})':>8}")
    for g in GROUPS:
        net, gross, cr = group(g, "net"), group(g, "gross"), group(g, "cr")
        s, gg = net[-1], gross[-1]
        stats[g] = dict(final_loss=float(group(g, "final").mean()), net=float(s.mean()), gross=float(gg.mean()),
                        gross_over_net=float(np.mean(gg / np.maximum(np.abs(s), 1e-12))),
                        cr_at_K=float(np.nanmean(cr[:, -1])), net_curve=net.mean(1).tolist(),
                        gross_curve=gross.mean(1).tolist(), cr_curve=np.nanmean(cr, 0).tolist())
        st = stats[g]
        print(f"{g:<12} {st['final_loss']:>8.3f} {st['net']:>10.3e} {st['gross']:>10.3e} "
              f"{st['gross_over_net']:>8.2f} {st['cr_at_K']:>8.3f}")

    v = torch.as_tensor(any_res["v"])
    drive = torch.as_tensor(any_res["drive"])
    t1 = time.perf_counter()
    x_cure_adv, c_adv, tau_adv, _ = mode_cure(model, v, drive, x_adv, x_clean, args.tau, args.tau_rel,
                                              cure_eps, alpha, steps, lam_ortho=args.lam_ortho)
    x_cure_rand, _, _, _ = mode_cure(model, v, drive, x_rand, x_clean, args.tau, args.tau_rel,
                                     cure_eps, alpha, steps, lam_ortho=args.lam_ortho)
    cure_s = time.perf_counter() - t1
    x_adv_rand = C.random_sign_perturbation(x_adv, cure_eps, seed=2)
    d_cure = (x_cure_adv - x_adv).flatten(1)
    d_adv = (x_adv - x_clean).flatten(1)
    cosine = float(F.cosine_similarity(d_cure, d_adv, dim=1).mean())
    table = {"Clean": C.accuracy(model, x_clean, y), "Random": C.accuracy(model, x_rand, y),
             "Adversarial": C.accuracy(model, x_adv, y), "Cured Adversarial": C.accuracy(model, x_cure_adv, y),
             "Cured Random": C.accuracy(model, x_cure_rand, y),
             "Adversarial + Random Perturbation": C.accuracy(model, x_adv_rand, y)}
    print(f"\nTable 2 analogue ({n} test points all correctly classified when clean; cure: K={k_modes}, "
          f"eps={cure_eps}, {steps} steps of {alpha:.4f}, tau={'%.3g' % args.tau if args.tau else f'{args.tau_rel}×mean|c|'}"
          f", λ_ortho={args.lam_ortho}; {cure_s:.0f}s)")
    print(f"{'Data type':<36} {'Accuracy':>8}")
    for k, a in table.items():
        print(f"{k:<36} {a:>8.1%}")
    print(f"mean cosine(cure direction, adversarial direction) = {cosine:+.3f}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    epochs = np.arange(1, len(stats["clean"]["net_curve"]) + 1)
    for g in GROUPS:
        axes[0].plot(epochs, stats[g]["net_curve"], "o-", label=g)
        axes[1].plot(epochs, stats[g]["gross_curve"], "o-", label=g)
    axes[0].set_title("net influence S(e) (mean)")
    axes[1].set_title("gross influence G(e) (mean)")
    for ax in axes[:2]:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    axes[2].barh(list(table)[::-1], [table[k] for k in list(table)[::-1]])
    axes[2].set_xlim(0, 1)
    axes[2].set_title("accuracy (Table 2 analogue)")
    fig.tight_layout()
    png = out / "adversarial.png"
    fig.savefig(png, dpi=120)
    print(f"[wrote {png}]")
    C.save_json(out / "adversarial.json", {"command": C.command_line(), "run": str(run), "n": n, "eps": args.eps,
                                           "iters": args.iters, "modes": k_modes, "cure_eps": cure_eps,
                                           "cure_steps": steps, "groups": stats, "table2": table,
                                           "cure_adv_cosine": cosine, "replay_s": replay_s, "cure_s": cure_s})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
