"""Exact per-example parameter gradients of single layers, registered by module type.

A rule turns one layer's batched forward input a (batch along dim 0) and the gradient δ of
Σ_m q_m with respect to its output into {param_name: (B, *param.shape)} per-example gradients of
the layer's own parameters. It is exact only when example m's output depends on example m's input
alone (no batch statistics, no in-place weight changes); a rule answers None when the module's
current mode or configuration breaks that, and the caller falls back to a generic path.

Each layer kind lives in its own file and calls :func:`register` on import; lookup is by exact
``type(module)``, since a subclass may override ``forward`` and so the math.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn


@dataclass(frozen=True)
class LayerRule:
    kind: str  # short name for timing reports
    gradients: Callable[[nn.Module, Tensor, Tensor], dict | None]


_REGISTRY: dict[type, tuple[LayerRule, Callable[[nn.Module], bool]]] = {}


def register(module_type: type, rule: LayerRule,
             supports: Callable[[nn.Module], bool] | None = None) -> None:
    """Make ``rule`` the rule for modules of exactly ``module_type``.

    ``supports(module)`` says whether the module's configuration allows an exact rule; it is
    checked by :func:`rule_for` and again at call time (attributes can change after lookup).
    """
    if supports is None:
        _REGISTRY[module_type] = (rule, lambda module: True)
        return

    def gradients(module, inputs, output_grad):
        return rule.gradients(module, inputs, output_grad) if supports(module) else None

    _REGISTRY[module_type] = (LayerRule(rule.kind, gradients), supports)


def rule_for(module: nn.Module) -> LayerRule | None:
    entry = _REGISTRY.get(type(module))
    if entry is None or not entry[1](module):
        return None
    return entry[0]


def batch_sum(t: Tensor, trailing: int) -> Tensor:
    """Sum ``t`` (B, ..., *last ``trailing`` dims) over everything between batch and trailing dims."""
    return t.reshape(t.shape[0], -1, *t.shape[t.dim() - trailing:]).sum(1)


from plgk_cli.per_example import conv, embedding, hf_conv1d, linear, norm  # noqa: E402,F401  (registration)

__all__ = ["LayerRule", "register", "rule_for"]
