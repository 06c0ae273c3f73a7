"""Smoke tests of scripts/bench.py on a tiny workload (no timing assertions).

The full-batch SGD run is the captum-sgd workload in miniature: with every example in every batch
and no momentum, plgk's euler audit is exactly TracIn,
    influence[m, n] = -Σ_t (lr_t / M) ∇ℓ(x_m; θ_t) · ∇ℓ(x_n; θ_t),
which is checked against an explicit per-example loop here (always) and against captum's
TracInCP (when captum is installed: `pip install '.[bench]'`).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import load_script, tiny_config, write_tiny_npz

ROOT = Path(__file__).resolve().parent.parent
STEPS, LR = 3, 0.3


bench = load_script("bench")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One benchmarked tiny full-batch SGD run (train, un-recorded train, euler replay)."""
    work = tmp_path_factory.mktemp("bench")
    npz = write_tiny_npz(work / "tiny.npz", n_train=24, n_test=5)
    config = tiny_config(npz, {"name": "sgd", "lr": LR}, "float64", epochs=STEPS, batch_size=24)
    w = bench.Workload("captum-sgd", config, "test[:5]", "euler", label="tiny", notes=["tiny"])
    row = bench.run_workload(w, work, device="cpu", baseline=True, keep_scores=True)
    return work, row


def test_row_table_and_json_have_the_fields(tiny):
    work, row = tiny
    for key in ("train_s", "train_cpu_s", "write_s", "record_overhead", "train_unrecorded_s",
                "replay_s", "replay_cpu_s", "replay_ratio", "replay_ms_per_step",
                "train_peak_rss_mib", "replay_peak_rss_mib", "mre", "lc", "max_update_error"):
        assert key in row, key
        assert np.isfinite(row[key]), key
    assert row["steps"] == STEPS and row["num_train"] == 24 and row["num_audit"] == 5
    assert row["checkpoint_writes"] == STEPS + 1  # θ_0 and one per update
    assert row["write_s"] > 0 and row["write_s"] < row["train_s"]
    assert row["train_peak_rss_mib"] > 10 and row["replay_peak_rss_mib"] > 10  # the children's own
    assert row["replay_ratio"] == pytest.approx(row["replay_s"] / row["train_s"])
    assert row["replay_cuda_peak_mib"] is None  # cpu run: no GPU column
    assert row["max_update_error"] < 1e-12  # float64 SGD

    table = bench.format_table([row])
    header = table.splitlines()[0].split()
    for column in ("train", "rec.ovh", "replay", "rep/trn", "ms/step", "MRE", "LC"):
        assert column in header
    assert "captum-sgd tiny" in table.splitlines()[1]
    notes = bench.format_notes([row], {"idle_rss_mib": 100.0})
    assert "exclude process start" in notes and "train without recording" in notes

    doc = json.loads(json.dumps(bench._jsonable({"rows": [row]})))
    assert "_influence" not in doc["rows"][0]  # arrays stay out of the JSON
    assert doc["rows"][0]["replay_s"] == row["replay_s"]


def _explicit_tracin(run_dir: Path, audit_n: int) -> np.ndarray:
    """-Σ_t (lr_t/M) g_m(θ_t)·g_n(θ_t) with one autograd call per example: the reference loop."""
    from plgk_cli.run import load_run

    run = load_run(run_dir)
    model = run.build_model().to(dtype=run.dtype)
    data = run.dataset
    x_train, y_train = data.x_train, data.y_train
    x_audit, y_audit = data.x_test[:audit_n], data.y_test[:audit_n]
    params = dict(model.named_parameters())

    def grad_of(x, y):
        loss = F.cross_entropy(model(x[None]), y[None])
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))])

    m = len(y_train)
    influence = np.zeros((m, audit_n))
    for t in run.steps[:-1]:
        with torch.no_grad():
            for name, value in run.checkpoint(t).params.items():
                params[name].copy_(value)
        lr = run.checkpoint(t + 1).lr  # the rate of the update θ_t -> θ_{t+1}
        assert len(run.checkpoint(t + 1).batch) == m  # full batch: every example, every step
        g_train = [grad_of(x_train[i], y_train[i]) for i in range(m)]
        g_audit = [grad_of(x_audit[j], y_audit[j]) for j in range(audit_n)]
        for i in range(m):
            for j in range(audit_n):
                influence[i, j] -= lr / m * float(g_train[i] @ g_audit[j])
    return influence


