"""Tasks (plgk_cli/tasks): built-ins, the user's own py: task with per-example weights, and the
errors a task spec can cause."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import write_tiny_npz
from plgk_cli.arguments import ReplayArguments
from plgk_cli.config import parse_config
from plgk_cli.errors import ConfigError, DataError
from plgk_cli.replay import replay
from plgk_cli.store import InfluenceFile
from plgk_cli.tasks import Task, task_for
from plgk_cli.tasks.classification import Classification
from plgk_cli.train import train


class ClassWeighted(Classification):
    """L_B = Σ_m w_m ℓ_m with w_m ∝ 1 + y_m, normalised over the batch (class-weighted loss)."""

    def weights(self, y):
        w = 1.0 + y.to(torch.float64)
        return w / w.sum()

    def batch_loss(self, output, y):
        return (self.weights(y).to(output.dtype) * self.loss_terms(output, y)).sum()


class UniformTensor(Classification):
    """The plain mean, stated as a tensor of weights: must audit exactly as classification."""

    def weights(self, y):
        return torch.full((len(y),), 1.0 / len(y), dtype=torch.float64)


class NotATask:
    pass


def _run(tmp_path, task, optim, name="run"):
    npz = write_tiny_npz(tmp_path / "tiny.npz")
    config = {"data": {"dataset": f"npz:{npz}"}, "model": {"name": "mlp", "kwargs": {"hidden": 6}},
              "optim": optim, "train": {"epochs": 2, "batch_size": 8, "dtype": "float64", "device": "cpu"}}
    if task:
        config["task"] = {"name": task}
    train(parse_config(config), tmp_path / name, progress=False)
    out = tmp_path / f"{name}.h5"
    summary = replay(ReplayArguments(ckpts=str(tmp_path / name), audit_set="test[:4]", out=str(out),
                                     device="cpu"), progress=False)
    return summary, out


def test_weighted_task_is_audited_with_its_weights(tmp_path):
    summary, out = _run(tmp_path, "py:test_tasks:ClassWeighted", {"name": "sgd", "lr": 0.05, "momentum": 0.9})
    assert summary.max_update_error <= 1e-10  # 1/|B| instead of w_m would miss every update
    with InfluenceFile(out) as f:
        assert f.task == "py:test_tasks:ClassWeighted"
        metrics = f.metrics("loss")
        scale = np.abs(f.array("loss", "final") - f.array("loss", "initial")).mean()
    assert metrics["mre"] <= 5e-3 * scale and metrics["lc"] >= 0.9999


def test_weights_as_a_tensor_equal_the_plain_mean(tmp_path):
    _, plain = _run(tmp_path, None, {"name": "adam", "lr": 0.05}, name="plain")
    _, tensor = _run(tmp_path, "py:test_tasks:UniformTensor", {"name": "adam", "lr": 0.05}, name="tensor")
    with InfluenceFile(plain) as a, InfluenceFile(tensor) as b:
        np.testing.assert_allclose(b.influence("loss"), a.influence("loss"), rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(b.array("loss", "residual"), a.array("loss", "residual"), atol=1e-12)


def test_builtin_tasks_loss_terms_add_up_to_the_batch_loss():
    torch.manual_seed(0)
    out, classes = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    task = task_for("classification")
    torch.testing.assert_close(task.batch_loss(out, classes), F.cross_entropy(out, classes))
    regression = task_for("regression")
    targets = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(regression.batch_loss(out, targets), F.mse_loss(out, targets))
    values = regression.audited(out, targets, ("loss", "output"))
    assert values.shape == (5, 4)
    torch.testing.assert_close(values[:, 1:], out)


@pytest.mark.parametrize("name,needle", [
    ("ranking", "unknown task 'ranking'"),
    ("py:no_such_module:Task", "cannot import"),
    ("py:test_tasks:NotATask", "not a plgk_cli.tasks.Task"),
])
def test_bad_task_names(name, needle):
    with pytest.raises(ConfigError, match=needle):
        task_for(name)


def test_task_section_is_validated():
    with pytest.raises(ConfigError, match=r"\[task\] name: expected one of classification, regression"):
        parse_config({"task": {"name": "ranking"}})
    assert parse_config({"task": {"name": "regression"}}).task.name == "regression"


def test_regression_targets_are_checked(tmp_path):
    from plgk_cli.data import load_dataset

    path = tmp_path / "bad.npz"
    rng = np.random.default_rng(0)
    y = rng.normal(size=8)
    y[3] = np.nan
    np.savez(path, x_train=rng.normal(size=(8, 3)), y_train=y, x_test=rng.normal(size=(2, 3)), y_test=y[:2])
    with pytest.raises(DataError, match="y_train holds NaN or Inf"):
        load_dataset(f"npz:{path}", task=task_for("regression"))
    with pytest.raises(DataError, match="must hold integer class labels"):
        load_dataset(f"npz:{path}")  # classification: float targets are refused


def test_diabetes_is_a_builtin_regression_dataset():
    from plgk_cli.data import load_dataset

    data = load_dataset("diabetes", task=task_for("regression"))
    assert data.x_train.shape[1:] == (10,) and data.y_train.dtype == torch.float32
    assert len(data.y_train) + len(data.y_test) == 442 and data.num_classes == 1
    assert abs(float(data.y_train.mean())) < 1e-5  # standardised with the training split


def test_synthetic_text_keeps_token_ids_integer():
    from plgk_cli.data import load_dataset

    data = load_dataset("synthetic-text")
    assert data.x_train.dtype == torch.int64 and data.in_shape == (16,) and data.num_classes == 3
    counts = torch.stack([(data.x_train == 1 + c).sum(1) for c in range(3)], 1)
    assert torch.equal(counts.argmax(1), data.y_train)  # the label is what the sequence shows


def test_runs_and_files_of_the_previous_versions_still_read(tmp_path):
    """A format-1 run (no task, no forward record) replays as the classification run it is, and a
    schema-2 influences file (no task attribute) reads as a classification audit."""
    import json

    import h5py

    _, out = _run(tmp_path, None, {"name": "adam", "lr": 0.05})
    manifest_path = tmp_path / "run" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for key in ("task", "forward", "checksum"):  # version 1 manifests carry none of these
        del manifest[key]
    manifest["format_version"] = 1
    manifest["config"].pop("task")
    manifest_path.write_text(json.dumps(manifest))
    old = tmp_path / "old.h5"
    replay(ReplayArguments(ckpts=str(tmp_path / "run"), audit_set="test[:4]", out=str(old), device="cpu"),
           progress=False)
    with InfluenceFile(out) as a, InfluenceFile(old) as b:
        np.testing.assert_array_equal(a.influence("loss"), b.influence("loss"))
    with h5py.File(old, "r+") as f:
        f.attrs["schema_version"] = 2
        del f.attrs["task"]
    with InfluenceFile(old) as f:
        assert f.task == "classification" and f.buffer_residual("loss") is None
