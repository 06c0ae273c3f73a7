"""Everything plgk reads is validated before use (plgk_cli/manifest.py, plgk_cli/progress.py).

- The manifest carries a sha256 of its content (format version 4): a hand edit (an optimizer
  value, the steps per epoch, a shape, the run id) is refused by replay and reported by `plgk
  check`, where before it replayed into a wrong result. Manifests of versions 1-3 carry none and
  read as before.
- Every field plgk reads has a type and a range: a wrong one is one line naming the field and
  what was expected, never a traceback; a hypothesis fuzz substitutes random JSON at random field
  paths of a real manifest (re-checksummed, so the schema and not the checksum must catch it).
- A replay progress file's checksum covers its header too, and a commit that cannot be written
  is one line that leaves the previous commit in place.

The tiny run of tests/test_cli_errors.py (3 updates of an MLP with Adam) is trained once.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import save_file

from plgk_cli import progress
from plgk_cli.check import validate_run
from plgk_cli.errors import OutputError, PlgkError, StoreError, TrajectoryError
from plgk_cli.manifest import content_checksum
from plgk_cli.progress import progress_path
from plgk_cli.recorder import Recorder
from plgk_cli.trajectory import FORMAT_VERSION, read_manifest, write_manifest
from test_cli_errors import (assert_nothing_written, assert_one_line_error, crash_after_first_commit, invoke,
                             replay, train_run, write_config, write_npz)


def error_classes(cls=PlgkError) -> list:
    return [cls] + [sub for child in cls.__subclasses__() for sub in error_classes(child)]


EXIT_CODES = {cls.exit_code for cls in error_classes()} - {PlgkError.exit_code}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny run of test_cli_errors and its replay."""
    root = tmp_path_factory.mktemp("manifest")
    run = train_run(write_config(root / "run.toml", write_npz(root / "data.npz")), root / "run")
    h5 = root / "influences.h5"
    result = replay(run, out=h5)
    assert result.exit_code == 0, result.output
    return {"root": root, "run": run, "h5": h5}


@pytest.fixture
def run_copy(base, tmp_path) -> Path:
    return Path(shutil.copytree(base["run"], tmp_path / "run"))


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out.h5"


def manifest_path(run: Path) -> Path:
    return run / "manifest.json"


def load_json(run: Path) -> dict:
    return json.loads(manifest_path(run).read_text())


def hand_edit(run: Path, edit) -> None:
    """What an editor does: change the JSON, leave the checksum as it was."""
    manifest = load_json(run)
    edit(manifest)
    manifest_path(run).write_text(json.dumps(manifest, indent=2))


def rewrite(run: Path, edit) -> None:
    """A manifest as plgk would write it, checksum included, with ``edit`` made to it."""
    manifest = load_json(run)
    edit(manifest)
    write_manifest(run, manifest)


def check_lines(result) -> list:
    assert "Traceback" not in result.output + result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.strip()]


def influences(h5: Path) -> np.ndarray:
    with h5py.File(h5, "r") as f:
        return f["audit/loss/influence"][()]


# --------------------------------------------------------------------------- checksum


def test_a_new_run_carries_the_checksum_of_its_content(base):
    manifest = load_json(base["run"])
    assert manifest["format_version"] == FORMAT_VERSION == 4
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", manifest["checksum"])
    assert manifest["checksum"] == content_checksum(manifest)


