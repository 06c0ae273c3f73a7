"""Where plgk writes (plgk_cli/outputs.py): one writer per output, outputs apart from inputs, write
failures (a full disk, a permission) as one line with nothing half-written under a final name, files
with the user's umask, and influences.h5 files checked when they are opened.

A second writer is simulated in-process by holding the lock file's flock on a descriptor of the
test's own (as another process would) and naming a pid in it; one real two-process race and a
SIGKILL are run as subprocesses (slow).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
from safetensors import SafetensorError

from plgk_cli import outputs, store, trajectory
from plgk_cli.data import load_dataset
from plgk_cli.errors import OutputError
from plgk_cli.models import build_model
from plgk_cli.recorder import Recorder
from plgk_cli.train import check_out_dir
from test_cli_errors import (assert_nothing_written, assert_one_line_error, base, invoke, out,  # noqa: F401
                             replay, run_copy, snapshot)

OTHER_PID = 4242  # the pid the simulated other writer writes into its lock file


@contextlib.contextmanager
def held_by_another_process(lock: Path, pid: int = OTHER_PID):
    """Hold ``lock`` as another plgk process would: its own descriptor, flock'd, its pid inside."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, f"{pid}\n".encode())
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def directory_held_by_another_process(directory: Path):
    """Hold a run directory's own flock, as a --overwrite that replaces it does."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def train(base, out, *extra):
    return invoke("train", "--config", base["config"], "--out", out, "--quiet", *extra)


def run_files(directory: Path) -> list:
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------- one writer per run


@pytest.mark.parametrize("extra", [(), ("--overwrite",)], ids=["new", "overwrite"])
def test_train_refuses_a_new_out_another_process_is_writing(base, tmp_path, extra):
    out = tmp_path / "run"
    with held_by_another_process(out / outputs.RUN_LOCK):
        assert_one_line_error(train(base, out, *extra), OutputError.exit_code, str(out),
                              f"another plgk process (pid {OTHER_PID}) is writing this run",
                              "wait for it to finish or choose another --out")
        assert run_files(out) == [outputs.RUN_LOCK]
        assert (out / outputs.RUN_LOCK).read_text() == f"{OTHER_PID}\n"  # the writer's claim untouched


@pytest.mark.parametrize("extra", [("--resume",), ("--overwrite",)], ids=["resume", "overwrite"])
def test_train_refuses_a_run_another_process_is_writing(base, run_copy, extra):
    manifest = json.loads((run_copy / "manifest.json").read_text())
    (run_copy / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with held_by_another_process(run_copy / outputs.RUN_LOCK):
        before = snapshot(run_copy)
        assert_one_line_error(train(base, run_copy, *extra), OutputError.exit_code, str(run_copy),
                              f"another plgk process (pid {OTHER_PID}) is writing this run")
        assert snapshot(run_copy) == before
    assert run_files(run_copy.parent) == ["run"]  # no staging directory


@pytest.mark.parametrize("extra", [("--resume",), ("--overwrite",), ()], ids=["resume", "overwrite", "new"])
def test_the_run_an_overwrite_replaces_is_locked_without_a_file(base, run_copy, extra):
    """The run an --overwrite is replacing keeps its files as they are (no lock file in it, which
    a SIGKILL would leave behind): its directory's own flock keeps other writers out."""
    manifest = json.loads((run_copy / "manifest.json").read_text())
    (run_copy / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    before = snapshot(run_copy)
    outputs.claim_run_dir(run_copy, mark=False).release()
    assert snapshot(run_copy) == before
    with directory_held_by_another_process(run_copy):
        assert_one_line_error(train(base, run_copy, *extra), OutputError.exit_code, str(run_copy),
                              "another plgk process is writing this run")
    assert snapshot(run_copy) == before


def test_a_finished_train_leaves_no_lock_and_an_interrupted_one_keeps_it_free(base, tmp_path):
    """A complete run has no lock file; an interrupted one keeps an empty, unlocked one, which
    says that no one is writing it: --overwrite replaces it at once (no 60 s wait)."""
    out = tmp_path / "run"
    assert train(base, out).exit_code == 0
    assert outputs.RUN_LOCK not in run_files(out)
    env = {"PLGK_FAULT": "after_checkpoint:2:CRASH"}
    result = make_env_invoke(env)("train", "--config", base["config"], "--out", tmp_path / "cut", "--quiet")
    assert result.exit_code != 0
    cut = tmp_path / "cut"
    assert (cut / outputs.RUN_LOCK).read_text() == ""  # the claim's marker, no pid: nobody holds it
    assert outputs.lock_holder(cut / outputs.RUN_LOCK) == (False, None)
    result = train(base, cut, "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((cut / "manifest.json").read_text())["complete"]
    assert outputs.RUN_LOCK not in run_files(cut) and run_files(tmp_path) == ["cut", "run"]


def make_env_invoke(env: dict):
    def call(*args):
        saved = {k: os.environ.get(k) for k in (*env, "PLGK_FAULT_COUNT")}
        os.environ.update(env)
        os.environ.pop("PLGK_FAULT_COUNT", None)
        try:
            return invoke(*args)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return call


def start_recorder(out: Path, npz: Path, **kwargs) -> Recorder:
    data = load_dataset(f"npz:{npz}", 0, torch.float64)
    torch.manual_seed(0)
    model = build_model("mlp", {"hidden": 4}, data.in_shape, data.num_classes).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return Recorder(out, model, optimizer, model_name="mlp", model_kwargs={"hidden": 4}, dataset=data,
                    batch_size=8, epochs=1, **kwargs)


def test_a_recorder_claims_its_run_until_it_finishes(base, tmp_path):
    out = tmp_path / "run"
    first = start_recorder(out, base["npz"])
    before = snapshot(out)
    with pytest.raises(OutputError, match=rf"another plgk process \(pid {os.getpid()}\) is writing this "
                                          "run; wait for it to finish or choose another out_dir"):
        start_recorder(out, base["npz"], resume=True)
    assert snapshot(out) == before
    first.__exit__(RuntimeError, RuntimeError("the loop failed"), None)  # an interrupted loop
    assert outputs.lock_holder(out / outputs.RUN_LOCK) == (False, None)
    start_recorder(out, base["npz"], resume=True).__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)


def test_a_recorder_with_another_writer_on_its_new_dir_writes_nothing(base, tmp_path):
    out = tmp_path / "run"
    with held_by_another_process(out / outputs.RUN_LOCK):
        with pytest.raises(OutputError, match=f"pid {OTHER_PID}"):
            start_recorder(out, base["npz"])
        assert run_files(out) == [outputs.RUN_LOCK]


def test_a_failed_check_under_the_claim_leaves_the_directory_as_it_was(base, tmp_path):
    """The claim comes first and creates the lock file; when the check under it refuses, the lock
    file and the directories the claim created go again."""
    out = tmp_path / "a" / "b" / "run"
    claim = outputs.claim_run_dir(out)
    assert run_files(out) == [outputs.RUN_LOCK]
    claim.release()
    assert run_files(tmp_path) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me\n")
    with pytest.raises(OutputError, match="not empty"):
        start_recorder(tmp_path / "mine", base["npz"])
    assert run_files(tmp_path / "mine") == ["notes.txt"]


@pytest.mark.slow
def test_two_trains_on_one_new_out_one_wins(base, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "plgk_cli", "train", "--config", str(base["config"]), "--out", str(out),
               "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    children = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(child.wait(timeout=300), child.stderr.read()) for child in children]
    codes = sorted(code for code, _ in results)
    assert codes == [0, OutputError.exit_code], results
    loser = next(err for code, err in results if code)
    assert loser.startswith("plgk: error: ") and len(loser.strip().splitlines()) == 1, loser
    assert invoke("check", out).exit_code == 0
    assert run_files(out) == run_files(base["run"])


@pytest.mark.slow
def test_sigkill_leaves_no_stale_claim(base, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PLGK_FAULT": "after_checkpoint:2:KILL"}
    child = subprocess.run([sys.executable, "-m", "plgk_cli", "train", "--config", str(base["config"]),
                            "--out", str(out), "--quiet"], env=env, capture_output=True, text=True)
    assert child.returncode == -9, child.stderr
    assert (out / outputs.RUN_LOCK).read_text().strip().isdigit()  # the dead writer's pid stays
    result = train(base, out, "--resume")
    assert result.exit_code == 0, result.output
    assert invoke("check", out).exit_code == 0
    assert outputs.RUN_LOCK not in run_files(out)


# --------------------------------------------------------------------------- one writer per replay


def test_replay_refuses_an_output_another_replay_is_writing(base, out):
    lock = outputs.output_lock(out)
    with held_by_another_process(lock):
        assert_one_line_error(replay(base["run"], out=out), OutputError.exit_code, str(out),
                              f"another plgk replay (pid {OTHER_PID}) is writing this output",
                              "wait for it or choose another --out")
        assert not out.exists() and lock.read_text() == f"{OTHER_PID}\n"
    result = replay(base["run"], out=out)  # a lock file its dead writer left: taken, then removed
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_replay_claim_follows_a_lock_file_replaced_under_it(tmp_path):
    """A lock file its holder removed (released) between another's open and flock is a dead file:
    the claim opens the one now at the path."""
    out = tmp_path / "o.h5"
    lock = outputs.output_lock(out)
    real_flock = outputs._flock_busy
    swapped = []

    def flock_then_swap(fd, operation):
        busy = real_flock(fd, operation)
        if not swapped:  # the first descriptor's file is unlinked and replaced right after its flock
            swapped.append(True)
            lock.unlink()
            lock.write_text("")
        return busy

    outputs._flock_busy = flock_then_swap
    try:
        claim = outputs.claim_output(out)
    finally:
        outputs._flock_busy = real_flock
    assert swapped and outputs.lock_holder(lock) == (False, None)  # this process holds the file now there
    other = os.open(lock, os.O_RDONLY)
    with pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)
    os.close(other)
    claim.release()
    assert not lock.exists()


# --------------------------------------------------------------------------- outputs apart from inputs


def test_replay_out_inside_its_run_is_refused_even_with_overwrite(base, run_copy, tmp_path):
    before = snapshot(run_copy)
    for target in (run_copy / "manifest.json", run_copy, run_copy / "new.h5"):
        assert_one_line_error(replay(run_copy, "--overwrite", out=target), OutputError.exit_code,
                              f"--ckpts {run_copy}", "an input of this replay")
    link = tmp_path / "link"
    link.symlink_to(run_copy)
    assert_one_line_error(replay(run_copy, "--overwrite", out=link / "manifest.json"),
                          OutputError.exit_code, "lies inside --ckpts")
    assert snapshot(run_copy) == before


def test_replay_out_equal_to_its_audit_set_or_train_subset_is_refused(base, tmp_path):
    audit = tmp_path / "audit.npz"
    shutil.copy(base["npz"], audit)
    subset = tmp_path / "subset.txt"
    subset.write_text("0\n1\n2\n")
    for target, extra, option in ((audit, (), "--audit-set"), (subset, ("--train-subset", subset), "--train-subset")):
        spec = str(audit) if option == "--audit-set" else "test[:4]"
        before = target.read_bytes()
        assert_one_line_error(replay(base["run"], "--overwrite", *extra, audit_set=spec, out=target),
                              OutputError.exit_code, f"is {option} {target}")
        assert target.read_bytes() == before


def test_replay_progress_file_may_not_be_an_input(base, tmp_path):
    run = Path(shutil.copytree(base["run"], tmp_path / "o.h5.progress"))
    before = snapshot(run)
    assert_one_line_error(replay(run, out=tmp_path / "o.h5"), OutputError.exit_code,
                          f"its progress file {run}", "--ckpts")
    assert snapshot(run) == before


def test_train_out_holding_or_being_an_input_is_refused(base, run_copy):
    with pytest.raises(OutputError, match=r"holds --config .*manifest\.json, an input of this plgk train"):
        check_out_dir(run_copy, overwrite=True, inputs={"--config": run_copy / "manifest.json"})
    with pytest.raises(OutputError, match=r"is --config"):
        check_out_dir(base["config"], overwrite=True, inputs={"--config": base["config"]})


# --------------------------------------------------------------------------- write failures


def full_disk_at(monkeypatch, step: int):
    """safetensors failing as on a full disk (its own exception type) when step file ``step`` is
    written, after writing part of the temporary file."""
    real = trajectory.save_file

    def save_file(tensors, filename, metadata=None):
        if Path(filename).name == f"step_{step:08d}.safetensors.tmp":
            Path(filename).write_bytes(b"\0" * 100)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(trajectory, "save_file", save_file)


def test_train_on_a_full_disk_stops_resumable(base, tmp_path, monkeypatch):
    out = tmp_path / "run"
    full_disk_at(monkeypatch, 2)
    assert_one_line_error(train(base, out), OutputError.exit_code,
                          f"{out / 'step_00000002.safetensors'}: cannot be written (the disk is full)",
                          "free space, then continue with `plgk train --resume`")
    assert run_files(out) == [outputs.RUN_LOCK, "manifest.json", "step_00000000.safetensors",
                              "step_00000001.safetensors"]
    monkeypatch.undo()
    result = train(base, out, "--resume")
    assert result.exit_code == 0, result.output
    assert invoke("check", out).exit_code == 0


def test_train_overwrite_on_a_full_disk_keeps_the_old_run(base, run_copy, monkeypatch):
    before = snapshot(run_copy)
    full_disk_at(monkeypatch, 1)
    assert_one_line_error(train(base, run_copy, "--overwrite"), OutputError.exit_code,
                          "cannot be written (the disk is full)",
                          f"free space and run again; the run in {run_copy} is unchanged")
    assert snapshot(run_copy) == before
    assert run_files(run_copy.parent) == ["run"]


def test_train_manifest_on_a_full_disk(base, tmp_path, monkeypatch):
    """The completed manifest fails to be written: the old one stays, no temporary file."""
    out = tmp_path / "run"
    real = Path.write_text

    def write_text(self, text, *args, **kwargs):
        if self.name == "manifest.json.tmp" and '"complete": true' in text:
            real(self, text[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    assert_one_line_error(train(base, out), OutputError.exit_code,
                          f"{out / 'manifest.json'}: cannot be written (the disk is full)", "--resume")
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    assert "manifest.json.tmp" not in run_files(out)
    monkeypatch.undo()
    assert train(base, out, "--resume").exit_code == 0


def test_train_into_an_unwritable_folder_is_refused_before_any_work(base, tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    assert_one_line_error(train(base, tmp_path / "run"), OutputError.exit_code, f"{tmp_path}: not writable")
    assert run_files(tmp_path) == []


def test_train_where_the_directory_cannot_be_created(base, tmp_path, monkeypatch):
    """As root, access() says yes to everything: the mkdir's own failure is the one line."""
    def mkdir(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert_one_line_error(train(base, tmp_path / "run"), OutputError.exit_code,
                          f"{tmp_path / 'run'}: cannot be written (the file system is read-only)",
                          "choose another --out")


def test_replay_on_a_full_disk_writes_nothing(base, tmp_path, monkeypatch):
    out = tmp_path / "out.h5"

    def write(tmp, **kwargs):
        tmp.write_bytes(b"\x89HDF")
        raise RuntimeError("Can't decrement id ref count (unable to extend file properly, errno = 28, "
                           "error message = 'No space left on device')")

    monkeypatch.setattr(store, "_write", write)
    assert_one_line_error(replay(base["run"], out=out), OutputError.exit_code,
                          f"{out}: cannot be written (the disk is full)", "free space and run `plgk replay` again")
    assert_nothing_written(out)
    existing = tmp_path / "existing.h5"
    shutil.copy(base["h5"], existing)
    assert_one_line_error(replay(base["run"], "--overwrite", out=existing), OutputError.exit_code, "the disk is full")
    assert existing.read_bytes() == base["h5"].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.h5"]


def test_replay_lock_file_that_cannot_be_created(base, out, monkeypatch):
    def claim(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(outputs.output_lock(path)))

    monkeypatch.setattr(outputs, "claim_output", claim)
    monkeypatch.setattr("plgk_cli.replay.claim_output", claim)
    assert_one_line_error(replay(base["run"], out=out), OutputError.exit_code,
                          f"{outputs.output_lock(out)}: cannot be written (the file system is read-only)")
    assert_nothing_written(out)


# --------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_files_take_the_umask(base, tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        assert train(base, tmp_path / "run").exit_code == 0
        assert replay(tmp_path / "run", out=tmp_path / "out.h5").exit_code == 0
    finally:
        os.umask(previous)
    files = [*(tmp_path / "run").iterdir(), tmp_path / "out.h5"]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(mode) for p in files}


# --------------------------------------------------------------------------- influences.h5 on open


@pytest.fixture
def h5_copy(base, tmp_path) -> Path:
    return Path(shutil.copy(base["h5"], tmp_path / "copy.h5"))


def flip_bytes(path: Path, offset: int, count: int = 8) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_chunk_is_one_line(h5_copy):
    with h5py.File(h5_copy, "r") as f:
        chunk = f["audit/loss/influence"].id.get_chunk_info(0)
    flip_bytes(h5_copy, chunk.byte_offset + chunk.size // 2)
    for extra in ((), ("--audit", "0"), ("--json",)):
        assert_one_line_error(invoke("inspect", h5_copy, *extra), 15, str(h5_copy),
                              "dataset /audit/loss/influence is damaged", "re-run `plgk replay`")


def test_a_damaged_object_header_is_one_line(h5_copy):
    with h5py.File(h5_copy, "r") as f:
        header = h5py.h5o.get_info(f["audit/loss/residual"].id).addr
    flip_bytes(h5_copy, header, 4)
    assert_one_line_error(invoke("inspect", h5_copy), 15, str(h5_copy), "/audit/loss/residual is damaged",
                          "re-run `plgk replay`")


@pytest.mark.parametrize("node, attribute", [("/", "complete_audit"), ("/", "targets"),
                                             ("audit/loss", "mre"), ("audit/loss/by_layer_epoch", "layers"),
                                             ("audit", "source")])
def test_a_missing_attribute_is_named_on_open(h5_copy, node, attribute):
    with h5py.File(h5_copy, "a") as f:
        del f[node].attrs[attribute]
    line = assert_one_line_error(invoke("inspect", h5_copy), 15, str(h5_copy), f"attribute {attribute}",
                                 "is missing", "re-run `plgk replay`")
    assert node == "/" or f"/{node}" in line


@pytest.mark.parametrize("dataset", ["audit/loss/residual", "train/index", "audit/loss/by_epoch/net"])
def test_a_missing_dataset_is_named_on_open(h5_copy, dataset):
    with h5py.File(h5_copy, "a") as f:
        del f[dataset]
    assert_one_line_error(invoke("inspect", h5_copy), 15, str(h5_copy), f"dataset /{dataset} is missing")


@pytest.mark.parametrize("attribute, value, needle", [
    ("manifest", "{not json", "attribute manifest"), ("targets", '"loss"', "not a list of target names"),
    ("schema_version", "five", "attribute schema_version")])
def test_a_bad_attribute_is_named_on_open(h5_copy, attribute, value, needle):
    with h5py.File(h5_copy, "a") as f:
        f.attrs[attribute] = value
    assert_one_line_error(invoke("inspect", h5_copy), 15, str(h5_copy), needle)


def test_a_dataset_of_the_wrong_kind_is_named_on_open(h5_copy):
    with h5py.File(h5_copy, "a") as f:
        del f["audit/loss/initial"]
        f["audit/loss"].create_group("initial")
    assert_one_line_error(invoke("inspect", h5_copy), 15, "/audit/loss/initial is a group, not a dataset")
