"""Long replays survive faults: killed, signalled or crashed at random commits, a --resume ends
with the same output as an uninterrupted replay, bit for bit on CPU."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import train_tiny
from plgk_cli.progress import progress_path

ADAM_MOMENTUM = {"name": "adam", "lr": 0.02, "weight_decay": 0.01}
TOTAL_STEPS = 9  # 22 examples, batch 8, 3 epochs


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_npz):
    return train_tiny(tmp_path_factory.mktemp("run") / "run", tiny_npz, ADAM_MOMENTUM, epochs=3)


def plgk_replay(run_dir, out, *extra, fault=None, audit_set="test[0:4]", targets="loss,margin"):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLGK_FAULT")}
    if fault:
        env["PLGK_FAULT"] = fault
    cmd = [sys.executable, "-m", "plgk_cli", "replay", "--ckpts", str(run_dir), "--audit-set",
           audit_set, "--out", str(out), "--target", targets, "--quiet",
           "--device", "cpu", "--commit-every", "1", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def reference(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "reference.h5"
    assert plgk_replay(run_dir, out).returncode == 0
    return out


def assert_same_file(a, b):
    """Every dataset equal bit for bit, every attribute equal but the creation time."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names_a, names_b = [], []
        fa.visit(names_a.append)
        fb.visit(names_b.append)
        assert names_a == names_b
        for name in ["/", *names_a]:
            attrs_a = {k: v for k, v in fa[name].attrs.items() if k != "created"}
            attrs_b = {k: v for k, v in fb[name].attrs.items() if k != "created"}
            assert attrs_a.keys() == attrs_b.keys()
            for key in attrs_a:
                va, vb = np.asarray(attrs_a[key]), np.asarray(attrs_b[key])
                same = np.array_equal(va, vb, equal_nan=va.dtype.kind == "f")
                assert same, (name, key)
            if isinstance(fa[name], h5py.Dataset):
                assert np.array_equal(fa[name][()], fb[name][()], equal_nan=True), name


# Commits happen after each update (--commit-every 1); faults strike after random ones: SIGKILL
# at three points, and one point each for the handled signals and an unexpected exception.
_POINTS = random.Random(0).sample(range(1, TOTAL_STEPS), 3)
FAULTS = [("KILL", p) for p in _POINTS] + list(zip(["TERM", "INT", "CRASH"], _POINTS))


@pytest.mark.parametrize("how, commit", FAULTS)
def test_resume_after_fault_matches_uninterrupted(run_dir, reference, tmp_path, how, commit):
    out = tmp_path / "out.h5"
    broken = plgk_replay(run_dir, out, fault=f"after_commit:{commit}:{how}")
    assert broken.returncode != 0 and not out.exists()
    assert progress_path(out).exists()
    if how in ("TERM", "INT"):  # handled: one line, progress committed, exit code 130
        assert broken.returncode == 130 and "--resume" in broken.stderr
    resumed = plgk_replay(run_dir, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not progress_path(out).exists()
    assert_same_file(reference, out)


@pytest.mark.parametrize("extra, audit_set, targets", [
    (("--stride", "3"), "test[0:4]", "loss,margin"),  # killed inside a segment of three updates
    (("--rule", "euler"), "test[0:1]", "loss"),  # one column: h is ∇q at the boundary itself
    (("--rule", "adaptive:1e-3"), "test[0:4]", "loss,margin"),  # dh and dw travel with the commit
])
def test_resume_matches_uninterrupted_for_strides_and_rules(run_dir, tmp_path, extra, audit_set, targets):
    kwargs = dict(audit_set=audit_set, targets=targets)
    reference = tmp_path / "reference.h5"
    assert plgk_replay(run_dir, reference, *extra, **kwargs).returncode == 0
    out = tmp_path / "out.h5"
    broken = plgk_replay(run_dir, out, *extra, fault="after_commit:4:KILL", **kwargs)
    assert broken.returncode != 0 and progress_path(out).exists()
    resumed = plgk_replay(run_dir, out, "--resume", *extra, **kwargs)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_file(reference, out)


def test_resume_refuses_other_arguments(run_dir, tmp_path):
    out = tmp_path / "out.h5"
    plgk_replay(run_dir, out, fault="after_commit:2:KILL")
    without_resume = plgk_replay(run_dir, out)
    assert without_resume.returncode != 0 and "--resume" in without_resume.stderr
    other = plgk_replay(run_dir, out, "--resume", "--rule", "euler")
    assert other.returncode != 0 and "other arguments" in other.stderr and "Traceback" not in other.stderr


def test_damaged_progress_is_refused(run_dir, tmp_path):
    out = tmp_path / "out.h5"
    plgk_replay(run_dir, out, fault="after_commit:2:KILL")
    path = progress_path(out)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the last tensor
    path.write_bytes(bytes(data))
    result = plgk_replay(run_dir, out, "--resume")
    assert result.returncode != 0 and "checksum" in result.stderr and "Traceback" not in result.stderr
    assert plgk_replay(run_dir, out, "--overwrite").returncode == 0  # the way out the message names


def test_inspect_says_a_replay_is_unfinished(run_dir, tmp_path):
    out = tmp_path / "out.h5"
    plgk_replay(run_dir, out, fault="after_commit:3:KILL")
    result = subprocess.run([sys.executable, "-m", "plgk_cli", "inspect", str(out)],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "--resume" in result.stderr


def test_two_replays_are_bit_identical(run_dir, reference, tmp_path):
    out = tmp_path / "again.h5"
    assert plgk_replay(run_dir, out).returncode == 0
    assert_same_file(reference, out)


def test_resume_of_a_run_with_parameter_groups_matches_uninterrupted(tiny_npz, tmp_path):
    """Momentum differs between the groups, so the walk carries a per-coordinate μ across the
    commit (walk/decay_next); the resumed replay must still equal the uninterrupted one."""
    optim = {"name": "sgd", "lr": 0.05, "momentum": 0.9,
             "groups": [{"params": "*.bias", "momentum": 0.5, "lr": 0.1}]}
    run = train_tiny(tmp_path / "run", tiny_npz, optim, {"name": "cosine"}, epochs=3)  # μ not cycled
    reference = tmp_path / "reference.h5"
    assert plgk_replay(run, reference).returncode == 0
    out = tmp_path / "out.h5"
    assert plgk_replay(run, out, fault="after_commit:4:KILL").returncode != 0
    resumed = plgk_replay(run, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_file(reference, out)
