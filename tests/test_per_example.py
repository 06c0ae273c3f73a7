"""Per-example layer rules against an explicit loop of single-example autograd, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from plgk_cli.per_example import LayerRule, rule_for

B = 5


def _q(out: torch.Tensor) -> torch.Tensor:
    """Per-example q_m = Σ c ⊙ tanh(output_m), c fixed per output shape."""
    c = torch.randn(out.shape[1:], generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    return (c * torch.tanh(out)).reshape(out.shape[0], -1).sum(1)


def _hooked(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> dict | None:
    seen = {}
    handle = layer.register_forward_hook(
        lambda module, inputs, output: seen.update(a=inputs[0].detach(), out=output))
    try:
        q = _q(model(x))
    finally:
        handle.remove()
    delta, = torch.autograd.grad(q.sum(), seen["out"])
    return rule_for(layer).gradients(layer, seen["a"], delta)


def _looped(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> dict:
    params = dict(layer.named_parameters(recurse=False))
    if not params:
        return {}
    rows = {name: [] for name in params}
    for m in range(len(x)):
        grads = torch.autograd.grad(_q(model(x[m:m + 1])).sum(), list(params.values()))
        for name, g in zip(params, grads):
            rows[name].append(g.to_dense() if g.is_sparse else g)
    return {name: torch.stack(g) for name, g in rows.items()}


def _check(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> None:
    got, want = _hooked(model, layer, x), _looped(model, layer, x)
    assert got is not None
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].shape == want[name].shape and got[name].dtype == torch.float64, name
        scale = max(want[name].norm().item(), 1e-30)
        assert (got[name] - want[name]).norm().item() <= 1e-10 * scale, name


@pytest.fixture(autouse=True)
def _float64():
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("shape", [(B, 6), (B, 3, 6), (B, 2, 3, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(shape, bias):
    layer = nn.Linear(6, 4, bias=bias)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), layer)
    _check(model, layer, torch.randn(shape))


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, dilation=2, padding=2, bias=False),
    dict(kernel_size=4, padding="same"),                 # odd total padding: extra on the right
    dict(kernel_size=3, dilation=3, padding="same"),
    dict(kernel_size=2, padding="valid", stride=3),
    dict(kernel_size=3, groups=2, stride=2, padding=1),
    dict(kernel_size=1, groups=4, bias=False),
])
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv1d(kwargs):
    layer = nn.Conv1d(4, 8, **kwargs)
    model = nn.Sequential(nn.Conv1d(2, 4, 1), nn.Tanh(), layer)
    _check(model, layer, torch.randn(B, 2, 11))


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2)),
    dict(kernel_size=3, dilation=(2, 1), padding=1, bias=False),
    dict(kernel_size=(4, 3), padding="same"),
    dict(kernel_size=2, dilation=2, padding="same", bias=False),
    dict(kernel_size=3, groups=2, stride=2, padding=1),
])
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv2d(kwargs):
    layer = nn.Conv2d(4, 6, **kwargs)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.Tanh(), layer)
    _check(model, layer, torch.randn(B, 2, 7, 6))


@pytest.mark.parametrize("kwargs", [dict(), dict(padding_idx=2), dict(sparse=True)])
@pytest.mark.parametrize("ids_shape", [(B,), (B, 6), (B, 2, 4)])
def test_embedding(kwargs, ids_shape):
    layer = nn.Embedding(5, 3, **kwargs)
    model = nn.Sequential(layer, nn.Linear(3, 2))
    ids = torch.randint(0, 5, ids_shape)
    if len(ids_shape) > 1:
        ids[:, 0] = ids[:, 1] = 2  # repeated ids within every example, and the padding row
    _check(model, layer, ids)


@pytest.mark.parametrize("shape", [(6,), (3, 6)])
@pytest.mark.parametrize("kwargs", [dict(), dict(bias=False), dict(elementwise_affine=False)])
@pytest.mark.parametrize("x_shape", [(B, 3, 6), (B, 2, 3, 6)])
def test_layer_norm(shape, kwargs, x_shape):
    layer = nn.LayerNorm(shape, **kwargs)
    if layer.weight is not None:
        nn.init.normal_(layer.weight)
    model = nn.Sequential(nn.Linear(6, 6), layer)
    _check(model, layer, torch.randn(x_shape))


@pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="torch without nn.RMSNorm")
@pytest.mark.parametrize("shape", [(6,), (3, 6)])
@pytest.mark.parametrize("eps", [None, 1e-3])
def test_rms_norm(shape, eps):
    layer = nn.RMSNorm(shape, eps=eps)
    nn.init.normal_(layer.weight)
    model = nn.Sequential(nn.Linear(6, 6), layer)
    _check(model, layer, torch.randn(B, 2, 3, 6))


@pytest.mark.parametrize("groups,x_shape", [(2, (B, 6)), (3, (B, 6, 5)), (1, (B, 6, 3, 4)),
                                             (6, (B, 6, 3, 4))])
def test_group_norm(groups, x_shape):
    layer = nn.GroupNorm(groups, 6)
    nn.init.normal_(layer.weight)
    _check(nn.Sequential(nn.Tanh(), layer), layer, torch.randn(x_shape))


def _random_running_stats(layer: nn.Module) -> None:
    layer.running_mean.copy_(torch.randn(layer.num_features))
    layer.running_var.copy_(torch.rand(layer.num_features) + 0.5)


@pytest.mark.parametrize("cls,x_shape", [(nn.InstanceNorm1d, (B, 3, 7)),
                                          (nn.InstanceNorm2d, (B, 3, 4, 5))])
@pytest.mark.parametrize("mode", ["train", "train-tracking", "eval-untracked", "eval-running"])
def test_instance_norm(cls, x_shape, mode):
    layer = cls(3, affine=True, track_running_stats=mode in ("train-tracking", "eval-running"))
    nn.init.normal_(layer.weight)
    if mode == "eval-running":
        _random_running_stats(layer)
    layer.train(mode.startswith("train"))
    _check(nn.Sequential(nn.Tanh(), layer), layer, torch.randn(x_shape))


def test_instance_norm_without_affine_has_no_parameters():
    layer = nn.InstanceNorm1d(3)
    assert rule_for(layer).gradients(layer, torch.randn(B, 3, 4), torch.randn(B, 3, 4)) == {}


@pytest.mark.parametrize("cls,x_shape", [(nn.BatchNorm1d, (B, 3)), (nn.BatchNorm1d, (B, 3, 4)),
                                          (nn.BatchNorm2d, (B, 3, 4, 5))])
def test_batch_norm_eval(cls, x_shape):
    layer = cls(3)
    nn.init.normal_(layer.weight)
    _random_running_stats(layer)
    layer.eval()
    _check(nn.Sequential(nn.Tanh(), layer), layer, torch.randn(x_shape))


def test_batch_norm_train_mode_is_refused_at_call_time():
    layer = nn.BatchNorm2d(3).train()
    rule = rule_for(layer)
    assert rule is not None and rule.kind == "BatchNorm(eval)"
    x = torch.randn(B, 3, 4, 4)
    assert rule.gradients(layer, x, torch.randn_like(x)) is None
    untracked = nn.BatchNorm2d(3, track_running_stats=False).eval()  # batch stats even in eval
    assert rule_for(untracked).gradients(untracked, x, torch.randn_like(x)) is None


@pytest.mark.parametrize("layer", [
    nn.Embedding(5, 3, max_norm=1.0),
    nn.Embedding(5, 3, scale_grad_by_freq=True),
    nn.Conv1d(2, 3, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"),
    nn.ReLU(),
])
def test_refused_configurations(layer):
    assert rule_for(layer) is None


def test_refusal_is_rechecked_at_call_time():
    layer = nn.Embedding(5, 3)
    rule = rule_for(layer)
    layer.max_norm = 1.0
    ids = torch.randint(0, 5, (B, 2))
    assert rule.gradients(layer, ids, torch.randn(B, 2, 3)) is None


def test_lookup_is_by_exact_type():
    class MyLinear(nn.Linear):
        pass

    assert rule_for(MyLinear(3, 2)) is None
    rule = rule_for(nn.Linear(3, 2))
    assert isinstance(rule, LayerRule) and rule.kind == "Linear"
    assert {rule_for(m).kind for m in (nn.Conv1d(1, 1, 1), nn.Conv2d(1, 1, 1), nn.GroupNorm(1, 2),
                                       nn.InstanceNorm3d(2), nn.LayerNorm(2))} \
        == {"Conv1d", "Conv2d", "GroupNorm", "InstanceNorm", "LayerNorm"}
