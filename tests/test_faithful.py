"""Runs whose training forward is random or couples its batch: dropout and BatchNorm (DESIGN.md v2).

The float64 reference shares no code with plgk_cli.gradients, .optimizers, .replay or .audit: it
re-runs each recorded training forward (train mode, the recorded generator state, the whole
minibatch) and takes every example's loss-term gradient with its own autograd call (an explicit
loop), audits in eval mode one point at a time, and feeds per-example copies of the optimizer's
linear buffer forward in time (tests/test_replay_reference.py's optimizers). Agreement with
replay's backward adjoints checks the masks, the attribution and the walk at once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from plgk_cli.arguments import ReplayArguments
from plgk_cli.config import parse_config
from plgk_cli.errors import UpdateCheckError
from plgk_cli.replay import replay
from plgk_cli.run import load_run
from plgk_cli.store import InfluenceFile
from plgk_cli.train import train
from test_replay_reference import CLIP_EPS, reference_optimizer, relative_error

TINY_TRANSFORMER = {"name": "transformer",
                    "kwargs": {"vocab": 32, "width": 8, "heads": 2, "layers": 1, "dropout": 0.1}}
ADAMW_CLIP = {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01, "clip_grad_norm": 0.3}
NUM_AUDIT = 4


def _train(out, model, optim, dtype, epochs=1, batch_size=16, dataset="synthetic-text", task=None):
    config = {"data": {"dataset": dataset}, "model": model, "optim": optim,
              "train": {"epochs": epochs, "batch_size": batch_size, "dtype": dtype, "device": "cpu"}}
    if task:
        config["task"] = {"name": task}
    train(parse_config(config), out, progress=False)
    return out


@pytest.fixture(scope="module", params=["linear", "torch"], ids=["own_attention", "nn_multihead_attention"])
def transformer64(request, tmp_path_factory):
    """Attention from nn.Linear projections (per-example gradients by the layers' rules) and
    torch's nn.TransformerEncoderLayer (nn.MultiheadAttention: the generic Jacobian path)."""
    model = {**TINY_TRANSFORMER, "kwargs": {**TINY_TRANSFORMER["kwargs"], "torch_layers": request.param == "torch"}}
    return _train(tmp_path_factory.mktemp("tf64") / "run", model, ADAMW_CLIP, "float64")


def _replay(run_dir, out, audit=NUM_AUDIT, **kwargs):
    summary = replay(ReplayArguments(ckpts=str(run_dir), audit_set=f"test[:{audit}]", out=str(out),
                                     device="cpu", **kwargs), progress=False)
    return summary, InfluenceFile(out)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _load(model, params):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])


def _per_example_loop(model, x, y):
    """(B, P): the batch forwarded once (as training did), then one autograd call per example."""
    terms = F.cross_entropy(model(x), y, reduction="none")
    rows = []
    for m in range(len(y)):
        grads = torch.autograd.grad(terms[m], list(model.parameters()), retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                               for p, g in zip(model.parameters(), grads)]))
    return torch.stack(rows)


def _audit_gradients(model, x, y):
    """(N, P): eval mode, each audit point alone."""
    model.eval()
    rows = []
    for n in range(len(y)):
        loss = F.cross_entropy(model(x[n:n + 1]), y[n:n + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]))
    model.train()
    return torch.stack(rows)


