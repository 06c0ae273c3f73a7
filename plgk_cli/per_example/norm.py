"""Per-example gradients of the affine parameters of normalisation layers.

Every layer here computes y = x̂ ⊙ w + b with x̂ per example (LayerNorm, RMSNorm, GroupNorm,
InstanceNorm, eval-mode BatchNorm), so ∂q_m/∂w = Σ δ_m ⊙ x̂_m and ∂q_m/∂b = Σ δ_m, summed over
the dims the parameter is broadcast along. x̂ is recomputed from the input (statistics at float32
or wider, as torch's kernels do for half precision).
"""

from __future__ import annotations

import torch
from torch import nn

from plgk_cli.per_example import LayerRule, batch_sum, register


def _wide(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _standardize(x, dims, eps):
    # biased variance, as torch's norm layers
    var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def _affine(module, x, x_hat, delta, reduce) -> dict:
    """∂q_m/∂w = reduce(δ ⊙ x̂), ∂q_m/∂b = reduce(δ), in the input's dtype."""
    delta = delta.to(x_hat.dtype)
    grads = {}
    if getattr(module, "weight", None) is not None:
        grads["weight"] = reduce(delta * x_hat).to(x.dtype)
    if getattr(module, "bias", None) is not None:
        grads["bias"] = reduce(delta).to(x.dtype)
    return grads


def _last_dims(module, x, delta, x_hat_of):
    trailing = len(module.normalized_shape)
    if x.dim() <= trailing:  # an unbatched call
        return None
    if getattr(module, "weight", None) is None and getattr(module, "bias", None) is None:
        return {}
    dims = tuple(range(-trailing, 0))
    x_hat = x_hat_of(_wide(x), dims)
    return _affine(module, x, x_hat, delta, lambda t: batch_sum(t, trailing))


def _layer_norm(module: nn.LayerNorm, x, delta):
    return _last_dims(module, x, delta, lambda x, dims: _standardize(x, dims, module.eps))


def _rms_norm(module, x, delta):
    # eps None: torch uses the machine epsilon of its compute dtype (float32 for half inputs)
    eps = torch.finfo(_wide(x).dtype).eps if module.eps is None else module.eps
    # x̂ = x · rsqrt(mean(x²) + eps) over the normalized dims
    return _last_dims(module, x, delta,
                      lambda x, dims: x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps))


def _per_channel(module, x, delta, x_hat) -> dict:
    # weight/bias (C,) broadcast over batch and spatial dims of x (B, C, *)
    return _affine(module, x, x_hat, delta, lambda t: t.reshape(*t.shape[:2], -1).sum(-1))


def _group_norm(module: nn.GroupNorm, x, delta):
    if x.dim() < 2:
        return None
    if not module.affine:
        return {}
    wide = _wide(x)
    # statistics per (example, group) over the group's channels and all spatial positions
    grouped = wide.reshape(x.shape[0], module.num_groups, -1)
    x_hat = _standardize(grouped, (-1,), module.eps).reshape(x.shape)
    return _per_channel(module, x, delta, x_hat)


def _channel_view(stat, x):
    return stat.to(x.dtype).reshape(1, -1, *[1] * (x.dim() - 2))


def _instance_norm(module, x, delta):
    if x.dim() != {nn.InstanceNorm1d: 3, nn.InstanceNorm2d: 4, nn.InstanceNorm3d: 5}[type(module)]:
        return None  # an unbatched (C, *) call
    if not module.affine:
        return {}
    wide = _wide(x)
    # the forward's use_input_stats: own statistics per (example, channel), else running stats
    if module.training or not module.track_running_stats:
        x_hat = _standardize(wide, tuple(range(2, x.dim())), module.eps)
    elif module.running_mean is None or module.running_var is None:
        return None
    else:
        x_hat = ((wide - _channel_view(module.running_mean, wide))
                 * torch.rsqrt(_channel_view(module.running_var, wide) + module.eps))
    return _per_channel(module, x, delta, x_hat)


def _batch_norm(module, x, delta):
    # batch statistics (train mode, or no running stats) couple the examples; only the
    # eval-mode running-statistics forward is per-example separable
    if module.training or module.running_mean is None or module.running_var is None:
        return None
    if x.dim() < 2:
        return None
    if not module.affine:
        return {}
    wide = _wide(x)
    x_hat = ((wide - _channel_view(module.running_mean, wide))
             * torch.rsqrt(_channel_view(module.running_var, wide) + module.eps))
    return _per_channel(module, x, delta, x_hat)


register(nn.LayerNorm, LayerRule("LayerNorm", _layer_norm))
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    register(nn.RMSNorm, LayerRule("RMSNorm", _rms_norm))
register(nn.GroupNorm, LayerRule("GroupNorm", _group_norm))
for _type in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
    register(_type, LayerRule("InstanceNorm", _instance_norm))
for _type in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register(_type, LayerRule("BatchNorm(eval)", _batch_norm))
