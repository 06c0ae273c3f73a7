"""Kernel geometry of a recorded run: PLGK, IPS, temporal kernel, regime metrics (pure tensor maths).

Paper sections 3.6, 4, 6.2, 6.3, A.2.3, A.6–A.8. Everything here works on per-sample *loss*
gradients g = ε φ = ∇_θ ℓ(x, y; θ_t) as flat vectors — rows of a (B, P) tensor, as
:meth:`plgk_cli.gradients.GradientComputer.loss_gradients` returns them — accumulates in float64 on
the accumulator's device, and never holds M×P: the training side always arrives in row chunks
("rows" are positions 0..M-1 of the training examples being analysed, as an int64 tensor or a
slice). No file I/O: the replay engine feeds these objects once per kernel checkpoint, the store
writes what they return.

- :class:`PLGKAccumulator` — PLGK Gram matrices (Def. 7, eq. 11; eq. 29 with a diagonal
  preconditioner), IPS (Def. 8, eq. 15) and the distances of Cor. 4.1.1 (eq. 16).
- :class:`TemporalKernel`, :class:`TemporalKernelSketch`, :func:`temporal_spectrum` — the
  T×(MP) temporal kernel of eq. 40 / A.7, its spectrum and participation ratio.
- :func:`row_cosines`, :class:`MeanRowCosine`, :func:`subspace_overlap` — kernel-regime metrics of
  section 6.3 (i)–(iii).
- :class:`NetGrossInfluence` and helpers — net S_n(t) and gross G_n(t) influence (section 6.3).
- :func:`ips_l2_norm`, :func:`ips_class_margin`, :func:`auroc`, :func:`average_precision`,
  :func:`spearman` — the difficulty scores of section 6.2 / Table 1 and their evaluation.

Use per kernel checkpoint t (weight w_t, optional diagonal preconditioner A_t as a P-vector):
``plgk.begin_checkpoint(g_audit, A_t, w_t)``; for each chunk of training rows
``plgk.add_train_chunk(rows, g)`` (and ``sketch.add_chunk(k, rows, g)``, ``MeanRowCosine.add`` ...);
``plgk.end_checkpoint()``. The modes of the training gradients (Algorithm 1, A.8) are modes.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from plgk_cli.chunks import F64, Rows, device_of, gradient_matrix, orthonormal, row_positions, sign_fix

# ----------------------------------------------------------------------------- helpers


def _weight(weight: float) -> float:
    w = float(weight)
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"weight: need a finite weight >= 0 (a negative one breaks the PSD kernel), got {w}")
    return w


def _sqrt_precond(precond: torch.Tensor | None, num_params: int, device, dtype) -> torch.Tensor | None:
    """A_t^{1/2} of a diagonal preconditioner given as a P-vector (paper A.2.3, eq. 29)."""
    if precond is None:
        return None
    a = torch.as_tensor(precond).reshape(-1).to(device=device, dtype=F64)
    if a.numel() != num_params:
        raise ValueError(f"precond: {a.numel()} entries, expected one per parameter ({num_params})")
    if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
        raise ValueError("precond: eq. 29 needs a diagonal A_t with finite entries >= 0")
    return a.sqrt().to(dtype)


# ----------------------------------------------------------------------------- PLGK and IPS


def ips_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """IPS (paper eq. 15) of a square PLGK Gram: P'_ij / sqrt(P'_ii P'_jj), clamped to [-1, 1].

    The diagonal is set to exactly 1; rows/columns of a point whose path feature is zero
    (P'_ii = 0, IPS undefined) are NaN.
    """
    d = gram.diagonal().clone()
    out = cosine_normalise(gram, d, d)
    idx = torch.arange(len(d), device=gram.device)
    out[idx, idx] = torch.where(d > 0, torch.ones_like(d), torch.full_like(d, torch.nan))
    return out


def cosine_normalise(gram: torch.Tensor, row_sq_norms: torch.Tensor,
                     col_sq_norms: torch.Tensor) -> torch.Tensor:
    """gram[i, j] / (‖Φ_i‖ ‖Φ_j‖) from squared path-feature norms, clamped to [-1, 1] (Cauchy–Schwarz);
    NaN where either norm is zero."""
    r, c = row_sq_norms.to(F64), col_sq_norms.to(F64)
    denom = r.clamp_min(0).sqrt()[:, None] * c.clamp_min(0).sqrt()[None, :]
    out = (gram.to(F64) / denom).clamp(-1.0, 1.0)
    return torch.where(denom > 0, out, torch.full_like(out, torch.nan))


def chord_distance(ips: torch.Tensor) -> torch.Tensor:
    """d_chord = sqrt(2 − 2 IPS) (paper Cor. 4.1.1, eq. 16): Euclidean distance of the unit path features."""
    return (2.0 - 2.0 * ips).clamp_min(0.0).sqrt()


def angle_distance(ips: torch.Tensor) -> torch.Tensor:
    """d_angle = arccos(IPS) in radians (paper Cor. 4.1.1, eq. 16)."""
    return torch.arccos(ips.clamp(-1.0, 1.0))


class PLGKAccumulator:
    """PLGK Gram matrices over the kernel checkpoints (paper Def. 7, eq. 11):

        P'_ij = Σ_t w_t (A_t^{1/2} g_i(t)) · (A_t^{1/2} g_j(t)),

    g = ε φ the per-sample loss gradient at θ_t, w_t ≥ 0 the caller's checkpoint weight (e.g. the
    number of steps a kernel checkpoint stands for, so that a strided sum estimates eq. 11's sum over
    all steps; IPS does not depend on a uniform weight) and A_t an optional diagonal preconditioner
    (eq. 29; Adam/RMSprop/Adagrad's 1/(sqrt(v̂)+eps)), absorbed into the features as A.2.3 suggests.
    This is Φ_path Φ_pathᵀ with Φ_path(x) = (sqrt(w_t) A_t^{1/2} g(x, t))_t (eq. 13, 14).

    Blocks (float64, on `device`): ``audit_gram`` (N, N), ``audit_train`` (N, M) — audit rows,
    training columns —, ``train_sq_norms`` (M) = P'_mm, and ``train_gram`` (M, M) when asked for.

    Per kernel checkpoint: :meth:`begin_checkpoint` with the audit gradients (adds audit×audit),
    :meth:`add_train_chunk` once for every training row (audit×train, P'_mm and the diagonal blocks
    of train×train), :meth:`add_train_pair` for each pair of distinct chunks when ``train_gram``
    (or let :func:`feed_training_rows` run both loops), then :meth:`end_checkpoint`, which checks
    that every training row (and every train×train entry) was fed exactly once.

    ``compute_dtype=torch.float32`` does each checkpoint's GEMMs in float32 (about 1e-6 relative
    per checkpoint; far faster on GPUs without fast float64) and still accumulates in float64.
    """

    STATE = ("audit_gram", "audit_train", "train_sq_norms", "train_gram")

    def __init__(self, num_audit: int, num_train: int = 0, *, train_gram: bool = False, device=None,
                 compute_dtype: torch.dtype = F64):
        if num_audit < 0 or num_train < 0:
            raise ValueError("num_audit and num_train must be >= 0")
        if train_gram and num_train == 0:
            raise ValueError("train_gram needs num_train > 0")
        self.device = device_of(device)
        self.compute_dtype = compute_dtype
        f64 = dict(dtype=F64, device=self.device)
        self.num_audit, self.num_train = num_audit, num_train
        self.audit_gram = torch.zeros(num_audit, num_audit, **f64)
        self.audit_train = torch.zeros(num_audit, num_train, **f64)
        self.train_sq_norms = torch.zeros(num_train, **f64)
        self.train_gram = torch.zeros(num_train, num_train, **f64) if train_gram else None
        self.checkpoints = 0  # completed kernel checkpoints
        self._open = False

    # -- feeding, once per kernel checkpoint

    def begin_checkpoint(self, g_audit: torch.Tensor | None, precond: torch.Tensor | None = None,
                         weight: float = 1.0, num_params: int | None = None) -> None:
        """Open checkpoint t: audit loss gradients (N, P) at θ_t, optional A_t (P) and weight w_t.
        Adds w_t (A^{1/2}G)(A^{1/2}G)ᵀ to ``audit_gram``. ``num_params`` is needed only when N = 0."""
        if self._open:
            raise RuntimeError("begin_checkpoint: the previous checkpoint was not ended (end_checkpoint)")
        if g_audit is None:
            if self.num_audit:
                raise ValueError(f"g_audit: expected {self.num_audit} audit gradients")
            if num_params is None:
                raise ValueError("begin_checkpoint: without audit gradients pass num_params")
            p = num_params
        else:
            g_audit = gradient_matrix(g_audit, "g_audit")
            if g_audit.shape[0] != self.num_audit:
                raise ValueError(f"g_audit: {g_audit.shape[0]} rows, expected {self.num_audit}")
            p = g_audit.shape[1]
        self._p = p
        self._w = _weight(weight)
        self._sqrt_a = _sqrt_precond(precond, p, self.device, self.compute_dtype)
        self._h_audit = None
        if self.num_audit:
            h = self._features(g_audit)
            gram = (h @ h.T).to(F64)
            self.audit_gram += self._w * 0.5 * (gram + gram.T)  # exactly symmetric
            self._h_audit = h
        self._fed = torch.zeros(self.num_train, dtype=torch.int64, device=self.device)
        self._pairs_fed = 0
        self._open = True

    def _features(self, g: torch.Tensor) -> torch.Tensor:
        h = g.to(device=self.device, dtype=self.compute_dtype)
        return h * self._sqrt_a if self._sqrt_a is not None else h

    def _check_open(self, what: str) -> None:
        if not self._open:
            raise RuntimeError(f"{what}: call begin_checkpoint first")

    def add_train_chunk(self, rows: Rows, g_train: torch.Tensor) -> None:
        """Training loss gradients (C, P) at θ_t of the rows ``rows``: adds audit×train columns,
        P'_mm and, with ``train_gram``, the chunk's diagonal block."""
        self._check_open("add_train_chunk")
        idx = row_positions(rows, self.device)
        g_train = gradient_matrix(g_train, "g_train", self._p)
        if len(idx) != g_train.shape[0]:
            raise ValueError(f"rows: {len(idx)} positions for {g_train.shape[0]} gradient rows")
        h = self._features(g_train)
        self.train_sq_norms.index_add_(0, idx, self._w * (h * h).sum(1).to(F64))
        if self._h_audit is not None:
            self.audit_train.index_add_(1, idx, self._w * (self._h_audit @ h.T).to(F64))
        if self.train_gram is not None:
            block = (h @ h.T).to(F64)
            self._add_block(idx, idx, self._w * 0.5 * (block + block.T))
            self._pairs_fed += len(idx) ** 2
        self._fed.index_add_(0, idx, torch.ones_like(idx))

    def add_train_pair(self, rows_a: Rows, g_a: torch.Tensor, rows_b: Rows, g_b: torch.Tensor) -> None:
        """Off-diagonal train×train block of two *disjoint* chunks: adds [a, b] and its transpose [b, a]."""
        self._check_open("add_train_pair")
        if self.train_gram is None:
            raise RuntimeError("add_train_pair: this accumulator was made without train_gram=True")
        ia, ib = row_positions(rows_a, self.device), row_positions(rows_b, self.device)
        g_a, g_b = gradient_matrix(g_a, "g_a", self._p), gradient_matrix(g_b, "g_b", self._p)
        if len(ia) != len(g_a) or len(ib) != len(g_b):
            raise ValueError("add_train_pair: rows and gradients differ in length")
        block = self._w * (self._features(g_a) @ self._features(g_b).T).to(F64)
        self._add_block(ia, ib, block)
        self._add_block(ib, ia, block.T)
        self._pairs_fed += 2 * len(ia) * len(ib)

    def _add_block(self, ia: torch.Tensor, ib: torch.Tensor, block: torch.Tensor) -> None:
        self.train_gram.index_put_((ia[:, None], ib[None, :]), block, accumulate=True)

    def end_checkpoint(self) -> None:
        """Close the checkpoint; raises if a training row was missed or fed twice."""
        self._check_open("end_checkpoint")
        self._open = False
        self._h_audit = None
        if self.num_train:
            missing = int((self._fed == 0).sum())
            repeated = int((self._fed > 1).sum())
            if missing or repeated:
                raise ValueError(f"end_checkpoint: {missing} training rows never fed and {repeated} fed "
                                 "more than once at this checkpoint; the PLGK would be wrong")
            if self.train_gram is not None and self._pairs_fed != self.num_train ** 2:
                raise ValueError(f"end_checkpoint: train×train covered {self._pairs_fed} of "
                                 f"{self.num_train ** 2} entries; feed every pair of chunks once")
        self.checkpoints += 1

    # -- results

    def audit_sq_norms(self) -> torch.Tensor:
        """‖Φ_path(x_n)‖² = P'_nn (N)."""
        return self.audit_gram.diagonal().clone()

    def audit_ips(self) -> torch.Tensor:
        """IPS among audit points (N, N), eq. 15; diagonal exactly 1."""
        return ips_from_gram(self.audit_gram)

    def audit_train_ips(self) -> torch.Tensor:
        """IPS of audit point n and training example m (N, M): P'_nm / sqrt(P'_nn P'_mm), eq. 15."""
        return cosine_normalise(self.audit_train, self.audit_sq_norms(), self.train_sq_norms)

    def train_ips(self) -> torch.Tensor:
        """IPS among training examples (M, M), eq. 15 (needs ``train_gram``)."""
        if self.train_gram is None:
            raise RuntimeError("train_ips: this accumulator was made without train_gram=True")
        return ips_from_gram(self.train_gram)

    def state_tensors(self, prefix: str = "kernel/plgk") -> dict:
        """Accumulated sums for a progress commit (between checkpoints only)."""
        if self._open:
            raise RuntimeError("state_tensors: a checkpoint is still open")
        out = {f"{prefix}/{n}": getattr(self, n) for n in self.STATE if getattr(self, n) is not None}
        out[f"{prefix}/checkpoints"] = torch.tensor(self.checkpoints)
        return out

    def load_state_tensors(self, tensors: dict, prefix: str = "kernel/plgk") -> None:
        for n in self.STATE:
            mine = getattr(self, n)
            if mine is None:
                continue
            saved = tensors[f"{prefix}/{n}"]
            if saved.shape != mine.shape:
                raise ValueError(f"progress: {prefix}/{n} has shape {tuple(saved.shape)}, "
                                 f"expected {tuple(mine.shape)}")
            setattr(self, n, saved.to(device=self.device, dtype=F64))
        self.checkpoints = int(tensors[f"{prefix}/checkpoints"])


