"""More bad inputs for the CLI's error contract (tests/test_cli_errors.py has the first set and
the helpers): a duplicated or foreign step file, a wrong shape, NaN/Inf, batch indices outside the
training split, a full disk, an HDF5 output held open by another process, a manifest of another
run or of an unknown version, an unfinished run, `plgk check` listing every problem, and config
values the optimizer would silently ignore.

Each case asserts the error class's exit code, ONE line on stderr naming the file, key or value
(`plgk check`: one line per problem and a summary), no traceback, and that nothing already written
is lost: the run directory is untouched and an existing output survives a failing --overwrite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file

from plgk_cli.errors import (AuditSpecError, ConfigError, DataError, OutputError, StoreError,
                             TrajectoryError)
from plgk_cli.trajectory import checksum_metadata, write_manifest
from test_cli_errors import (assert_nothing_written, assert_one_line_error, crash_after_first_commit, invoke,
                             replay, train_run, write_config, write_npz)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny run of test_cli_errors (20 train / 8 test, 3 updates), a second run of the same
    config (another run_id) and a replay of the first."""
    root = tmp_path_factory.mktemp("bad_inputs")
    npz = write_npz(root / "data.npz")
    config = write_config(root / "run.toml", npz)
    run = train_run(config, root / "run")
    other = train_run(config, root / "other")
    h5 = root / "influences.h5"
    result = replay(run, out=h5)
    assert result.exit_code == 0, result.output
    return {"config": config, "run": run, "other": other, "h5": h5}


@pytest.fixture
def run_copy(runs, tmp_path) -> Path:
    return Path(shutil.copytree(runs["run"], tmp_path / "run"))


@pytest.fixture
def existing_out(runs, tmp_path) -> Path:
    """A finished output that a failing `replay --overwrite` must leave as it was."""
    return Path(shutil.copy(runs["h5"], tmp_path / "existing.h5"))


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}


def step_file(run: Path, step: int) -> Path:
    return run / f"step_{step:08d}.safetensors"


