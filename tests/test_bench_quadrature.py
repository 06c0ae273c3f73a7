"""Smoke test of scripts/bench.py's quadrature workload on a tiny run (no timing assertions):
one training, trapezoid / adaptive / supersample replays each in its own child, one row with the
fields the table prints."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import load_script, tiny_config, write_tiny_npz

bench = load_script("bench")


@pytest.fixture(scope="module")
def row(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench-quadrature")
    npz = write_tiny_npz(work / "tiny.npz", n_train=24, n_test=5)
    config = tiny_config(npz, {"name": "adam", "lr": 3e-2}, "float32", epochs=2, batch_size=8)
    w = bench.Workload("quadrature", config, "test[:5]", label="tiny", notes=["tiny"])
    return bench.run_quadrature(w, work, rules=("trapezoid", "adaptive", "supersample:8"))


def test_quadrature_row_has_the_fields(row):
    assert row["workload"] == "quadrature" and row["label"] == "tiny"
    assert row["steps"] == 6 and row["num_train"] == 24 and row["num_audit"] == 5
    assert list(row["rules"]) == ["trapezoid", "adaptive", "supersample:8"]
    assert row["reference"] == "supersample:8" and row["adaptive_rule"] == "adaptive"
    for rule, r in row["rules"].items():
        for key in ("replay_s", "cpu_s", "rmre", "lc", "mre", "peak_rss_mib", "max_update_error"):
            assert np.isfinite(r[key]), (rule, key)
        assert r["all_s"] == [r["replay_s"]]
        if rule != "supersample:8":
            assert 0 <= r["rel_frobenius"] < 1, rule
    assert row["time_ratio"] == pytest.approx(row["rules"]["adaptive"]["replay_s"]
                                              / row["rules"]["trapezoid"]["replay_s"])
    assert 1 <= row["sub_intervals_mean"] <= row["sub_intervals_max"] <= 64
    assert row["segments"] == row["steps"]
    assert 0 <= row["bound_share"] <= row["bound_share_rounding"] <= 1
    assert set(row["bars"]) == {"lc", "rmre", "time", "influence", "bound"}

    table = bench.format_quadrature_table([row])
    assert "adapt/trap" in table and "bound+rnd" in table and "dF adapt" in table
    line = next(text for text in table.splitlines() if text.startswith("tiny "))
    assert line.split()[-1] == "pass" or line.split()[-1].startswith("miss:")
    assert json.loads(json.dumps(bench._jsonable({"rows": [row]})))["rows"][0]["rules"]["adaptive"]


def test_quadrature_runs_are_the_configs_and_the_four_cnn_runs():
    names = list(bench.QUADRATURE_RUNS)
    assert {"demo", "transformer_text", "cnn-rmsprop", "cnn-adagrad", "cnn-adam", "cnn-sgd-momentum"} <= set(names)
    assert "quadrature" in bench.ALL_WORKLOADS and "quadrature" not in bench.DEFAULT_WORKLOADS
    default = [w.label for w in bench.quadrature_workloads()]
    assert not set(default) & set(bench.QUADRATURE_SKIPPED)
    (w,) = bench.quadrature_workloads(["cnn-adam"])
    assert w.config["optim"] == {"name": "adam", "lr": 1e-2}
    assert w.config["train"]["dtype"] == "float32" and w.audit_set == "test[:64]"
    with pytest.raises(SystemExit):
        bench.quadrature_workloads(["no-such-run"])
