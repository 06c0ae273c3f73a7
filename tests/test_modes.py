"""Modes of the training gradients (plgk_cli.modes): the streamed SVD against torch.linalg.svd /
svdvals on matrices of known spectrum, its convergence control and --modes auto's growth, the
cancellation ratio's definition, and Oja's online modes (A.8)."""

from __future__ import annotations

import math

import pytest
import torch

from plgk_cli import modes as M
from plgk_cli.chunks import row_chunks
from plgk_cli.kernel import principal_cosines

F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def decaying_matrix(m=300, p=200, decay=0.85, noise=1e-3, seed=0):
    """Φ with a realistic geometrically decaying spectrum plus a small noise floor."""
    gen = torch.Generator().manual_seed(seed)
    r = min(m, p)
    u = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=F64)).Q
    v = torch.linalg.qr(torch.randn(p, r, generator=gen, dtype=F64)).Q
    s = 10 * decay ** torch.arange(r, dtype=F64)
    return (u * s) @ v.T + noise * torch.randn(m, p, generator=gen, dtype=F64)


def chunk_source(phi, size=37, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def chunks():  # a different row order in every pass
        order = torch.randperm(len(phi), generator=gen)
        for i in range(0, len(phi), size):
            rows = order[i:i + size]
            yield rows, phi[rows]
    return chunks


def matrix_with_spectrum(s: torch.Tensor, m: int, p: int, seed: int = 0) -> torch.Tensor:
    """U diag(s) Vᵀ with random orthonormal U (m×r), V (p×r): the singular values are s exactly."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(s), generator=gen, dtype=F64)).Q
    v = torch.linalg.qr(torch.randn(p, len(s), generator=gen, dtype=F64)).Q
    return (u * s) @ v.T


def gapped_flat_tail(m=500, p=800):
    """Ten values 100..10, a gap, ten more 3..2.5, then a flat tail of 1s: the tail the random block
    cannot avoid, and the values just before it converge by (1/2.5)⁴ per iteration at best."""
    s = torch.cat([torch.logspace(2, 1, 10, dtype=F64), torch.linspace(3, 2.5, 10, dtype=F64),
                   torch.ones(min(m, p) - 20, dtype=F64)])
    return matrix_with_spectrum(s, m, p)


def relative_errors(found: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    return (found - exact[:len(found)]).abs() / exact[:len(found)]


def test_streamed_svd_matches_exact_svd():
    phi = decaying_matrix()
    g_audit = torch.randn(6, phi.shape[1], dtype=F64) + phi[:6]
    k = 20
    res = M.streamed_svd(chunk_source(phi), len(phi), k, g_audit=g_audit)
    u, s, vh = torch.linalg.svd(phi, full_matrices=False)
    assert ((res.s - s[:k]).abs() / s[:k]).max() <= 1e-3
    total = float((phi ** 2).sum())
    assert abs(res.total_energy - total) <= 1e-12 * total
    assert torch.allclose(res.row_sq_norms, (phi ** 2).sum(1), rtol=1e-12)
    # K@X% from the exact total energy (not from the modes' own sum)
    exact_curve = torch.cumsum(s ** 2, 0) / total
    for frac, got in res.k_at_energy().items():
        assert got == int(torch.nonzero(exact_curve >= frac)[0]) + 1
    assert M.streamed_svd(chunk_source(phi), len(phi), 5).k_at_energy() == {0.9: None, 0.95: None, 0.99: None}
    # drives and coefficients: λ_k c_{k,n} is free of the modes' sign ambiguity
    a_exact = u[:, :k].sum(0)
    c_exact = g_audit @ vh[:k].T
    terms = res.drive[None, :] * res.coefficients
    assert rel_err(terms, (a_exact * s[:k])[None, :] * c_exact) <= 1e-3
    assert rel_err(res.cancellation_ratio(), M.cancellation_ratio(a_exact * s[:k], c_exact)) <= 1e-3
    assert torch.allclose(res.net_exact, g_audit @ phi.sum(0), rtol=1e-12)
    assert torch.allclose(principal_cosines(res.v, vh[:k].T), torch.ones(k, dtype=F64), atol=1e-6)
    assert torch.allclose(res.u.T @ res.u, torch.eye(k, dtype=F64), atol=1e-10)
    assert rel_err(M.mode_drive(res.v, res.sum_gradient), res.drive) <= 1e-3  # = S Uᵀ1 up to the SVD's error
    # negative control: one pass without oversampling or power iterations misses the tolerance
    crude = M.streamed_svd(chunk_source(phi), len(phi), k, oversample=0, power_iterations=0)
    assert ((crude.s - s[:k]).abs() / s[:k]).max() > 1e-2


def test_all_modes_reconstruct_the_net_influence():
    phi = decaying_matrix(m=30, p=12, decay=0.7)
    g_audit = torch.randn(4, 12, dtype=F64)
    res = M.streamed_svd(row_chunks(lambda rows: phi[rows], 30, 8), 30, 12, g_audit=g_audit, keep_v=False)
    assert res.v is None
    # Σ_m g_m·g_n = Σ_k λ_k c_{k,n} with all modes (section 6.3); CR(K) ≤ 1 always
    assert torch.allclose(res.net_by_modes()[:, -1], res.net_exact, rtol=1e-9, atol=1e-12)
    cr = res.cancellation_ratio()
    assert cr.shape == (4, 12) and bool((cr <= 1 + 1e-12).all())
    assert torch.allclose(cr[:, 0], torch.ones(4, dtype=F64))
    assert res.k_at(1.0 - 1e-12) == 12


def test_cancellation_ratio_definition():
    drive = torch.tensor([2.0, -1.0, 1.0], dtype=F64)
    c = torch.tensor([[1.0, 2.0, 0.0], [1.0, -1.0, 1.0], [0.0, 0.0, 0.0]], dtype=F64)
    cr = M.cancellation_ratio(drive, c)
    assert torch.allclose(cr[0], torch.tensor([1.0, 0.0, 0.0], dtype=F64))  # 2 − 2 cancels
    assert torch.allclose(cr[1], torch.tensor([1.0, 1.0, 1.0], dtype=F64))  # 2 + 1 + 1, same sign
    assert torch.isnan(cr[2]).all()


def test_streamed_svd_pass_errors():
    phi = decaying_matrix(m=20, p=10)
    svd = M.StreamedSVD(20, 3)
    svd.feed(torch.arange(10), phi[:10])
    with pytest.raises(ValueError, match="fed twice"):
        svd.feed(torch.arange(5, 15), phi[5:15])
    with pytest.raises(ValueError, match="not fed"):
        svd.end_pass()
    with pytest.raises(RuntimeError, match="passes still"):
        svd.result()


# ----------------------------------------------------------------------------- Oja (A.8)


def test_oja_captures_the_exact_top_k_energy_on_a_stationary_case():
    phi = decaying_matrix(m=600, p=80, decay=0.7, noise=1e-2, seed=3)
    k, batch = 5, 20
    s = torch.linalg.svdvals(phi)
    best = float((s[:k] ** 2).sum() / (s ** 2).sum())
    oja = M.OjaModes(80, k, seed=0)
    initial = oja.estimate.clone()
    gen = torch.Generator().manual_seed(0)
    per_epoch = []
    for epoch in range(6):
        order = torch.randperm(600, generator=gen)
        for i in range(0, 600, batch):
            captured = oja.observe(phi[order[i:i + batch]])
            assert (captured is None) == (epoch == 0)
        per_epoch.append(oja.end_epoch())
    assert per_epoch[0] is None
    last = per_epoch[-1]
    # an epoch sees every row once, so no rank-k projector beats the exact top-k energy
    assert last.energy_fraction <= best + 1e-12
    assert last.energy_fraction >= best - 0.01
    assert abs(last.norm_fraction - math.sqrt(last.energy_fraction)) <= 1e-12
    assert principal_cosines(oja.projector, torch.linalg.svd(phi)[2][:k].T).min() >= 0.95
    # negative control: the random starting projector captures about k/P of the energy
    assert M.captured_energy(phi, initial).energy_fraction < 0.5 * best
    resumed = M.OjaModes(80, k, seed=1)
    resumed.load_state_tensors(oja.state_tensors())
    assert torch.equal(resumed.projector, oja.projector) and torch.equal(resumed.estimate, oja.estimate)


def test_every_value_within_1e3_on_a_gapped_spectrum_with_a_flat_tail():
    phi = gapped_flat_tail()
    exact = torch.linalg.svdvals(phi)
    res = M.streamed_svd(chunk_source(phi, size=64), len(phi), 20)
    errors = relative_errors(res.s, exact)
    assert len(res.s) == 20 and float(errors.max()) <= 1e-3
    assert res.converged and res.estimated_error <= M.SVD_TOLERANCE
    # the estimate the iteration stopped on is honest: the true error is not far above it
    assert float(errors.max()) <= 10 * res.estimated_error
    # negative control: the fixed schedule it replaced (10 extra columns, 2 power iterations)
    # misses 1e-3 here, and says so
    fixed = M.streamed_svd(chunk_source(phi, size=64), len(phi), 20, oversample=10, power_iterations=2)
    assert float(relative_errors(fixed.s, exact).max()) > 1e-3
    assert not fixed.converged and fixed.estimated_error > M.SVD_TOLERANCE


@pytest.mark.parametrize("spectrum", ["slow", "cluster", "rank-deficient"])
def test_convergence_control_on_hard_spectra(spectrum):
    r = 300
    s = {"slow": 10 / torch.arange(1, r + 1, dtype=F64).sqrt(),  # σ_k ∝ k^-1/2: no gap anywhere
         "cluster": torch.cat([torch.linspace(10, 5, 19, dtype=F64), torch.tensor([4.0, 3.999, 3.998], dtype=F64),
                               torch.linspace(3.9, 1, r - 22, dtype=F64)]),  # three equal-ish values across K
         "rank-deficient": torch.cat([torch.logspace(1, 0, 12, dtype=F64), torch.zeros(r - 12, dtype=F64)])}[spectrum]
    phi = matrix_with_spectrum(s, 320, 400, seed=1)
    exact = torch.linalg.svdvals(phi)
    res = M.streamed_svd(row_chunks(lambda rows: phi[rows], 320, 50), 320, 20)
    meaningful = exact[:20] > 1e-10 * exact[0]
    assert float(relative_errors(res.s, exact)[meaningful].max()) <= 1e-3
    assert bool((res.s[~meaningful].abs() <= 1e-10 * exact[0]).all())
    assert res.converged


def test_a_block_as_wide_as_the_matrix_is_exact_after_one_iteration():
    phi = decaying_matrix(m=40, p=25, decay=0.9)
    res = M.streamed_svd(row_chunks(lambda rows: phi[rows], 40, 16), 40, 20)
    assert res.passes == 2 and res.estimated_error == 0.0 and res.converged
    assert float(relative_errors(res.s, torch.linalg.svdvals(phi)).max()) <= 1e-12


@pytest.mark.parametrize("energy", [0.9, 0.99])
def test_auto_grows_k_until_the_energy_is_held(energy):
    phi = gapped_flat_tail(m=300, p=400)
    exact = torch.linalg.svdvals(phi)
    curve = torch.cumsum(exact ** 2, 0) / float((phi ** 2).sum())
    k_exact = int(torch.nonzero(curve >= energy)[0]) + 1
    res = M.streamed_svd(chunk_source(phi, size=64), len(phi), energy=energy)
    assert len(res.s) == k_exact and res.energy_target == energy
    assert res.k_at(energy) == k_exact and float(res.energy_curve[-1]) >= energy
    assert float(relative_errors(res.s, exact).max()) <= 1e-3
    if energy == 0.9:  # inside the first block (32): no growth needed, still converged
        assert k_exact < M.AUTO_START_RANK and res.converged
    else:  # the flat tail puts K@99% past 32: it grew
        assert k_exact > M.AUTO_START_RANK


def test_rank_and_energy_are_exclusive():
    with pytest.raises(ValueError, match="one of them"):
        M.StreamedSVD(20, 3, energy=0.9)
    with pytest.raises(ValueError, match="one of them"):
        M.StreamedSVD(20)
    with pytest.raises(ValueError, match="energy"):
        M.StreamedSVD(20, energy=1.0)
