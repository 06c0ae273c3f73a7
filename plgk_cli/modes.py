"""Modes of the training gradients Φ_train(t) (M×P, rows g_m): paper Algorithm 1 and section 6.3
(truncated SVD, energy curve, K@X%, a_k, λ_k, c_{k,n}, the cancellation ratio CR(K)) and the online
estimator of A.8. Pure tensor maths in float64; Φ arrives in row chunks (chunks.py), never whole.

- :class:`StreamedSVD`, :func:`streamed_svd`, :class:`SVDModes` — randomized subspace iteration
  from passes over the rows, run until every reported singular value has converged to a relative
  tolerance (estimated from the iterates, not assumed), and, with ``energy``, grown until its top
  K modes hold that share of ‖Φ‖_F² (``--modes auto``).
- :class:`OjaModes` — the online mode estimator of A.8 and its captured-energy diagnostic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from plgk_cli.chunks import (F64, ChunkSource, Rows, device_of, gradient_matrix, orthonormal, row_positions,
                             sign_fix)

DEFAULT_FRACTIONS = (0.90, 0.95, 0.99)  # paper Table 3's K@90/95/99%
DEFAULT_ENERGY = 0.99  # --modes auto: the share of ‖Φ‖_F² the K modes must hold
SVD_TOLERANCE = 1e-4  # the estimated relative error every reported singular value must reach
MAX_POWER_ITERATIONS = 40  # then it stops and reports the error it estimates (converged: false)
MIN_OVERSAMPLE = 10  # the block is K + max(10, K) columns wide unless told otherwise
AUTO_START_RANK = 32  # --modes auto: the first K tried, doubled until the energy is held
AUTO_BLOCK_ITERATIONS = 10  # --modes auto: a block short of the energy grows after this many at most
NUMERICAL_ZERO = 1e-12  # singular values below this share of s_1 are rounding: no relative accuracy


def energy_curve(s: torch.Tensor, total_energy: float) -> torch.Tensor:
    """Cumulative captured energy Σ_{k≤K} s_k² / ‖Φ‖_F² (K = 1..len(s))."""
    return torch.cumsum(s.to(F64) ** 2, 0) / total_energy


def k_at_energy(s: torch.Tensor, total_energy: float, fraction: float) -> int | None:
    """Smallest K whose top-K modes hold ``fraction`` of the exact total energy; None when the
    computed modes do not reach it (store −1)."""
    if total_energy <= 0:
        return None
    hit = torch.nonzero(energy_curve(s, total_energy) >= fraction)
    return int(hit[0]) + 1 if len(hit) else None


def cancellation_ratio(drive: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """CR(K) of paper section 6.3 for every K = 1..K_max and audit point:

        CR_n(K) = |Σ_{k≤K} Λ_k c_{k,n}| / Σ_{k≤K} |Λ_k c_{k,n}|,

    drive Λ (K_max,), coefficients c (N, K_max) → (N, K_max). 1: no cancellation among the modes,
    ≈0: near-perfect cancellation; NaN where every term is zero. Invariant to the modes' signs.
    """
    terms = coefficients.to(F64) * drive.to(F64)[None, :]
    net, gross = terms.cumsum(1).abs(), terms.abs().cumsum(1)
    return torch.where(gross > 0, net / gross, torch.full_like(gross, torch.nan))


def mode_drive(v: torch.Tensor, sum_gradient: torch.Tensor) -> torch.Tensor:
    """λ_k = v_kᵀ(Φᵀ1) from orthonormal modes and the summed gradient; equals a_k s_k for exact
    singular vectors (Φᵀ1 = V S Uᵀ1), and gives drives for modes from another estimator (OjaModes)."""
    return v.to(F64).T @ sum_gradient.to(device=v.device, dtype=F64)


@dataclass(frozen=True)
class SVDModes:
    """Top-K modes of Φ_train(t*) (M, P) (paper Algorithm 1, section 6.3); float64.

    Signs: each u_k's largest-magnitude entry is positive (a_k, c_{k,n} flip with the sign of a
    mode; λ_k c_{k,n} and CR do not).
    """

    s: torch.Tensor  # (K,) singular values, descending
    u: torch.Tensor  # (M, K) left singular vectors
    v: torch.Tensor | None  # (P, K) right singular vectors (parameter-space modes); None if not kept
    total_energy: float  # ‖Φ‖_F² = Σ_m ‖g_m‖², exact, from the same pass
    row_sq_norms: torch.Tensor  # (M,) ‖g_m‖²
    sum_gradient: torch.Tensor  # (P,) Φᵀ1 = Σ_m g_m (the summed training gradient at t*)
    coefficients: torch.Tensor | None = None  # (N, K) c_{k,n} = v_k·g_n for audit gradients
    net_exact: torch.Tensor | None = None  # (N,) (Φᵀ1)·g_n = Σ_m g_m·g_n, what the modes decompose
    estimated_error: float = 0.0  # the largest estimated relative error of s (0: exact subspace)
    converged: bool = True  # estimated_error met the tolerance (or the subspace was exact)
    passes: int = 0  # passes over the rows it took
    energy_target: float | None = None  # auto: the energy share K was grown to capture

    @property
    def a(self) -> torch.Tensor:
        """a_k = u_kᵀ1 (Algorithm 1 line 3): net alignment of the training set with mode k."""
        return self.u.sum(0)

    @property
    def drive(self) -> torch.Tensor:
        """λ_k = a_k s_k (Algorithm 1 line 4), the mode drive Λ_k of section 6.3."""
        return self.a * self.s

    @property
    def energy_curve(self) -> torch.Tensor:
        return energy_curve(self.s, self.total_energy)

    def k_at(self, fraction: float) -> int | None:
        return k_at_energy(self.s, self.total_energy, fraction)

    def k_at_energy(self, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict:
        """{fraction: K@fraction or None} (paper Table 3's K@90/95/99%)."""
        return {f: self.k_at(f) for f in fractions}

    def cancellation_ratio(self) -> torch.Tensor:
        """CR_n(K) for K = 1..K_max (N, K_max); needs ``coefficients``."""
        if self.coefficients is None:
            raise RuntimeError("cancellation_ratio: no audit coefficients (pass g_audit to result())")
        return cancellation_ratio(self.drive, self.coefficients)

    def net_by_modes(self) -> torch.Tensor:
        """Σ_{k≤K} λ_k c_{k,n} for K = 1..K_max (N, K_max): the top-K reconstruction of ``net_exact``
        (section 6.3: Σ_m g_m·g_n = Σ_k λ_k c_{k,n} when all modes are kept)."""
        if self.coefficients is None:
            raise RuntimeError("net_by_modes: no audit coefficients (pass g_audit to result())")
        return (self.coefficients * self.drive[None, :]).cumsum(1)


class StreamedSVD:
    """Truncated SVD of Φ (M×P) from passes over its row chunks, never holding Φ.

    Randomized subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4) on a block of
    ℓ = K + max(10, K) columns: pass 0: Y = ΦΩ (Ω Gaussian P×ℓ), also the exact ‖Φ‖_F², ‖g_m‖²
    and Φᵀ1; then alternately Z = ΦᵀQ(Y) and Y = Φ Q(Z). Every Z pass gives Ritz values, the
    singular values of QᵀΦ = Zᵀ, which are lower bounds of the exact ones (interlacing) and rise
    towards them geometrically: by (σ_{ℓ+1}/σ_k)⁴ per iteration asymptotically. From the last two
    increments and that rate (σ_{ℓ+1} taken as the block's smallest Ritz value, the larger of the
    two rates used) the remaining error of each of the K values is extrapolated; iteration stops
    when the largest is within ``tolerance`` (relative), after at least three Z passes, or after
    ``max_power_iterations`` (then ``converged`` is False and the estimate is reported). A block
    as wide as min(M, P) spans Φ's range: the result is exact after its first Z pass.

    With ``energy`` (and no ``rank``) K starts at 32 and doubles (the block so far kept as the
    start of the wider one) while the block's top K Ritz values, extrapolated, cannot hold
    ``energy`` of ‖Φ‖_F²; the result keeps the smallest K whose values do, and only those must
    converge. ``power_iterations`` fixes the number of iterations instead (the error is still
    estimated, inf before three Z passes: for comparisons). ``noise_floor``: values below this
    share of s_1 are taken as rounding (the gradients' dtype), with no relative accuracy to reach.

    Drive it as: ``while not svd.done: [svd.feed(rows, g) for rows, g in chunks()]; svd.end_pass()``,
    then :meth:`result`. Each pass must feed every row exactly once (any chunking, any order). Rows
    must be the same in every pass (recomputed gradients may differ by rounding only).
    Memory: M×ℓ + 2·P×ℓ + one chunk.
    """

    def __init__(self, num_rows: int, rank: int | None = None, *, energy: float | None = None,
                 oversample: int | None = None, power_iterations: int | None = None,
                 tolerance: float = SVD_TOLERANCE, max_power_iterations: int = MAX_POWER_ITERATIONS,
                 noise_floor: float = NUMERICAL_ZERO, seed: int = 0, device=None):
        if (rank is None) == (energy is None):
            raise ValueError("give the rank K or the energy share to hold (auto), one of them")
        if rank is not None and not 1 <= rank <= num_rows:
            raise ValueError(f"rank: need 1 <= rank <= num_rows ({num_rows}), got {rank}")
        if energy is not None and not 0 < energy < 1:
            raise ValueError(f"energy: need a share in (0, 1), got {energy}")
        if (oversample is not None and oversample < 0) or (power_iterations is not None and power_iterations < 0):
            raise ValueError("oversample and power_iterations must be >= 0")
        if not tolerance > 0 or max_power_iterations < 0:
            raise ValueError("tolerance must be > 0 and max_power_iterations >= 0")
        self.num_rows, self.energy, self.seed = num_rows, energy, seed
        self.rank = rank if rank is not None else min(AUTO_START_RANK, num_rows)
        self.oversample, self.power_iterations = oversample, power_iterations
        self.tolerance, self.max_power_iterations = tolerance, max_power_iterations
        self.noise_floor = noise_floor
        self.device = device_of(device)
        self.pass_index = 0
        self._stage = "Y"
        self._p = None
        self._q = None  # orthonormal M×ℓ basis of the current range estimate
        self._acc = None  # Y (M×ℓ) or Z (P×ℓ) being accumulated this pass
        self._seen = torch.zeros(num_rows, dtype=torch.bool, device=self.device)
        self._z_final = None
        self._ritz = []  # Ritz values of the Z passes since the block last changed
        self.estimated_error, self.converged = math.inf, False

    @property
    def done(self) -> bool:
        return self._z_final is not None

    @property
    def passes(self) -> int:
        """Passes fed so far."""
        return self.pass_index

    def _block_width(self, rank: int) -> int:
        over = self.oversample if self.oversample is not None else max(MIN_OVERSAMPLE, rank)
        return min(rank + over, self._cap)

    def _gaussian(self, columns: int) -> torch.Tensor:
        return torch.randn(self._p, columns, generator=self._generator, device=self.device, dtype=F64)

    def _start(self, p: int) -> None:
        if self.rank > p:
            if self.energy is None:
                raise ValueError(f"rank {self.rank} exceeds the number of parameters {p}")
            self.rank = p
        self._p, self._cap = p, min(self.num_rows, p)
        self._width = self._block_width(self.rank)
        self._generator = torch.Generator(device=self.device).manual_seed(self.seed)
        self._right = self._gaussian(self._width)  # Ω
        self.total_energy = torch.zeros((), dtype=F64, device=self.device)
        self.row_sq_norms = torch.zeros(self.num_rows, dtype=F64, device=self.device)
        self.sum_gradient = torch.zeros(p, dtype=F64, device=self.device)

    def feed(self, rows: Rows, g: torch.Tensor) -> None:
        """One chunk of the current pass: rows (C,) and their gradients (C, P)."""
        if self.done:
            raise RuntimeError("feed: all passes are done; call result()")
        idx = row_positions(rows, self.device)
        g = gradient_matrix(g, "g", self._p).to(device=self.device, dtype=F64)
        if len(idx) != g.shape[0]:
            raise ValueError(f"rows: {len(idx)} positions for {g.shape[0]} gradient rows")
        if self._p is None:
            self._start(g.shape[1])
        if bool(self._seen[idx].any()) or len(torch.unique(idx)) != len(idx):
            raise ValueError(f"feed: a row was fed twice in pass {self.pass_index}")
        self._seen[idx] = True
        if self._stage == "Y":
            if self._acc is None:
                self._acc = torch.zeros(self.num_rows, self._width, dtype=F64, device=self.device)
            self._acc[idx] = g @ self._right
            if self.pass_index == 0:
                sq = (g * g).sum(1)
                self.row_sq_norms[idx] = sq
                self.total_energy += sq.sum()
                self.sum_gradient += g.sum(0)
        else:
            if self._acc is None:
                self._acc = torch.zeros(self._p, self._width, dtype=F64, device=self.device)
            self._acc += g.T @ self._q[idx]

    def end_pass(self) -> None:
        if self.done:
            raise RuntimeError("end_pass: all passes are done")
        if not bool(self._seen.all()):
            raise ValueError(f"end_pass: {int((~self._seen).sum())} of {self.num_rows} rows were not "
                             f"fed in pass {self.pass_index}")
        if self._stage == "Y":
            self._q, self._stage = orthonormal(self._acc), "Z"
        else:
            self._after_z_pass(self._acc)
        self._acc = None
        self._seen.zero_()
        self.pass_index += 1

    def _after_z_pass(self, z: torch.Tensor) -> None:
        self._ritz.append(torch.linalg.svdvals(z))  # singular values of QᵀΦ = Zᵀ, descending
        exact = self._width >= self._cap
        kept = self.rank
        if self.energy is not None:
            # Ritz values are lower bounds, so K counted from them is at least the exact K@ENERGY
            # and falls to it as they converge (an exact block counts all its values); its values
            # are the ones that must meet the tolerance.
            held = k_at_energy(self._ritz[-1][:self._width if exact else self.rank],
                               float(self.total_energy), self.energy)
            if held is None and not exact and self._energy_out_of_reach():
                self._grow(z)
                return
            kept = held if held is not None else (self._width if exact else self.rank)
        # only the values that will be reported must converge
        self.estimated_error = 0.0 if exact else self._error_estimate(kept)
        self.converged = self.estimated_error <= self.tolerance
        limit = self.power_iterations if self.power_iterations is not None else self.max_power_iterations
        finished = exact or len(self._ritz) > limit or (self.power_iterations is None and self.converged)
        if self.energy is not None and held is None and not exact:
            finished = len(self._ritz) > limit  # short of the energy: iterate on (or grow, above)
        if finished:
            self.rank = kept
            self._z_final = z
            self._right = None
        else:
            self._right, self._stage = orthonormal(z), "Y"

    def _energy_out_of_reach(self) -> bool:
        """Whether this block's top-K Ritz energy, extrapolated like the values themselves, stays
        short of the target: then K must grow. Also after AUTO_BLOCK_ITERATIONS of one block, so
        that a slowly converging block cannot hold the growth up."""
        if len(self._ritz) < 3:
            return False
        if len(self._ritz) > AUTO_BLOCK_ITERATIONS:
            return True
        older, old, new = (float((r[:self.rank] ** 2).sum()) for r in self._ritz[-3:])
        step, previous_step = new - old, old - older
        rate = min(max(step / previous_step, 0.0), 0.999) if previous_step > 0 else 0.0
        return new + step * rate / (1 - rate) < self.energy * float(self.total_energy)

    def _grow(self, z: torch.Tensor) -> None:
        """Double K; the block so far starts the wider one, new Gaussian columns fill it."""
        self.rank = min(2 * self.rank, self._cap)
        width = self._block_width(self.rank)
        self._right = orthonormal(torch.cat([orthonormal(z), self._gaussian(width - self._width)], 1))
        self._width, self._stage, self._ritz = width, "Y", []
        self.estimated_error, self.converged = math.inf, False

    def _error_estimate(self, count: int) -> float:
        """The largest extrapolated remaining relative error of the top ``count`` Ritz values (inf
        until three Z passes of this block: one increment gives no rate to trust)."""
        if len(self._ritz) < 3:
            return math.inf
        older, old, new = (r[:count] for r in self._ritz[-3:])
        tiny = torch.finfo(F64).tiny
        step, previous_step = (new - old).abs(), (old - older).abs()
        rate = (self._ritz[-1][-1] / new.clamp_min(tiny)) ** 4
        observed = torch.where(previous_step > 0, step / previous_step.clamp_min(tiny), torch.zeros_like(step))
        rate = torch.maximum(rate, observed).clamp(max=0.999)
        remaining = step * rate / (1 - rate)
        meaningful = new > self.noise_floor * new[0]
        rel = torch.where(meaningful, remaining / new.clamp_min(tiny), torch.zeros_like(new))
        return float(rel.max())

    def result(self, g_audit: torch.Tensor | None = None, keep_v: bool = True) -> SVDModes:
        """The top-``rank`` modes; with audit loss gradients (N, P) also c_{k,n} and (Φᵀ1)·g_n."""
        if not self.done:
            raise RuntimeError(f"result: passes still to feed (pass {self.pass_index} is next)")
        # Bᵀ = ΦᵀQ = Q₂R;  R = A S Bhᵀ  ⇒  Φ ≈ Q B = (Q Bh) S (Q₂ A)ᵀ
        q2, r = torch.linalg.qr(self._z_final, mode="reduced")
        a_small, s, bh_t = torch.linalg.svd(r)
        k = self.rank
        u = self._q @ bh_t.T[:, :k]
        v = q2 @ a_small[:, :k]
        signs = sign_fix(u)
        u, v, s = u * signs, v * signs, s[:k]
        coefficients = net = None
        if g_audit is not None:
            ga = gradient_matrix(g_audit, "g_audit", self._p).to(device=self.device, dtype=F64)
            coefficients = ga @ v
            net = ga @ self.sum_gradient
        return SVDModes(s=s, u=u, v=v if keep_v else None, total_energy=float(self.total_energy),
                        row_sq_norms=self.row_sq_norms, sum_gradient=self.sum_gradient,
                        coefficients=coefficients, net_exact=net, estimated_error=self.estimated_error,
                        converged=self.converged, passes=self.pass_index, energy_target=self.energy)


def streamed_svd(chunks: ChunkSource, num_rows: int, rank: int | None = None, *,
                 energy: float | None = None, g_audit: torch.Tensor | None = None, keep_v: bool = True,
                 **options) -> SVDModes:
    """Truncated SVD of Φ (num_rows × P) whose row chunks ``chunks()`` yields as (rows, g), called
    once per pass until it has converged. ``options``: those of :class:`StreamedSVD`."""
    svd = StreamedSVD(num_rows, rank, energy=energy, **options)
    while not svd.done:
        for rows, g in chunks():
            svd.feed(rows, g)
        svd.end_pass()
    return svd.result(g_audit, keep_v)


@dataclass(frozen=True)
class CapturedEnergy:
    """Share of a feature matrix X (rows g_m) that a projector V (P×K, orthonormal) keeps."""

    norm_fraction: float  # ‖XV‖_F / ‖X‖_F — the ratio paper A.8 plots (Figure 25)
    energy_fraction: float  # ‖XV‖_F² / ‖X‖_F² — comparable with the SVD energy curve s_k²/‖Φ‖_F²


def captured_energy(g: torch.Tensor, v: torch.Tensor) -> CapturedEnergy:
    g = g.to(device=v.device, dtype=F64)
    total = float((g * g).sum())
    kept = float((g @ v.to(F64)).pow(2).sum())
    frac = kept / total if total > 0 else float("nan")
    return CapturedEnergy(math.sqrt(frac) if total > 0 else float("nan"), frac)


class OjaModes:
    """Online top-K modes of the training features (paper A.8): Oja's subspace rule (Oja 1989),

        V ← orth(V + η XᵀX V),   η = lr / ‖X‖_F²   (QR after every step),

    streamed over the minibatches' per-sample loss gradients X (B, P). The step is normalised by the
    batch's energy so that it is free of the gradients' scale (η·trace(XᵀX) = lr). At each
    :meth:`end_epoch` the running estimate is frozen as the projector used on the *next* epoch's
    gradients, and :meth:`observe` reports the share of each batch that projector captures (A.8,
    Figure 25). Before the first :meth:`end_epoch` there is no projector and observe returns None.
    The estimate keeps running across epochs (warm start). Order-agnostic: "next" is the next epoch
    fed, so a backward walk uses epoch e+1's projector on epoch e.
    """

    STATE = ("estimate", "projector")

    def __init__(self, num_params: int, rank: int, *, lr: float = 3.0, seed: int = 0, device=None):
        if not 1 <= rank <= num_params:
            raise ValueError(f"rank: need 1 <= rank <= num_params ({num_params}), got {rank}")
        if not lr > 0:
            raise ValueError("lr must be > 0")
        self.device = device_of(device)
        self.num_params, self.rank, self.lr = num_params, rank, float(lr)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        start = torch.randn(num_params, rank, generator=gen, device=self.device, dtype=F64)
        self.estimate = orthonormal(start)
        self.projector: torch.Tensor | None = None
        self._kept = 0.0
        self._total = 0.0

    def observe(self, g: torch.Tensor) -> CapturedEnergy | None:
        """One checkpoint's minibatch gradients (B, P): captured share under the frozen projector
        (None before the first epoch ends), then one Oja step on the running estimate."""
        x = gradient_matrix(g, "g", self.num_params).to(device=self.device, dtype=F64)
        energy = float((x * x).sum())
        captured = None
        if self.projector is not None and energy > 0:
            kept = float((x @ self.projector).pow(2).sum())
            self._kept += kept
            self._total += energy
            captured = CapturedEnergy(math.sqrt(kept / energy), kept / energy)
        if energy > 0:
            self.estimate = orthonormal(self.estimate + (self.lr / energy) * (x.T @ (x @ self.estimate)))
        return captured

    def end_epoch(self) -> CapturedEnergy | None:
        """Close an epoch: returns the epoch's aggregate share under the projector it used (None for
        the first), then freezes the current estimate as the projector for the next epoch."""
        out = None
        if self.projector is not None and self._total > 0:
            frac = self._kept / self._total
            out = CapturedEnergy(math.sqrt(frac), frac)
        self.projector = self.estimate.clone()
        self._kept = self._total = 0.0
        return out

    def state_tensors(self, prefix: str = "kernel/oja") -> dict:
        out = {f"{prefix}/estimate": self.estimate,
               f"{prefix}/epoch_sums": torch.tensor([self._kept, self._total], dtype=F64)}
        if self.projector is not None:
            out[f"{prefix}/projector"] = self.projector
        return out

    def load_state_tensors(self, tensors: dict, prefix: str = "kernel/oja") -> None:
        self.estimate = tensors[f"{prefix}/estimate"].to(device=self.device, dtype=F64)
        p = tensors.get(f"{prefix}/projector")
        self.projector = None if p is None else p.to(device=self.device, dtype=F64)
        self._kept, self._total = (float(x) for x in tensors[f"{prefix}/epoch_sums"])
