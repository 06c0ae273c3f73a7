"""Exact decomposition of each supported optimizer's update into per-sample terms.

Every supported optimizer (torch.optim SGD with or without (nesterov) momentum and dampening,
Adam, AdamW, RMSprop (plain, centered, with momentum), Adagrad; L2 or decoupled weight decay;
global grad-norm clipping; any number of parameter groups; any schedule of lr, momentum, betas,
eps and weight decay) fits one linear template per step t:

    d_t       = c_t G_t + λ₂ θ_t                      (G_t = batch-mean loss gradient, c_t = clip coef)
    buf_{t+1} = μ_t buf_t + a_t ⊙ d_t                  (the linear memory: momentum, Adam's m)
    Δθ_t      = −lr_t (p_t ⊙ buf_{t+1} + e_t ⊙ d_t) − lr_t λ_d θ_t

where the diagonal a_t, p_t, e_t carry the preconditioner A_t (paper A.2.3, eq. 26-28) read from the
recorded optimizer state after the step, bias corrections, nesterov's look-ahead and dampening, and
λ_d is decoupled (AdamW) decay (A.2.5, eq. 32). Only G_t depends on the samples, so
G_t = Σ_m g_{m,t}/|B_t| splits Δθ_t exactly into per-sample terms plus the sample-independent
λ₂θ and λ_dθ terms (the residual).

Every coefficient is diagonal (DESIGN.md: K_{t,s} is diagonal), so nothing in the template needs
it constant across parameters or time: lr_t, μ_t, λ₂, λ_d, β1, β2 and eps are per-coordinate
vectors where parameter groups differ (a plain float where they agree), taken from the update's
own record (:class:`UpdateHyper`). A parameter torch skipped in an update (its .grad was None)
keeps θ and its state: μ = 1 and a = p = e = λ_d = 0 on its coordinates.

The same :class:`StepCoefficients` serve three uses, so that they cannot drift apart:
``apply`` (forward: re-simulation and the per-step update check), ``adjoint`` (the backward walk
of the replay, exact momentum with no truncation window, DESIGN.md) and ``residual``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

Vector = torch.Tensor  # flat float64 vector over all P parameters, or a python float

@dataclass(frozen=True)
class UpdateHyper:
    """The hyper-parameters one update used, per coordinate of the flat parameter vector: a float
    where every parameter group had the same value, else a P-vector (torch's names; beta1/beta2
    are Adam's betas, momentum SGD's and RMSprop's)."""

    lr: Vector | float
    momentum: Vector | float = 0.0
    dampening: Vector | float = 0.0
    beta1: Vector | float = 0.9
    beta2: Vector | float = 0.999
    eps: Vector | float = 1e-8
    alpha: Vector | float = 0.99
    weight_decay: Vector | float = 0.0
    step: Vector | float = 1.0  # the optimizer's step count of the parameter after the update
    stepped: Vector | None = None  # bool: the optimizer updated the coordinate (None: all were)


# The per-group values each update records, in this order (trajectory format v3).
HYPER_FIELDS = tuple(f.name for f in fields(UpdateHyper))[:8]


@dataclass(frozen=True)
class StepCoefficients:
    lr: Vector | float
    clip_coef: float
    decay: Vector | float  # μ_t: multiplies buf_t
    a: Vector | float  # into the buffer
    p: Vector | float  # buffer -> update
    e: Vector | float  # direct d -> update
    l2: Vector | float  # λ₂: coupled (L2) weight decay, enters d_t
    decoupled: Vector | float  # λ_d: decoupled weight decay

    def direction(self, grad: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """d_t = c_t G_t + λ₂ θ_t: what the optimizer's update rule sees as the gradient."""
        return self.clip_coef * grad + self.l2 * theta

    def apply(self, buf: torch.Tensor, grad: torch.Tensor, theta: torch.Tensor):
        """Forward step: (Δθ_t, buf_{t+1}) from buf_t, the batch-mean gradient G_t and θ_t."""
        d = self.direction(grad, theta)
        buf_next = self.decay * buf + self.a * d
        delta = -self.lr * (self.p * buf_next + self.e * d) - self.lr * self.decoupled * theta
        return delta, buf_next

    def adjoint(self, w_next: torch.Tensor, decay_next: Vector | float, h: torch.Tensor,
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
        w = w_next.mul_(_col(decay_next))
        _add_scaled(w, _times(self.lr, self.p), h)
        v = torch.empty_like(w) if out is None else out
        if _is_zero(self.a):
            v.zero_()
        else:
            torch.mul(w, _col(_times(-1.0, self.a)), out=v)
        _add_scaled(v, _times(_times(-1.0, self.lr), self.e), h)
        return w, v

    def residual(self, theta: torch.Tensor, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """What no sample owns: λ₂θ_s through the same memory, and −lr λ_d θ_s (paper eq. 34)."""
        out = torch.zeros(h.shape[1], dtype=h.dtype, device=h.device)
        if isinstance(self.l2, torch.Tensor):
            out += (self.l2 * theta) @ v
        elif self.l2:
            out += self.l2 * (theta @ v)
        if isinstance(self.decoupled, torch.Tensor) or isinstance(self.lr, torch.Tensor):
            out -= (self.lr * self.decoupled * theta) @ h
        elif self.decoupled:
            out -= self.lr * self.decoupled * (theta @ h)
        return out

    def where_stepped(self, stepped: Vector | None) -> "StepCoefficients":
        """These coefficients on the coordinates torch updated, the identity elsewhere: a
        parameter whose .grad was None keeps θ and its buffer (μ = 1, nothing in or out)."""
        if stepped is None:
            return self
        return StepCoefficients(self.lr, self.clip_coef, _where(stepped, self.decay, 1.0),
                                _where(stepped, self.a, 0.0), _where(stepped, self.p, 0.0),
                                _where(stepped, self.e, 0.0), self.l2,
                                _where(stepped, self.decoupled, 0.0))


def _col(x):
    return x[:, None] if isinstance(x, torch.Tensor) and x.dim() == 1 else x


def _is_zero(x) -> bool:
    return not isinstance(x, torch.Tensor) and x == 0


def _times(x: Vector | float, y: Vector | float) -> Vector | float:
    """x * y, a float when both are."""
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return x * y
    return float(x * y)


def _where(condition, x: Vector | float, y: Vector | float) -> Vector | float:
    """x where condition, else y (condition a bool P-vector or a bool). torch.where, not a
    product, so that an inf or NaN that x holds where it is not taken (a bias correction
    1 − β^0 = 0 on a coordinate never stepped) cannot leak."""
    if not isinstance(condition, torch.Tensor):
        return x if condition else y
    like = next((v for v in (x, y) if isinstance(v, torch.Tensor)), None)
    dtype, device = (torch.float64, condition.device) if like is None else (like.dtype, like.device)
    as_tensor = lambda v: v if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=dtype, device=device)  # noqa: E731
    return torch.where(condition, as_tensor(x), as_tensor(y))


def _sqrt(x: Vector | float) -> Vector | float:
    return x.sqrt() if isinstance(x, torch.Tensor) else math.sqrt(x)


def _add_scaled(out: torch.Tensor, coefficient: Vector | float, h: torch.Tensor) -> None:
    """out += coefficient ⊙ h in place (coefficient per row of h, or one number)."""
    if isinstance(coefficient, torch.Tensor):
        out.addcmul_(_col(coefficient), h)
    elif coefficient != 0:
        out.add_(h, alpha=coefficient)


@dataclass(frozen=True)
class Hyper:
    """Optimizer hyper-parameters as the manifest records them (torch names): the family and its
    switches, which hold for every parameter group and the whole run, and the first group's
    starting values (the only values of runs recorded before format v3)."""

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

    def update_hyper(self, lr: float, step: float) -> UpdateHyper:
        """One update of a run with one group and constant hyper-parameters but the lr."""
        return UpdateHyper(lr=lr, momentum=self.momentum, dampening=self.dampening,
                           beta1=self.betas[0], beta2=self.betas[1], eps=self.eps, alpha=self.alpha,
                           weight_decay=self.weight_decay, step=step)


class Decomposition:
    """Per-family rules: which state is the linear buffer, how the rest of the state evolves,
    and the step's coefficients. ``state`` maps torch's state keys to flat float64 vectors; a
    parameter that has no state yet (never stepped) holds zeros, as torch starts it."""

    buffer_key: str | None = None

    def __init__(self, hyper: Hyper):
        self.hyper = hyper

    def coefficients(self, before: dict, after: dict | None, hp: UpdateHyper,
                     clip_coef: float) -> StepCoefficients:
        """The template's coefficients of the update that went from ``before`` to ``after``
        (``after`` None: only what d_t needs)."""
        coefficients = self._coefficients(before, after, hp, clip_coef)
        return coefficients if after is None else coefficients.where_stepped(hp.stepped)

    def _coefficients(self, before, after, hp, clip_coef) -> StepCoefficients:
        raise NotImplementedError

    def advance_state(self, before: dict, d: torch.Tensor, hp: UpdateHyper) -> dict:
        """The non-linear part of the state (second moments, sums) after one step."""
        return {}

    def preconditioner(self, after: dict, hp: UpdateHyper) -> torch.Tensor | None:
        """The diagonal A_t of the update that ended in state ``after`` (paper A.2.3; eq. 29 weighs
        the PLGK with it), 0 on coordinates it did not update; None for the identity (SGD)."""
        precondition = self._preconditioner(after, hp)
        if precondition is None or hp.stepped is None:
            return precondition
        return _where(hp.stepped, precondition, 0.0)

    def _preconditioner(self, after, hp) -> torch.Tensor | None:
        return None

    def has_buffer(self, hp: UpdateHyper) -> bool:
        return self.buffer_key is not None

    def simulate(self, before: dict, theta: torch.Tensor, grad: torch.Tensor, hp: UpdateHyper,
                 clip_coef: float):
        """One optimizer step from recorded state: (Δθ_t, predicted state after, coefficients)."""
        d = self.coefficients(before, None, hp, clip_coef).direction(grad, theta)
        after = self.advance_state(before, d, hp)
        if hp.stepped is not None:  # a skipped parameter's state stays as it was
            after = {k: torch.where(hp.stepped, v, before.get(k, torch.zeros_like(v)))
                     for k, v in after.items()}
        coeffs = self.coefficients(before, after, hp, clip_coef)
        has_buffer = self.has_buffer(hp)
        buf = before.get(self.buffer_key, torch.zeros_like(theta)) if has_buffer else \
            torch.zeros_like(theta)
        delta, buf_next = coeffs.apply(buf, grad, theta)
        if has_buffer:
            after = {**after, self.buffer_key: buf_next}
        return delta, after, coeffs


class SGD(Decomposition):
    buffer_key = "momentum_buffer"

    def has_buffer(self, hp):
        return isinstance(hp.momentum, torch.Tensor) or hp.momentum > 0

    def _coefficients(self, before, after, hp, clip_coef):
        l2 = hp.weight_decay
        if not self.has_buffer(hp):
            return StepCoefficients(hp.lr, clip_coef, 0.0, 0.0, 0.0, 1.0, l2, 0.0)
        # torch.optim.SGD starts the buffer as d_0 itself (no dampening on its first step).
        a = _where(hp.step == 1, 1.0, _times(-1.0, hp.dampening) + 1.0)
        if self.hyper.nesterov:  # update = d_t + μ buf_{t+1}
            p, e = hp.momentum, 1.0
        else:
            p, e = 1.0, 0.0
        if isinstance(hp.momentum, torch.Tensor):  # groups without momentum: plain SGD there
            with_momentum = hp.momentum > 0
            a, p = _where(with_momentum, a, 0.0), _where(with_momentum, p, 0.0)
            e = _where(with_momentum, e, 1.0)
        return StepCoefficients(hp.lr, clip_coef, hp.momentum, a, p, e, l2, 0.0)


class Adam(Decomposition):
    """Adam (L2 decay) and AdamW (decoupled decay), with amsgrad. A_t from v_{t+1}."""

    buffer_key = "exp_avg"

    def __init__(self, hyper: Hyper, decoupled: bool):
        super().__init__(hyper)
        self.decoupled = decoupled

    def advance_state(self, before, d, hp):
        v = hp.beta2 * before.get("exp_avg_sq", torch.zeros_like(d)) + (1 - hp.beta2) * d * d
        out = {"exp_avg_sq": v}
        if self.hyper.amsgrad:
            out["max_exp_avg_sq"] = torch.maximum(before.get("max_exp_avg_sq", torch.zeros_like(d)), v)
        return out

    def _coefficients(self, before, after, hp, clip_coef):
        wd_l2, wd_dec = (0.0, hp.weight_decay) if self.decoupled else (hp.weight_decay, 0.0)
        if after is None:  # only d_t is needed before the state is known
            return StepCoefficients(hp.lr, clip_coef, hp.beta1, 0.0, 0.0, 0.0, wd_l2, wd_dec)
        bc1 = 1 - hp.beta1 ** hp.step
        return StepCoefficients(hp.lr, clip_coef, hp.beta1, 1 - hp.beta1,
                                self._preconditioner(after, hp) / bc1, 0.0, wd_l2, wd_dec)

    def _preconditioner(self, after, hp):
        v = after["max_exp_avg_sq"] if self.hyper.amsgrad else after["exp_avg_sq"]
        return 1.0 / (v.sqrt() / _sqrt(1 - hp.beta2 ** hp.step) + hp.eps)


class RMSprop(Decomposition):
    """torch.optim.RMSprop: its momentum buffer holds preconditioned steps, buf = μ buf + A d."""

    buffer_key = "momentum_buffer"

    def has_buffer(self, hp):
        return isinstance(hp.momentum, torch.Tensor) or hp.momentum > 0

    def advance_state(self, before, d, hp):
        alpha = hp.alpha
        out = {"square_avg": alpha * before.get("square_avg", torch.zeros_like(d)) + (1 - alpha) * d * d}
        if self.hyper.centered:
            out["grad_avg"] = alpha * before.get("grad_avg", torch.zeros_like(d)) + (1 - alpha) * d
        return out

    def _coefficients(self, before, after, hp, clip_coef):
        l2 = hp.weight_decay
        if after is None:
            return StepCoefficients(hp.lr, clip_coef, hp.momentum, 0.0, 0.0, 0.0, l2, 0.0)
        precond = self._preconditioner(after, hp)
        if not self.has_buffer(hp):
            return StepCoefficients(hp.lr, clip_coef, 0.0, 0.0, 0.0, precond, l2, 0.0)
        if isinstance(hp.momentum, torch.Tensor):  # groups without momentum: plain RMSprop there
            with_momentum = hp.momentum > 0
            return StepCoefficients(hp.lr, clip_coef, hp.momentum, _where(with_momentum, precond, 0.0),
                                    _where(with_momentum, 1.0, 0.0), _where(with_momentum, 0.0, 1.0) * precond,
                                    l2, 0.0)
        return StepCoefficients(hp.lr, clip_coef, hp.momentum, precond, 1.0, 0.0, l2, 0.0)

    def _preconditioner(self, after, hp):
        var = after["square_avg"]
        if self.hyper.centered:
            var = var - after["grad_avg"] ** 2
        return 1.0 / (var.sqrt() + hp.eps)


class Adagrad(Decomposition):
    def advance_state(self, before, d, hp):
        return {"sum": before.get("sum", torch.zeros_like(d)) + d * d}

    def _coefficients(self, before, after, hp, clip_coef):
        l2 = hp.weight_decay
        if after is None:
            return StepCoefficients(hp.lr, clip_coef, 0.0, 0.0, 0.0, 0.0, l2, 0.0)
        return StepCoefficients(hp.lr, clip_coef, 0.0, 0.0, 0.0, self._preconditioner(after, hp), l2, 0.0)

    def _preconditioner(self, after, hp):
        return 1.0 / (after["sum"].sqrt() + hp.eps)


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
