"""Per-example gradients of nn.Conv1d / nn.Conv2d (zero padding, any stride, dilation, groups).

The convolution is a matmul over unfolded input patches: y[o, l] = Σ_i W[o, i] P[i, l] + b[o]
with P = unfold(pad(a)), so ∂q_m/∂W = δ_m P_mᵀ (per group) and ∂q_m/∂b = Σ_l δ_m[:, l].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plgk_cli.per_example import LayerRule, register


def _explicit_padding(module: nn.Module) -> list[tuple[int, int]]:
    """(left, right) zero padding per spatial dim, as the forward applies it."""
    if module.padding == "valid":
        return [(0, 0)] * len(module.kernel_size)
    if module.padding == "same":
        # aten's _convolution_same: total d·(k−1), the odd extra goes on the right
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in module.padding]


def _conv(module: nn.Module, a, delta) -> dict | None:
    spatial = len(module.kernel_size)
    if a.dim() != spatial + 2:  # an unbatched call
        return None
    pads = _explicit_padding(module)
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if spatial == 1:  # unfold is 2-D only: give Conv1d a dummy height of 1
        a = a.unsqueeze(-2)
        kernel, dilation, stride, pads = (1, *kernel), (1, *dilation), (1, *stride), [(0, 0), *pads]
    # F.pad lists the last dim first
    a = F.pad(a, [p for left_right in reversed(pads) for p in left_right])
    patches = F.unfold(a, kernel, dilation=dilation, stride=stride)  # (B, C_in·K, L)
    batch, groups = a.shape[0], module.groups
    delta = delta.to(a.dtype).reshape(batch, groups, module.out_channels // groups, -1)
    # unfold orders rows channel-major, so group g's input channels are a contiguous block
    patches = patches.reshape(batch, groups, -1, patches.shape[-1])
    weight = torch.einsum("bgol,bgil->bgoi", delta, patches)
    grads = {"weight": weight.reshape(batch, *module.weight.shape)}
    if module.bias is not None:
        grads["bias"] = delta.sum(-1).reshape(batch, -1)
    return grads


def _zero_padded(module: nn.Module) -> bool:
    # other padding modes pad by reflection/replication/wrapping; not implemented here
    return module.padding_mode == "zeros"


register(nn.Conv1d, LayerRule("Conv1d", _conv), _zero_padded)
register(nn.Conv2d, LayerRule("Conv2d", _conv), _zero_padded)
