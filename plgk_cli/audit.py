"""Accumulators of the training-data audit and its completeness metrics (paper section 5).

Columns: the audited quantities of all audit points and targets, stacked (N*Q). Rows: training
examples (or the subset / groups being audited). All sums are float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CompletenessMetrics:
    mre: float  # paper eq. 22: mean_n |Σ_m influence + residual − true change|
    lc: float  # paper eq. 23: correlation over audit points of reconstructed and true change
    rmre: float  # mre / mean_n |true change|: scale-free, for comparing targets


def completeness(reconstructed: torch.Tensor, true_change: torch.Tensor) -> CompletenessMetrics:
    gap = (reconstructed - true_change).abs().mean()
    scale = true_change.abs().mean()
    r, t = reconstructed - reconstructed.mean(), true_change - true_change.mean()
    denom = r.norm() * t.norm()
    lc = float((r @ t) / denom) if len(t) > 1 and denom > 0 else float("nan")
    return CompletenessMetrics(float(gap), lc, float(gap / scale) if scale > 0 else float("nan"))


class AuditAccumulator:
    """influence[row, col] = Σ_s Σ_{m∈B_s, row(m)=row} (c_s g_{m,s}/|B_s|)·v_s[:, col] and the rest.

    ``row_of`` maps each training index to its row (-1: not audited) so that full, partial
    (A.1.3) and grouped (A.1.2) audits share one code path.
    """

    def __init__(self, row_of: torch.Tensor, num_rows: int, num_columns: int, num_steps: int,
                 num_epochs: int, layers: tuple, device: torch.device, bounded: bool = False):
        f64 = dict(dtype=torch.float64, device=device)
        self.row_of = row_of.to(device)
        self.layers = layers
        self.influence = torch.zeros(num_rows, num_columns, **f64)
        self.residual = torch.zeros(num_columns, **f64)
        self.layer_epoch_signed = torch.zeros(num_epochs, len(layers), num_columns, **f64)
        self.layer_epoch_abs = torch.zeros(num_epochs, len(layers), num_columns, **f64)
        self.step_change = torch.zeros(num_steps, num_columns, **f64)  # Δθ_t · h(t), recorded Δθ
        self.update_error = torch.zeros(num_steps, **f64)  # per-step relative error of the update check
        # epoch_tail[e] = influence credited to gradients taken from epoch e's first step onwards;
        # the walk goes backwards, so it is a snapshot of `influence` when epoch e is done.
        self.epoch_tail = torch.zeros(num_epochs, num_rows, num_columns, **f64)
        # adaptive quadrature: Σ_s |c_s w_m| Σ_layers |g_{m,s} · δv_s| with δv_s the adjoint of the
        # estimated error of h: a bound on each entry's quadrature error (DESIGN.md v2)
        self.error_bound = torch.zeros(num_rows, num_columns, **f64) if bounded else None

    def add_samples(self, batch: torch.Tensor, per_sample_grads: torch.Tensor, scale: float | torch.Tensor,
                    v: torch.Tensor, epoch: int, parts: dict | None = None,
                    dv: torch.Tensor | None = None) -> None:
        """Credit the step's per-sample terms (scale·g_m)·v to their rows, layer by layer;
        ``scale`` is c_s w_m, one number (the mean over the batch) or one per row (the task's
        weights); ``parts`` {layer index: g_m·v over that layer} replaces the product for those
        layers; ``dv``, how far v may be off (adaptive quadrature), adds to the error bound."""
        rows = self.row_of[batch]
        if isinstance(scale, torch.Tensor):
            scale = scale[:, None]
        total = torch.zeros(len(batch), v.shape[1], dtype=torch.float64, device=v.device)
        bound = torch.zeros_like(total) if dv is not None else None
        for layer, (_, sl) in enumerate(self.layers):
            part = scale * (parts[layer] if parts and layer in parts else per_sample_grads[:, sl] @ v[sl])
            total += part
            self.layer_epoch_signed[epoch, layer] += part.sum(0)
            self.layer_epoch_abs[epoch, layer] += part.abs().sum(0)
            if bound is not None:  # the same credit with v's error, layer by layer, no cancellation
                bound += (per_sample_grads[:, sl] @ dv[sl]).abs()
        self.influence.index_add_(0, rows, total)
        if bound is not None:
            self.error_bound.index_add_(0, rows, bound * (scale.abs() if isinstance(scale, torch.Tensor)
                                                          else abs(scale)))

    def add_residual(self, residual: torch.Tensor) -> None:
        self.residual += residual

    def record_step(self, step: int, delta: torch.Tensor, h: torch.Tensor, update_error: float) -> None:
        self.step_change[step] = delta @ h
        self.update_error[step] = update_error

    STATE = ("influence", "residual", "layer_epoch_signed", "layer_epoch_abs", "step_change",
             "update_error", "epoch_tail", "error_bound")  # error_bound: adaptive replays only

    def close_epoch(self, epoch: int) -> None:
        self.epoch_tail[epoch] = self.influence

    def net_and_gross(self) -> tuple[torch.Tensor, torch.Tensor]:
        """S_n(e) = Σ_m P̃_mn(e) and G_n(e) = Σ_m |P̃_mn(e)| (paper 6.3), P̃(e) the influence of the
        gradients taken up to the end of epoch e (E x columns each): cancellation shows as G ≫ |S|."""
        tails = torch.cat([self.epoch_tail[1:], torch.zeros_like(self.epoch_tail[:1])])
        cumulative = self.influence[None] - tails  # (E, rows, columns)
        return cumulative.sum(1), cumulative.abs().sum(1)

    def state_tensors(self) -> dict:
        """The accumulated sums, for a progress commit (exact float64 copies)."""
        return {f"audit/{name}": getattr(self, name) for name in self.STATE if getattr(self, name) is not None}

    def load_state_tensors(self, tensors: dict) -> None:
        for name in (n for n in self.STATE if getattr(self, n) is not None):
            saved = tensors[f"audit/{name}"]
            if saved.shape != getattr(self, name).shape:
                raise ValueError(f"progress: audit/{name} has shape {tuple(saved.shape)}")
            setattr(self, name, saved.to(getattr(self, name).device))