@pytest.mark.parametrize("edit", [
    lambda m: m["optimizer"].update(momentum=0.5),
    lambda m: m["optimizer"].update(betas=[0.5, 0.999]),
    lambda m: m.update(steps_per_epoch=2),
    lambda m: m["parameters"][0].update(shape=[6, 4]),
    lambda m: m.update(run_id="0" * 32),
    lambda m: m["dataset"].update(num_train=19),
    lambda m: m.update(complete=False),
], ids=["momentum", "betas", "steps_per_epoch", "parameter_shape", "run_id", "num_train", "complete"])
def test_hand_edited_manifest_is_refused(run_copy, out, edit):
    hand_edit(run_copy, edit)
    before = manifest_path(run_copy).read_bytes()
    line = assert_one_line_error(replay(run_copy, out=out), TrajectoryError.exit_code,
                                 str(manifest_path(run_copy)), "checksum mismatch",
                                 "changed after plgk wrote it", "re-run `plgk train`")
    assert "more problem" not in line
    assert_nothing_written(out)
    result = invoke("check", run_copy)
    assert result.exit_code == TrajectoryError.exit_code
    lines = check_lines(result)
    assert len(lines) == 2 and "checksum mismatch" in lines[0], lines
    assert lines[1] == f"{run_copy}: 1 problem"
    assert manifest_path(run_copy).read_bytes() == before


def test_reformatted_manifest_still_reads(run_copy, out):
    """The checksum is of the content, not the bytes: re-indenting or reordering keys is no edit."""
    manifest = load_json(run_copy)
    assert manifest["checksum"].startswith("sha256:")
    reordered = dict(reversed(list(manifest.items())))
    manifest_path(run_copy).write_text(json.dumps(reordered, indent=4))
    result = invoke("check", run_copy)
    assert result.exit_code == 0, result.stderr


def test_v4_manifest_without_checksum_is_refused(run_copy, out):
    hand_edit(run_copy, lambda m: m.pop("checksum"))
    assert_one_line_error(replay(run_copy, out=out), TrajectoryError.exit_code,
                          str(manifest_path(run_copy)), "no checksum", "format version 4",
                          "re-run `plgk train`")
    assert_nothing_written(out)


@pytest.mark.parametrize("value", ["sha1:abc", 5, None, "sha256:" + "0" * 64])
def test_malformed_checksum_is_refused(run_copy, out, value):
    hand_edit(run_copy, lambda m: m.update(checksum=value))
    assert_one_line_error(replay(run_copy, out=out), TrajectoryError.exit_code,
                          str(manifest_path(run_copy)), "checksum", "re-run `plgk train`")
    assert_nothing_written(out)


def test_version_3_manifest_without_checksum_still_replays(base, run_copy, out):
    """What an older plgk wrote: format version 3, no checksum; it replays to the same result."""
    def as_version_3(manifest):
        manifest.update(format_version=3)
        del manifest["checksum"]
    hand_edit(run_copy, as_version_3)
    result = replay(run_copy, out=out)
    assert result.exit_code == 0, result.stderr
    np.testing.assert_array_equal(influences(out), influences(base["h5"]))
    assert invoke("check", run_copy).exit_code == 0


def test_lowering_the_version_keeps_the_check(run_copy, out):
    """A manifest edited to version 3 still carries the checksum of its version-4 content."""
    hand_edit(run_copy, lambda m: m.update(format_version=3))
    assert_one_line_error(replay(run_copy, out=out), TrajectoryError.exit_code, "checksum mismatch")


def test_every_write_recomputes_the_checksum(run_copy):
    """A dict read back (stale checksum inside) and changed, then written by plgk, reads."""
    manifest = read_manifest(run_copy)
    old = manifest["checksum"]
    manifest["optimizer"]["lr"] = 0.02
    write_manifest(run_copy, manifest)
    again = read_manifest(run_copy)
    assert again["optimizer"]["lr"] == 0.02 and again["checksum"] not in (old, None)
    assert manifest["checksum"] == old  # the caller's dict is not changed