def feed_training_rows(acc: PLGKAccumulator, gradients_of: Callable[[torch.Tensor], torch.Tensor],
                       chunk_size: int) -> None:
    """The training side of one open checkpoint: every chunk once (audit×train, P'_mm) and, with
    ``train_gram``, every later chunk against it. Costs n + n(n−1)/2 chunk gradient evaluations with
    train×train (n = ⌈M / chunk_size⌉), n without."""
    starts = list(range(0, acc.num_train, chunk_size))
    rows = [torch.arange(s, min(s + chunk_size, acc.num_train), device=acc.device) for s in starts]
    for i, rows_i in enumerate(rows):
        g_i = gradients_of(rows_i)
        acc.add_train_chunk(rows_i, g_i)
        if acc.train_gram is not None:
            for rows_j in rows[i + 1:]:
                acc.add_train_pair(rows_i, g_i, rows_j, gradients_of(rows_j))


# ----------------------------------------------------------------------------- temporal kernel (A.7)


class TemporalKernel:
    """K_time[t, t'] = Σ_m g_m(t)·g_m(t') over the kernel checkpoints t (paper eq. 40, A.7), exact.

    Eq. 40 contracts the example index *pairwise* (m with the same m), so it is the Frobenius inner
    product ⟨Φ_train(t), Φ_train(t')⟩ and cannot be had from per-checkpoint summed gradients
    (those give Σ_{m,m'} g_m(t)·g_{m'}(t')). Exactly it needs each example's gradients at all kernel
    checkpoints at once: feed it chunk-major, :meth:`add_rows` with a (T, C, P) stack for one chunk of
    training rows (a pass over the training set per chunk of rows, memory T×C×P). In the replay's
    checkpoint-major order use :class:`TemporalKernelSketch` instead.
    """

    def __init__(self, num_checkpoints: int, device=None):
        self.device = device_of(device)
        self.gram = torch.zeros(num_checkpoints, num_checkpoints, dtype=F64, device=self.device)

    def add_rows(self, grads: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """One chunk of training rows at every kernel checkpoint: (T, C, P) or T tensors (C, P)."""
        if not isinstance(grads, torch.Tensor):
            grads = torch.stack([g.to(device=self.device, dtype=F64) for g in grads])
        if grads.dim() != 3 or grads.shape[0] != self.gram.shape[0]:
            raise ValueError(f"add_rows: need ({self.gram.shape[0]}, C, P), got {tuple(grads.shape)}")
        flat = grads.to(device=self.device, dtype=F64).reshape(grads.shape[0], -1)
        block = flat @ flat.T
        self.gram += 0.5 * (block + block.T)


class TemporalKernelSketch:
    """Unbiased sketch of eq. 40's K_time fed in checkpoint-major order (one checkpoint at a time).

    vec Φ(t) ∈ R^{MP} is hashed by a degree-2 tensor (Kronecker) CountSketch: entry (m, p) goes to
    bucket (h₁(m) + h₂(p)) mod D with sign s₁(m)s₂(p) (Pham & Pagh 2013). Then E[z_t·z_t'] =
    ⟨Φ(t), Φ(t')⟩_F exactly, with a standard deviation of a few ‖Φ(t)‖_F‖Φ(t')‖_F / sqrt(D); memory
    T×D + O(M + P), cost O(CP) per chunk (a scatter-add, no GEMM). Prefer :class:`TemporalKernel`
    when a chunk-major pass is affordable: small eigenvalues of the sketch are noise-dominated.
    """

    def __init__(self, num_checkpoints: int, num_rows: int, num_params: int, *, dim: int = 2 ** 18,
                 seed: int = 0, device=None):
        self.device = device_of(device)
        self.dim = dim
        gen = torch.Generator(device=self.device).manual_seed(seed)

        def ints(n, high):
            return torch.randint(0, high, (n,), generator=gen, device=self.device)
        self._h1, self._h2 = ints(num_rows, dim), ints(num_params, dim)
        self._s1 = (2 * ints(num_rows, 2) - 1).to(F64)
        self._s2 = (2 * ints(num_params, 2) - 1).to(F64)
        self.sketch = torch.zeros(num_checkpoints, dim, dtype=F64, device=self.device)

    def add_chunk(self, index: int, rows: Rows, g: torch.Tensor) -> None:
        """Training rows (C, P) of kernel checkpoint ``index`` (0..T−1)."""
        idx = row_positions(rows, self.device)
        g = gradient_matrix(g, "g", len(self._h2)).to(device=self.device, dtype=F64)
        bucket = (self._h1[idx][:, None] + self._h2[None, :]) % self.dim
        values = (self._s1[idx][:, None] * self._s2[None, :]) * g
        self.sketch[index].index_add_(0, bucket.reshape(-1), values.reshape(-1))

    @property
    def gram(self) -> torch.Tensor:
        return self.sketch @ self.sketch.T


def participation_ratio(weights: torch.Tensor) -> float:
    """PR = (Σ w)² / Σ w² (paper section 6.3 / A.7); negative weights (rounding or sketch noise in an
    eigen-spectrum) count as 0. 1: one component dominates; K: K equal components."""
    w = weights.to(F64).clamp_min(0)
    den = float((w * w).sum())
    return float(w.sum()) ** 2 / den if den > 0 else float("nan")


@dataclass(frozen=True)
class TemporalSpectrum:
    eigenvalues: torch.Tensor  # (T,) descending
    eigenvectors: torch.Tensor  # (T, T) columns: temporal modes, loading over checkpoints (Figure 23)
    participation_ratio: float  # (Σλ)²/Σλ²
    energy_fraction: torch.Tensor  # (T,) λ_k / Σλ


def temporal_spectrum(gram: torch.Tensor, scales: torch.Tensor | None = None) -> TemporalSpectrum:
    """Eigen-decomposition of K_time (A.7). ``scales`` (T) multiplies checkpoint t's features (eq. 38's
    η(t)), i.e. K ← D K D. Eigenvector signs: largest-magnitude entry positive."""
    k = gram.to(F64)
    if scales is not None:
        d = scales.to(device=k.device, dtype=F64)
        k = d[:, None] * k * d[None, :]
    lam, vec = torch.linalg.eigh(0.5 * (k + k.T))
    lam, vec = lam.flip(0), vec.flip(1)
    vec = vec * sign_fix(vec)
    total = float(lam.clamp_min(0).sum())
    frac = lam / total if total > 0 else torch.full_like(lam, torch.nan)
    return TemporalSpectrum(lam, vec, participation_ratio(lam), frac)


def prefix_participation_ratios(gram: torch.Tensor) -> torch.Tensor:
    """PR of K_time restricted to the checkpoints up to t, for every t (T,) — our reading of
    A.7's 'participation ratio over time' (Figure 24), which the paper does not define further."""
    k = gram.to(F64)
    return torch.tensor([participation_ratio(torch.linalg.eigvalsh(k[:t + 1, :t + 1]))
                         for t in range(k.shape[0])], dtype=F64, device=k.device)


# ----------------------------------------------------------------------------- kernel regime (6.3)


def row_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a_m, b_m) per row (C,); NaN where either row is zero."""
    a, b = a.to(F64), b.to(device=a.device, dtype=F64)
    if a.shape != b.shape:
        raise ValueError(f"row_cosines: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    denom = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(denom > 0, (a * b).sum(1) / denom, torch.full_like(denom, torch.nan))


class MeanRowCosine:
    """Mean over training examples of cos(x_m(t), x_m(T)), fed in row chunks: the feature overlap
    ρ_feat(t) of section 6.3 (i) with x = loss gradients ε φ, and the activation overlap ρ_act(t)
    of (iii) with x = final-hidden-layer activations α. Rows with a zero vector are skipped and
    counted in ``skipped``."""

    def __init__(self):
        self.total = 0.0
        self.count = 0
        self.skipped = 0

    def add(self, at_t: torch.Tensor, at_final: torch.Tensor) -> None:
        c = row_cosines(at_t, at_final)
        ok = ~torch.isnan(c)
        self.total += float(c[ok].sum())
        self.count += int(ok.sum())
        self.skipped += int((~ok).sum())

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")


def principal_cosines(va: torch.Tensor, vb: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(va) and span(vb) (columns), descending."""
    qa, qb = orthonormal(va.to(F64)), orthonormal(vb.to(device=va.device, dtype=F64))
    return torch.linalg.svdvals(qa.T @ qb).clamp(0.0, 1.0)


