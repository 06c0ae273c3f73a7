"""Smoke test of scripts/bench.py's lm workload (no timing assertions): configs/lm_addition.toml cut
to one epoch by --steps-scale, trained (recorded and un-recorded) and replayed on the demo's prompts
with target sequence-logprob, each phase in its own child; one row with the fields the table prints."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import load_script

bench = load_script("bench")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench-lm")
    w = bench.lm_workload(work / "data", steps_scale=0.05)  # round(20 x 0.05) = 1 epoch of 20 steps
    # One torch thread in the children (bench --threads 1): on a 2-core machine shared with other
    # tests, two threads per process made this replay 20x slower (65 s instead of 3 s).
    threads, bench.TORCH_THREADS = bench.TORCH_THREADS, 1
    try:
        row = bench.run_workload(w, work, device="cpu", baseline=True)
    finally:
        bench.TORCH_THREADS = threads
    return w, row


def test_lm_workload_is_the_demo_config_on_the_demo_prompts(tmp_path):
    assert "lm" in bench.ALL_WORKLOADS and "lm" not in bench.DEFAULT_WORKLOADS
    full = bench.lm_workload(tmp_path)
    assert full.config == bench._toml_config(bench.LM_CONFIG)  # as it is without --steps-scale
    assert full.config["task"]["name"] == "language-model" and full.config["model"]["name"] == "gpt"
    assert full.rule == "supersample:2" and full.replay_options == {"targets": ["sequence-logprob"]}
    lines = [json.loads(line) for line in open(full.audit_set, encoding="utf-8")]
    assert len(lines) == 20 and all(set(p) == {"prompt", "continuation"} for p in lines)
    short = bench.lm_workload(tmp_path, steps_scale=0.1)
    assert short.config["train"]["epochs"] == max(1, round(full.config["train"]["epochs"] * 0.1))
    assert bench.lm_workload(tmp_path, steps_scale=0.001).config["train"]["epochs"] == 1
    assert any("--steps-scale 0.1" in n for n in short.notes)


def test_lm_row_has_the_fields(lm):
    w, row = lm
    assert row["workload"] == "lm" and row["target"] == "sequence-logprob" and row["rule"] == "supersample:2"
    assert row["steps"] == 20 and row["num_train"] == 640 and row["num_audit"] == 20
    assert row["checkpoint_writes"] == row["steps"] + 1
    for key in ("train_s", "train_unrecorded_s", "replay_s", "replay_ratio", "replay_cpu_ratio",
                "replay_ms_per_step", "mre", "rmre", "lc", "max_update_error", "train_peak_rss_mib",
                "replay_peak_rss_mib"):
        assert np.isfinite(row[key]) and row[key] >= 0, key
    assert row["replay_ratio"] == pytest.approx(row["replay_s"] / row["train_s"])
    assert 0.99 < row["lc"] <= 1 and row["rmre"] < 0.05  # the audit is complete: sane, not a bar
    assert row["max_update_error"] < 1e-5  # float32, dropout replayed from the recorded CPU generator
    assert row["replay_cuda_peak_mib"] is None
    # the replay audited the continuation's log-probability
    from plgk_cli.store import InfluenceFile

    with InfluenceFile(row["influences"]) as f:
        assert f.targets == ["sequence-logprob"] and f.task == "language-model"
        assert f.influence("sequence-logprob").shape == (640, 20)
        assert f.metrics("sequence-logprob")["lc"] == pytest.approx(row["lc"])

    table = bench.format_table([row])
    header = table.splitlines()[0].split()
    for column in ("train", "norec", "replay", "rep/trn", "rMRE", "LC", "upd.err"):
        assert column in header, column
    assert table.splitlines()[1].startswith("lm ")
    notes = bench.format_notes([row], {})
    assert "lm: configs/lm_addition.toml" in notes and "sequence-logprob" in notes
    assert "train without recording" in notes
    assert json.loads(json.dumps(bench._jsonable({"rows": [row]})))["rows"][0]["target"] == "sequence-logprob"