def test_recorder_rewrites_during_a_run_stay_valid(tmp_path):
    """The Recorder rewrites the manifest when clipping starts and when it finishes: each write
    carries the checksum of what it wrote."""
    torch.manual_seed(0)
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.arange(12) % 3
    np.savez(tmp_path / "d.npz", x_train=x.numpy(), y_train=y.numpy(), x_test=x[:4].numpy(),
             y_test=y[:4].numpy())
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    checksums = []
    with Recorder(tmp_path / "run", model, optimizer, model_name="test_manifest:two_layers",
                  dataset=f"npz:{tmp_path / 'd.npz'}", batch_size=6, epochs=1) as recorder:
        checksums.append(read_manifest(tmp_path / "run")["checksum"])
        for batch in torch.arange(12).split(6):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            recorder.clip_grad_norm(0.5)
            optimizer.step()
            recorder.step(batch, loss)
            checksums.append(read_manifest(tmp_path / "run")["checksum"])
    final = read_manifest(tmp_path / "run")
    assert final["complete"] and final["optimizer"]["clip_grad_norm"] == 0.5
    assert len({*checksums, final["checksum"]}) == 3  # start, clipping used, complete
    assert validate_run(tmp_path / "run") == []


def two_layers(in_shape, num_classes):
    return torch.nn.Sequential(torch.nn.Linear(in_shape[0], 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, num_classes))


# --------------------------------------------------------------------------- schema

# (path, value, what the line names): a manifest as plgk writes it but for one field.
SCHEMA_CASES = [
    (("optimizer", "momentum"), "0.9", 'optimizer.momentum must be a number in [0, 1], got "0.9"'),
    (("optimizer", "momentum"), 1.5, "optimizer.momentum must be a number in [0, 1], got 1.5"),
    (("optimizer", "betas"), [0.9], "optimizer.betas must be a list of 2 numbers in [0, 1), got [0.9]"),
    (("optimizer", "betas"), [0.9, 1.0], "optimizer.betas[1] must be a number in [0, 1), got 1.0"),
    (("optimizer", "eps"), float("nan"), "optimizer.eps must be a finite number >= 0, got NaN"),
    (("optimizer", "weight_decay"), -0.1, "optimizer.weight_decay must be a finite number >= 0, got -0.1"),
    (("optimizer", "name"), "lion", ('optimizer.name must be one of "sgd", "adam", "adamw", "rmsprop", '
                                     '"adagrad", got "lion"')),
    (("optimizer", "amsgrad"), 1, "optimizer.amsgrad must be true or false, got 1"),
    (("optimizer", "clip_grad_norm"), 0, "optimizer.clip_grad_norm must be null or a finite number > 0"),
    (("optimizer", "groups"), [], "optimizer.groups must be a list (non-empty) of objects, got []"),
    (("optimizer", "groups", 0, "params"), ["1.weight", "nope"],
     'optimizer.groups[0].params[1] must name a recorded parameter, got "nope"'),
    (("steps_per_epoch",), 0, "steps_per_epoch must be an integer >= 1, got 0"),
    (("steps_per_epoch",), True, "steps_per_epoch must be an integer >= 1, got true"),
    (("batch_size",), 2.5, "batch_size must be an integer >= 1, got 2.5"),
    (("total_steps",), -1, "total_steps must be an integer >= 0, got -1"),
    (("checkpoint_every",), "1", 'checkpoint_every must be an integer >= 1, got "1"'),
    (("complete",), "yes", 'complete must be true or false, got "yes"'),
    (("dataset", "num_train"), 0, "dataset.num_train must be an integer >= 1, got 0"),
    (("dataset", "in_shape"), [6, 0], "dataset.in_shape[1] must be an integer >= 1, got 0"),
    (("dataset", "seed"), -1, "dataset.seed must be an integer >= 0, got -1"),
    (("dataset",), [1, 2], "dataset must be an object, got [1, 2]"),
    (("parameters",), [], "parameters must be a list (non-empty) of objects, got []"),
    (("parameters", 0, "shape"), "4x6", 'parameters[0].shape must be a list of integers >= 0, got "4x6"'),
    (("parameters", 0, "dtype"), "float16", 'parameters[0].dtype must be one of "float32", "float64"'),
    (("parameters", 1, "name"), "1.weight", ('parameters[1].name "1.weight" names a parameter listed '
                                             "before it")),
    (("dtype",), "float16", 'dtype must be one of "float32", "float64", got "float16"'),
    (("model", "kwargs"), [], "model.kwargs must be an object, got []"),
    (("task", "name"), 5, "task.name must be a non-empty string, got 5"),
    (("run_id",), "", 'run_id must be a non-empty string, got ""'),
    (("config",), 5, "config must be null or a `plgk train` configuration"),
    (("forward", "buffers"), "none", 'forward.buffers must be a list of non-empty strings, got "none"'),
]