def subspace_overlap(va: torch.Tensor, vb: torch.Tensor, k: int = 10) -> float:
    """Section 6.3 (ii): mean cosine similarity between the subspaces of the top-k right singular
    vectors of Φ_train(t) and Φ_train(T) — the mean cosine of their principal angles, 1 when the
    subspaces coincide, ≈ k/P for unrelated random ones. va, vb: (P, ≥k), leading columns used."""
    if va.shape[1] < k or vb.shape[1] < k:
        raise ValueError(f"subspace_overlap: need at least k={k} columns")
    return float(principal_cosines(va[:, :k], vb[:, :k]).mean())


# ----------------------------------------------------------------------------- net and gross influence (6.3)


def net_influence_from_layer_epoch(signed: torch.Tensor) -> torch.Tensor:
    """S_n(t) = Σ_m P̃'_{m,n}(t) after epoch t (E, N, ...), exact from the audit's
    by_layer_epoch/signed (E, L, N, ...) — sums are linear, so layers and epochs just add up."""
    return torch.as_tensor(signed, dtype=F64).sum(1).cumsum(0)


def gross_bound_from_layer_epoch(abs_sums: torch.Tensor) -> torch.Tensor:
    """Σ_{e≤t} Σ_L Σ_m |per-step, per-layer contribution| (E, N, ...) from by_layer_epoch/abs: an
    upper bound of G_n(t) (triangle inequality), not G_n(t) itself — G needs |cumulative per
    example| (see :class:`NetGrossInfluence`)."""
    return torch.as_tensor(abs_sums, dtype=F64).sum(1).cumsum(0)


