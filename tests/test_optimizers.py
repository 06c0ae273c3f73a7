"""The optimizer decomposition: exact against torch's recorded updates, and its adjoint exact
against its own forward form."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import train_tiny
from plgk_cli.arguments import ReplayArguments
from plgk_cli.gradients import GradientComputer, ParameterLayout
from plgk_cli.optimizers import StepCoefficients, UpdateHyper, decomposition_for
from plgk_cli.replay import replay
from plgk_cli.run import load_run

CONFIGS = {
    "sgd": {"name": "sgd", "lr": 0.2},
    "sgd_momentum_dampening_l2": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "dampening": 0.3,
                                  "weight_decay": 0.01},
    "sgd_nesterov_clip": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True,
                          "clip_grad_norm": 0.3},
    "adam_l2": {"name": "adam", "lr": 0.05, "weight_decay": 0.01},
    "adam_amsgrad": {"name": "adam", "lr": 0.05, "amsgrad": True, "betas": [0.8, 0.95]},
    "adamw_clip": {"name": "adamw", "lr": 0.05, "weight_decay": 0.1, "clip_grad_norm": 0.5},
    "rmsprop_momentum_l2": {"name": "rmsprop", "lr": 0.01, "momentum": 0.5, "weight_decay": 0.01},
    "rmsprop_centered": {"name": "rmsprop", "lr": 0.01, "centered": True},
    "adagrad_l2": {"name": "adagrad", "lr": 0.1, "weight_decay": 0.01},
}
SCHEDULES = {"adamw_clip": {"name": "cosine", "warmup_steps": 2},
             "sgd_momentum_dampening_l2": {"name": "step", "step_size": 2, "gamma": 0.5}}


def _replayed_update_error(tmp_path, npz, name, dtype):
    run = train_tiny(tmp_path / "run", npz, CONFIGS[name], SCHEDULES.get(name), dtype=dtype)
    summary = replay(ReplayArguments(ckpts=str(run), audit_set="test[0:2]", out=str(tmp_path / "o.h5"),
                                     device="cpu"), progress=False)
    return summary.max_update_error


@pytest.mark.parametrize("name", CONFIGS)
def test_update_check_exact_in_float64(tmp_path, tiny_npz, name):
    assert _replayed_update_error(tmp_path, tiny_npz, name, "float64") <= 1e-10


@pytest.mark.parametrize("name", CONFIGS)
def test_update_check_in_float32(tmp_path, tiny_npz, name):
    assert _replayed_update_error(tmp_path, tiny_npz, name, "float32") <= 1e-3


def _worst_simulated_error(run, hyper_change: dict) -> float:
    """Re-simulate every recorded update with a (deliberately wrong) decomposition."""
    # the switches (nesterov, amsgrad, centered) are the family's, the values each update's own
    values = {k: v for k, v in hyper_change.items() if k in UpdateHyper.__dataclass_fields__}
    switches = {k: v for k, v in hyper_change.items() if k not in values}
    decomposition = decomposition_for(dataclasses.replace(run.hyper, **switches))
    model = run.build_model().double()
    layout = ParameterLayout.of(model)
    grads = GradientComputer(model, layout, run.dataset.num_classes)
    x, y = run.dataset.x_train.double(), run.dataset.y_train
    worst = 0.0
    previous = run.checkpoint(0)
    for t in run.steps[1:]:
        current = run.checkpoint(t)
        theta = layout.flatten(previous.params)
        g = grads.mean_loss_gradient(theta, x[current.batch], y[current.batch])
        before = layout.flatten_state(previous.optim_state)
        delta, _, _ = decomposition.simulate(before, theta, g, dataclasses.replace(run.update_hyper(current), **values),
                                             current.clip_coef)
        recorded = layout.flatten(current.params) - theta
        worst = max(worst, float((delta - recorded).norm() / recorded.norm()))
        previous = current
    return worst


@pytest.mark.parametrize("name, wrong", [
    ("sgd_momentum_dampening_l2", {"weight_decay": 0.0}),  # the L2 term is missing
    ("sgd_momentum_dampening_l2", {"dampening": 0.0}),
    ("sgd_nesterov_clip", {"nesterov": False}),
    ("adamw_clip", {"weight_decay": 0.0}),  # decoupled decay is missing
    ("adam_amsgrad", {"amsgrad": False}),
    ("rmsprop_centered", {"centered": False}),
])
def test_a_missing_term_shows(tmp_path, tiny_npz, name, wrong):
    run = load_run(train_tiny(tmp_path / "run", tiny_npz, CONFIGS[name], SCHEDULES.get(name)))
    assert _worst_simulated_error(run, {}) <= 1e-10  # the right decomposition, same harness
    assert _worst_simulated_error(run, wrong) > 1e-4


@pytest.mark.parametrize("per_coordinate", [False, True], ids=["one_group", "groups"])
def test_adjoint_walk_equals_forward_sum(per_coordinate):
    """Σ_t Δθ_t·h(t) from the forward template equals Σ_s d_s·v_s − Σ_s lr_s λ_d θ_s·h(s)
    from the backward recursion, for random per-step coefficients (vectors and scalars); with
    parameter groups lr, μ, λ₂ and λ_d are per-coordinate vectors that change every step too."""
    torch.manual_seed(0)
    p, q, steps = 7, 3, 6
    f64 = dict(dtype=torch.float64)

    def value(scale):
        return scale * torch.rand(p, **f64) if per_coordinate else scale * float(torch.rand(1))

    coeffs = [StepCoefficients(lr=value(1.0) + 0.1, clip_coef=float(torch.rand(1)),
                               decay=value(1.0), a=torch.rand(p, **f64), p=torch.rand(p, **f64),
                               e=torch.rand(p, **f64), l2=value(0.03), decoupled=value(0.02))
              for _ in range(steps)]
    grads = [torch.randn(p, **f64) for _ in range(steps)]
    thetas = [torch.randn(p, **f64) for _ in range(steps)]
    hs = [torch.randn(p, q, **f64) for _ in range(steps)]

    buf, forward = torch.zeros(p, **f64), torch.zeros(q, **f64)
    for c, g, th, h in zip(coeffs, grads, thetas, hs):
        delta, buf = c.apply(buf, g, th)
        forward += delta @ h

    w, decay_next, backward = torch.zeros(p, q, **f64), 0.0, torch.zeros(q, **f64)
    for c, g, th, h in reversed(list(zip(coeffs, grads, thetas, hs))):
        w, v = c.adjoint(w, decay_next, h)
        decay_next = c.decay
        backward += (c.clip_coef * g) @ v + c.residual(th, v, h)
    torch.testing.assert_close(backward, forward, rtol=1e-12, atol=1e-12)
