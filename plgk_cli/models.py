"""Model builders. Every builder takes ``in_shape`` (C, H, W or features) and ``num_classes``.

Models must be per-sample separable (no BatchNorm, no dropout): the audit decomposes each update
into per-example gradients, which batch statistics would couple.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from plgk_cli.errors import ConfigError
from plgk_cli.importing import import_object


def _flat_features(module: nn.Module, in_shape: tuple) -> int:
    with torch.no_grad():
        return int(module(torch.zeros(1, *in_shape)).flatten(1).shape[1])


def mlp(in_shape: tuple, num_classes: int, hidden: int = 64, depth: int = 2) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(in_shape)
    for _ in range(depth - 1):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(in_shape: tuple, num_classes: int, channels: int = 8, hidden: int = 32) -> nn.Module:
    features = nn.Sequential(
        nn.Conv2d(in_shape[0], channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    )
    width = _flat_features(features, in_shape)
    return nn.Sequential(features, nn.Flatten(), nn.Linear(width, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def lenet5(in_shape: tuple, num_classes: int) -> nn.Module:
    # LeCun et al. 1998 shapes; padding 2 lets 28x28 (and the 8x8 digits) through both pools.
    features = nn.Sequential(
        nn.Conv2d(in_shape[0], 6, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5, padding=2 if in_shape[-1] < 16 else 0), nn.Tanh(), nn.AvgPool2d(2),
    )
    width = _flat_features(features, in_shape)
    return nn.Sequential(features, nn.Flatten(), nn.Linear(width, 120), nn.Tanh(),
                         nn.Linear(120, 84), nn.Tanh(), nn.Linear(84, num_classes))


BUILTIN = {"mlp": mlp, "cnn": cnn, "lenet5": lenet5}
# Batch statistics couple the examples of a batch; dropout draws randomness the record lacks.
UNSUPPORTED_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def build_model(name: str, kwargs: dict, in_shape: tuple, num_classes: int) -> nn.Module:
    if name in BUILTIN:
        builder = BUILTIN[name]
    else:
        try:
            builder = import_object(name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"[model] name: cannot import {name!r} ({exc}); give "
                              "package.module:function importable from the working directory") from None
    try:
        model = builder(in_shape=tuple(in_shape), num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:  # unknown or out-of-range kwargs
        raise ConfigError(f"[model] kwargs: {name} rejected {kwargs!r} ({exc})") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"[model] name: {name} returned {type(model).__name__}, not a torch.nn.Module")
    for sub_name, sub in model.named_modules():
        if isinstance(sub, UNSUPPORTED_LAYERS):
            raise ConfigError(f"[model] name: layer {sub_name!r} is {type(sub).__name__}, which couples "
                              "examples in a batch or is random; plgk audits need per-sample separable models")
    return model


def layer_of(parameter_name: str) -> str:
    """The layer a parameter belongs to: its owning module's name (``0.weight`` -> ``0``)."""
    return parameter_name.rsplit(".", 1)[0] if "." in parameter_name else parameter_name