def reference_audit(run_dir):
    """(influence (M, N), residual (N,)) of the trapezoid rule, float64."""
    run = load_run(run_dir)
    model = run.build_model().to(torch.float64)
    data = run.dataset
    x_audit, y_audit = data.x_test[:NUM_AUDIT], data.y_test[:NUM_AUDIT]
    opt = reference_optimizer(run.manifest["optimizer"])
    clip_norm = run.manifest["optimizer"]["clip_grad_norm"]
    m_train, p = len(data.y_train), sum(q.numel() for q in model.parameters())
    per_sample_buf = torch.zeros(m_train, p, dtype=torch.float64)
    influence = torch.zeros(m_train, NUM_AUDIT, dtype=torch.float64)
    residual = torch.zeros(NUM_AUDIT, dtype=torch.float64)
    ck = run.checkpoint(0)
    for t in run.steps[:-1]:
        ck_next = run.checkpoint(t + 1)
        assert "cpu" in ck_next.rng  # the forward drew dropout masks: their state is recorded
        _load(model, ck.params)
        theta_t, batch = _flat(model), ck_next.batch
        torch.set_rng_state(ck_next.rng["cpu"])
        model.train()
        g = _per_example_loop(model, data.x_train[batch], data.y_train[batch])
        c = min(1.0, clip_norm / (float((g.sum(0) / len(batch)).norm()) + CLIP_EPS))
        assert c == pytest.approx(ck_next.clip_coef, rel=1e-9)
        share = torch.zeros(m_train, p, dtype=torch.float64)
        share[batch] = c * g / len(batch)
        opt.observe(share.sum(0), ck_next.lr)
        deltas = torch.zeros(m_train, p, dtype=torch.float64)
        for m in range(m_train):
            per_sample_buf[m], deltas[m] = opt.linear_step(per_sample_buf[m], share[m])
        independent = -ck_next.lr * opt.decoupled * theta_t  # AdamW's decay: no example owns it
        _load(model, ck_next.params)
        theta_next = _flat(model)
        assert relative_error(deltas.sum(0) + independent, theta_next - theta_t) < 1e-10
        h = 0.5 * _audit_gradients(model, x_audit, y_audit)
        _load(model, ck.params)
        h += 0.5 * _audit_gradients(model, x_audit, y_audit)
        influence += deltas @ h.T
        residual += h @ independent
        ck = ck_next
    return influence.numpy(), residual.numpy()


def test_dropout_transformer_float64_equals_per_example_reference(transformer64, tmp_path):
    summary, f = _replay(transformer64, tmp_path / "tf.h5")
    with f:
        influence = f.influence("loss").astype(np.float64)
        replayed_residual = f.array("loss", "residual")
    assert summary.max_update_error <= 1e-10
    reference, residual = reference_audit(transformer64)
    assert np.linalg.norm(reference) > 1e-3
    print(f"\nfloat64 dropout transformer: update error {summary.max_update_error:.1e}, influence rel. err "
          f"{relative_error(influence, reference):.2e}, residual max abs diff {np.abs(replayed_residual - residual).max():.1e}")
    assert relative_error(influence, reference) <= 1e-6  # float32 on disk
    np.testing.assert_allclose(replayed_residual, residual, rtol=1e-6, atol=1e-9)


def test_reference_sees_the_masks(transformer64, tmp_path):
    """Negative control: the same reference with masks drawn afresh misses the recorded update."""
    run = load_run(transformer64)
    model = run.build_model().to(torch.float64)
    ck, ck_next = run.checkpoint(0), run.checkpoint(1)
    _load(model, ck.params)
    batch = ck_next.batch
    torch.manual_seed(12345)  # not the recorded state
    g = _per_example_loop(model, run.dataset.x_train[batch], run.dataset.y_train[batch]).sum(0)
    torch.set_rng_state(ck_next.rng["cpu"])
    g_recorded = _per_example_loop(model, run.dataset.x_train[batch], run.dataset.y_train[batch]).sum(0)
    assert relative_error(g, g_recorded) > 1e-3


def _completeness(f):
    metrics = f.metrics("loss")
    true_change = f.array("loss", "final") - f.array("loss", "initial")
    return metrics, float(np.abs(true_change).mean())


def test_dropout_transformer_float32_is_complete(tmp_path):
    run_dir = _train(tmp_path / "run", TINY_TRANSFORMER, {**ADAMW_CLIP, "lr": 1e-3}, "float32", epochs=2)
    summary, f = _replay(run_dir, tmp_path / "tf.h5", audit=32)
    with f:
        metrics, scale = _completeness(f)
        assert f.attrs["audited_mode"] == "eval"
    assert summary.max_update_error <= 1e-5
    assert metrics["mre"] <= 5e-3 * scale and metrics["lc"] >= 0.9999


