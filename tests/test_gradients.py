"""Batched per-sample gradients against an explicit loop of autograd calls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plgk_cli.gradients import GradientComputer, ParameterLayout
from plgk_cli.models import cnn, mlp

NUM_CLASSES = 4


def _setup(model, method="auto"):
    torch.manual_seed(0)
    model = model.double()
    layout = ParameterLayout.of(model)
    theta = layout.flatten(dict(model.named_parameters())).detach()
    return model, layout, theta, GradientComputer(model, layout, NUM_CLASSES, chunk_size=3, method=method)


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


@pytest.mark.parametrize("method", ["hooks", "vmap"])
def test_loss_gradients_match_loop(method):
    model, layout, theta, grads = _setup(cnn((1, 8, 8), NUM_CLASSES, channels=2, hidden=5), method)
    x, y = torch.randn(7, 1, 8, 8, dtype=torch.float64), torch.randint(0, NUM_CLASSES, (7,))
    batched, losses = grads.loss_gradients(theta, x, y)  # chunk_size 3: exercises chunking
    for i in range(len(y)):
        expected = _loop_gradient(model, layout, theta,
                                  lambda m: F.cross_entropy(m(x[i:i + 1]), y[i:i + 1]))
        torch.testing.assert_close(batched[i], expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads.mean_loss_gradient(theta, x, y), batched.mean(0),
                               rtol=1e-12, atol=1e-14)
    assert losses.shape == (7,)


@pytest.mark.parametrize("method", ["hooks", "vmap"])
def test_audit_targets_match_loop(method):
    model, layout, theta, grads = _setup(mlp((6,), NUM_CLASSES, hidden=5), method)
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


class _Shared(nn.Module):
    """One Linear applied twice: per-sample gradients by hooks would see only its last call."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(NUM_CLASSES, NUM_CLASSES)
        self.head = nn.Linear(6, NUM_CLASSES)

    def forward(self, x):
        return self.inner(torch.tanh(self.inner(self.head(x))))


class _Tied(nn.Module):
    """Two Linear layers holding the same weight."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.second = nn.Linear(6, 6)
        self.second.weight = self.first.weight
        self.head = nn.Linear(6, NUM_CLASSES)

    def forward(self, x):
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


class _Sequence(nn.Module):
    """A Linear layer on (B, L, F) inputs and a strided, dilated convolution without bias."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, stride=2, dilation=2, padding=(1, 2), bias=False)
        self.rows = nn.Linear(3, 5)
        self.head = nn.LazyLinear(NUM_CLASSES)

    def forward(self, x):
        h = torch.tanh(self.conv(x))  # B x 3 x H' x W'
        h = self.rows(h.flatten(2).transpose(1, 2))  # B x L x 5
        return self.head(torch.relu(h).flatten(1))


class _Scale(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        return torch.tanh(x) * self.scale


def _model(kind):
    torch.manual_seed(1)
    if kind == "shared":
        return _Shared(), (6,)
    if kind == "tied":
        return _Tied(), (6,)
    if kind == "inplace":  # ReLU(inplace) rewrites the Linear output the hook recorded
        return nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, NUM_CLASSES)), (6,)
    if kind == "layernorm":  # by its rule in plgk_cli.per_example
        return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, NUM_CLASSES)), (6,)
    if kind == "scale":  # a parameter of a layer without a per-example rule
        return nn.Sequential(nn.Linear(6, 5), _Scale(5), nn.Linear(5, NUM_CLASSES)), (6,)
    model = _Sequence()
    model(torch.zeros(1, 1, 9, 9))  # materialise the lazy head
    return model, (1, 9, 9)


@pytest.mark.parametrize("kind,method", [("shared", "vmap"), ("tied", "hooks"), ("inplace", "vmap"),
                                         ("layernorm", "hooks"), ("scale", "vmap"), ("sequence", "hooks")])
