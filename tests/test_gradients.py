"""Batched per-sample gradients against an explicit loop of autograd calls."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from plgk_cli.gradients import GradientComputer, ParameterLayout
from plgk_cli.models import cnn, mlp

NUM_CLASSES = 4


def _setup(model):
    torch.manual_seed(0)
    model = model.double()
    layout = ParameterLayout.of(model)
    theta = layout.flatten(dict(model.named_parameters())).detach()
    return model, layout, theta, GradientComputer(model, layout, NUM_CLASSES, chunk_size=3)


def _loop_gradient(model, layout, theta, quantity):
    """∇θ quantity(logits) by one autograd call on a model holding θ."""
    with torch.no_grad():
        for name, value in layout.unflatten(theta).items():
            model.get_parameter(name).copy_(value)
    model.zero_grad()
    quantity(model).backward()
    return torch.cat([model.get_parameter(n).grad.reshape(-1) for n in layout.names])


def test_layout_round_trip_and_layers():
    model, layout, theta, _ = _setup(mlp((5,), NUM_CLASSES, hidden=3))
    assert layout.size == 5 * 3 + 3 + 3 * NUM_CLASSES + NUM_CLASSES
    restored = layout.unflatten(theta)
    for name, p in model.named_parameters():
        assert torch.equal(restored[name], p.detach())
    assert [name for name, _ in layout.layers] == ["1", "3"]  # Flatten, Linear, ReLU, Linear
    assert layout.layers[-1][1].stop == layout.size


def test_loss_gradients_match_loop():
    model, layout, theta, grads = _setup(cnn((1, 8, 8), NUM_CLASSES, channels=2, hidden=5))
    x, y = torch.randn(7, 1, 8, 8, dtype=torch.float64), torch.randint(0, NUM_CLASSES, (7,))
    batched, losses = grads.loss_gradients(theta, x, y)  # chunk_size 3: exercises chunking
    for i in range(len(y)):
        expected = _loop_gradient(model, layout, theta,
                                  lambda m: F.cross_entropy(m(x[i:i + 1]), y[i:i + 1]))
        torch.testing.assert_close(batched[i], expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads.mean_loss_gradient(theta, x, y), batched.mean(0),
                               rtol=1e-12, atol=1e-14)
    assert losses.shape == (7,)


def test_audit_targets_match_loop():
    model, layout, theta, grads = _setup(mlp((6,), NUM_CLASSES, hidden=5))
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, NUM_CLASSES, (5,))
    targets = ("loss", "logit", "margin", "logits")
    values, g = grads.audit_gradients(theta, x, y, targets)
    assert values.shape == (5, 3 + NUM_CLASSES) and g.shape == (5, 3 + NUM_CLASSES, layout.size)

    def quantities(m, i):
        logits = m(x[i:i + 1])[0]
        other = torch.cat([logits[:y[i]], logits[y[i] + 1:]]).max()
        return [F.cross_entropy(logits[None], y[i:i + 1]), logits[y[i]], logits[y[i]] - other,
                *logits]

    for i in range(len(y)):
        for column in range(3 + NUM_CLASSES):
            expected = _loop_gradient(model, layout, theta, lambda m: quantities(m, i)[column])
            torch.testing.assert_close(g[i, column], expected, rtol=1e-12, atol=1e-14)
            assert torch.isclose(values[i, column], quantities(model, i)[column].detach())
