"""Counterfactual prediction on the digits demo: the linear datamodeling score (LDS) and top-k
removal, plgk side by side with TRAK, kronfluence (EK-FAC), TracIn and a gradient dot product.

plgk's claim is an exact account of one run (paper Remark 5.3); this script asks what its
influences are worth for "what if the training set had been different" questions, the yardstick
TRAK, dattri and kronfluence report.

1. Train and record the config (default configs/demo.toml) with training seeds 0..K-1
   (--ensemble K, default 5); seed 0 is the audited run, the others are what the k = K rows
   average over (the same K trained models for plgk and TRAK: equal training cost).
2. Scores S_f[m, n] for every training example m and audit point n = test[0:N] (--audit-n,
   default 128), for f = loss (cross-entropy) and f = margin (z_y − max_{c≠y} z_c, plgk's
   `margin`). Every method's S_f is oriented as its *prediction of the change of f(n) that
   including m causes*, so Σ_{m∈S} S_f[m, n] predicts f(n) of a model trained on S (up to a
   constant) and a correctly signed method has a positive LDS:
     plgk (k=1)        replay of run 0, rule --rule (default trapezoid), targets loss and margin:
                       S_f = influence (plgk's sign: the change of f that m's updates caused).
     plgk (k=K)        the same, averaged over the runs of seeds 0..K-1.
     plgk adaptive     run 0 with --adaptive-rule (default adaptive, tolerance 3e-3): the more exact
                       account of the same run (LDS only).
     TRAK (k=1, k=K)   traker 0.3.2 on θ_T of the same runs, its default image-classification
                       output (margin log p/(1−p)), CPU BasicProjector (normal entries, fast_jl is
                       CUDA only), --proj-dim (default 64), float32. τ > 0 = raises the margin:
                       S_margin = τ, S_loss = −τ.
     kronfluence       EK-FAC at θ_T of run 0 (library defaults: true Fisher, damping 1e-8),
                       measurement = the loss or the margin; its score g_f(n)ᵀ H⁻¹ g_ℓ(m) > 0
                       means up-weighting m lowers f(n): S_f = −score.
     TracIn            every recorded step a checkpoint (the exp_fidelity implementation,
                       generalised to the margin): S_f = −Σ_{t: m∈B_t} lr_t c_t/|B_t| g_ℓ(m)·g_f(n)
                       at θ_{t−1} — TracIn's "ideal" in-run form, all layers.
     grad-dot          S_f = −g_ℓ(m, θ_T)·g_f(n, θ_T) (one gradient step at the final model).
     random            S_f ~ N(0, 1), seed --random-seed.
     PLGK datamodel    kernel regression on the path-integrated features of run 0, TRAK-style:
                       τ = (K_tt + λ I)⁻¹ K_tn with K the PLGK (replay --kernel --kernel-train:
                       Σ over the kernel checkpoints 0, T/10, …, T — the demo's epochs — of
                       per-example loss-gradient products),
                       λ = --dm-ridge × mean diag K_tt; τ > 0 = helpful: S_margin = τ,
                       S_loss = −τ. Also with --precondition (Adam's preconditioner, eq. 29), and
                       both kernels K_tn alone, without the regression (LDS only).
3. LDS: R models (--subsets, default 256) retrained from scratch on random 50% subsets of the
   training split, subset r drawn and trained with seed --subset-seed + r (the `plgk train` loop
   on the subset: the config's epochs, init and shuffles from that seed). Per audit point n the
   Spearman correlation over the R subsets between Σ_{m∈S_r} S_f[m, n] and f(n) of model r; mean
   ± standard error over the N audit points, and each method's paired difference to single-model
   TRAK. The noise floor of the yardstick: the first --ceiling subsets retrained with a second
   seed, and the Spearman correlation of the two seeds' outputs over those subsets.
4. Top-k removal (k in --ks, default 10 50 100): the first --topk-n (default 40) audit points that
   the reference model classifies correctly; the reference is the full training set retrained
   with seed 0 (= the recorded run 0, checked). For each method and point, retrain with seed 0
   and the reference's number of updates without the k examples of largest S_margin[:, n] (the
   most helpful for n's margin) and count a flip when the retrained model misclassifies n. The
   random method is the control for what any removal + retrain does (the shuffles change).
   Shares with their binomial standard error √(p(1−p)/n).

Each phase is timed with wall and CPU seconds (CPU: this process and its children).

    python scripts/exp_lds.py
    python scripts/exp_lds.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import time

import exp_common as C
import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch.func import functional_call, grad, vmap

from plgk_cli import trajectory
from plgk_cli.arguments import ReplayArguments
from plgk_cli.models import build_model
from plgk_cli.replay import replay
from plgk_cli.store import InfluenceFile

QUANTITIES = ("loss", "margin")
QUICK_EPOCHS = 20  # --quick: 128 rows, batch 256, so 20 updates (1 epoch would be a single one)
METHODS = ("plgk", "plgk-ens", "trak", "trak-ens", "kronfluence", "tracin", "graddot", "random", "plgk-dm",
           "plgk-dm-pre", "plgk-kernel", "plgk-kernel-pre", "plgk-adaptive")
# LDS only, no top-k retrains: the datamodels' kernels without the regression, and plgk's audit with the
# adaptive rule (does a more exact account of the run predict retraining better?)
LDS_ONLY = ("plgk-kernel", "plgk-kernel-pre", "plgk-adaptive")


def labels(ensemble: int) -> dict:
    return {"plgk": "plgk trapezoid (k=1)", "plgk-ens": f"plgk trapezoid (k={ensemble})", "trak": "TRAK (k=1)",
            "trak-ens": f"TRAK (k={ensemble})", "kronfluence": "kronfluence EK-FAC", "tracin": "TracIn (every step)",
            "graddot": "grad-dot at θ_T", "random": "random", "plgk-dm": "PLGK datamodel",
            "plgk-dm-pre": "PLGK datamodel (precond.)", "plgk-kernel": "PLGK kernel K_tn (no regr.)",
            "plgk-kernel-pre": "PLGK kernel (precond., no regr.)", "plgk-adaptive": "plgk adaptive (k=1)"}


def quantity(logits: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:
    """Per-example loss (cross-entropy) or margin z_y − max_{c≠y} z_c (plgk's `margin`)."""
    if name == "loss":
        return F.cross_entropy(logits, y, reduction="none")
    onehot = torch.arange(logits.shape[-1], device=logits.device) == y[:, None]  # (vmap-safe one_hot)
    return logits.masked_fill(~onehot, 0).sum(-1) - logits.masked_fill(onehot, float("-inf")).amax(-1)


@torch.no_grad()
def evaluate(model, x, y) -> dict:
    z = model(x)
    return {"loss": quantity(z, y, "loss").double().numpy(), "margin": quantity(z, y, "margin").double().numpy(),
            "correct": (z.argmax(1) == y).numpy()}


def per_sample_grads(model, params: dict, x, y, name: str, chunk: int = 512) -> torch.Tensor:
    """(n, P) float64 gradients of the per-example loss or margin at ``params``."""
    def one(p, x1, y1):
        return quantity(functional_call(model, p, (x1[None],)), y1[None], name)[0]
    g = vmap(grad(one), in_dims=(None, 0, 0))
    out = []
    for i in range(0, len(y), chunk):
        d = g(params, x[i:i + chunk], y[i:i + chunk])
        out.append(torch.cat([d[k].reshape(len(d[k]), -1) for k in params], 1).double())
    return torch.cat(out) if out else torch.zeros(0, sum(p.numel() for p in params.values()), dtype=torch.float64)


def run_model(run):
    manifest = trajectory.read_manifest(run)
    d = manifest["dataset"]
    return manifest, build_model(manifest["model"]["name"], manifest["model"]["kwargs"], tuple(d["in_shape"]),
                                 d["num_classes"]).eval()


def tracin(run, data, x_a, y_a) -> dict:
    """TracIn with every recorded step a checkpoint (exp_fidelity.tracin, all layers), for the
    audit-side loss and margin: S_f[m, n] = −Σ_{t: m∈B_t} lr_t c_t/|B_t| g_ℓ(m)·g_f(n) at θ_{t−1}."""
    manifest, model = run_model(run)
    scores = {q: torch.zeros(len(data.y_train), len(y_a), dtype=torch.float64) for q in QUANTITIES}
    prev = trajectory.read_checkpoint(run, 0)
    for t in range(1, manifest["total_steps"] + 1):
        rec = trajectory.read_checkpoint(run, t)
        params = {k: v.to(torch.float32) for k, v in prev.params.items()}
        batch = rec.batch.long()
        g_train = per_sample_grads(model, params, data.x_train[batch], data.y_train[batch], "loss")
        scale = rec.lr * rec.clip_coef / len(batch)
        for q in QUANTITIES:
            scores[q].index_add_(0, batch, -scale * (g_train @ per_sample_grads(model, params, x_a, y_a, q).T))
        prev = rec
    return {q: s.numpy() for q, s in scores.items()}


def graddot(run, data, x_a, y_a) -> dict:
    manifest, model = run_model(run)
    params = {k: v.to(torch.float32) for k, v in trajectory.read_checkpoint(run, manifest["total_steps"]).params.items()}
    g_train = per_sample_grads(model, params, data.x_train, data.y_train, "loss")
    return {q: (-(g_train @ per_sample_grads(model, params, x_a, y_a, q).T)).numpy() for q in QUANTITIES}


def plgk_influence(run, audit_n: int, m_train: int, rule: str, h5) -> dict:
    replay(ReplayArguments(ckpts=str(run), audit_set=f"test[0:{audit_n}]", out=str(h5), device="cpu", overwrite=True,
                           rule=rule, targets=QUANTITIES), progress=False)
    with InfluenceFile(h5) as f:
        out = {}
        for q in QUANTITIES:
            infl = np.zeros((m_train, audit_n))
            infl[f.train_index] = f.influence(q).astype(np.float64)
            out[q] = infl
        out["metrics"] = {q: f.metrics(q) for q in QUANTITIES}
    return out


def plgk_datamodel(run, audit_n: int, h5, ridge: float, precondition: bool) -> dict:
    """TRAK-style kernel regression on the PLGK of one run: τ = (K_tt + λ I)⁻¹ K_tn
    (InfluenceFile.datamodel)."""
    # 11 kernel checkpoints 0, T/10, ..., T (the demo: every epoch, replay's default)
    stride = max(1, trajectory.read_manifest(run)["total_steps"] // 10)
    replay(ReplayArguments(ckpts=str(run), audit_set=f"test[0:{audit_n}]", out=str(h5), device="cpu", overwrite=True,
                           rule="euler", kernel=True, kernel_train=True, kernel_stride=stride, precondition=precondition),
           progress=False)
    with InfluenceFile(h5) as f:
        tau = f.datamodel(ridge)
        k_tn = f.kernel("audit_train_gram").astype(np.float64).T
        lam = ridge * float(np.mean(np.diag(f.kernel("train_gram").astype(np.float64))))
    return {"loss": -tau, "margin": tau, "lambda": lam, "kernel": {"loss": -k_tn, "margin": k_tn}}


def trak_scores(model, states, data, x_a, y_a, proj_dim: int, workdir, clock, ks) -> dict:
    """TRAK (traker) on the checkpoints ``states`` (state dicts of ``model``'s architecture);
    {k: (M, N) τ averaged over the first k of them}."""
    from trak import TRAKer
    shutil.rmtree(workdir, ignore_errors=True)
    traker = TRAKer(model=model, task="image_classification", train_set_size=len(data.y_train),
                    save_dir=str(workdir), load_from_save_dir=True, device="cpu", proj_dim=proj_dim,
                    use_half_precision=False, logging_level=logging.WARNING)
    for i, sd in enumerate(states):  # traker's order: featurize every model, finalize, then score
        with clock(f"trak model {i}"):
            traker.load_checkpoint(sd, model_id=i)
            for b in torch.arange(len(data.y_train)).split(256):
                traker.featurize(batch=[data.x_train[b], data.y_train[b]], num_samples=len(b))
            traker.finalize_features(model_ids=[i])
    for i, sd in enumerate(states):
        with clock(f"trak model {i}"):
            traker.start_scoring_checkpoint(exp_name="audit", checkpoint=sd, model_id=i, num_targets=len(y_a))
            # finalize_features frees the projection matrix; with a single block (proj_dim <= 100) traker
            # 0.3.2 regenerates it only when the model id changes: force that
            traker.projector.model_id = -1
            traker.score(batch=[x_a, y_a], num_samples=len(y_a))
    out = {}
    for k in ks:
        with clock(f"trak finalize k={k}"):
            out[k] = np.array(traker.finalize_scores(exp_name="audit", model_ids=list(range(k))), dtype=np.float64)
    return out


def kronfluence_scores(run, data, x_a, y_a, workdir) -> dict:
    try:
        import kronfluence  # noqa: F401
    except ImportError:
        raise SystemExit("exp_lds: kronfluence is not installed: pip install -e '.[lds]' && pip install --no-deps "
                         "'kronfluence>=1.0.1' (see pyproject.toml), or leave it out with --methods") from None
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task

    class Classification(Task):
        measurement = "loss"

        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:  # the true Fisher: labels drawn from the model
                with torch.no_grad():
                    y = torch.multinomial(logits.softmax(-1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return quantity(model(x), y, self.measurement).sum()

    shutil.rmtree(workdir, ignore_errors=True)
    task = Classification()
    model = prepare_model(C.final_model(run), task)
    analyzer = Analyzer("lds", model, task, cpu=True, disable_tqdm=True, output_dir=str(workdir),
                        log_level=logging.WARNING)
    train_ds = torch.utils.data.TensorDataset(data.x_train, data.y_train)
    query_ds = torch.utils.data.TensorDataset(x_a, y_a)
    analyzer.fit_all_factors("ekfac", dataset=train_ds, per_device_batch_size=256,
                             factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
    out = {}
    for q in QUANTITIES:
        task.measurement = q
        analyzer.compute_pairwise_scores(scores_name=f"scores_{q}", factors_name="ekfac", query_dataset=query_ds,
                                         train_dataset=train_ds, per_device_query_batch_size=len(y_a),
                                         per_device_train_batch_size=256, overwrite_output_dir=True)
        score = analyzer.load_pairwise_scores(f"scores_{q}")["all_modules"].double().numpy()  # (N, M)
        out[q] = -score.T
    return out


def spearman(a, b) -> float:
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def lds(masks: np.ndarray, outputs: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per audit point: Spearman over subsets of Σ_{m∈S} scores[m, n] vs outputs[:, n]."""
    pred = masks.astype(np.float64) @ scores
    return np.array([spearman(pred[:, n], outputs[:, n]) for n in range(outputs.shape[1])])


def main(argv=None) -> int:
    p = C.common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--audit-n", type=int, default=None, help="audit points test[0:N] (default 128; quick 8)")
    p.add_argument("--subsets", type=int, default=None, help="retrained 50%% subsets for the LDS (default 256; quick 8)")
    p.add_argument("--subset-frac", type=float, default=0.5)
    p.add_argument("--subset-seed", type=int, default=1000, help="subset r is drawn and trained with seed S + r")
    p.add_argument("--ensemble", type=int, default=None, help="runs (seeds 0..K-1) of the k=K rows (default 5; quick 2)")
    p.add_argument("--rule", default="trapezoid", help="plgk replay's quadrature rule")
    p.add_argument("--adaptive-rule", default="adaptive", help="the rule of the plgk-adaptive row")
    p.add_argument("--proj-dim", type=int, default=None, help="TRAK's projection dimension (default 64; quick 16)")
    p.add_argument("--dm-ridge", type=float, default=10.0, help="PLGK datamodel: λ / mean diag K_tt")
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--ks", type=int, nargs="*", default=None, help="top-k removal sizes (default 10 50 100; quick 8)")
    p.add_argument("--topk-n", type=int, default=None, help="audit points of the top-k removal (default 40; quick 2)")
    p.add_argument("--ceiling", type=int, default=None,
                   help="retrain the first R subsets with a second seed (S + 100000 + r): the seed-to-seed "
                        "Spearman, what the retrain noise leaves (default 64; quick 4)")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    args = p.parse_args(argv)
    if args.quick and args.epochs is None:
        args.epochs = QUICK_EPOCHS
    out = C.out_dir(args)
    config = C.make_config(args)
    audit_n = args.audit_n or (8 if args.quick else 128)
    n_subsets = args.subsets or (8 if args.quick else 256)
    ensemble = args.ensemble or (2 if args.quick else 5)
    proj_dim = args.proj_dim or (16 if args.quick else 64)
    n_ceiling = min(n_subsets, args.ceiling if args.ceiling is not None else (4 if args.quick else 64))
    ks = args.ks or ([8] if args.quick else [10, 50, 100])
    topk_n = args.topk_n or (2 if args.quick else 40)
    methods = [m for m in METHODS if m in args.methods]
    label = labels(ensemble)
    clock = C.Stopwatch()
    t_start, c_start = time.perf_counter(), C.cpu_seconds()
    work = out / "lds"
    work.mkdir(parents=True, exist_ok=True)

    # 1. the runs
    runs = []
    for s in range(ensemble):
        cfg = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=s))
        with clock(f"train run seed {s}"):
            runs.append(C.base_run(cfg, out))
    run = runs[0]
    data = C.load_run_data(run)
    m_train = len(data.y_train)
    x_a, y_a = data.x_test[:audit_n], data.y_test[:audit_n]
    accuracies = [trajectory.read_manifest(r)["final"]["test_accuracy"] for r in runs]
    print(f"runs {[r.name for r in runs]}: test accuracy {accuracies}", flush=True)

    # 2. the scores
    scores, extra = {}, {}
    if "plgk" in methods or "plgk-ens" in methods:
        per_run = []
        for i, r in enumerate(runs[:ensemble if "plgk-ens" in methods else 1]):
            with clock(f"plgk replay seed {i}"):
                per_run.append(plgk_influence(r, audit_n, m_train, args.rule, work / f"plgk-s{i}.h5"))
        extra["plgk_metrics"] = [pr.pop("metrics") for pr in per_run]
        if "plgk" in methods:
            scores["plgk"] = per_run[0]
        if "plgk-ens" in methods:
            scores["plgk-ens"] = {q: np.mean([pr[q] for pr in per_run], 0) for q in QUANTITIES}
    if "plgk-adaptive" in methods:
        with clock("plgk-adaptive"):
            scores["plgk-adaptive"] = plgk_influence(run, audit_n, m_train, args.adaptive_rule, work / "plgk-adaptive.h5")
        extra["plgk_adaptive_metrics"] = scores["plgk-adaptive"].pop("metrics")
    if "trak" in methods or "trak-ens" in methods:
        trak_ks = sorted({1} | ({ensemble} if "trak-ens" in methods else set()))
        taus = trak_scores(C.final_model(run), [C.final_model(r).state_dict() for r in runs[:max(trak_ks)]], data, x_a,
                           y_a, proj_dim, work / "trak", clock, trak_ks)
        for name, k in (("trak", 1), ("trak-ens", ensemble)):
            if name in methods:
                scores[name] = {"loss": -taus[k], "margin": taus[k]}
    if "kronfluence" in methods:
        torch.manual_seed(args.random_seed)  # its true Fisher draws labels from the model
        with clock("kronfluence"):
            scores["kronfluence"] = kronfluence_scores(run, data, x_a, y_a, work / "kronfluence")
    if "tracin" in methods:
        with clock("tracin"):
            scores["tracin"] = tracin(run, data, x_a, y_a)
    if "graddot" in methods:
        with clock("graddot"):
            scores["graddot"] = graddot(run, data, x_a, y_a)
    if "random" in methods:
        rng = np.random.default_rng(args.random_seed)
        scores["random"] = {q: rng.standard_normal((m_train, audit_n)) for q in QUANTITIES}
    for name, kname, pre in (("plgk-dm", "plgk-kernel", False), ("plgk-dm-pre", "plgk-kernel-pre", True)):
        if name in methods or kname in methods:
            with clock(name):
                dm = plgk_datamodel(run, audit_n, work / f"{name}.h5", args.dm_ridge, pre)
            extra[f"{name}_lambda"] = dm.pop("lambda")
            kernel = dm.pop("kernel")
            if name in methods:
                scores[name] = dm
            if kname in methods:
                scores[kname] = kernel
                clock.rows[kname] = clock.rows[name]  # the same replay

    # 3. LDS
    n_keep = round(args.subset_frac * m_train)
    masks = np.zeros((n_subsets, m_train), dtype=bool)
    outputs = {q: np.zeros((n_subsets, audit_n)) for q in QUANTITIES}
    subset_acc = []
    with clock("LDS retrains"):
        for r in range(n_subsets):
            seed = args.subset_seed + r
            keep = np.sort(np.random.default_rng(seed).permutation(m_train)[:n_keep])
            masks[r, keep] = True
            model = C.retrain(config, data, keep, seed=seed)
            ev = evaluate(model, x_a, y_a)
            for q in QUANTITIES:
                outputs[q][r] = ev[q]
            subset_acc.append(C.accuracy(model, data.x_test, data.y_test))
    subset_updates = C.steps_of(config, n_keep)
    twin = {q: np.zeros((n_ceiling, audit_n)) for q in QUANTITIES}
    with clock("ceiling retrains"):
        for r in range(n_ceiling):
            model = C.retrain(config, data, np.nonzero(masks[r])[0], seed=args.subset_seed + 100000 + r)
            ev = evaluate(model, x_a, y_a)
            for q in QUANTITIES:
                twin[q][r] = ev[q]
    ceiling = {q: C.mean_sd_se([spearman(outputs[q][:n_ceiling, n], twin[q][:, n]) for n in range(audit_n)])
               for q in QUANTITIES} if n_ceiling > 2 else {}
    lds_table = {}
    for name in methods:
        lds_table[name] = {}
        for q in QUANTITIES:
            per_point = lds(masks, outputs[q], scores[name][q])
            st = C.mean_sd_se(per_point)
            lds_table[name][q] = st
    # paired by audit point: each method's LDS minus single-model TRAK's (mean ± se over the points)
    paired = {name: {q: C.mean_sd_se(np.subtract(lds_table[name][q]["all"], lds_table["trak"][q]["all"]))
                     for q in QUANTITIES} for name in methods if "trak" in methods and name != "trak"}
    print(f"LDS: {n_subsets} subsets of {n_keep}/{m_train} rows ({subset_updates} updates each; test accuracy "
          f"{np.mean(subset_acc):.4f} ± {np.std(subset_acc, ddof=1) if n_subsets > 1 else float('nan'):.4f}), "
          f"{clock.rows['LDS retrains']['wall_s']:.0f}s", flush=True)

    # 4. top-k removal
    full_steps = C.steps_of(config, m_train)
    with clock("top-k retrains"):
        reference = C.retrain(config, data, seed=0, total_steps=full_steps)
        ref = evaluate(reference, x_a, y_a)
        ref_full_test = C.accuracy(reference, data.x_test, data.y_test)
        points = np.nonzero(ref["correct"])[0][:topk_n]
        topk = {}
        for name in [nm for nm in methods if nm not in LDS_ONLY]:
            topk[name] = {}
            for k in ks:
                flips, margins, drops = [], [], []
                for n in points:
                    drop = np.argsort(-scores[name]["margin"][:, n], kind="stable")[:k]
                    keep = np.setdiff1d(np.arange(m_train), drop)
                    model = C.retrain(config, data, keep, seed=0, total_steps=full_steps)
                    ev = evaluate(model, x_a[n:n + 1], y_a[n:n + 1])
                    flips.append(bool(not ev["correct"][0]))
                    margins.append(float(ev["margin"][0]))
                    drops.append(drop.tolist())
                share = float(np.mean(flips)) if flips else float("nan")
                topk[name][str(k)] = {"flipped": flips, "flip_share": share,
                                      "flip_se": float(np.sqrt(share * (1 - share) / len(flips))) if flips else float("nan"),
                                      "margin_after": margins, "dropped": drops}
            print(f"  top-k {label[name]} done", flush=True)

    total = {"wall_s": time.perf_counter() - t_start, "cpu_s": C.cpu_seconds() - c_start}
    timings = clock.rows

    def cost(name):  # the attribution cost of a method (training of the runs is listed apart)
        keys = {"plgk": ["plgk replay seed 0"], "plgk-ens": [f"plgk replay seed {i}" for i in range(ensemble)],
                "trak": ["trak model 0", "trak finalize k=1"],
                "trak-ens": [f"trak model {i}" for i in range(ensemble)] + [f"trak finalize k={ensemble}"],
                }.get(name, [name])
        rows = [timings[k] for k in keys if k in timings]
        return {"wall_s": sum(r["wall_s"] for r in rows), "cpu_s": sum(r["cpu_s"] for r in rows)}

    models_needed = {"plgk-ens": ensemble, "trak-ens": ensemble}
    print(f"\nLDS ({run.name}; audit test[0:{audit_n}]; {n_subsets} retrained {args.subset_frac:.0%} subsets, seeds "
          f"{args.subset_seed}..{args.subset_seed + n_subsets - 1}); mean ± se over the {audit_n} audit points")
    print(f"{'method':<33} {'LDS loss':>16} {'LDS margin':>16} {'models':>6} {'wall s':>8} {'CPU s':>8}")
    for name in methods:
        c = cost(name)
        print(f"{label[name]:<33} " + " ".join(f"{lds_table[name][q]['mean']:>+9.3f} ± {lds_table[name][q]['se']:.3f}"
                                              for q in QUANTITIES)
              + f" {models_needed.get(name, 1 if name != 'random' else 0):>6} {c['wall_s']:>8.1f} {c['cpu_s']:>8.1f}")
    for name, by_q in paired.items():
        print(f"  {label[name]} − TRAK (k=1), paired: " + ", ".join(
            f"{q} {st['mean']:+.3f} ± {st['se']:.3f}" for q, st in by_q.items()))
    for q, st in ceiling.items():
        print(f"seed-to-seed ({n_ceiling} subsets retrained with a second seed), {q}: Spearman {st['mean']:+.3f} ± {st['se']:.3f}")
    print(f"\nTop-k removal: share of {len(points)} audit points (correct under the seed-0 reference) misclassified "
          f"after retraining (seed 0, {full_steps} updates) without each method's k most helpful examples")
    print(f"{'method':<33} " + " ".join(f"{'k=' + str(k):>12}" for k in ks))
    for name in topk:
        print(f"{label[name]:<33} " + " ".join(f"{topk[name][str(k)]['flip_share']:>6.3f}±{topk[name][str(k)]['flip_se']:.3f}"
                                              for k in ks))
    print("training: " + ", ".join(f"seed {s} {timings[f'train run seed {s}']['wall_s']:.1f}s" for s in range(ensemble))
          + f"; LDS retrains {timings['LDS retrains']['wall_s']:.0f}s wall / {timings['LDS retrains']['cpu_s']:.0f}s CPU; "
          f"top-k retrains {timings['top-k retrains']['wall_s']:.0f}s / {timings['top-k retrains']['cpu_s']:.0f}s; "
          f"total {total['wall_s']:.0f}s wall / {total['cpu_s']:.0f}s CPU")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    xs = np.arange(len(methods))
    for j, q in enumerate(QUANTITIES):
        axes[0].bar(xs + (j - 0.5) * 0.4, [lds_table[nm][q]["mean"] for nm in methods], 0.4,
                    yerr=[lds_table[nm][q]["se"] for nm in methods], capsize=2, label=q)
    axes[0].set_title(f"LDS ({n_subsets} subsets, {audit_n} points, ± se)")
    axes[0].legend(fontsize=7)
    for j, k in enumerate(ks):
        axes[1].bar(xs + (j - (len(ks) - 1) / 2) * 0.8 / len(ks), [topk[nm][str(k)]["flip_share"] if nm in topk else 0 for nm in methods],
                    0.8 / len(ks), label=f"k={k}")
    axes[1].set_title(f"top-k removal: flipped share ({len(points)} points)")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(xs, [label[nm] for nm in methods], rotation=40, ha="right", fontsize=7)
    fig.tight_layout()
    png = out / "lds.png"
    fig.savefig(png, dpi=120)
    print(f"[wrote {png}]")
    arrays = {"masks": masks, "audit_label": y_a.numpy(), "topk_points": points}
    for q in QUANTITIES:
        arrays[f"outputs_{q}"] = outputs[q]
        for name in methods:
            arrays[f"score_{name}_{q}"] = scores[name][q].astype(np.float64)
    np.savez_compressed(out / "lds.npz", **arrays)
    C.save_json(out / "lds.json", {
        "command": C.command_line(), "runs": [str(r) for r in runs], "test_accuracy": accuracies,
        "audit_n": audit_n, "train_n": m_train, "subsets": n_subsets, "subset_keep": n_keep,
        "subset_seeds": [args.subset_seed, args.subset_seed + n_subsets - 1], "subset_updates": subset_updates,
        "subset_test_accuracy": C.mean_sd_se(subset_acc), "ensemble": ensemble, "rule": args.rule,
        "proj_dim": proj_dim, "dm_ridge": args.dm_ridge, "random_seed": args.random_seed, "methods": methods,
        "labels": {nm: label[nm] for nm in methods}, "lds": lds_table, "lds_minus_trak": paired, "ks": ks, "topk_points": points.tolist(),
        "topk_updates": full_steps, "reference_full_test": ref_full_test, "reference_margin": ref["margin"].tolist(),
        "topk": topk, "ceiling_subsets": n_ceiling, "ceiling": ceiling, "timings": timings, "cost": {nm: cost(nm) for nm in methods}, "total": total, **extra})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