def test_method_choice_and_fallback_match_loop(kind, method):
    """Hooks where they are exact (tied weights too: both uses add up); vmap for reused,
    in-place-modified or other layers."""
    model, in_shape = _model(kind)
    model, layout, theta, grads = _setup(model)
    x, y = torch.randn(5, *in_shape, dtype=torch.float64), torch.randint(0, NUM_CLASSES, (5,))
    values, g = grads.audit_gradients(theta, x, y, ("loss", "margin"))
    assert grads.method == method
    for i in range(len(y)):
        expected = _loop_gradient(model, layout, theta, lambda m: F.cross_entropy(m(x[i:i + 1]), y[i:i + 1]))
        torch.testing.assert_close(g[i, 0], expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(values[i, 0], F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).detach())


def test_hooks_refused_where_they_do_not_apply():
    model, layout, _, _ = _setup(_model("scale")[0])
    with pytest.raises(ValueError, match="Linear or Conv2d"):
        GradientComputer(model, layout, NUM_CLASSES, method="hooks")


@pytest.mark.parametrize("method", ["hooks", "vmap"])
def test_audit_and_loss_gradients_share_a_pass(method):
    """One forward over audit and training rows gives what two separate calls give."""
    model, layout, theta, grads = _setup(cnn((1, 8, 8), NUM_CLASSES, channels=2, hidden=5), method)
    grads.chunk_size = 16
    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, NUM_CLASSES, (4,))
    xt, yt = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, NUM_CLASSES, (6,))
    targets = ("margin", "loss", "logits")
    values, g, train = grads.audit_and_loss_gradients(theta, x, y, targets, xt, yt)
    expected_values, expected_g = grads.audit_gradients(theta, x, y, targets)
    torch.testing.assert_close(values, expected_values, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(g, expected_g, rtol=1e-12, atol=1e-14)
    for i in range(len(yt)):
        expected = _loop_gradient(model, layout, theta, lambda m: F.cross_entropy(m(xt[i:i + 1]), yt[i:i + 1]))
        torch.testing.assert_close(train[i], expected, rtol=1e-12, atol=1e-14)


class _Folded(nn.Module):
    """Per-sample separable, but the Linear sees the batch folded with a sequence axis."""

    def __init__(self, length=3, features=4):
        super().__init__()
        self.length, self.features = length, features
        self.step = nn.Linear(features, features)
        self.head = nn.Linear(length * features, NUM_CLASSES)

    def forward(self, x):
        b = len(x)
        h = torch.tanh(self.step(x.reshape(b * self.length, self.features)))
        return self.head(h.reshape(b, -1))


class _SequenceFirst(nn.Module):
    """The Linear sees (L, B, F): with L == B only the first comparison with vmap can tell."""

    def __init__(self, length, features=4):
        super().__init__()
        self.length, self.features = length, features
        self.step = nn.Linear(features, features)
        self.head = nn.Linear(length * features, NUM_CLASSES)

    def forward(self, x):
        h = torch.tanh(self.step(x.reshape(len(x), self.length, self.features).transpose(0, 1)))
        return self.head(h.transpose(0, 1).reshape(len(x), -1))


@pytest.mark.parametrize("model, batch", [(_Folded(), 5), (_SequenceFirst(5), 5), (_SequenceFirst(3), 5)])
def test_batch_not_along_dimension_0_falls_back_to_vmap(model, batch):
    model, layout, theta, grads = _setup(model)
    grads.chunk_size = 8
    x, y = torch.randn(batch, 12 if isinstance(model, _Folded) else model.length * 4,
                       dtype=torch.float64), torch.randint(0, NUM_CLASSES, (batch,))
    g, _ = grads.loss_gradients(theta, x, y)
    assert grads.method == "vmap"
    for i in range(batch):
        expected = _loop_gradient(model, layout, theta, lambda m: F.cross_entropy(m(x[i:i + 1]), y[i:i + 1]))
        torch.testing.assert_close(g[i], expected, rtol=1e-12, atol=1e-14)
