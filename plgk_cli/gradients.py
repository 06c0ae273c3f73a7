"""Per-sample gradients from one batched pass (torch.func.vmap), on a flat parameter vector.

Everything downstream works on flat vectors of all P trainable parameters in the model's
``named_parameters`` order; :class:`ParameterLayout` maps between the flat vector, the named
tensors and the layers (owning modules) used for the per-layer split of the audit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, vmap

from plgk_cli.models import layer_of

TARGETS = ("loss", "logit", "margin", "logits")


@dataclass(frozen=True)
class ParameterLayout:
    names: tuple
    shapes: tuple
    offsets: tuple  # start of each parameter in the flat vector; offsets[-1] == P

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ParameterLayout":
        names, shapes, offsets = [], [], [0]
        for name, p in model.named_parameters():
            if p.requires_grad:
                names.append(name)
                shapes.append(tuple(p.shape))
                offsets.append(offsets[-1] + p.numel())
        return cls(tuple(names), tuple(shapes), tuple(offsets))

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def flatten(self, tensors: dict, dtype=torch.float64, device=None) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1).to(dtype=dtype, device=device) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict:
        return {n: flat[self.offsets[i]:self.offsets[i + 1]].view(self.shapes[i])
                for i, n in enumerate(self.names)}

    def flatten_state(self, state: dict, device=None) -> dict:
        """Optimizer state {name: {key: tensor}} as {key: flat float64 vector} in layout order;
        raises ValueError when a key is recorded for some parameters only."""
        keys = [set(state.get(n, {})) for n in self.names]
        common = set.intersection(*keys) if keys else set()
        partial = set().union(*keys) - common if keys else set()
        if partial:
            raise ValueError(f"optimizer state {sorted(partial)} recorded for some parameters only")
        return {k: torch.cat([state[n][k].reshape(-1).to(device=device, dtype=torch.float64)
                              for n in self.names]) for k in common}

    @property
    def layers(self) -> tuple:
        """(layer name, slice of the flat vector), in order; a layer's parameters are contiguous."""
        out: list = []
        for i, n in enumerate(self.names):
            layer = layer_of(n)
            if out and out[-1][0] == layer:
                out[-1] = (layer, slice(out[-1][1].start, self.offsets[i + 1]))
            else:
                out.append((layer, slice(self.offsets[i], self.offsets[i + 1])))
        return tuple(out)


def target_columns(targets: tuple, num_classes: int) -> int:
    """Audited quantities per audit point: one per target, one per class for ``logits``."""
    return sum(num_classes if t == "logits" else 1 for t in targets)


class GradientComputer:
    """Loss and audit-target values and per-sample gradients of one model at a flat θ."""

    def __init__(self, model: torch.nn.Module, layout: ParameterLayout, num_classes: int,
                 chunk_size: int = 256):
        self.model = model
        self.layout = layout
        self.num_classes = num_classes
        self.chunk_size = chunk_size

    def _logits(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.layout.unflatten(theta), (x.unsqueeze(0),))[0]

    def _sample_loss(self, theta, x, y):
        return F.cross_entropy(self._logits(theta, x).unsqueeze(0), y.unsqueeze(0))

    def loss_gradients(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        """Per-sample loss gradients (B x P) and losses (B) at θ."""
        fn = vmap(grad(self._sample_loss, has_aux=False), in_dims=(None, 0, 0))
        loss_fn = vmap(self._sample_loss, in_dims=(None, 0, 0))
        grads, losses = [], []
        for start in range(0, len(x), self.chunk_size):
            xs, ys = x[start:start + self.chunk_size], y[start:start + self.chunk_size]
            grads.append(fn(theta, xs, ys))
            with torch.no_grad():
                losses.append(loss_fn(theta, xs, ys))
        return torch.cat(grads), torch.cat(losses)

    def mean_loss_gradient(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        """Gradient of the batch-mean loss (P), as the optimizer saw it, without per-sample work."""
        theta = theta.detach().requires_grad_(True)
        logits = functional_call(self.model, self.layout.unflatten(theta), (x,))
        (g,) = torch.autograd.grad(F.cross_entropy(logits, y), theta)
        return g

    def target_columns(self, targets: tuple) -> int:
        return target_columns(targets, self.num_classes)

    def _sample_targets(self, theta, x, y, targets: tuple):
        logits = self._logits(theta, x)
        is_true = torch.arange(self.num_classes, device=logits.device) == y
        true_logit = torch.where(is_true, logits, torch.zeros_like(logits)).sum()
        values = []
        for t in targets:
            if t == "loss":
                values.append(F.cross_entropy(logits.unsqueeze(0), y.unsqueeze(0)).reshape(1))
            elif t == "logit":
                values.append(true_logit.reshape(1))
            elif t == "margin":  # true-class logit minus the best other logit at this θ
                other = torch.where(is_true, torch.full_like(logits, -torch.inf), logits).max()
                values.append((true_logit - other).reshape(1))
            elif t == "logits":
                values.append(logits)
        out = torch.cat(values)
        return out, out.detach()

    def audit_gradients(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, targets: tuple):
        """Values (N x Q) and gradients (N x Q x P) of the audited quantities at θ.

        Q stacks the targets in order; ``logits`` contributes one column per class.
        """
        fn = vmap(jacrev(lambda th, xi, yi: self._sample_targets(th, xi, yi, targets), has_aux=True),
                  in_dims=(None, 0, 0))
        grads, values = [], []
        for start in range(0, len(x), self.chunk_size):
            g, v = fn(theta, x[start:start + self.chunk_size], y[start:start + self.chunk_size])
            grads.append(g)
            values.append(v)
        return torch.cat(values), torch.cat(grads)