def test_euler_full_batch_sgd_equals_explicit_tracin(tiny):
    _, row = tiny
    expected = _explicit_tracin(Path(row["run_dir"]), row["num_audit"])
    ours = row["_influence"]
    assert np.abs(expected).max() > 1e-4  # a real signal, not two zero matrices
    rel = np.linalg.norm(ours - expected) / np.linalg.norm(expected)
    assert rel <= 1e-5, rel


@pytest.mark.skipif(importlib.util.find_spec("captum") is None,
                    reason="captum not installed (pip install '.[bench]'); the explicit-loop TracIn "
                           "test above checks the same identity")
def test_captum_tracincp_agrees(tiny):
    work, row = tiny
    cmp = bench.captum_comparison(row, work)
    assert cmp["captum_checkpoints"] == STEPS
    assert cmp["relative_error"] <= 1e-5, cmp
    assert cmp["ghost_relative_error"] <= 1e-5, cmp  # plgk --ghost on the same checkpoints
    assert cmp["captum_s"] > 0 and cmp["speed_ratio"] > 0 and cmp["floor_s"] > 0


def test_failed_child_names_a_log_that_outlives_the_temporary_workdir(tmp_path, monkeypatch):
    """main() runs in a temporary directory deleted on the way out: a failed child's message must
    name a copy of its log that is still there when the message is read."""
    import tempfile

    monkeypatch.setattr(bench, "FAILED_LOGS", tmp_path / "failed-logs")
    with tempfile.TemporaryDirectory() as workdir:
        with pytest.raises(RuntimeError) as failed:
            bench.run_child({"kind": "no-such-phase"}, Path(workdir) / "logs", "train")
    first = str(failed.value).splitlines()[0]
    assert first.startswith("no-such-phase child failed (exit 1); log ")
    log = Path(first.split("; log ", 1)[1].rstrip(":"))
    assert log.parent == tmp_path / "failed-logs" and log.name.startswith("train-")
    assert "KeyError: 'no-such-phase'" in log.read_text()
    assert "KeyError: 'no-such-phase'" in str(failed.value)  # and the tail is in the message