@pytest.mark.parametrize("path, value, needle", SCHEMA_CASES,
                         ids=[".".join(map(str, p)) + f"={json.dumps(v)}" for p, v, _ in SCHEMA_CASES])
def test_wrong_field_is_one_line_naming_it(run_copy, out, path, value, needle):
    def edit(manifest):
        target = manifest
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    rewrite(run_copy, edit)
    line = assert_one_line_error(replay(run_copy, out=out), TrajectoryError.exit_code,
                                 str(manifest_path(run_copy)), needle, "re-run `plgk train`")
    assert "checksum" not in line
    assert_nothing_written(out)
    lines = check_lines(invoke("check", run_copy))
    assert needle in lines[0], lines
    assert lines[-1] == f"{run_copy}: {len(lines) - 1} problem" + ("s" if len(lines) > 2 else "")


@pytest.mark.parametrize("version", [True, 1.0, 4.0])
def test_format_version_that_only_equals_an_integer(run_copy, out, version):
    """JSON true and 1.0 equal 1 in Python; neither is a format version."""
    rewrite(run_copy, lambda m: m.update(format_version=version))
    assert_one_line_error(replay(run_copy, out=out), TrajectoryError.exit_code,
                          f"version {version!r}; this plgk reads plgk-trajectory versions 1 to 4")
    assert_nothing_written(out)


def test_missing_nested_field(run_copy, out):
    rewrite(run_copy, lambda m: m["optimizer"]["groups"][0].pop("lr"))
    assert_one_line_error(replay(run_copy, out=out), TrajectoryError.exit_code,
                          "optimizer.groups[0].lr is missing")


def test_check_lists_every_wrong_field(run_copy, out):
    def edit(manifest):
        manifest["optimizer"]["momentum"] = -1
        manifest["dataset"]["num_test"] = "8"
    rewrite(run_copy, edit)
    result = invoke("check", run_copy)
    lines = check_lines(result)
    assert result.exit_code == TrajectoryError.exit_code
    assert len(lines) == 3, lines
    assert "dataset.num_test must be an integer >= 0" in lines[0]
    assert "optimizer.momentum must be a number in [0, 1], got -1" in lines[1]
    assert lines[2] == f"{run_copy}: 2 problems"
    line = assert_one_line_error(replay(run_copy, out=out), TrajectoryError.exit_code, "dataset.num_test")
    assert line.endswith("(and 1 more problem: run `plgk check`)")


@pytest.mark.parametrize("key, value, needle", [
    ("in_shape", [7], "dataset.in_shape is [7], but the run's data"),
    ("num_classes", 4, "dataset.num_classes is 4, but the run's data"),
    ("num_train", 21, "dataset.num_train is 21, but the run's data"),
])
def test_manifest_that_misstates_its_data(run_copy, out, key, value, needle):
    """Well-typed, re-checksummed, but not what the (unchanged) data hold: the manifest is wrong."""
    rewrite(run_copy, lambda m: m["dataset"].update({key: value}))
    assert_one_line_error(replay(run_copy, out=out), TrajectoryError.exit_code, needle,
                          str(manifest_path(run_copy)))
    assert_nothing_written(out)


