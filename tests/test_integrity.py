"""Checksums on every tensor file (issue 12): fault injection.

A bit flipped inside one tensor's data (not the header) of a step file is caught by `plgk check`
and by `plgk replay` before it writes anything, one line naming the file and the tensor, exit 12;
a bit flipped inside a chunk of an influences.h5 dataset is caught by its reader (InfluenceFile,
`plgk inspect`), one line naming the file and the dataset, exit 15. Step files written before
checksums (no ``checksum`` metadata) still read, with one warning line per run directory.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from plgk_cli import trajectory
from plgk_cli.check import validate_run
from plgk_cli.errors import StoreError, TrajectoryError
from plgk_cli.store import InfluenceFile
from test_cli_errors import (assert_one_line_error, invoke, replay, train_run, write_config,
                             write_npz)

WARNING = "step files carry no checksums (written by an older plgk); corruption cannot be detected"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """test_cli_errors' tiny run (adam, 3 updates), the same with [checkpoint] every = 2 (files
    at steps 0, 2, 3; step 2's file carries step 1's record/*) and a replay of the first."""
    root = tmp_path_factory.mktemp("integrity")
    config = write_config(root / "run.toml", write_npz(root / "data.npz"))
    sparse_config = root / "sparse.toml"
    sparse_config.write_text(config.read_text() + "\n[checkpoint]\nevery = 2\n")
    dense, sparse = train_run(config, root / "dense"), train_run(sparse_config, root / "sparse")
    assert sorted(p.name for p in sparse.glob("step_*")) == \
        [f"step_{t:08d}.safetensors" for t in (0, 2, 3)]
    h5 = root / "influences.h5"
    result = replay(dense, out=h5)
    assert result.exit_code == 0, result.stderr
    return {"dense": dense, "sparse": sparse, "h5": h5}


def copy_run(runs, kind: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(runs[kind], tmp_path / kind))


def step_file(run: Path, step: int) -> Path:
    return run / f"step_{step:08d}.safetensors"


def tensor_names(path: Path) -> list:
    with safe_open(str(path), framework="pt") as f:
        return sorted(f.keys())


def flip_bit(path: Path, tensor: str, bit: int = 3) -> None:
    """Flip one bit in the middle of TENSOR's data bytes, found from the safetensors header (8
    bytes little-endian header length, then JSON with each tensor's data_offsets)."""
    raw = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8:8 + length])[tensor]["data_offsets"]
    assert end > begin, tensor
    raw[8 + length + (begin + end) // 2] ^= 1 << bit
    path.write_bytes(bytes(raw))


def first_param(run: Path) -> str:
    return json.loads((run / "manifest.json").read_text())["parameters"][0]["name"]


def problem_lines(result) -> list:
    assert "Traceback" not in result.output + result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.strip()]


def damaged(runs, tmp_path, kind, tensor):
    """A copy of run KIND with one bit flipped in TENSOR of step 2's file."""
    run = copy_run(runs, kind, tmp_path)
    name = tensor.format(param=first_param(run))
    flip_bit(step_file(run, 2), name)
    return run, step_file(run, 2), name


CASES = [("dense", "param/{param}"), ("dense", "optim/{param}/exp_avg"),
         ("dense", "optim/{param}/exp_avg_sq"), ("dense", "batch"), ("dense", "lr"),
         ("dense", "clip_coef"), ("dense", "loss"), ("dense", "hyper"),
         ("sparse", "record/batch"), ("sparse", "record/scalars"), ("sparse", "record/hyper"),
         ("sparse", "param/{param}")]
IDS = [f"{kind}-{tensor.split('/')[0] if kind == 'dense' else tensor.replace('/{param}', '')}"
       for kind, tensor in CASES]


# --------------------------------------------------------------------------- step files


@pytest.mark.parametrize("kind, tensor", CASES, ids=IDS)
def test_check_names_the_file_and_tensor_of_a_flipped_bit(runs, tmp_path, kind, tensor):
    run, path, name = damaged(runs, tmp_path, kind, tensor)
    result = invoke("check", run)
    lines = problem_lines(result)
    assert result.exit_code == TrajectoryError.exit_code
    assert lines == [f"plgk: problem: {path}: tensor {name} fails its checksum "
                     f"{lines[0].split('fails its checksum ')[1]}", f"{run}: 1 problem"], lines
    assert "the file is corrupt" in lines[0] and "plgk train" in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("kind, tensor", CASES, ids=IDS)
def test_replay_refuses_a_flipped_bit_before_writing_anything(runs, tmp_path, kind, tensor):
    run, path, name = damaged(runs, tmp_path, kind, tensor)
    out = tmp_path / "out" / "influences.h5"
    out.parent.mkdir()
    assert_one_line_error(replay(run, out=out), TrajectoryError.exit_code, str(path),
                          f"tensor {name} fails its checksum")
    assert list(out.parent.iterdir()) == []  # no output, no progress file, no partial file


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_every_tensor_of_every_step_file_is_checked(runs, tmp_path, kind):
    """All tensors, not only the kinds above: rng, fixed, buffer and future ones alike."""
    for step in trajectory.list_steps(runs[kind]):
        for name in tensor_names(step_file(runs[kind], step)):
            run = Path(shutil.copytree(runs[kind], tmp_path / f"{kind}-{step}-{name.replace('/', '_')}"))
            flip_bit(step_file(run, step), name, bit=0)
            messages = [p.message for p in validate_run(run, check_data=False)]
            assert messages == [f"{step_file(run, step)}: tensor {name} fails its checksum "
                                f"{messages[0].split('fails its checksum ')[1]}"], (step, name, messages)


def test_written_files_carry_a_checksum_per_tensor(runs):
    for run in (runs["dense"], runs["sparse"]):
        for step in trajectory.list_steps(run):
            path = step_file(run, step)
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata()
            tensors = load_file(str(path))
            assert metadata["checksum"] == "crc32"
            assert {k for k in metadata if k.startswith("crc32/")} == {f"crc32/{k}" for k in tensors}
            assert trajectory.checksum_metadata(tensors) == {
                k: v for k, v in metadata.items() if k == "checksum" or k.startswith("crc32/")}


def test_fixed_tensors_odd_shapes_and_dtypes_are_checked(tmp_path):
    """read_fixed verifies too; 0-d, empty, bool and bfloat16 tensors have checksums."""
    params = {"scalar": torch.tensor(1.5, dtype=torch.float64), "empty": torch.zeros(0, 3),
              "half": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
              "mask": torch.tensor([True, False, True])}
    fixed = {"bn.running_mean": torch.arange(4.0), "bn.num_batches_tracked": torch.tensor(7)}
    path = trajectory.write_checkpoint(tmp_path, "rid", 0, params, {}, 0, fixed=fixed)
    ck = trajectory.read_checkpoint(tmp_path, 0, "rid")
    assert all(torch.equal(ck.params[k], v) for k, v in params.items())
    assert all(torch.equal(t, fixed[k]) for k, t in trajectory.read_fixed(tmp_path, "rid").items())
    for name, read in (("fixed/bn.num_batches_tracked", lambda: trajectory.read_fixed(tmp_path)),
                       ("param/scalar", lambda: trajectory.read_checkpoint(tmp_path, 0)),
                       ("param/mask", lambda: trajectory.read_checkpoint(tmp_path, 0))):
        original = path.read_bytes()
        flip_bit(path, name, bit=0)
        with pytest.raises(TrajectoryError, match=f"tensor {name} fails its checksum"):
            read()
        path.write_bytes(original)


def rewrite_metadata(path: Path, edit) -> None:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata=edit(metadata))


def test_a_tensor_without_its_checksum_is_refused(runs, tmp_path):
    run = copy_run(runs, "dense", tmp_path)
    rewrite_metadata(step_file(run, 1), lambda m: {k: v for k, v in m.items() if k != "crc32/lr"})
    with pytest.raises(TrajectoryError, match="tensor lr has no checksum"):
        trajectory.read_checkpoint(run, 1)


def test_an_unknown_checksum_kind_is_refused(runs, tmp_path):
    run = copy_run(runs, "dense", tmp_path)
    rewrite_metadata(step_file(run, 1), lambda m: {**m, "checksum": "sha3"})
    with pytest.raises(TrajectoryError, match="checksums of kind 'sha3'.*upgrade plgk"):
        trajectory.read_checkpoint(run, 1)


# --------------------------------------------------------------------------- older runs


def strip_checksums(run: Path) -> Path:
    """What a plgk before checksums wrote: the same tensors and metadata, no checksum keys."""
    for path in run.glob("step_*.safetensors"):
        rewrite_metadata(path, lambda m: {k: v for k, v in m.items()
                                          if k != "checksum" and not k.startswith("crc32/")})
    return run


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_a_run_without_checksums_checks_with_one_warning(runs, tmp_path, kind):
    run = strip_checksums(copy_run(runs, kind, tmp_path))
    result = invoke("check", run)
    assert result.exit_code == 0, result.stderr
    assert problem_lines(result) == [f"plgk: warning: {run}: {WARNING}"]
    assert result.stdout.strip() == f"{run}: ok"


def test_a_run_without_checksums_replays_with_one_warning(runs, tmp_path):
    run = strip_checksums(copy_run(runs, "dense", tmp_path))
    out = tmp_path / "old.h5"
    result = replay(run, out=out)
    assert result.exit_code == 0, result.stderr
    assert problem_lines(result) == [f"plgk: warning: {run}: {WARNING}"]
    with InfluenceFile(out) as fresh, InfluenceFile(runs["h5"]) as reference:
        np.testing.assert_array_equal(fresh.influence(), reference.influence())


def test_reading_an_old_step_file_warns_once(runs, tmp_path, capsys):
    run = strip_checksums(copy_run(runs, "dense", tmp_path))
    for step in trajectory.list_steps(run):
        assert trajectory.read_checkpoint(run, step).step == step
    assert capsys.readouterr().err.splitlines() == [f"plgk: warning: {run}: {WARNING}"]


# --------------------------------------------------------------------------- influences.h5


def flip_chunk_bit(path: Path, dataset: str) -> None:
    """Flip one bit in the middle of DATASET's first chunk (its stored, filtered bytes)."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(0)
    raw = bytearray(path.read_bytes())
    raw[info.byte_offset + info.size // 2] ^= 1 << 3
    path.write_bytes(bytes(raw))


def test_every_dataset_is_checksummed(runs):
    with h5py.File(runs["h5"], "r") as f:
        datasets = []
        f.visititems(lambda name, node: datasets.append(node) if isinstance(node, h5py.Dataset) else None)
        assert datasets and all(d.fletcher32 for d in datasets if d.shape), \
            [d.name for d in datasets if d.shape and not d.fletcher32]


READERS = {"/audit/loss/influence": lambda f: f.influence("loss"),
           "/audit/loss/residual": lambda f: f.array("loss", "residual"),
           "/train/index": lambda f: f.train_index,
           "/audit/label": lambda f: f.audit_label,
           "/replay/update_error": lambda f: f.update_error}


@pytest.mark.parametrize("dataset", sorted(READERS))
def test_reader_names_the_file_and_dataset_of_a_flipped_bit(runs, tmp_path, dataset):
    h5 = Path(shutil.copy(runs["h5"], tmp_path / "influences.h5"))
    flip_chunk_bit(h5, dataset)
    with InfluenceFile(h5) as f:
        with pytest.raises(StoreError) as caught:
            READERS[dataset](f)
    message = str(caught.value)
    assert message.startswith(f"{h5}: dataset {dataset} is damaged") and "\n" not in message
    assert "failed its checksum" in message and "plgk replay" in message


def test_inspect_refuses_a_flipped_bit(runs, tmp_path):
    h5 = Path(shutil.copy(runs["h5"], tmp_path / "influences.h5"))
    flip_chunk_bit(h5, "/audit/loss/influence")
    assert_one_line_error(invoke("inspect", h5), StoreError.exit_code, str(h5),
                          "dataset /audit/loss/influence is damaged")
