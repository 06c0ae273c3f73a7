"""Paper 6.3 (adversarial analysis) and Table 2 (mode-aware cure, Algorithm 2 of A.9) on digits.

1. Train and record the config (default configs/demo.toml), take θ_T; report its clean and PGD
   (robust) accuracy on the whole test split.
2. S seeds (--seeds, default 5): seed s takes the s-th block of N test points (--n) of a fixed
   shuffle of the points θ_T classifies correctly (disjoint blocks) and builds three audit sets
   (npz, x and y = true labels): clean, L∞ PGD adversarial (--eps, --step, --iters, random start
   of seed s) and random ±eps sign perturbations (the same L∞ budget, seed 1000 + s).
3. One replay of all 3 × N × S points stacked (the columns of an audit are independent) with
   --rule and --modes K, save_modes. Report per group: net S_n and gross G_n influence at the end
   of training (/audit/loss/by_epoch/net, gross), G/|S|, the mode cancellation ratio CR_n(K);
   means over the N points of a seed, then mean ± sd over the seeds.
4. Mode-aware cure (Algorithm 2, label-free branch: y* = argmax f(x), λ_loss = 0): PGD in input
   space on ½‖c(x) − c_tgt‖² + λ_ortho cos²(δ, δ_ref) with c_k(x) = v_k·∇θ ℓ(f(x), y*) over the
   top-K' modes v_k of Φ_train(T) (--cure-modes K' ≤ K; replay's save_modes), c_tgt =
   c(x_adv) − τ sign(λ_k), ‖δ‖∞ ≤ --cure-eps, sign steps. τ = --tau-rel × mean_k |c_k(x_adv)|
   per example unless --tau (several --tau-rel values: one Table 2 column each). Controls: a
   fresh random ±cure-eps sign perturbation of the adversarial inputs (seed 2000 + s), and one
   rescaled to the cure's own ‖δ‖₂ per example (matched magnitude).
5. Table 2 analogue: accuracy (true labels) of clean / random / adversarial / cured adversarial /
   cured random / adversarial + random, all with the same model; mean ± sd over the seeds.

    python scripts/exp_adversarial.py
    python scripts/exp_adversarial.py --quick
"""

from __future__ import annotations

import argparse
import time

import exp_common as C
import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from plgk_cli.arguments import ReplayArguments
from plgk_cli.replay import replay
from plgk_cli.store import InfluenceFile

GROUPS = ("clean", "adversarial", "random")


def mode_cure(model, v, drive, x_start, x_clean, tau, tau_rel, eps, alpha, steps, lam_match=1.0,
              lam_ortho=1.0):
    """Algorithm 2 (label-free, λ_loss = 0) for a batch; returns x_cure, c(x_adv), τ_n, the final
    match loss and the shift achieved, mean_k sign(λ_k)(c_k(x_adv) − c_k(x_cure)) / τ_n (1: on target)."""
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
    c_cure = vmap(coeffs)(x, y_star).detach()
    achieved = ((c_adv - c_cure) * sign_drive[None, :]).mean(1) / tau_n.squeeze(1)
    return x, c_adv, tau_n.squeeze(1), last, achieved


ROWS = ("Clean", "Random", "Adversarial", "Cured Adversarial", "Cured Random",
        "Adversarial + Random Perturbation", "Adversarial + Random (matched ‖δ‖₂)")


def matched_random(x_adv, x_cure, eps, seed):
    """A random sign direction rescaled, per example, to the L2 norm of the cure's δ = x_cure − x_adv."""
    gen = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, x_adv.shape, generator=gen).to(x_adv.dtype) * 2 - 1
    norm = (x_cure - x_adv).flatten(1).norm(dim=1)
    scale = (norm / (eps * np.sqrt(sign[0].numel()))).clamp(max=1.0).view(-1, *[1] * (x_adv.dim() - 1))
    return (x_adv + eps * scale * sign).clamp(0, 1)