class NetGrossInfluence:
    """Net S_n(t) = Σ_m P̃'_{m,n}(t) and gross G_n(t) = Σ_m |P̃'_{m,n}(t)| per audit column and epoch
    (paper section 6.3), P̃'(t) the cumulative audit through epoch t (eq. 27).

    G takes the absolute value of each example's *cumulative* influence, so it needs per-example,
    per-epoch influence: feed :meth:`add_rows` with one chunk of training rows' per-epoch influence
    (E, C, N) — from memory or from a stored (E, M, N) array — in any row order; each chunk's
    epochs are summed cumulatively before the absolute value.
    """

    def __init__(self, num_epochs: int, num_columns: int, device=None):
        self.device = device_of(device)
        self.net = torch.zeros(num_epochs, num_columns, dtype=F64, device=self.device)
        self.gross = torch.zeros(num_epochs, num_columns, dtype=F64, device=self.device)

    def add_rows(self, per_epoch: torch.Tensor) -> None:
        x = torch.as_tensor(per_epoch).to(device=self.device, dtype=F64)
        if x.dim() != 3 or x.shape[0] != self.net.shape[0] or x.shape[2] != self.net.shape[1]:
            raise ValueError(f"add_rows: need (E={self.net.shape[0]}, C, N={self.net.shape[1]}), "
                             f"got {tuple(x.shape)}")
        cumulative = x.cumsum(0)
        self.net += cumulative.sum(1)
        self.gross += cumulative.abs().sum(1)