def test_forward_buffer_that_step_0_lacks(run_copy, out):
    rewrite(run_copy, lambda m: m["forward"].update(buffers=["0.running_mean"]))
    assert_one_line_error(replay(run_copy, out=out), TrajectoryError.exit_code,
                          "forward.buffers names '0.running_mean'", "step 0 does not record")
    lines = check_lines(invoke("check", run_copy))
    assert len(lines) == 2 and "forward.buffers" in lines[0], lines


def test_total_steps_far_past_the_files(run_copy):
    """One problem, quickly: not one missing file per step of a total_steps of 10^12."""
    rewrite(run_copy, lambda m: m.update(total_steps=10**12, epochs=10**12))
    problems = validate_run(run_copy)
    assert [p.message for p in problems] == [(
        f"{run_copy}: the manifest says {10**12} steps but the last checkpoint is step 3; checkpoints "
        "are missing at the end: restore them or re-run `plgk train`")]


# --------------------------------------------------------------------------- fuzz

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.integers(),
                         st.floats(), st.text(max_size=12))
json_values = st.recursive(json_scalars,
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=6)


def field_paths(value, prefix=()) -> list:
    """Every path to a value inside the manifest (the checksum's aside)."""
    paths = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            if prefix or key != "checksum":
                paths += field_paths(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            paths += field_paths(item, prefix + (i,))
    return paths


def edited(manifest: dict, edits: list) -> dict:
    """``manifest`` with each (path, value) of ``edits`` made: the value put at the path, or the
    path deleted where the value is DELETE; a path that an earlier edit removed is skipped."""
    manifest = json.loads(json.dumps(manifest))
    for path, value in edits:
        target = manifest
        try:
            for key in path[:-1]:
                target = target[key]
            if value is DELETE:
                del target[path[-1]]
            else:
                target[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    return manifest


DELETE = object()


# PLGK_FUZZ_EXAMPLES / PLGK_FUZZ_REPLAYS: more examples for a longer search than the suite's.
FUZZ_HEALTH = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
FUZZ = settings(max_examples=int(os.environ.get("PLGK_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=FUZZ_HEALTH)
FUZZ_REPLAYS = settings(max_examples=int(os.environ.get("PLGK_FUZZ_REPLAYS", "25")), deadline=None,
                        suppress_health_check=FUZZ_HEALTH)


@pytest.fixture(scope="module")
def fuzz_paths(base):
    return field_paths(load_json(base["run"]))


def fuzzed_copy(base, data, fuzz_paths) -> Path:
    """A copy of the run whose manifest holds random JSON values at one to three random paths (or
    lacks what was there), written (and checksummed) as plgk writes it."""
    edits = data.draw(st.lists(st.tuples(st.sampled_from(fuzz_paths),
                                         st.one_of(json_values, st.just(DELETE))),
                               min_size=1, max_size=3), label="edits")
    run = Path(tempfile.mkdtemp(dir=base["root"])) / "run"
    shutil.copytree(base["run"], run)
    write_manifest(run, edited(load_json(base["run"]), edits))
    return run


@FUZZ
@given(data=st.data())
def test_fuzzed_manifest_check_never_raises(base, fuzz_paths, data):
    run = fuzzed_copy(base, data, fuzz_paths)
    try:
        problems = validate_run(run)  # problems or ok, never an exception
        assert all(issubclass(p.error, PlgkError) and "\n" not in p.message for p in problems)
        result = invoke("check", run)
        lines = check_lines(result)
        if problems:
            assert result.exit_code == max(p.error.exit_code for p in problems), result.stderr
            assert len(lines) == len(problems) + 1
        else:
            assert result.exit_code == 0 and not lines, result.stderr
    finally:
        shutil.rmtree(run.parent)


@FUZZ_REPLAYS
@given(data=st.data())
def test_fuzzed_manifest_replay_is_one_line_or_a_result(base, fuzz_paths, data):
    run = fuzzed_copy(base, data, fuzz_paths)
    h5 = run.parent / "out.h5"
    try:
        problems = validate_run(run)
        result = replay(run, out=h5)
        if problems:
            assert_one_line_error(result, problems[0].error.exit_code)
            assert_nothing_written(h5)
        elif result.exit_code != 0:  # a value the checks let through, that replay then refuses
            assert_one_line_error(result, result.exit_code)
            assert result.exit_code in EXIT_CODES
    finally:
        shutil.rmtree(run.parent)


# --------------------------------------------------------------------------- progress files


@pytest.fixture
def crashed_replay(base, tmp_path, monkeypatch):
    """A replay of the tiny run that crashed right after its first progress commit."""
    out = tmp_path / "out.h5"
    crash_after_first_commit(base["run"], out, monkeypatch)
    return out


def test_damaged_progress_header_is_refused(base, crashed_replay):
    """One digit of next_step in the header's JSON state: still a valid header, now a wrong step."""
    progress_file = progress_path(crashed_replay)
    data = bytearray(progress_file.read_bytes())
    at = data.index(b'next_step\\": ') + len(b'next_step\\": ')
    assert chr(data[at]).isdigit()
    data[at] = ord("0") if data[at] != ord("0") else ord("1")
    progress_file.write_bytes(bytes(data))
    before = progress_file.read_bytes()
    result = replay(base["run"], "--commit-every", "1", "--resume", out=crashed_replay)
    assert_one_line_error(result, StoreError.exit_code, str(progress_file), "checksum mismatch",
                          "the progress file is damaged", "start over with --overwrite")
    assert progress_file.read_bytes() == before and not crashed_replay.exists()


def test_progress_of_version_1_is_refused(base, crashed_replay):
    """What the old format's writer made (its checksum over the tensors only)."""
    progress_file = progress_path(crashed_replay)
    tensors, state = progress.load(progress_file)
    save_file(tensors, str(progress_file), metadata={"format": progress.FORMAT, "version": "1",
                                                     "state": json.dumps(state, sort_keys=True)})
    result = replay(base["run"], "--commit-every", "1", "--resume", out=crashed_replay)
    assert_one_line_error(result, StoreError.exit_code, "version 2", "start over with --overwrite")


def test_progress_file_has_the_users_permissions(crashed_replay):
    umask = os.umask(0)
    os.umask(umask)
    assert progress_path(crashed_replay).stat().st_mode & 0o777 == 0o666 & ~umask


def no_space(kind):
    def fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # what a write cut short leaves
        if kind == "os":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return fail


@pytest.mark.parametrize("kind", ["os", "safetensors"])
def test_full_disk_at_a_commit_keeps_the_last_one(base, crashed_replay, monkeypatch, kind):
    """The resumed replay's next commit finds the disk full: one line, no temporary file, the last
    commit in place; once there is space, --resume finishes with the uninterrupted result."""
    progress_file = progress_path(crashed_replay)
    before = progress_file.read_bytes()
    monkeypatch.setattr(progress, "save_file", no_space(kind))
    result = replay(base["run"], "--commit-every", "1", "--resume", out=crashed_replay)
    assert_one_line_error(result, OutputError.exit_code, str(progress_file), "the disk is full",
                          "the last commit is kept", "--resume")
    assert progress_file.read_bytes() == before
    assert not progress_file.with_name(progress_file.name + ".tmp").exists()
    assert not crashed_replay.exists()
    monkeypatch.undo()
    result = replay(base["run"], "--commit-every", "1", "--resume", out=crashed_replay)
    assert result.exit_code == 0, result.stderr
    np.testing.assert_array_equal(influences(crashed_replay), influences(base["h5"]))


def test_progress_checksum_covers_the_state():
    """Unit level: the same tensors under another state have another checksum."""
    tensors = {"walk/w": torch.ones(3, dtype=torch.float64)}
    meta = {"format": progress.FORMAT, "version": progress.VERSION}
    assert progress._checksum({**meta, "state": '{"next_step": 2}'}, tensors) != \
        progress._checksum({**meta, "state": '{"next_step": 1}'}, tensors)