def test_synthetic_mnist_is_mnist_shaped_and_class_structured(tmp_path):
    path = bench.make_synthetic_mnist(tmp_path / "m.npz", n_train=400, n_test=100, seed=1)
    with np.load(path) as f:
        x, y = f["x_train"], f["y_train"]
        assert x.shape == (400, 28, 28) and x.dtype == np.uint8
        assert f["x_test"].shape == (100, 28, 28) and set(np.unique(y)) <= set(range(10))
    # Learnable: nearest class mean beats chance by a wide margin.
    flat = x.reshape(len(x), -1).astype(np.float64)
    means = np.stack([flat[y == c].mean(0) for c in range(10)])
    predicted = ((flat[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == y).mean() > 0.5


def test_mnist_plan_scales_steps():
    steps, epochs, m, notes = bench.mnist_plan(0.02)
    assert (steps, epochs, m) == (200, 1, 51_200)
    steps, epochs, m, notes = bench.mnist_plan(0.005)
    assert (steps, epochs, m) == (50, 1, 50 * 256) and any("cut" in n for n in notes)
    assert bench.mnist_plan(1.0)[:3] == (10_000, 50, 51_200)


def test_memory_fit_recovers_a_linear_law():
    rows = [{"workload": "memory", "label": f"N={n} B={b}", "num_audit": n, "batch_size": b,
             "replay_peak_rss_mib": 300 + 0.5 * n + 0.25 * b, "parameters": 1000, "num_train": 100}
            for n in (16, 64, 256) for b in (32, 64, 128)]
    fit = bench.memory_fit(rows)
    assert fit["mib_per_audit_point"] == pytest.approx(0.5)
    assert fit["mib_per_batch_example"] == pytest.approx(0.25)
    assert fit["r2"] == pytest.approx(1.0)


def _tiny_transformer_split(tmp_path, torch_layers: bool):
    from plgk_cli.config import parse_config
    from plgk_cli.train import train

    config = {"data": {"dataset": "synthetic-text"},
              "model": {"name": "transformer", "kwargs": {"width": 8, "heads": 2, "layers": 1, "dropout": 0.1,
                                                          "torch_layers": torch_layers}},
              "optim": {"name": "adamw", "lr": 3e-3, "clip_grad_norm": 1.0},
              "train": {"epochs": 1, "batch_size": 32, "seed": 0}}
    run = tmp_path / f"run-{torch_layers}"
    manifest = train(parse_config(config), run, progress=False)
    split = bench.layer_split(str(run), steps=1, repeats=1)
    names = [n for r in split["types"] for n in r["parameter_names"]]
    assert sorted(names) == sorted(p["name"] for p in manifest["parameters"])  # each exactly once
    assert sum(r["params"] for r in split["types"]) == split["parameters"]
    assert sum(r["share"] for r in split["types"]) == pytest.approx(1.0)
    for r in split["types"]:
        assert r["max_rel_diff"] < 1e-5, r
        assert r["alone_ms"] > 0
    for key in ("engine", "engine_first", "engine_generic"):
        assert split[f"{key}_vs_jacobian_rel_diff"] < 1e-5, key
    return split, {r["type"]: r for r in split["types"]}


def test_transformer_workloads_are_the_config_with_and_without_torch_layers():
    own, torch_layers = bench.transformer_workloads()
    assert "transformer" in bench.ALL_WORKLOADS
    assert (own.label, torch_layers.label) == ("own attention", "nn.MultiheadAttention")
    assert not own.config["model"]["kwargs"].get("torch_layers")
    assert torch_layers.config["model"]["kwargs"]["torch_layers"] is True
    assert {k: v for k, v in torch_layers.config["model"]["kwargs"].items() if k != "torch_layers"} == \
        own.config["model"]["kwargs"]


def test_transformer_layer_split_own_attention_runs_the_engine_on_hooks(tmp_path):
    """Attention from nn.Linear projections: every parameter has a rule, so the engine as replay
    builds it (method "auto") keeps hooks for training_pass, and every rule equals the Jacobian rows."""
    split, types = _tiny_transformer_split(tmp_path, torch_layers=False)
    assert set(types) == {"Embedding", "Linear", "LayerNorm"}
    assert all(r["path"] == "hooks" and r["rule_ms"] > 0 for r in types.values())
    assert set(types["Embedding"]["module_names"]) == {"tokens", "positions"}
    assert split["engine_method"] == "hooks" and split["engine_training_hooks"] is True
    assert split["engine_first_training_hooks"] == [True]
    assert split["mixed_ms"] is None and split["graph_rules_ms"] > 0
    text = bench.format_layer_split(split, "own attention")
    assert "layer hooks" in text and "jacobian_rows over all" in text


def test_transformer_layer_split_torch_layers_takes_the_generic_path(tmp_path):
    """nn.TransformerEncoderLayer: MultiheadAttention has no rule, so the engine's training_pass
    is the generic Jacobian rows; the mixed hooks + generic path agrees with them."""
    split, types = _tiny_transformer_split(tmp_path, torch_layers=True)
    assert types["MultiheadAttention"]["path"] == "generic" and types["MultiheadAttention"]["rule_ms"] is None
    assert {"Linear", "LayerNorm", "Embedding"} <= {k for k, r in types.items() if r["path"] == "hooks"}
    assert "positions" in types["Embedding"]["module_names"]  # a module call now, batch first
    assert split["engine_method"] == "vmap" and split["engine_training_hooks"] is False
    assert split["mixed_vs_jacobian_rel_diff"] < 1e-5
    text = bench.format_layer_split(split, "nn.MultiheadAttention")
    assert "MultiheadAttention" in text and "shared forward + backward" in text and "generic Jacobian rows" in text
