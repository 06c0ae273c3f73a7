"""Kernel geometry (plgk_cli.kernel) against naive float64 references and peer implementations.

References: PLGK = Φ_path Φ_pathᵀ with the path features of all checkpoints concatenated (paper
eq. 13–14; eq. 29 with A_t^{1/2} absorbed into the features, A.2.3); modes against
torch.linalg.svd of the materialised Φ (Algorithm 1); K_time against the flattened T×(MP)
unfolding (eq. 40); AUROC/AUPR/Spearman against scikit-learn and scipy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from plgk_cli import kernel as K
from plgk_cli.gradients import GradientComputer, ParameterLayout

F64 = torch.float64
NUM_CLASSES = 3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def path():
    """A tiny float64 MLP at 4 'kernel checkpoints', its audit/training data and per-sample loss
    gradients at every checkpoint (via the package's GradientComputer)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, NUM_CLASSES)).double()
    layout = ParameterLayout.of(model)
    grads = GradientComputer(model, layout, NUM_CLASSES, chunk_size=4)
    theta0 = layout.flatten(dict(model.named_parameters())).detach()
    thetas = [theta0 + 0.4 * k * torch.randn(layout.size, dtype=F64) for k in range(4)]
    x_train, y_train = torch.randn(13, 5, dtype=F64), torch.randint(0, NUM_CLASSES, (13,))
    x_audit, y_audit = torch.randn(5, 5, dtype=F64), torch.randint(0, NUM_CLASSES, (5,))
    x_audit[0], y_audit[0] = x_train[3], y_train[3]  # audit point 0 is training example 3
    g_train = [grads.loss_gradients(th, x_train, y_train)[0] for th in thetas]
    g_audit = [grads.loss_gradients(th, x_audit, y_audit)[0] for th in thetas]
    gen = torch.Generator().manual_seed(1)
    precond = [torch.rand(layout.size, generator=gen, dtype=F64) * 3 + 0.05 for _ in thetas]
    return dict(g_train=g_train, g_audit=g_audit, weights=[1.0, 2.0, 0.5, 3.0], precond=precond,
                P=layout.size, M=13, N=5)


def naive_path_features(g_list, weights, precond=None):
    """Φ_path(x) = (sqrt(w_t) A_t^{1/2} g(x, t))_t, concatenated over t (eq. 13, 29)."""
    parts = []
    for t, (g, w) in enumerate(zip(g_list, weights)):
        scale = math.sqrt(w) * (precond[t].sqrt() if precond is not None else 1.0)
        parts.append(g * scale)
    return torch.cat(parts, dim=1)


def accumulate(path, precond=None, chunk=4, train_gram=True, seed=0):
    acc = K.PLGKAccumulator(path["N"], path["M"], train_gram=train_gram)
    gen = torch.Generator().manual_seed(seed)
    for t, (ga, gt, w) in enumerate(zip(path["g_audit"], path["g_train"], path["weights"])):
        acc.begin_checkpoint(ga, precond=None if precond is None else precond[t], weight=w)
        order = torch.randperm(path["M"], generator=gen)  # chunks in a scrambled row order
        chunks = [order[i:i + chunk] for i in range(0, path["M"], chunk)]
        for i, rows in enumerate(chunks):
            acc.add_train_chunk(rows, gt[rows])
            if train_gram:
                for other in chunks[i + 1:]:
                    acc.add_train_pair(rows, gt[rows], other, gt[other])
        acc.end_checkpoint()
    return acc


@pytest.mark.parametrize("preconditioned", [False, True])
def test_plgk_equals_naive_path_gram(path, preconditioned):
    precond = path["precond"] if preconditioned else None
    acc = accumulate(path, precond)
    phi_a = naive_path_features(path["g_audit"], path["weights"], precond)
    phi_t = naive_path_features(path["g_train"], path["weights"], precond)
    assert rel_err(acc.audit_gram, phi_a @ phi_a.T) <= 1e-6
    assert rel_err(acc.audit_train, phi_a @ phi_t.T) <= 1e-6
    assert rel_err(acc.train_gram, phi_t @ phi_t.T) <= 1e-6
    assert rel_err(acc.train_sq_norms, (phi_t ** 2).sum(1)) <= 1e-6
    assert rel_err(acc.audit_train_ips(), torch.nn.functional.normalize(phi_a, dim=1)
                   @ torch.nn.functional.normalize(phi_t, dim=1).T) <= 1e-6
    assert acc.checkpoints == 4
    # negative controls: one checkpoint left out, or A_t on one side only (the audit's eq. 27), differ
    partial = phi_a[:, :phi_a.shape[1] * 3 // 4]
    assert rel_err(partial @ partial.T, phi_a @ phi_a.T) > 1e-2
    if preconditioned:
        other = accumulate(path, None)
        assert rel_err(other.audit_gram, acc.audit_gram) > 1e-2


def test_feed_training_rows_and_float32_compute(path):
    ref = accumulate(path, path["precond"])
    for dtype, tol in ((F64, 1e-12), (torch.float32, 1e-5)):
        acc = K.PLGKAccumulator(path["N"], path["M"], train_gram=True, compute_dtype=dtype)
        for t in range(4):
            gt = path["g_train"][t]
            acc.begin_checkpoint(path["g_audit"][t], path["precond"][t], path["weights"][t])
            K.feed_training_rows(acc, lambda rows, gt=gt: gt[rows], chunk_size=5)
            acc.end_checkpoint()
        assert acc.audit_gram.dtype == F64
        for name in ("audit_gram", "audit_train", "train_gram", "train_sq_norms"):
            assert rel_err(getattr(acc, name), getattr(ref, name)) <= tol, name


def test_gram_psd_ips_and_distances(path):
    acc = accumulate(path, path["precond"])
    gram = acc.audit_gram
    assert torch.equal(gram, gram.T)
    eig = torch.linalg.eigvalsh(gram)
    assert eig.min() >= -1e-6 * eig.max()
    ips = acc.audit_ips()
    assert torch.allclose(ips.diagonal(), torch.ones(path["N"], dtype=F64), atol=1e-6, rtol=0)
    assert ips.abs().max() <= 1.0
    assert torch.allclose(acc.train_ips().diagonal(), torch.ones(path["M"], dtype=F64), atol=1e-6, rtol=0)
    # train×train diagonal and the per-row norms are the same quantity by two routes
    assert rel_err(acc.train_gram.diagonal(), acc.train_sq_norms) <= 1e-12
    # the audit point that is training example 3 has IPS 1 and distance 0 to it, and the same row
    cross = acc.audit_train_ips()
    assert abs(float(cross[0, 3]) - 1.0) <= 1e-9
    assert torch.allclose(cross[0], acc.train_ips()[3], atol=1e-9, rtol=0)
    chord, angle = K.chord_distance(ips), K.angle_distance(ips)
    assert torch.allclose(chord.diagonal(), torch.zeros(path["N"], dtype=F64), atol=1e-6)
    assert torch.allclose(chord, 2 * torch.sin(angle / 2), atol=1e-7)  # same metric, two scales
    assert float(K.chord_distance(cross)[0, 3]) <= 1e-4
    # the chord distance of unit path features is their Euclidean distance (a true metric)
    phi = torch.nn.functional.normalize(naive_path_features(path["g_audit"], path["weights"],
                                                            path["precond"]), dim=1)
    assert torch.allclose(chord, torch.cdist(phi, phi), atol=1e-6)


def test_feeding_errors_are_caught(path):
    acc = K.PLGKAccumulator(path["N"], path["M"])
    g = path["g_train"][0]
    with pytest.raises(RuntimeError, match="begin_checkpoint"):
        acc.add_train_chunk(torch.arange(3), g[:3])
    acc.begin_checkpoint(path["g_audit"][0])
    acc.add_train_chunk(torch.arange(0, 7), g[:7])
    acc.add_train_chunk(torch.arange(6, 13), g[6:])  # row 6 twice
    with pytest.raises(ValueError, match="fed more than once"):
        acc.end_checkpoint()
    acc.begin_checkpoint(path["g_audit"][0])
    acc.add_train_chunk(slice(0, 12), g[:12])  # row 12 missing
    with pytest.raises(ValueError, match="never fed"):
        acc.end_checkpoint()
    with pytest.raises(ValueError, match="eq. 29"):
        acc.begin_checkpoint(path["g_audit"][0], precond=-torch.ones(path["P"], dtype=F64))
    with pytest.raises(ValueError, match="weight"):
        acc.begin_checkpoint(path["g_audit"][0], weight=-1.0)


def test_state_round_trip(path):
    acc = accumulate(path, path["precond"])
    fresh = K.PLGKAccumulator(path["N"], path["M"], train_gram=True)
    fresh.load_state_tensors(acc.state_tensors())
    assert torch.equal(fresh.audit_train, acc.audit_train) and fresh.checkpoints == 4


# ----------------------------------------------------------------------------- temporal kernel (A.7)


def temporal_stack(t=5, m=40, p=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(t, m, p, generator=gen, dtype=F64)
    g += torch.randn(t, 1, p, generator=gen, dtype=F64)  # a direction the examples share
    for i in range(1, t):  # correlated over time
        g[i] = 0.8 * g[i - 1] + 0.5 * g[i]
    return g


def test_temporal_kernel_exact_and_spectrum():
    g = temporal_stack()
    flat = g.reshape(g.shape[0], -1)  # mode-1 unfolding T×(MP), eq. 40
    exact = flat @ flat.T
    tk = K.TemporalKernel(5)
    for i in range(0, 40, 9):
        tk.add_rows(g[:, i:i + 9])
    assert rel_err(tk.gram, exact) <= 1e-12
    spec = K.temporal_spectrum(tk.gram)
    lam = torch.linalg.eigvalsh(exact).flip(0)
    assert rel_err(spec.eigenvalues, lam) <= 1e-10
    assert abs(spec.participation_ratio - float(lam.sum() ** 2 / (lam ** 2).sum())) <= 1e-10
    vec = spec.eigenvectors
    assert rel_err(vec @ torch.diag(spec.eigenvalues) @ vec.T, exact) <= 1e-10
    assert 1.0 <= spec.participation_ratio <= 5.0
    pr = K.prefix_participation_ratios(tk.gram)
    assert pr[0] == 1.0 and abs(float(pr[-1]) - spec.participation_ratio) <= 1e-10
    # negative control: the Gram of per-checkpoint *summed* gradients is another quantity
    summed = g.sum(1)
    assert rel_err(summed @ summed.T, exact) > 0.1


def test_participation_ratio_bounds():
    assert K.participation_ratio(torch.tensor([3.0, 0.0, 0.0])) == 1.0
    assert abs(K.participation_ratio(torch.ones(7)) - 7.0) <= 1e-12


def test_temporal_sketch_is_close_to_exact():
    g = temporal_stack(t=4, m=40, p=500, seed=2)
    flat = g.reshape(4, -1)
    exact = flat @ flat.T
    norms = flat.norm(dim=1)
    dim = 2 ** 16
    sk = K.TemporalKernelSketch(4, 40, 500, dim=dim, seed=0)
    for t in reversed(range(4)):  # checkpoint-major, backwards like replay, scrambled rows
        order = torch.randperm(40, generator=torch.Generator().manual_seed(t))
        for i in range(0, 40, 7):
            rows = order[i:i + 7]
            sk.add_chunk(t, rows, g[t, rows])
    err = ((sk.gram - exact) / (norms[:, None] * norms[None, :])).abs().max()
    assert err <= 4 * math.sqrt(11 / dim)


# ----------------------------------------------------------------------------- kernel regime (6.3)


def test_kernel_regime_overlaps():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(30, 8, generator=gen, dtype=F64)
    b = a + 0.3 * torch.randn(30, 8, generator=gen, dtype=F64)
    b[4] = 0.0
    exact = torch.nn.functional.cosine_similarity(a, b, dim=1)
    mean = K.MeanRowCosine()
    for i in range(0, 30, 7):
        mean.add(a[i:i + 7], b[i:i + 7])
    keep = torch.arange(30) != 4
    assert abs(mean.mean - float(exact[keep].mean())) <= 1e-12 and mean.skipped == 1
    same = K.MeanRowCosine()
    same.add(a, 2.5 * a)  # direction converged, scale not: overlap 1 (kernel regime)
    assert abs(same.mean - 1.0) <= 1e-12
    v = torch.linalg.qr(torch.randn(200, 12, generator=gen, dtype=F64)).Q
    rot = torch.linalg.qr(torch.randn(10, 10, generator=gen, dtype=F64)).Q
    assert abs(K.subspace_overlap(v[:, :10] @ rot, v[:, :10]) - 1.0) <= 1e-10  # same subspace
    assert K.subspace_overlap(v[:, :10], v[:, 2:12]) == pytest.approx(0.8, abs=1e-10)  # 8 shared
    other = torch.randn(200, 10, generator=gen, dtype=F64)
    assert K.subspace_overlap(v[:, :10], other) < 0.5  # unrelated subspaces


# ----------------------------------------------------------------------------- net and gross (6.3)


def test_net_and_gross_influence():
    gen = torch.Generator().manual_seed(0)
    e, layers, m, n = 4, 3, 11, 5
    split = torch.randn(e, layers, m, n, generator=gen, dtype=F64)  # per epoch, layer, example
    per_epoch = split.sum(1)  # (E, M, N)
    cumulative = per_epoch.cumsum(0)
    ng = K.NetGrossInfluence(e, n)
    order = torch.randperm(m, generator=gen)
    for i in range(0, m, 4):
        ng.add_rows(per_epoch[:, order[i:i + 4]])
    assert rel_err(ng.net, cumulative.sum(1)) <= 1e-12
    assert rel_err(ng.gross, cumulative.abs().sum(1)) <= 1e-12
    # S is exact from the stored by_layer_epoch/signed; /abs only bounds G from above
    assert rel_err(K.net_influence_from_layer_epoch(split.sum(2)), ng.net) <= 1e-12
    bound = K.gross_bound_from_layer_epoch(split.abs().sum(2))
    assert bool((bound >= ng.gross - 1e-12).all()) and rel_err(bound, ng.gross) > 0.1


# ----------------------------------------------------------------------------- difficulty scores (6.2)


def test_ips_difficulty_scores():
    ips = torch.tensor([[0.9, 0.8, -0.2, 0.1, float("nan")],
                        [0.1, -0.3, 0.5, 0.7, 0.2]], dtype=F64)
    labels = torch.tensor([0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 2])
    l2 = K.ips_l2_norm(ips)
    assert torch.allclose(l2, torch.tensor([math.sqrt(0.81 + 0.64 + 0.04 + 0.01),
                                            math.sqrt(0.01 + 0.09 + 0.25 + 0.49 + 0.04)], dtype=F64))
    margin = K.ips_class_margin(ips, labels, predicted, 3)
    # n=0: own class 0 mean 0.85, others: class 1 −0.05, class 2 undefined → 0.9
    # n=1: own class 2 mean 0.2, best other: class 1 mean 0.6 → −0.4 (a likely error)
    assert torch.allclose(margin, torch.tensor([0.9, -0.4], dtype=F64))


def test_auroc_aupr_spearman_match_sklearn_and_scipy():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    scores = np.round(rng.normal(size=200) + 1.2 * y, 1)  # rounding makes ties
    assert K.auroc(scores, y) == pytest.approx(sklearn_metrics.roc_auc_score(y, scores), abs=1e-12)
    assert K.average_precision(scores, y) == pytest.approx(
        sklearn_metrics.average_precision_score(y, scores), abs=1e-12)
    other = np.round(scores + rng.normal(size=200), 1)
    assert K.spearman(scores, other) == pytest.approx(stats.spearmanr(scores, other).statistic, abs=1e-12)
    assert np.allclose(K.rankdata(scores), stats.rankdata(scores))
    # torch tensors work as well; a perfect and an inverted score
    assert K.auroc(torch.tensor(y * 1.0), torch.tensor(y)) == 1.0
    assert K.auroc(-scores, y) == pytest.approx(1 - K.auroc(scores, y), abs=1e-12)
    assert math.isnan(K.auroc(scores, np.zeros(200, dtype=bool)))
    with pytest.raises(ValueError, match="NaN"):
        K.auroc(np.array([0.1, np.nan]), np.array([True, False]))
