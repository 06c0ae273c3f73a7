"""Exact decomposition of each supported optimizer's update into per-sample terms.

Every supported optimizer (torch.optim SGD with or without (nesterov) momentum and dampening,
Adam, AdamW, RMSprop (plain, centered, with momentum), Adagrad; L2 or decoupled weight decay;
global grad-norm clipping; any learning-rate schedule) fits one linear template per step t:

    d_t       = c_t G_t + λ₂ θ_t                      (G_t = batch-mean loss gradient, c_t = clip coef)
    buf_{t+1} = μ_t buf_t + a_t ⊙ d_t                  (the linear memory: momentum, Adam's m)
    Δθ_t      = −lr_t (p_t ⊙ buf_{t+1} + e_t ⊙ d_t) − lr_t λ_d θ_t

where the diagonal a_t, p_t, e_t carry the preconditioner A_t (paper A.2.3, eq. 26-28) read from the
recorded optimizer state after the step, bias corrections, nesterov's look-ahead and dampening, and
λ_d is decoupled (AdamW) decay (A.2.5, eq. 32). Only G_t depends on the samples, so
G_t = Σ_m g_{m,t}/|B_t| splits Δθ_t exactly into per-sample terms plus the sample-independent
λ₂θ and λ_dθ terms (the residual).

The same :class:`StepCoefficients` serve three uses, so that they cannot drift apart:
``apply`` (forward: re-simulation and the per-step update check), ``adjoint`` (the backward walk
of the replay, exact momentum with no truncation window, DESIGN.md) and ``residual``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Vector = torch.Tensor  # flat float64 vector over all P parameters, or a python float


@dataclass(frozen=True)
class StepCoefficients:
    lr: float
    clip_coef: float
    decay: float  # μ_t: multiplies buf_t
    a: Vector | float  # into the buffer
    p: Vector | float  # buffer -> update
    e: Vector | float  # direct d -> update
    l2: float  # λ₂: coupled (L2) weight decay, enters d_t
    decoupled: float  # λ_d: decoupled weight decay

    def direction(self, grad: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """d_t = c_t G_t + λ₂ θ_t: what the optimizer's update rule sees as the gradient."""
        return self.clip_coef * grad + self.l2 * theta

    def apply(self, buf: torch.Tensor, grad: torch.Tensor, theta: torch.Tensor):
        """Forward step: (Δθ_t, buf_{t+1}) from buf_t, the batch-mean gradient G_t and θ_t."""
        d = self.direction(grad, theta)
        buf_next = self.decay * buf + self.a * d
        delta = -self.lr * (self.p * buf_next + self.e * d) - self.lr * self.decoupled * theta
        return delta, buf_next

    def adjoint(self, w_next: torch.Tensor, decay_next: float, h: torch.Tensor,
                out: torch.Tensor | None = None):
        """One step of the backward walk for audit columns h (P x Q).

        With W(s) = Σ_{t≥s} (Π_{s<j≤t} μ_j) lr_t p_t ⊙ h(t), the recursion is
        W(s) = lr_s p_s ⊙ h(s) + μ_{s+1} W(s+1), and the coefficient of d_s in Σ_t Δθ_t·h(t) is
        v_s = −(a_s ⊙ W(s) + lr_s e_s ⊙ h(s)). Returns (W(s), v_s); a sample m in B_s adds
        (c_s g_{m,s}/|B_s|)·v_s to its influence (paper eq. 31 and 37, summed exactly).
        W(s) is computed in place in ``w_next`` and v_s into ``out`` if given: the walk's largest
        tensors are P x Q, and terms whose coefficient is exactly 0 (Adam's e, plain SGD's a and p)
        are skipped.
        """
        w = w_next.mul_(decay_next)
        _add_scaled(w, _scaled(self.lr, self.p), h)
        v = torch.empty_like(w) if out is None else out
        if _is_zero(self.a):
            v.zero_()
        else:
            torch.mul(w, _col(_scaled(-1.0, self.a)), out=v)
        _add_scaled(v, _scaled(-self.lr, self.e), h)
        return w, v

    def residual(self, theta: torch.Tensor, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """What no sample owns: λ₂θ_s through the same memory, and −lr λ_d θ_s (paper eq. 34)."""
        out = torch.zeros(h.shape[1], dtype=h.dtype, device=h.device)
        if self.l2:
            out += self.l2 * (theta @ v)
        if self.decoupled:
            out -= self.lr * self.decoupled * (theta @ h)
        return out


def _col(x):
    return x[:, None] if isinstance(x, torch.Tensor) and x.dim() == 1 else x


def _is_zero(x) -> bool:
    return not isinstance(x, torch.Tensor) and x == 0


def _scaled(factor: float, x: Vector | float) -> Vector | float:
    return x * factor if isinstance(x, torch.Tensor) else float(factor * x)


def _add_scaled(out: torch.Tensor, coefficient: Vector | float, h: torch.Tensor) -> None:
    """out += coefficient ⊙ h in place (coefficient per row of h, or one number)."""
    if isinstance(coefficient, torch.Tensor):
        out.addcmul_(_col(coefficient), h)
    elif coefficient != 0:
        out.add_(h, alpha=coefficient)


@dataclass(frozen=True)
class Hyper:
    """Optimizer hyper-parameters as the manifest records them (torch names)."""

    name: str
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    alpha: float = 0.99
    weight_decay: float = 0.0
    amsgrad: bool = False
    centered: bool = False


class Decomposition:
    """Per-family rules: which state is the linear buffer, how the rest of the state evolves,
    and the step's coefficients. ``state`` maps torch's state keys to flat float64 vectors."""

    buffer_key: str | None = None

    def __init__(self, hyper: Hyper):
        self.hyper = hyper

    def coefficients(self, before: dict, after: dict, lr: float, clip_coef: float,
                     step_after: int) -> StepCoefficients:
        raise NotImplementedError

    def advance_state(self, before: dict, d: torch.Tensor) -> dict:
        """The non-linear part of the state (second moments, sums) after one step."""
        return {}

    def preconditioner(self, after: dict, step_after: int) -> torch.Tensor | None:
        """The diagonal A_t of the update that ended in state ``after`` (paper A.2.3; eq. 29 weighs
        the PLGK with it); None for the identity (SGD)."""
        return None

    def has_buffer(self) -> bool:
        return self.buffer_key is not None

    def simulate(self, before: dict, theta: torch.Tensor, grad: torch.Tensor, lr: float,
                 clip_coef: float, step_after: int):
        """One optimizer step from recorded state: (Δθ_t, predicted state after, coefficients)."""
        d = self.coefficients(before, None, lr, clip_coef, step_after).direction(grad, theta)
        after = self.advance_state(before, d)
        coeffs = self.coefficients(before, after, lr, clip_coef, step_after)
        buf = before.get(self.buffer_key, torch.zeros_like(theta)) if self.has_buffer() else \
            torch.zeros_like(theta)
        delta, buf_next = coeffs.apply(buf, grad, theta)
        if self.has_buffer():
            after = {**after, self.buffer_key: buf_next}
        return delta, after, coeffs


class SGD(Decomposition):
    buffer_key = "momentum_buffer"

    def has_buffer(self):
        return self.hyper.momentum > 0

    def coefficients(self, before, after, lr, clip_coef, step_after):
        h = self.hyper
        if h.momentum == 0:
            return StepCoefficients(lr, clip_coef, 0.0, 0.0, 0.0, 1.0, h.weight_decay, 0.0)
        # torch.optim.SGD starts the buffer as d_0 itself (no dampening on the first step).
        first = self.buffer_key not in before
        a = 1.0 if first else 1.0 - h.dampening
        if h.nesterov:  # update = d_t + μ buf_{t+1}
            return StepCoefficients(lr, clip_coef, h.momentum, a, h.momentum, 1.0, h.weight_decay, 0.0)
        return StepCoefficients(lr, clip_coef, h.momentum, a, 1.0, 0.0, h.weight_decay, 0.0)


class Adam(Decomposition):
    """Adam (L2 decay) and AdamW (decoupled decay), with amsgrad. A_t from v_{t+1}."""

    buffer_key = "exp_avg"

    def __init__(self, hyper: Hyper, decoupled: bool):
        super().__init__(hyper)
        self.decoupled = decoupled

    def advance_state(self, before, d):
        beta2 = self.hyper.betas[1]
        v = beta2 * before.get("exp_avg_sq", torch.zeros_like(d)) + (1 - beta2) * d * d
        out = {"exp_avg_sq": v}
        if self.hyper.amsgrad:
            out["max_exp_avg_sq"] = torch.maximum(before.get("max_exp_avg_sq", torch.zeros_like(d)), v)
        return out

    def coefficients(self, before, after, lr, clip_coef, step_after):
        h = self.hyper
        beta1, beta2 = h.betas
        wd_l2, wd_dec = (0.0, h.weight_decay) if self.decoupled else (h.weight_decay, 0.0)
        if after is None:  # only d_t is needed before the state is known
            return StepCoefficients(lr, clip_coef, beta1, 0.0, 0.0, 0.0, wd_l2, wd_dec)
        bc1 = 1 - beta1 ** step_after
        return StepCoefficients(lr, clip_coef, beta1, 1 - beta1,
                                self.preconditioner(after, step_after) / bc1, 0.0, wd_l2, wd_dec)

    def preconditioner(self, after, step_after):
        h = self.hyper
        v = after["max_exp_avg_sq"] if h.amsgrad else after["exp_avg_sq"]
        return 1.0 / (v.sqrt() / math.sqrt(1 - h.betas[1] ** step_after) + h.eps)


class RMSprop(Decomposition):
    """torch.optim.RMSprop: its momentum buffer holds preconditioned steps, buf = μ buf + A d."""

    buffer_key = "momentum_buffer"

    def has_buffer(self):
        return self.hyper.momentum > 0

    def advance_state(self, before, d):
        alpha = self.hyper.alpha
        out = {"square_avg": alpha * before.get("square_avg", torch.zeros_like(d)) + (1 - alpha) * d * d}
        if self.hyper.centered:
            out["grad_avg"] = alpha * before.get("grad_avg", torch.zeros_like(d)) + (1 - alpha) * d
        return out

    def coefficients(self, before, after, lr, clip_coef, step_after):
        h = self.hyper
        if after is None:
            return StepCoefficients(lr, clip_coef, h.momentum, 0.0, 0.0, 0.0, h.weight_decay, 0.0)
        precond = self.preconditioner(after, step_after)
        if h.momentum > 0:
            return StepCoefficients(lr, clip_coef, h.momentum, precond, 1.0, 0.0, h.weight_decay, 0.0)
        return StepCoefficients(lr, clip_coef, 0.0, 0.0, 0.0, precond, h.weight_decay, 0.0)


    def preconditioner(self, after, step_after):
        var = after["square_avg"]
        if self.hyper.centered:
            var = var - after["grad_avg"] ** 2
        return 1.0 / (var.sqrt() + self.hyper.eps)


class Adagrad(Decomposition):
    def advance_state(self, before, d):
        return {"sum": before.get("sum", torch.zeros_like(d)) + d * d}

    def coefficients(self, before, after, lr, clip_coef, step_after):
        h = self.hyper
        if after is None:
            return StepCoefficients(lr, clip_coef, 0.0, 0.0, 0.0, 0.0, h.weight_decay, 0.0)
        return StepCoefficients(lr, clip_coef, 0.0, 0.0, 0.0, self.preconditioner(after, step_after),
                                h.weight_decay, 0.0)

    def preconditioner(self, after, step_after):
        return 1.0 / (after["sum"].sqrt() + self.hyper.eps)


def decomposition_for(hyper: Hyper) -> Decomposition:
    if hyper.name == "sgd":
        return SGD(hyper)
    if hyper.name in ("adam", "adamw"):
        return Adam(hyper, decoupled=hyper.name == "adamw")
    if hyper.name == "rmsprop":
        return RMSprop(hyper)
    if hyper.name == "adagrad":
        return Adagrad(hyper)
    raise ValueError(f"no decomposition for optimizer {hyper.name!r}")


def build_torch_optimizer(hyper: Hyper, params, lr: float) -> torch.optim.Optimizer:
    """The torch optimizer whose update the decomposition above reproduces."""
    h = hyper
    # foreach=False: the single-tensor path, whose arithmetic order the decomposition follows.
    if h.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=h.momentum, dampening=h.dampening,
                               nesterov=h.nesterov, weight_decay=h.weight_decay, foreach=False)
    if h.name in ("adam", "adamw"):
        cls = torch.optim.AdamW if h.name == "adamw" else torch.optim.Adam
        return cls(params, lr=lr, betas=tuple(h.betas), eps=h.eps, weight_decay=h.weight_decay,
                   amsgrad=h.amsgrad, foreach=False)
    if h.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=h.alpha, eps=h.eps, momentum=h.momentum,
                                   centered=h.centered, weight_decay=h.weight_decay, foreach=False)
    if h.name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, eps=h.eps, weight_decay=h.weight_decay, foreach=False)
    raise ValueError(f"unknown optimizer {h.name!r}")