# ----------------------------------------------------------------------------- difficulty scores (6.2)


def ips_l2_norm(ips_audit_train: torch.Tensor) -> torch.Tensor:
    """‖IPS(x_n, ·)‖₂ over the training set (N,) (section 6.2, Table 1); NaN entries skipped."""
    x = ips_audit_train.to(F64)
    return torch.nan_to_num(x, nan=0.0).pow(2).sum(1).sqrt()


def class_mean_ips(ips_audit_train: torch.Tensor, train_labels: torch.Tensor,
                   num_classes: int) -> torch.Tensor:
    """Mean IPS of each audit point to the training examples of each class (N, C); NaN for a class
    without (defined) training examples."""
    x = ips_audit_train.to(F64)
    ok = ~torch.isnan(x)
    onehot = torch.nn.functional.one_hot(torch.as_tensor(train_labels, device=x.device).long(),
                                         num_classes).to(F64)
    sums = torch.where(ok, x, torch.zeros_like(x)) @ onehot
    counts = ok.to(F64) @ onehot
    return torch.where(counts > 0, sums / counts, torch.full_like(sums, torch.nan))


def ips_class_margin(ips_audit_train: torch.Tensor, train_labels: torch.Tensor, predicted: torch.Tensor,
                     num_classes: int) -> torch.Tensor:
    """Class-conditioned IPS margin (section 6.2): mean IPS to the training examples of the
    *predicted* class minus the highest mean IPS to any other class (N,). NaN when the predicted
    class has no training examples or there is no other class."""
    means = class_mean_ips(ips_audit_train, train_labels, num_classes)
    pred = torch.as_tensor(predicted, device=means.device).long()
    own = means.gather(1, pred[:, None])[:, 0]
    others = torch.nan_to_num(means, nan=-torch.inf).scatter(1, pred[:, None], -torch.inf)
    best = others.max(1).values
    return torch.where(torch.isfinite(best), own - best, torch.full_like(own, torch.nan))


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def rankdata(x) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy.stats.rankdata's 'average')."""
    x = _np(x).reshape(-1)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1, dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def _binary(scores, positive) -> tuple[np.ndarray, np.ndarray]:
    s = _np(scores).astype(np.float64).reshape(-1)
    y = _np(positive).astype(bool).reshape(-1)
    if len(s) != len(y):
        raise ValueError(f"scores ({len(s)}) and labels ({len(y)}) differ in length")
    if np.isnan(s).any():
        raise ValueError(f"{int(np.isnan(s).sum())} scores are NaN; drop those points first")
    return s, y


def auroc(scores, positive) -> float:
    """Area under the ROC curve for "higher score ⇒ positive" (Mann–Whitney U / (n₊n₋), ties count ½),
    as sklearn's roc_auc_score. NaN with one class only."""
    s, y = _binary(scores, positive)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores, positive) -> float:
    """AUPR as average precision, Σ_k (R_k − R_{k−1}) P_k over distinct score thresholds (sklearn's
    average_precision_score). NaN without positives."""
    s, y = _binary(scores, positive)
    if not y.any():
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each distinct threshold
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def spearman(a, b) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks), as scipy.stats.spearmanr."""
    ra, rb = rankdata(a), rankdata(b)
    if len(ra) != len(rb):
        raise ValueError("spearman: inputs differ in length")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")
