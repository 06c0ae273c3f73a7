"""Per-example gradients of nn.Linear on inputs (B, d) or (B, T, ..., d)."""

from __future__ import annotations

import torch
from torch import nn

from plgk_cli.per_example import LayerRule, batch_sum, register


def _linear(module: nn.Linear, a, delta) -> dict | None:
    if a.dim() < 2:  # an unbatched call: no batch dimension to split
        return None
    # y = a Wᵀ + b at every middle position: ∂q_m/∂W = Σ_positions δ aᵀ, ∂q_m/∂b = Σ_positions δ
    delta = delta.to(a.dtype)
    grads = {"weight": torch.einsum("b...o,b...i->boi", delta, a)}
    if module.bias is not None:
        grads["bias"] = batch_sum(delta, 1)
    return grads


register(nn.Linear, LayerRule("Linear", _linear))