def test_batchnorm_cnn_is_complete_with_its_buffer_part(tmp_path):
    """configs/cnn_batchnorm.toml: the CNN with BatchNorm2d, Adam, 3 epochs on digits."""
    run_dir = _train(tmp_path / "run", {"name": "cnn", "kwargs": {"batch_norm": True}},
                     {"name": "adam", "lr": 1e-3}, "float32", epochs=3, batch_size=64, dataset="digits")
    run = load_run(run_dir)
    assert {"0.1.running_mean", "0.1.running_var"} <= set(run.changing_buffers)
    assert set(run.checkpoint(3).buffers) == set(run.changing_buffers)  # recorded with every step
    summary, f = _replay(run_dir, tmp_path / "bn.h5", audit=32)
    with f:
        metrics, scale = _completeness(f)
        buffer_part = f.buffer_residual("loss")
        attributed = f.influence("loss").astype(np.float64).sum(0) + f.array("loss", "residual") + buffer_part
        true_change = f.array("loss", "final") - f.array("loss", "initial")
    assert summary.max_update_error <= 1e-5
    assert np.abs(buffer_part).mean() > 1e-2 * scale  # the running statistics' change matters here
    assert metrics["mre"] <= 5e-3 * scale and metrics["lc"] >= 0.9999
    np.testing.assert_allclose(np.abs(attributed - true_change).mean(), metrics["mre"], rtol=1e-4)


@pytest.mark.parametrize("optim", [{"name": "sgd", "lr": 0.01, "momentum": 0.9}, {"name": "adam", "lr": 3e-3}],
                         ids=["sgd_momentum", "adam"])
def test_regression_on_diabetes_is_complete(optim, tmp_path):
    run_dir = _train(tmp_path / "run", {"name": "mlp", "kwargs": {"hidden": 16}}, optim, "float32",
                     epochs=5, batch_size=32, dataset="diabetes", task="regression")
    summary, f = _replay(run_dir, tmp_path / "reg.h5", audit=32, targets=("loss", "output"))
    with f:
        assert f.task == "regression"
        assert f.audit_label.dtype == np.float64
        if optim["name"] == "adam":  # tabular examples are drawn as text, not skipped
            from plgk_cli.plots import write_plots
            report = write_plots(f, tmp_path / "plots", audit=0)
            assert tmp_path / "plots" / "examples_audit0.png" in report.written
        for target in ("loss", "output"):
            metrics = f.metrics(target)
            scale = float(np.abs(f.array(target, "final") - f.array(target, "initial")).mean())
            assert metrics["mre"] <= 5e-3 * scale and metrics["lc"] >= 0.9999, (target, metrics)
    assert summary.max_update_error <= 1e-5


def test_mean_of_squared_losses_is_caught_by_the_update_check(tmp_path):
    """A Recorder loop whose loss is not Σ_m w_m ℓ_m: replay stops and says so."""
    from plgk_cli.data import load_dataset
    from plgk_cli.models import build_model
    from plgk_cli.recorder import Recorder

    data = load_dataset("digits", 0, torch.float64)
    torch.manual_seed(0)
    model = build_model("mlp", {"hidden": 8}, data.in_shape, data.num_classes).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, foreach=False)
    with Recorder(tmp_path / "run", model, optimizer, model_name="mlp", model_kwargs={"hidden": 8},
                  dataset=data, batch_size=64, epochs=1) as recorder:
        for batch in torch.randperm(len(data.y_train)).split(64)[:3]:
            optimizer.zero_grad()
            loss = (F.cross_entropy(model(data.x_train[batch]), data.y_train[batch], reduction="none") ** 2).mean()
            loss.backward()
            optimizer.step()
            recorder.step(batch, loss)
    with pytest.raises(UpdateCheckError, match="not the task's weighted sum"):
        _replay(tmp_path / "run", tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()


class NoisyMLP(torch.nn.Module):
    """Noise from numpy in the forward: torch's generator states cannot reproduce it."""

    def __init__(self, in_shape, num_classes):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(in_shape)), num_classes))

    def forward(self, x):
        noise = torch.from_numpy(np.random.default_rng().normal(size=x.shape)).to(x.dtype) if self.training else 0
        return self.body(x + 0.1 * noise)


def noisy_mlp(in_shape, num_classes):
    return NoisyMLP(in_shape, num_classes)


