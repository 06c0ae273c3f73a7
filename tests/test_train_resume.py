"""`plgk train --resume` after a kill at random checkpoints records the same trajectory, bit for
bit on CPU, as an uninterrupted run."""

from __future__ import annotations

import os
import random
import subprocess
import sys

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plgk_cli.check import validate_run
from plgk_cli.trajectory import list_steps, read_manifest

CONFIG = """
[data]
dataset = "npz:{npz}"
[model]
name = "mlp"
kwargs = {{ hidden = 6 }}
[optim]
name = "adamw"
lr = 0.02
weight_decay = 0.1
clip_grad_norm = 0.5
[schedule]
name = "cosine"
warmup_steps = 2
[train]
epochs = 3
batch_size = 8
device = "cpu"
"""
TOTAL_STEPS = 9  # 22 examples, batch 8, 3 epochs


def plgk_train(config, out, *extra, fault=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLGK_FAULT")}
    if fault:
        env["PLGK_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "plgk_cli", "train", "--config", str(config),
                           "--out", str(out), "--quiet", *extra],
                          env=env, capture_output=True, text=True, timeout=120)


def assert_same_step_files(reference, out):
    """The same step files, tensor for tensor, bit for bit."""
    assert list_steps(out) == list_steps(reference)
    for step in list_steps(reference):
        name = f"step_{step:08d}.safetensors"
        a, b = load_file(reference / name), load_file(out / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (step, key)


def assert_resumes_to_an_uninterrupted_run(config, tmp_path, kill_after: int) -> Path:
    """Train ``config`` whole, and again killed after its ``kill_after``-th checkpoint write and
    resumed: the two runs' step files must be equal bit for bit. Returns the resumed run."""
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert plgk_train(config, reference).returncode == 0
    assert plgk_train(config, out, fault=f"after_checkpoint:{kill_after}:KILL").returncode != 0
    resumed = plgk_train(config, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_step_files(reference, out)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_npz):
    root = tmp_path_factory.mktemp("train")
    config = root / "run.toml"
    config.write_text(CONFIG.format(npz=tiny_npz))
    assert plgk_train(config, root / "reference").returncode == 0
    return config, root / "reference"


# Checkpoint 0 is written first, so the K-th write is checkpoint K-1.
@pytest.mark.parametrize("kill_after", sorted(random.Random(1).sample(range(2, TOTAL_STEPS + 1), 2)))
def test_resumed_training_matches_uninterrupted(setup, tmp_path, kill_after):
    config, reference = setup
    out = tmp_path / "run"
    killed = plgk_train(config, out, fault=f"after_checkpoint:{kill_after}:KILL")
    assert killed.returncode != 0 and not read_manifest(out)["complete"]
    assert list_steps(out)[-1] == kill_after - 1
    refused = plgk_train(config, out)  # without --resume the run is never extended
    assert refused.returncode != 0 and "not empty" in refused.stderr
    assert "pass --overwrite" in refused.stderr and "not only a plgk run" not in refused.stderr
    advice = [p.message for p in validate_run(out, check_data=False) if "did not finish" in p.message]
    assert len(advice) == 1 and f"plgk train --config ... --out {out} --resume" in advice[0]
    resumed = plgk_train(config, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert read_manifest(out)["complete"]
    assert list_steps(out) == list_steps(reference) == list(range(TOTAL_STEPS + 1))
    assert_same_step_files(reference, out)


def test_plain_sgd_run_resumes(setup, tmp_path):
    """Plain SGD keeps no optimizer state, so its step files hold none: resume must not expect it."""
    config, _ = setup
    sgd = tmp_path / "sgd.toml"
    sgd.write_text(config.read_text().replace('name = "adamw"\nlr = 0.02\nweight_decay = 0.1',
                                              'name = "sgd"\nlr = 0.1'))
    assert_resumes_to_an_uninterrupted_run(sgd, tmp_path, kill_after=4)


def test_resume_of_a_complete_run_is_refused(setup):
    config, reference = setup
    result = plgk_train(config, reference, "--resume")
    assert result.returncode != 0 and "complete" in result.stderr and "Traceback" not in result.stderr


def test_sparse_run_resumes_at_its_last_stored_block(setup, tmp_path):
    """every = 4: a kill after step file 4 (mid-block 5..8) loses the block's kept records; resume
    redoes them from θ_4 and writes the same files as an uninterrupted sparse run."""
    config, _ = setup
    sparse = tmp_path / "sparse.toml"
    sparse.write_text(config.read_text() + "[checkpoint]\nevery = 4\n")
    reference = tmp_path / "reference"
    assert plgk_train(sparse, reference).returncode == 0
    out = tmp_path / "run"
    killed = plgk_train(sparse, out, fault="after_checkpoint:2:KILL")  # step files 0 and 4 written
    assert killed.returncode != 0
    assert sorted(p.name for p in out.glob("step_*")) == ["step_00000000.safetensors", "step_00000004.safetensors"]
    assert plgk_train(sparse, out, "--resume").returncode == 0
    names = sorted(p.name for p in reference.glob("step_*"))
    assert names == [f"step_{t:08d}.safetensors" for t in (0, 4, 8, 9)]
    assert sorted(p.name for p in out.glob("step_*")) == names
    for name in names:
        a, b = load_file(reference / name), load_file(out / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


def test_resumed_dropout_training_draws_the_same_masks(setup, tmp_path):
    """A model with dropout: the resumed run's generators continue from where the killed run's
    last recorded update left them (rng/cpu_after), so every mask and every step file matches."""
    config, _ = setup
    dropout = tmp_path / "dropout.toml"
    dropout.write_text(config.read_text().replace("kwargs = { hidden = 6 }", "kwargs = { hidden = 6, dropout = 0.3 }"))
    reference = tmp_path / "reference"
    assert plgk_train(dropout, reference).returncode == 0
    assert read_manifest(reference)["forward"]["random"]
    out = tmp_path / "run"
    assert plgk_train(dropout, out, fault="after_checkpoint:5:KILL").returncode != 0
    assert plgk_train(dropout, out, "--resume").returncode == 0
    for step in list_steps(reference):
        name = f"step_{step:08d}.safetensors"
        a, b = load_file(reference / name), load_file(out / name)
        assert a.keys() == b.keys() and (step == 0 or "rng/cpu" in a)
        for key in a:
            assert torch.equal(a[key], b[key]), (step, key)


def test_resumed_onecycle_run_with_groups_matches_uninterrupted(setup, tmp_path):
    """OneCycleLR cycles every group's lr and β1 from the update count: a resumed run puts the
    scheduler back where the killed one stood and writes the same step files."""
    config, _ = setup
    text = config.read_text().replace('name = "cosine"\nwarmup_steps = 2', 'name = "onecycle"')
    text = text.replace("[schedule]", '[[optim.groups]]\nparams = "*.bias"\nweight_decay = 0.0\nlr = 0.05\n\n[schedule]')
    cycled = tmp_path / "onecycle.toml"
    cycled.write_text(text)
    out = assert_resumes_to_an_uninterrupted_run(cycled, tmp_path, kill_after=5)
    assert all("hyper" in load_file(out / f"step_{t:08d}.safetensors") for t in list_steps(out)[1:])


@pytest.mark.parametrize("how", ["INT", "KILL"])
def test_interrupted_overwrite_keeps_the_old_run(setup, tmp_path, how):
    """--overwrite writes the new run beside the old one: Ctrl-C deletes the new run (exit 130, one
    line saying so), a SIGKILL leaves it beside; either way the old run is as it was."""
    import shutil

    config, reference = setup
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = plgk_train(config, out, "--overwrite", fault=f"after_checkpoint:4:{how}")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    left = sorted(p.name for p in tmp_path.iterdir())
    if how == "INT":
        assert result.returncode == 130, result.stderr
        assert result.stderr.strip() == (f"plgk: error: {out}: interrupted; the new run was deleted and "
                                         f"{out} still holds the run it was to replace")
        assert left == ["run"]
    else:
        assert result.returncode != 0
        assert left[0] == "run" and len(left) == 2 and left[1].startswith("run.plgk-new-")