def manifest_of(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def first_param(run: Path) -> str:
    return manifest_of(run)["parameters"][0]["name"]


def rewrite_checkpoint(path: Path, edit) -> None:
    """Load every tensor, let `edit` change the dict in place, save with the same metadata and
    fresh checksums: a file as a writer would have written it (a NaN from a diverged run carries
    a valid checksum), so the check under test, not the checksum, catches it (tests/test_integrity.py
    has the damaged files)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={**metadata, **checksum_metadata(tensors)})


def assert_replay_refused(run: Path, existing_out: Path, code: int, *needles) -> str:
    """`replay --overwrite` onto an existing output fails with one line; the output and the run
    directory are unchanged and no temporary or progress file is left."""
    before_out, before_run = existing_out.read_bytes(), snapshot(run)
    line = assert_one_line_error(replay(run, "--overwrite", out=existing_out), code, *needles)
    assert existing_out.read_bytes() == before_out
    assert snapshot(run) == before_run
    assert sorted(p.name for p in existing_out.parent.glob(existing_out.name + "*")) == \
        [existing_out.name]
    return line


def check_lines(result) -> list:
    assert "Traceback" not in result.output + result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.strip()]


# --------------------------------------------------------------------------- damaged checkpoints


def test_duplicated_step(run_copy, existing_out):
    """step 2's file copied over step 1's name: its metadata says step 2."""
    shutil.copy(step_file(run_copy, 2), step_file(run_copy, 1))
    line = assert_replay_refused(run_copy, existing_out, TrajectoryError.exit_code,
                                 str(step_file(run_copy, 1)), "holds step '2', not 1")
    assert "restore step 1's file" in line


def test_step_copied_past_the_end(run_copy, existing_out):
    shutil.copy(step_file(run_copy, 3), step_file(run_copy, 4))
    assert_replay_refused(run_copy, existing_out, TrajectoryError.exit_code,
                          str(step_file(run_copy, 4)), "past the run's last step 3", "remove it")


def test_wrong_parameter_shape(run_copy, existing_out):
    name = first_param(run_copy)
    shape = manifest_of(run_copy)["parameters"][0]["shape"]

    def edit(tensors):
        tensors["param/" + name] = torch.zeros(3, 3, dtype=torch.float64)

    rewrite_checkpoint(step_file(run_copy, 1), edit)
    assert_replay_refused(run_copy, existing_out, TrajectoryError.exit_code,
                          str(step_file(run_copy, 1)), f"param/{name} is float64 [3, 3]",
                          f"the manifest says float64 {shape}")


def test_nan_in_parameters(run_copy, existing_out):
    name = first_param(run_copy)

    def edit(tensors):
        tensors["param/" + name].view(-1)[0] = float("nan")

    rewrite_checkpoint(step_file(run_copy, 2), edit)
    line = assert_replay_refused(run_copy, existing_out, TrajectoryError.exit_code,
                                 str(step_file(run_copy, 2)), f"param/{name}", "holds 1 NaN of")
    assert "diverged" in line


def test_inf_in_optimizer_state(run_copy, existing_out):
    name = first_param(run_copy)

    def edit(tensors):
        tensors[f"optim/{name}/exp_avg_sq"].view(-1)[-1] = float("inf")

    rewrite_checkpoint(step_file(run_copy, 3), edit)
    line = assert_replay_refused(run_copy, existing_out, TrajectoryError.exit_code,
                                 str(step_file(run_copy, 3)), f"optim/{name}/exp_avg_sq",
                                 "holds 1 Inf of")
    assert "re-run `plgk train`" in line


@pytest.mark.parametrize("index", [20, -1, 10**6])
def test_batch_index_outside_training_split(run_copy, existing_out, index):
    def edit(tensors):  # indices are stored narrow (int16 here): widen to hold any index
        tensors["batch"] = tensors["batch"].to(torch.int64)
        tensors["batch"][3] = index

    rewrite_checkpoint(step_file(run_copy, 2), edit)
    assert_replay_refused(run_copy, existing_out, TrajectoryError.exit_code,
                          str(step_file(run_copy, 2)), f"batch holds index {index}",
                          "outside the training split 0..19")


# --------------------------------------------------------------------------- manifest


def test_manifest_from_another_run(runs, run_copy, existing_out):
    shutil.copy(runs["other"] / "manifest.json", run_copy / "manifest.json")
    own = json.loads((runs["run"] / "manifest.json").read_text())["run_id"]
    foreign = manifest_of(run_copy)["run_id"]
    line = assert_replay_refused(run_copy, existing_out, TrajectoryError.exit_code,
                                 str(run_copy / "manifest.json"), repr(foreign), repr(own),
                                 "copied from another run")
    assert "more problem" not in line  # one cause, one problem, not one per checkpoint


@pytest.mark.parametrize("edit, needles", [
    (lambda m: m.update(format_version=5), ("version 5", "reads plgk-trajectory versions 1 to 4",
                                            "upgrade plgk")),
    (lambda m: m.update(format_version="1"), ("version '1'", "reads plgk-trajectory versions 1 to 4")),
    (lambda m: m.update(format="something-else"), ("format 'something-else'",)),
    (lambda m: m.pop("format_version"), ("version None",)),
], ids=["newer", "string", "other_format", "no_version"])
def test_manifest_of_unknown_format_version(run_copy, existing_out, edit, needles):
    manifest = manifest_of(run_copy)
    edit(manifest)
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    assert_replay_refused(run_copy, existing_out, TrajectoryError.exit_code,
                          str(run_copy / "manifest.json"), *needles)


def test_unfinished_training_run(run_copy, existing_out):
    """What an interrupted `plgk train` leaves: complete = false, the last step missing."""
    manifest = manifest_of(run_copy)
    manifest["complete"] = False
    del manifest["final"]
    write_manifest(run_copy, manifest)
    step_file(run_copy, 3).unlink()
    line = assert_replay_refused(run_copy, existing_out, TrajectoryError.exit_code, str(run_copy),
                                 "training did not finish", "complete = false",
                                 "last checkpoint step 2 of 3")
    assert "plgk train" in line and "--resume" in line


# --------------------------------------------------------------------------- plgk check


def test_check_good_run(runs):
    before = snapshot(runs["run"])
    result = invoke("check", runs["run"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == f"{runs['run']}: ok"
    assert not check_lines(result)
    assert snapshot(runs["run"]) == before


def test_check_reports_every_problem(run_copy, existing_out):
    """A gap, NaN in θ, a batch index outside the split and a changed dataset: four lines, one
    summary, the largest exit code; replay names the first and counts the rest."""
    step_file(run_copy, 2).unlink()
    name = first_param(run_copy)
    rewrite_checkpoint(step_file(run_copy, 1),
                       lambda t: t["param/" + name].view(-1).__setitem__(0, float("nan")))
    rewrite_checkpoint(step_file(run_copy, 3), lambda t: t["batch"].__setitem__(0, 99))
    manifest = manifest_of(run_copy)
    manifest["dataset"]["fingerprint"] = "0" * 64  # as if the data changed since: not a manifest edit
    write_manifest(run_copy, manifest)

    before = snapshot(run_copy)
    result = invoke("check", run_copy)
    lines = check_lines(result)
    assert result.exit_code == max(TrajectoryError.exit_code, DataError.exit_code)
    assert len(lines) == 5, lines
    assert all(line.startswith("plgk: problem: ") for line in lines[:4]), lines
    assert str(step_file(run_copy, 2)) in lines[0] and "gap between steps 1 and 3" in lines[0]
    assert str(step_file(run_copy, 1)) in lines[1] and f"param/{name} holds 1 NaN" in lines[1]
    assert str(step_file(run_copy, 3)) in lines[2] and "batch holds index 99" in lines[2]
    assert "fingerprint mismatch" in lines[3]
    assert lines[4] == f"{run_copy}: 4 problems"
    assert result.stdout == ""
    assert snapshot(run_copy) == before

    line = assert_replay_refused(run_copy, existing_out, TrajectoryError.exit_code,
                                 str(step_file(run_copy, 2)), "gap")
    assert line.endswith("(and 3 more problems: run `plgk check`)")


def test_check_not_a_run_directory(tmp_path):
    result = invoke("check", tmp_path / "nowhere")
    lines = check_lines(result)
    assert result.exit_code == TrajectoryError.exit_code
    assert lines == [f"plgk: problem: {tmp_path / 'nowhere'}: run directory not found; give the "
                     "--out of `plgk train`", f"{tmp_path / 'nowhere'}: 1 problem"]


# --------------------------------------------------------------------------- output side


def test_disk_full_refused_before_work(runs, tmp_path, monkeypatch):
    """PLGK_FREE_BYTES stands for the free space: replay refuses before it walks, naming the
    directory and the space it needs; nothing is written, an existing output survives."""
    monkeypatch.setenv("PLGK_FREE_BYTES", "0")
    out = tmp_path / "out.h5"
    line = assert_one_line_error(
        replay(runs["run"], "--target", "logits", audit_set="test[:8]", out=out),
        OutputError.exit_code, str(tmp_path), "0 bytes free", "needs about")
    needed = re.search(r"needs about ([0-9.]+) (bytes|kB|MB|GB)", line)
    assert needed and float(needed.group(1)) > 0, line
    assert_nothing_written(out)

    existing = Path(shutil.copy(runs["h5"], tmp_path / "existing.h5"))
    assert_replay_refused(runs["run"], existing, OutputError.exit_code, "bytes free", "needs about")


def test_disk_full_keeps_progress_of_interrupted_replay(runs, tmp_path, monkeypatch):
    """A replay crashed after its first commit; resuming on a full disk keeps the progress."""
    out = tmp_path / "out.h5"
    progress = crash_after_first_commit(runs["run"], out, monkeypatch)
    before = progress.read_bytes()
    monkeypatch.setenv("PLGK_FREE_BYTES", "0")
    assert_one_line_error(replay(runs["run"], "--commit-every", "1", "--resume", out=out),
                          OutputError.exit_code, "bytes free", "needs about")
    assert progress.read_bytes() == before and not out.exists()


@pytest.fixture
def held_open(runs, tmp_path):
    """Another process holds a copy of the output open for writing (h5py takes the HDF5 lock)."""
    if os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() == "FALSE":
        pytest.skip("HDF5 file locking is disabled in this environment")
    path = Path(shutil.copy(runs["h5"], tmp_path / "held.h5"))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, h5py\nf = h5py.File(sys.argv[1], 'a')\n"
         "print('open', flush=True)\nsys.stdin.read()\nf.close()\n", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        yield path
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_inspect_file_held_open_for_writing(held_open):
    before = held_open.read_bytes()
    line = assert_one_line_error(invoke("inspect", held_open), StoreError.exit_code, str(held_open),
                                 "another process has it open for writing")
    assert "try again" in line
    assert held_open.read_bytes() == before


def test_overwrite_file_held_open_for_writing(runs, held_open):
    """The new output is written beside and renamed over the held one: a complete file, never a
    half one, and readable at once (the holder keeps the old, unlinked inode)."""
    result = replay(runs["run"], "--overwrite", out=held_open)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in held_open.parent.glob(held_open.name + "*")) == [held_open.name]
    result = invoke("inspect", held_open)
    assert result.exit_code == 0, result.stderr
    with h5py.File(held_open, "r") as f:
        assert f.attrs["complete_audit"] and "audit/loss/influence" in f


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("edit, needles", [
    (lambda c: c.replace("lr = 0.01", "lr = -1"), ("[optim] lr", "must be > 0", "got -1")),
    (lambda c: c.replace('name = "adam"', 'name = "sgd"').replace(
        "lr = 0.01", "lr = 0.01\nbetas = [0.9, 0.99]"),
     ("[optim] betas", "not used by sgd", "only by adam, adamw", "remove it")),
    (lambda c: c.replace("lr = 0.01", "lr = 0.01\nmomentum = 0.9"),
     ("[optim] momentum", "not used by adam", "only by sgd, rmsprop")),
    (lambda c: c.replace('name = "adam"', 'name = "sgd"').replace("lr = 0.01", "lr = 0.01\neps = 1e-6"),
     ("[optim] eps", "not used by sgd")),
    (lambda c: c.replace("lr = 0.01", "lr = nan"), ("[optim] lr", "finite", "nan")),
    (lambda c: c.replace("lr = 0.01", 'lr = 0.01\n[[optim.groups]]\nparams = "*.bias"\namsgrad = true'),
     ("[[optim.groups]] #1 amsgrad: unknown key", "the switches nesterov, amsgrad and centered hold for every group")),
    (lambda c: c.replace("lr = 0.01", 'lr = 0.01\n[[optim.groups]]\nweight_decay = 0.0'),
     ("[[optim.groups]] #1 params: expected a parameter-name pattern or a list of them",)),
    (lambda c: c + '\n[schedule]\nname = "cosine"\npct_start = 0.2\n',
     ("[schedule] pct_start: not used by schedule 'cosine' (only by onecycle); remove it",)),
], ids=["negative_lr", "betas_for_sgd", "momentum_for_adam", "eps_for_sgd", "nan_lr", "switch_in_a_group",
        "group_without_params", "onecycle_key_for_cosine"])
def test_config_value_refused(runs, tmp_path, edit, needles):
    config = tmp_path / "bad.toml"
    config.write_text(edit(runs["config"].read_text()))
    out = tmp_path / "run"
    out.mkdir()  # an empty --out is allowed; it must stay empty
    assert_one_line_error(invoke("train", "--config", config, "--out", out, "--quiet"),
                          ConfigError.exit_code, str(config), *needles)
    assert list(out.iterdir()) == []


def test_group_matching_no_parameter_is_refused_before_the_run_exists(runs, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text(runs["config"].read_text().replace(
        "lr = 0.01", 'lr = 0.01\n[[optim.groups]]\nparams = ["*.gamma"]\nweight_decay = 0.0'))
    out = tmp_path / "run"
    assert_one_line_error(invoke("train", "--config", config, "--out", out, "--quiet"), ConfigError.exit_code,
                          "[[optim.groups]] #1 params ['*.gamma']: matches no trainable parameter of the model",
                          "fix the patterns or remove the group")
    assert not out.exists() or list(out.iterdir()) == []


def test_debug_shows_the_traceback(run_copy, tmp_path):
    """--debug lets the PlgkError through (a traceback) instead of the one line."""
    step_file(run_copy, 2).unlink()
    result = invoke("--debug", "replay", "--ckpts", run_copy, "--audit-set", "test[:4]", "--out",
                    tmp_path / "out.h5", "--quiet")
    assert isinstance(result.exception, TrajectoryError)
    assert "gap" in str(result.exception)


# --------------------------------------------------------------------------- names with line breaks


def test_quoted_toml_key_with_a_newline_stays_one_line(runs, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text(runs["config"].read_text().replace("lr = 0.01", 'lr = 0.01\n"l\\nr" = 1'))
    assert_one_line_error(invoke("train", "--config", config, "--out", tmp_path / "run", "--quiet"),
                          ConfigError.exit_code, str(config), '[optim] "l\\nr": unknown key')


def test_path_with_a_newline_stays_one_line(runs, tmp_path):
    spec = str(tmp_path / "two\nlines.npz")
    assert_one_line_error(replay(runs["run"], audit_set=spec, out=tmp_path / "out.h5"),
                          AuditSpecError.exit_code, "two\\nlines.npz", "file not found")


# --------------------------------------------------------------------------- train subset files


@pytest.mark.parametrize("content, needles", [
    ("0\n5\nx7\n", ("'x7' is not an integer index",)),
    ("0 5\n20\n", ("index 20 is outside 0..19",)),
    ("\U000c5f8f\n", ("is not an integer index",)),  # numpy 2.4's loadtxt misreads this one
    ("# nothing\n", ("holds no indices",)),
], ids=["word", "out_of_range", "non_ascii", "empty"])
def test_bad_train_subset_file(runs, tmp_path, content, needles):
    path = tmp_path / "subset.txt"
    path.write_text(content, encoding="utf-8")
    out = tmp_path / "out.h5"
    assert_one_line_error(replay(runs["run"], "--train-subset", path, out=out),
                          AuditSpecError.exit_code, "--train-subset", str(path), *needles)
    assert_nothing_written(out)


def test_train_subset_npy_of_floats(runs, tmp_path):
    path = tmp_path / "subset.npy"
    np.save(path, np.array([0.0, 1.5]))
    out = tmp_path / "out.h5"
    assert_one_line_error(replay(runs["run"], "--train-subset", path, out=out),
                          AuditSpecError.exit_code, str(path), "holds float64 values")
    assert_nothing_written(out)