def test_randomness_outside_torch_is_named(tmp_path):
    from test_cli_errors import assert_one_line_error, invoke

    run_dir = _train(tmp_path / "run", {"name": "test_faithful:noisy_mlp"}, {"name": "sgd", "lr": 0.1},
                     "float64", batch_size=256, dataset="digits")
    with pytest.raises(UpdateCheckError, match="does not repeat from torch's generator states"):
        _replay(run_dir, tmp_path / "out.h5")
    result = invoke("replay", "--ckpts", run_dir, "--audit-set", "test[:2]", "--out", tmp_path / "out.h5", "--quiet")
    assert_one_line_error(result, UpdateCheckError.exit_code, "update", "gate 1e-08",
                          "does not repeat from torch's generator states", "--accept-update-error")
    assert not (tmp_path / "out.h5").exists()


def test_buffer_changed_outside_the_forward_is_refused(tmp_path):
    from plgk_cli.data import load_dataset
    from plgk_cli.errors import RecorderError
    from plgk_cli.models import build_model
    from plgk_cli.recorder import Recorder

    data = load_dataset("digits")
    model = build_model("cnn", {"batch_norm": True}, data.in_shape, data.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)
    with pytest.raises(RecorderError, match="changed between updates, outside the model's forward"):
        with Recorder(tmp_path / "run", model, optimizer, model_name="cnn", model_kwargs={"batch_norm": True},
                      dataset=data, batch_size=64, epochs=1) as recorder:
            for batch in torch.randperm(len(data.y_train)).split(64)[:3]:
                optimizer.zero_grad()
                F.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
                optimizer.step()
                recorder.step(batch, 0.0)
                with torch.no_grad():
                    model[0][1].running_mean.add_(1.0)  # by hand, between updates


def test_model_output_without_the_batch_dimension_is_refused(tmp_path):
    from plgk_cli.errors import ConfigError
    with pytest.raises(ConfigError, match="one row per example"):
        _train(tmp_path / "run", {"name": "test_faithful:pooled_mlp"}, {"name": "sgd", "lr": 0.1}, "float32",
               dataset="digits")


def pooled_mlp(in_shape, num_classes):
    """Averages over the batch: its output has no batch dimension."""
    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(int(np.prod(in_shape)), num_classes)

        def forward(self, x):
            return self.linear(x.flatten(1)).mean(0)
    return Pooled()


class FunctionalDropoutMLP(torch.nn.Module):
    """Dropout as a function call inside forward (no nn.Dropout module to find)."""

    def __init__(self, in_shape, num_classes):
        super().__init__()
        self.hidden = torch.nn.Linear(int(np.prod(in_shape)), 16)
        self.head = torch.nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(F.dropout(torch.tanh(self.hidden(x.flatten(1))), 0.3, self.training))


def functional_dropout_mlp(in_shape, num_classes):
    return FunctionalDropoutMLP(in_shape, num_classes)


def test_functional_dropout_is_recorded_and_replayed(tmp_path):
    run_dir = _train(tmp_path / "run", {"name": "test_faithful:functional_dropout_mlp"},
                     {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "float64", batch_size=128, dataset="digits")
    run = load_run(run_dir)
    assert run.manifest["forward"]["random"] and run.faithful  # seen from the generator, not a module
    summary, f = _replay(run_dir, tmp_path / "out.h5", audit=16)
    with f:
        metrics, scale = _completeness(f)
    assert summary.max_update_error <= 1e-10
    assert metrics["mre"] <= 5e-3 * scale and metrics["lc"] >= 0.9999


def test_dropout_of_zero_is_an_ordinary_run(tmp_path):
    """nn.TransformerEncoderLayer(dropout=0.0): nothing random, nothing refused, the plain path."""
    model = {**TINY_TRANSFORMER, "kwargs": {**TINY_TRANSFORMER["kwargs"], "dropout": 0.0, "torch_layers": True}}
    run_dir = _train(tmp_path / "run", model, ADAMW_CLIP, "float64")
    run = load_run(run_dir)
    assert not run.faithful and not run.checkpoint(1).rng
    summary, f = _replay(run_dir, tmp_path / "out.h5")
    f.close()
    assert summary.max_update_error <= 1e-10
