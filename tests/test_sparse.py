"""[checkpoint] every = K: θ every K steps, replay re-simulates the steps between with the same
decomposition, and lands on the same audit as the run stored at every step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file

from conftest import train_tiny
from plgk_cli.arguments import ReplayArguments
from plgk_cli.check import validate_run
from plgk_cli.config import parse_config
from plgk_cli.errors import TrajectoryError
from plgk_cli.replay import replay
from plgk_cli.run import load_run
from plgk_cli.store import InfluenceFile
from plgk_cli.train import train

ADAMW = {"name": "adamw", "lr": 0.02, "weight_decay": 0.1, "clip_grad_norm": 0.5}


def _train(out, npz, every, dtype):
    config = parse_config({"data": {"dataset": f"npz:{npz}"}, "model": {"name": "mlp", "kwargs": {"hidden": 6}},
                           "optim": ADAMW, "train": {"epochs": 3, "batch_size": 8, "dtype": dtype,
                                                     "device": "cpu"},
                           "checkpoint": {"every": every}})
    train(config, out, progress=False)
    return out


@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-9), ("float32", 1e-4)])
def test_sparse_run_replays_like_the_dense_one(tmp_path, tiny_npz, dtype, tolerance):
    dense = _train(tmp_path / "dense", tiny_npz, 1, dtype)
    sparse = _train(tmp_path / "sparse", tiny_npz, 4, dtype)
    run = load_run(sparse)
    assert [run.checkpoint(t).full for t in run.steps] == [t % 4 == 0 or t == 9 for t in range(10)]
    assert validate_run(sparse) == []
    results = {}
    for name, run_dir in (("dense", dense), ("sparse", sparse)):
        out = tmp_path / f"{name}.h5"
        summary = replay(ReplayArguments(ckpts=str(run_dir), audit_set="test[0:4]", out=str(out),
                                         device="cpu"), progress=False)
        with InfluenceFile(out) as f:
            results[name] = (summary, f.influence().astype(np.float64), f.max_drift)
    (d_summary, d_infl, d_drift), (s_summary, s_infl, s_drift) = results["dense"], results["sparse"]
    assert d_drift is None and s_drift is not None and s_drift < tolerance
    assert np.linalg.norm(s_infl - d_infl) / np.linalg.norm(d_infl) < tolerance
    assert abs(s_summary.metrics["loss"]["mre"] - d_summary.metrics["loss"]["mre"]) < 1e-4
    assert s_summary.max_update_error < tolerance


def test_a_sparse_run_missing_a_stored_theta_is_refused(tmp_path, tiny_npz):
    sparse = _train(tmp_path / "sparse", tiny_npz, 4, "float64")
    path = sparse / "step_00000004.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    kept = {k: v for k, v in load_file(str(path)).items() if not k.startswith(("param/", "optim/"))}
    save_file(kept, str(path), metadata=metadata)  # θ_4 dropped: the record alone remains
    problems = [p.message for p in validate_run(sparse)]
    assert any("step_00000004" in m and "holds no parameters" in m for m in problems)


def test_block_records_travel_in_the_file_that_ends_the_block(tmp_path, tiny_npz):
    """One step file per block: the steps in between have no file; their records are read from
    the next stored step (the last one for the final, shorter block)."""
    sparse = _train(tmp_path / "sparse", tiny_npz, 4, "float64")
    assert sorted(p.name for p in sparse.glob("step_*")) == \
        [f"step_{t:08d}.safetensors" for t in (0, 4, 8, 9)]
    dense = load_run(_train(tmp_path / "dense", tiny_npz, 1, "float64"))
    run = load_run(sparse)
    assert run.steps == dense.steps == list(range(10))
    for t in range(1, 10):
        a, b = run.checkpoint(t), dense.checkpoint(t)
        assert a.batch.dtype == torch.int64 and torch.equal(a.batch, b.batch)
        assert (a.lr, a.clip_coef, a.optim_step) == (b.lr, b.clip_coef, b.optim_step)
        assert a.loss == pytest.approx(b.loss, rel=1e-12)


def test_a_sparse_run_missing_a_block_file_is_refused(tmp_path, tiny_npz):
    sparse = _train(tmp_path / "sparse", tiny_npz, 4, "float64")
    (sparse / "step_00000008.safetensors").unlink()  # θ_8 and the records of steps 5..7
    problems = [p.message for p in validate_run(sparse)]
    assert problems[0] == (f"{sparse / 'step_00000008.safetensors'}: missing; with checkpoints every 4 "
                           "steps it holds θ_8 and the update records of steps 5-7: restore the file "
                           "or re-run `plgk train`"), problems
    assert not any("step_00000005" in m for m in problems), problems
    with pytest.raises(TrajectoryError, match="step_00000008.safetensors: missing; with checkpoints every 4"):
        load_run(sparse).steps  # noqa: B018