def main(argv=None) -> int:
    p = C.common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--n", type=int, default=None, help="clean points per seed (default 32; quick 6)")
    p.add_argument("--seeds", type=int, default=None, help="seeds = disjoint blocks of points (default 5; quick 1)")
    p.add_argument("--eps", type=float, default=0.15, help="PGD L∞ radius (pixels in [0, 1])")
    p.add_argument("--step", type=float, default=0.02)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--rule", default="adaptive:1e-2", help="replay's quadrature rule")
    p.add_argument("--modes", type=int, default=None, help="K modes of the replay (default 20; quick 5)")
    p.add_argument("--cure-modes", type=int, default=None, help="the cure's top K' ≤ K modes (default K)")
    p.add_argument("--cure-eps", type=float, default=None, help="cure L∞ radius (default: --eps)")
    p.add_argument("--cure-steps", type=int, default=50)
    p.add_argument("--cure-alpha", type=float, default=None, help="default cure-eps/10")
    p.add_argument("--tau", type=float, default=None)
    p.add_argument("--tau-rel", type=float, nargs="+", default=[1.0, 5.0])
    p.add_argument("--lam-ortho", type=float, default=1.0)
    args = p.parse_args(argv)
    out = C.out_dir(args)
    config = C.make_config(args)
    n = args.n or (6 if args.quick else 32)
    n_seeds = args.seeds or (1 if args.quick else 5)
    k_modes = args.modes or (5 if args.quick else 20)
    k_cure = args.cure_modes or k_modes
    if not 1 <= k_cure <= k_modes:
        p.error(f"--cure-modes must be in 1..{k_modes}")
    cure_eps = args.cure_eps if args.cure_eps is not None else args.eps
    alpha = args.cure_alpha or cure_eps / 10
    steps = 10 if args.quick and args.cure_steps == 50 else args.cure_steps
    taus = [args.tau] if args.tau is not None else args.tau_rel

    run = C.base_run(config, out)
    data = C.load_run_data(run)
    model = C.final_model(run)
    for prm in model.parameters():
        prm.requires_grad_(False)
    clean_acc = C.accuracy(model, data.x_test, data.y_test)
    robust_acc = C.accuracy(model, C.pgd(model, data.x_test, data.y_test, args.eps, args.step, args.iters, seed=0),
                            data.y_test)
    print(f"{run.name}: clean test accuracy {clean_acc:.4f}, PGD (eps {args.eps}, {args.iters} iters) {robust_acc:.4f}")
    with torch.no_grad():
        correct = (model(data.x_test).argmax(1) == data.y_test).nonzero().squeeze(1)
    correct = correct[torch.as_tensor(np.random.default_rng(0).permutation(len(correct)))]
    if len(correct) < n * n_seeds:
        p.error(f"only {len(correct)} correctly classified test points for {n_seeds} blocks of {n}")
    adir = out / "adversarial"
    adir.mkdir(parents=True, exist_ok=True)
    seeds = []
    for s in range(n_seeds):
        idx = correct[s * n:(s + 1) * n]
        x_clean, y = data.x_test[idx], data.y_test[idx]
        x_adv = C.pgd(model, x_clean, y, args.eps, args.step, args.iters, seed=s)
        x_rand = C.random_sign_perturbation(x_clean, args.eps, seed=1000 + s)
        seeds.append({"index": idx, "y": y, "clean": x_clean, "adversarial": x_adv, "random": x_rand})
    for g in GROUPS:
        np.savez(adir / f"{g}.npz", x=torch.cat([d[g] for d in seeds]).numpy(),
                 y=torch.cat([d["y"] for d in seeds]).numpy(), test_index=torch.cat([d["index"] for d in seeds]).numpy())
    # stacked: seed-major, then group, then point
    np.savez(adir / "all.npz", x=torch.cat([d[g] for d in seeds for g in GROUPS]).numpy(),
             y=torch.cat([d["y"] for d in seeds for _ in GROUPS]).numpy())

    t0 = time.perf_counter()
    h5 = (adir / f"all-{run.name}-eps{args.eps:g}-st{args.step:g}-it{args.iters}-{args.rule.replace(':', '')}"
                 f"-K{k_modes}-n{n}x{n_seeds}.h5")
    reused = h5.is_file()  # the same sets, rule and K: the replay is reused (delete it to redo it)
    if not reused:
        replay(ReplayArguments(ckpts=str(run), audit_set=str(adir / "all.npz"),
                               out=str(h5), device="cpu", overwrite=True, rule=args.rule, modes=k_modes,
                               save_modes=True), progress=False)
    with InfluenceFile(h5) as f:
        mode_name = f.modes[-1]
        res = {"net": f.array("loss", "by_epoch/net"), "gross": f.array("loss", "by_epoch/gross"),
                   "cr": f.mode(mode_name, "cancellation")[-1], "v": f.mode(mode_name, "v"),
                   "drive": f.mode(mode_name, "drive"), "metrics": f.metrics("loss"),
                   "final": f.array("loss", "final")}
    replay_s = time.perf_counter() - t0
    print(f"{'reused the replay of' if reused else 'replayed'} the 3 sets x {n_seeds} seeds stacked "
          f"({3 * n * n_seeds} points, rule {args.rule}, K={k_modes} modes) in {replay_s:.0f}s; MRE {res['metrics']['mre']:.2e} LC {res['metrics']['lc']:.6f}")

    def block(key, s, g):
        i = (s * len(GROUPS) + GROUPS.index(g)) * n
        a = res[key]
        return a[..., i:i + n] if key in ("net", "gross") else a[i:i + n]

    per_seed = {g: [] for g in GROUPS}
    for s in range(n_seeds):
        for g in GROUPS:
            net, gross, cr = block("net", s, g), block("gross", s, g), block("cr", s, g)
            sn, gg = net[-1], gross[-1]
            per_seed[g].append({"final_loss": float(block("final", s, g).mean()), "net": float(sn.mean()),
                                    "gross": float(gg.mean()),
                                    "gross_over_net": float(np.mean(gg / np.maximum(np.abs(sn), 1e-12))),
                                    "gross_over_net_median": float(np.median(gg / np.maximum(np.abs(sn), 1e-12))),
                                    "cr_at_K": float(np.nanmean(cr[:, -1])), "net_curve": net.mean(1),
                                    "gross_curve": gross.mean(1), "cr_curve": np.nanmean(cr, 0)})
    stats = {}
    keys = ("final_loss", "net", "gross", "gross_over_net", "gross_over_net_median", "cr_at_K")
    print(f"\nNet vs gross influence at the end of training ({run.name}, PGD eps={args.eps}, {args.iters} iters; "
          f"mean over {n} points, then mean ± sd over {n_seeds} seeds)")
    print(f"{'group':<12} {'loss T':>14} {'net S':>16} {'gross G':>16} {'G/|S| mean':>14} {'G/|S| median':>14} "
          f"{f'CR({k_modes})':>14}")
    for g in GROUPS:
        stats[g] = {key: C.mean_sd_se([d[key] for d in per_seed[g]]) for key in keys}
        for key in ("net_curve", "gross_curve", "cr_curve"):
            stats[g][key] = np.mean([d[key] for d in per_seed[g]], 0).tolist()
        print(f"{g:<12} " + " ".join(f"{stats[g][key]['mean']:>8.3f}±{stats[g][key]['sd']:<6.3f}" for key in keys))

    v = torch.as_tensor(res["v"])[:, :k_cure]
    drive = torch.as_tensor(res["drive"])[:k_cure]
    t1 = time.perf_counter()
    cure = {}
    for tau in taus:
        tau_abs, tau_rel = (tau, None) if args.tau is not None else (None, tau)
        accs = {r: [] for r in ROWS}
        cosines, shift, loss_cure, linf, tau_mean = [], [], [], [], []
        for s, d in enumerate(seeds):
            x_cure_adv, _, tau_n, _, achieved = mode_cure(model, v, drive, d["adversarial"], d["clean"], tau_abs, tau_rel,
                                            cure_eps, alpha, steps, lam_ortho=args.lam_ortho)
            x_cure_rand, _, _, _, _ = mode_cure(model, v, drive, d["random"], d["clean"], tau_abs, tau_rel,
                                             cure_eps, alpha, steps, lam_ortho=args.lam_ortho)
            x_adv_rand = C.random_sign_perturbation(d["adversarial"], cure_eps, seed=2000 + s)
            x_adv_matched = matched_random(d["adversarial"], x_cure_adv, cure_eps, seed=2000 + s)
            y = d["y"]
            for r, x in zip(ROWS, (d["clean"], d["random"], d["adversarial"], x_cure_adv, x_cure_rand, x_adv_rand,
                                   x_adv_matched)):
                accs[r].append(C.accuracy(model, x, y))
            shift.append(float(achieved.mean()))
            tau_mean.append(float(tau_n.mean()))
            linf.append(float((x_cure_adv - d["adversarial"]).abs().flatten(1).max(1).values.mean()))
            with torch.no_grad():
                loss_cure.append(float(F.cross_entropy(model(x_cure_adv), y)))
            cosines.append(float(F.cosine_similarity((x_cure_adv - d["adversarial"]).flatten(1),
                                                     (d["adversarial"] - d["clean"]).flatten(1), dim=1).mean()))
        cure[str(tau)] = {"accuracy": {r: C.mean_sd_se(a) for r, a in accs.items()},
                          "cure_adv_cosine": C.mean_sd_se(cosines), "achieved_shift": C.mean_sd_se(shift),
                          "cured_adv_loss": C.mean_sd_se(loss_cure), "cure_linf": C.mean_sd_se(linf),
                          "tau_abs": C.mean_sd_se(tau_mean)}
    cure_s = time.perf_counter() - t1
    tau_label = "tau" if args.tau is not None else "tau_rel (× mean|c|)"
    print(f"\nTable 2 analogue ({n} test points per seed, all correctly classified when clean; mean ± sd over "
          f"{n_seeds} seeds; cure: K'={k_cure} of K={k_modes} modes, eps={cure_eps}, {steps} steps of {alpha:.4f}, "
          f"λ_ortho={args.lam_ortho}; {cure_s:.0f}s)")
    print(f"{'Data type':<38} " + " ".join(f"{tau_label + '=' + format(t, 'g'):>22}" for t in taus))
    for r in ROWS:
        print(f"{r:<38} " + " ".join(f"{cure[str(t)]['accuracy'][r]['mean']:>15.1%} ±{cure[str(t)]['accuracy'][r]['sd']:.1%}"
                                     for t in taus))
    print(f"{'cosine(cure dir., adversarial dir.)':<38} " +
          " ".join(f"{cure[str(t)]['cure_adv_cosine']['mean']:>+15.3f} ±{cure[str(t)]['cure_adv_cosine']['sd']:.3f}"
                   for t in taus))
    for key, label in (("achieved_shift", "achieved shift / τ (1: on target)"),
                       ("cured_adv_loss", "loss of cured adv. (true labels)"), ("cure_linf", "mean ‖δ_cure‖∞"),
                       ("tau_abs", "τ (absolute, mean over points)")):
        print(f"{label:<38} " + " ".join(f"{cure[str(t)][key]['mean']:>15.3f} ±{cure[str(t)][key]['sd']:.3f}"
                                         for t in taus))

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
    first = cure[str(taus[0])]["accuracy"]
    axes[2].barh(list(ROWS)[::-1], [first[r]["mean"] for r in ROWS[::-1]], xerr=[first[r]["sd"] for r in ROWS[::-1]])
    axes[2].set_xlim(0, 1)
    axes[2].tick_params(axis="y", labelsize=7)
    axes[2].set_title(f"accuracy (Table 2 analogue, {tau_label}={taus[0]:g})", fontsize=9)
    fig.tight_layout()
    png = out / "adversarial.png"
    fig.savefig(png, dpi=120)
    print(f"[wrote {png}]")
    C.save_json(out / "adversarial.json", {"command": C.command_line(), "run": str(run), "n": n, "seeds": n_seeds,
                                           "eps": args.eps, "iters": args.iters, "rule": args.rule,
                                           "clean_accuracy": clean_acc, "robust_accuracy": robust_acc,
                                           "modes": k_modes, "cure_modes": k_cure, "cure_eps": cure_eps,
                                           "cure_steps": steps, "cure_alpha": alpha, "lam_ortho": args.lam_ortho,
                                           "tau_kind": "absolute" if args.tau is not None else "relative",
                                           "audit_mre": res["metrics"]["mre"], "audit_lc": res["metrics"]["lc"],
                                           "groups": stats, "cure": cure, "replay_s": replay_s, "cure_s": cure_s, "replay_reused": reused})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
