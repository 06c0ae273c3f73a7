"""The CLI's error contract: bad input gets ONE clear line on stderr ("plgk: error: ..." naming the
file, key or value and how to fix it), the PlgkError subclass's non-zero exit code, never a
traceback, and nothing already written is lost.

One tiny run (20 train / 8 test examples, 6 features, 3 classes, mlp hidden 4, adam, 1 epoch of
batch 8 = 3 updates, float64 on cpu) is trained once per module through the CLI; each test that
damages it works on its own copy.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from plgk_cli.cli import main
from plgk_cli.progress import progress_path
from plgk_cli.trajectory import write_manifest
from plgk_cli.errors import (AuditSpecError, ConfigError, DataError, OutputError, StoreError,
                             TrajectoryError)

# click < 8.2 mixes stderr into output unless told not to; 8.2+ always keeps result.stderr apart.
if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:
    def make_runner() -> CliRunner:
        return CliRunner(mix_stderr=False)
else:
    def make_runner() -> CliRunner:
        return CliRunner()


CONFIG = """\
[data]
dataset = "npz:{npz}"
seed = 0

[model]
name = "mlp"
kwargs = {{ hidden = 4 }}

[optim]
name = "adam"
lr = 0.01

[train]
epochs = 1
batch_size = 8
seed = 0
device = "cpu"
dtype = "float64"
"""


def invoke(*args):
    return make_runner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, exit_code: int, *needles: str) -> str:
    """Exit code, exactly one non-empty 'plgk: error:' line on stderr naming every needle,
    no traceback anywhere. Returns the line."""
    assert "Traceback" not in result.output, result.output
    assert "Traceback" not in result.stderr, result.stderr
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == exit_code != 0, (result.exit_code, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("plgk: error: "), line
    for needle in needles:
        assert str(needle) in line, (needle, line)
    return line


def write_npz(path: Path, seed: int = 0, n_train: int = 20, n_test: int = 8) -> Path:
    rng = np.random.default_rng(seed)
    y_train = np.arange(n_train) % 3  # every class present in both splits
    y_test = np.arange(n_test) % 3
    np.savez(path, x_train=rng.normal(size=(n_train, 6)), y_train=y_train.astype(np.int64),
             x_test=rng.normal(size=(n_test, 6)), y_test=y_test.astype(np.int64))
    return path


def write_config(path: Path, npz: Path) -> Path:
    path.write_text(CONFIG.format(npz=npz))
    return path


def train_run(config: Path, out: Path) -> Path:
    result = invoke("train", "--config", config, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    npz = write_npz(root / "data.npz")
    config = write_config(root / "run.toml", npz)
    run = train_run(config, root / "run")
    other = train_run(config, root / "other")  # same config, another run_id
    h5 = root / "influences.h5"
    result = invoke("replay", "--ckpts", run, "--audit-set", "test[:4]", "--out", h5, "--quiet")
    assert result.exit_code == 0, result.output
    return {"root": root, "npz": npz, "config": config, "run": run, "other": other, "h5": h5}


@pytest.fixture
def run_copy(base, tmp_path) -> Path:
    return Path(shutil.copytree(base["run"], tmp_path / "run"))


def replay(run, *extra, audit_set="test[:4]", out=None):
    return invoke("replay", "--ckpts", run, "--audit-set", audit_set, "--out", out, "--quiet", *extra)


def crash_after_first_commit(run, out: Path, monkeypatch) -> Path:
    """Replay ``run`` into ``out`` with a crash (PLGK_FAULT) right after its first progress commit,
    then clear the fault: the progress file is left, the output is not. Returns the progress file."""
    monkeypatch.setenv("PLGK_FAULT", "after_commit:1:CRASH")
    monkeypatch.setenv("PLGK_FAULT_COUNT", "0")
    crashed = replay(run, "--commit-every", "1", out=out)
    assert isinstance(crashed.exception, RuntimeError), crashed.output
    monkeypatch.delenv("PLGK_FAULT")
    assert progress_path(out).is_file() and not out.exists()
    return progress_path(out)


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out.h5"


def assert_nothing_written(out: Path):
    assert not out.exists()
    assert not list(out.parent.glob(out.name + ".*"))  # no .partial.<pid>, no .progress


# --------------------------------------------------------------------------- happy path


def test_replay_then_inspect(base, out):
    result = replay(base["run"], "--target", "loss,margin", out=out)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stdout and out.is_file()

    result = invoke("inspect", out)
    assert result.exit_code == 0, result.output
    assert "MRE" in result.stdout and "loss" in result.stdout and "margin" in result.stdout

    result = invoke("inspect", out, "--audit", 0, "--top", 3)
    assert result.exit_code == 0, result.output
    assert "most helpful" in result.stdout and "most harmful" in result.stdout

    result = invoke("inspect", out, "--json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert {"file", "schema_version", "rule", "optimizer", "run", "audit_set", "complete_audit",
            "group_by", "targets"} <= s.keys()
    assert set(s["targets"]) == {"loss", "margin"}
    assert s["targets"]["loss"]["influence_shape"] == [20, 4]
    assert {"mre", "lc", "rmre", "max_update_error", "attribution_gap", "residual_share",
            "mean_true_change"} <= s["targets"]["loss"].keys()
    assert s["run"]["steps"] == 3

    result = invoke("inspect", out, "--audit", 0, "--top", 3, "--json")
    assert result.exit_code == 0, result.output
    t = json.loads(result.stdout)
    assert {"target", "class", "audit", "audit_index", "audit_label", "initial", "final", "helpful",
            "harmful"} <= t.keys()
    assert len(t["helpful"]) == 3 and len(t["harmful"]) == 3
    assert {"rank", "train_index", "label", "influence"} <= t["helpful"][0].keys()


# --------------------------------------------------------------------------- damaged trajectories


def test_missing_checkpoint_gap(run_copy, out):
    (run_copy / "step_00000002.safetensors").unlink()
    line = assert_one_line_error(replay(run_copy, out=out), TrajectoryError.exit_code,
                                 "step_00000002.safetensors", "gap")
    assert "between steps 1 and 3" in line and "re-run `plgk train`" in line
    assert_nothing_written(out)


def test_truncated_checkpoint(run_copy, out):
    path = run_copy / "step_00000002.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_error(replay(run_copy, out=out), TrajectoryError.exit_code,
                          "step_00000002.safetensors", "truncated or corrupt")
    assert_nothing_written(out)


@pytest.mark.parametrize("where", [range(8, 24), range(0, 8)], ids=["json", "length"])
def test_flipped_header_bytes(run_copy, out, where):
    """Bytes flipped in the JSON header, or in the 8-byte header length before it."""
    path = run_copy / "step_00000001.safetensors"
    data = bytearray(path.read_bytes())
    for i in where:
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    assert_one_line_error(replay(run_copy, out=out), TrajectoryError.exit_code,
                          "step_00000001.safetensors", "corrupt")
    assert_nothing_written(out)


def test_checkpoint_from_another_run(base, run_copy, out):
    shutil.copy(base["other"] / "step_00000002.safetensors", run_copy / "step_00000002.safetensors")
    run_id = json.loads((run_copy / "manifest.json").read_text())["run_id"]
    line = assert_one_line_error(replay(run_copy, out=out), TrajectoryError.exit_code,
                                 "step_00000002.safetensors", run_id)
    assert "mixed" in line
    assert_nothing_written(out)


def test_failing_replay_keeps_existing_output(base, run_copy, out):
    """--overwrite does not remove the old file when the replay itself fails."""
    shutil.copy(base["h5"], out)
    before = out.read_bytes()
    (run_copy / "step_00000002.safetensors").unlink()
    assert_one_line_error(replay(run_copy, "--overwrite", out=out), TrajectoryError.exit_code,
                          "step_00000002.safetensors")
    assert out.read_bytes() == before


def test_dataset_changed_after_training(base, tmp_path, out):
    npz = write_npz(tmp_path / "data.npz")
    run = train_run(write_config(tmp_path / "run.toml", npz), tmp_path / "run")
    with np.load(npz) as f:
        arrays = dict(f)
    arrays["x_train"][0, 0] += 1.0
    np.savez(npz, **arrays)
    line = assert_one_line_error(replay(run, out=out), DataError.exit_code, str(npz),
                                 "fingerprint")
    assert "restore" in line
    assert_nothing_written(out)


def _drop_key(path: Path, key: str):
    """A manifest without ``key``, checksummed as plgk writes it: the missing key is what is caught."""
    manifest = json.loads(path.read_text())
    del manifest[key]
    write_manifest(path.parent, manifest)


@pytest.mark.parametrize("damage, needles", [
    ("manifest", ("manifest.json", "manifest missing")),
    ("run_dir", ("run directory not found",)),
    ("not_json", ("manifest.json", "manifest unreadable", "re-run `plgk train`")),
    ("json_list", ("manifest.json", "not a JSON object")),
    ("no_dataset", ("manifest.json", "manifest lacks dataset")),
])
def test_not_a_run_directory(base, tmp_path, out, damage, needles):
    run = Path(shutil.copytree(base["run"], tmp_path / "run"))
    manifest = run / "manifest.json"
    if damage == "manifest":
        manifest.unlink()
    elif damage == "run_dir":
        shutil.rmtree(run)
    elif damage == "not_json":
        manifest.write_text("{not json")
    elif damage == "json_list":
        manifest.write_text("[1, 2]")
    else:
        _drop_key(manifest, "dataset")
    assert_one_line_error(replay(run, out=out), TrajectoryError.exit_code, str(run), *needles)
    assert_nothing_written(out)


# --------------------------------------------------------------------------- replay arguments


@pytest.mark.parametrize("spec, needles", [
    ("test[0:999]", ("test[0:999]", "out of range", "8 examples")),
    ("test[3:3]", ("test[3:3]", "selects no examples", "START < STOP")),
    ("test[-99:]", ("test[-99:]", "out of range")),
    ("valid[0:4]", ("valid[0:4]", "SPLIT[START:STOP]")),
])
def test_bad_audit_slice(base, out, spec, needles):
    assert_one_line_error(replay(base["run"], audit_set=spec, out=out), AuditSpecError.exit_code,
                          "--audit-set", *needles)
    assert_nothing_written(out)


@pytest.mark.parametrize("extra, needles", [
    (("--target", "gradnorm"), ("--target", "'gradnorm'", "loss, logit, margin, logits")),
    (("--rule", "simpson"), ("--rule", "'simpson'", "supersample:K")),
    (("--rule", "supersample:0"), ("--rule", "'supersample:0'", "in 1..4096")),
    (("--rule", "supersample:100000000"), ("--rule", "'supersample:100000000'", "in 1..4096")),
    (("--rule", "supersample:" + "9" * 5000), ("--rule", "in 1..4096")),
    (("--stride", "0"), ("--stride", ">= 1", "0")),
    (("--chunk-size", "0"), ("--chunk-size", "in 1..")),
    (("--commit-seconds", "nan"), ("--commit-seconds", "finite", "nan")),
    (("--commit-seconds", "inf"), ("--commit-seconds", "finite", "inf")),
    (("--memory-budget", "-1"), ("--memory-budget", ">= 0")),
    (("--accept-update-error", "nan"), ("--accept-update-error", "finite")),
    (("--threads", "100000"), ("--threads", "100000", "CPUs")),
    (("--threads", "0"), ("--threads", ">= 1", "0")),
    (("--train-subset", "0:99"), ("--train-subset", "'0:99'", "out of range")),
    (("--ghost",), ("--ghost", "--rule euler", "--stride 1")),
])
def test_bad_replay_option(base, out, extra, needles):
    assert_one_line_error(replay(base["run"], *extra, out=out), AuditSpecError.exit_code, *needles)
    assert_nothing_written(out)


@pytest.mark.parametrize("arrays, needles", [
    (lambda rng: dict(x=rng.normal(size=(4, 5)), y=np.zeros(4, np.int64)),
     ("x has shape (4, 5)", "expected x (N, 6)")),
    (lambda rng: dict(x=rng.normal(size=(4, 6)), y=np.array([0, 1, 2, 3])),
     ("labels must be integers in 0..2",)),
    (lambda rng: dict(x=rng.normal(size=(4, 6))), ("needs arrays x and y",)),
    (None, ("not an .npz archive", "numpy.savez")),
])
def test_bad_audit_npz(base, tmp_path, out, arrays, needles):
    path = tmp_path / "audit.npz"
    if arrays is None:
        path.write_text("not an npz\n")
    else:
        np.savez(path, **arrays(np.random.default_rng(0)))
    assert_one_line_error(replay(base["run"], audit_set=path, out=out), AuditSpecError.exit_code,
                          "--audit-set", str(path), *needles)
    assert_nothing_written(out)


def test_existing_out_not_overwritten(base, out):
    out.write_text("precious\n")
    assert_one_line_error(replay(base["run"], out=out), OutputError.exit_code, str(out),
                          "--overwrite")
    assert out.read_text() == "precious\n"


def test_out_is_a_directory(base, tmp_path):
    """Refused up front, not after the whole replay (even with --overwrite)."""
    target = tmp_path / "results"
    target.mkdir()
    (target / "keep.txt").write_text("keep me\n")
    assert_one_line_error(replay(base["run"], "--overwrite", out=target), OutputError.exit_code,
                          str(target), "is a directory")
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


# --------------------------------------------------------------------------- inspect


def test_inspect_text_file(tmp_path):
    path = tmp_path / "x.h5"
    path.write_text("this is not hdf5\n")
    assert_one_line_error(invoke("inspect", path), StoreError.exit_code, str(path),
                          "not a readable HDF5 file")
    assert path.read_text() == "this is not hdf5\n"


def test_inspect_missing_file(tmp_path):
    path = tmp_path / "nope.h5"
    assert_one_line_error(invoke("inspect", path), StoreError.exit_code, str(path), "not found")


@pytest.mark.parametrize("audit", [4, -1, 999])
def test_inspect_audit_out_of_range(base, audit):
    assert_one_line_error(invoke("inspect", base["h5"], "--audit", audit), AuditSpecError.exit_code,
                          "--audit", str(audit), "0..3")


@pytest.mark.parametrize("top", [0, -1])
def test_inspect_top_not_positive(base, top):
    assert_one_line_error(invoke("inspect", base["h5"], "--audit", 0, "--top", top),
                          AuditSpecError.exit_code, "--top", ">= 1", str(top))


def test_inspect_truncated_h5(base, tmp_path):
    path = tmp_path / "cut.h5"
    data = base["h5"].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    result = invoke("inspect", path)
    # the needles must not be found in the path itself (this test's folder is named "truncated")
    assert_one_line_error(result, StoreError.exit_code, str(path), "not a readable HDF5 file", "truncated file")
    assert "another process" not in result.output


def test_inspect_unknown_target(base):
    assert_one_line_error(invoke("inspect", base["h5"], "--audit", 0, "--target", "margin"),
                          StoreError.exit_code, "'margin'", "loss")


# --------------------------------------------------------------------------- config / train


@pytest.mark.parametrize("edit, needles", [
    (lambda c: c.replace("lr = 0.01", "lr = 0.01\nlearning_rate = 0.1"),
     ("[optim] learning_rate", "unknown key", "lr")),
    (lambda c: c + "\n[trainer]\nepochs = 2\n", ("unknown section [trainer]", "[train]")),
    (lambda c: c.replace("lr = 0.01", "lr = -0.01"), ("[optim] lr", "> 0", "-0.01")),
    (lambda c: c.replace("epochs = 1", 'epochs = "3"'),
     ("[train] epochs", "expected an integer", "'3'")),
    (lambda c: c.replace("epochs = 1", "epochs = = 1"), ("not valid TOML", "line")),
    (lambda c: c.replace('device = "cpu"', 'device = "tpu"'), ("[train] device", "'tpu'", "cpu")),
    (lambda c: c.encode("utf-16"), ("not a UTF-8 text file",)),
])
def test_bad_config(base, tmp_path, edit, needles):
    config = tmp_path / "bad.toml"
    text = edit(base["config"].read_text())
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "run"
    assert_one_line_error(invoke("train", "--config", config, "--out", out, "--quiet"),
                          ConfigError.exit_code, str(config), *needles)
    assert not out.exists()


def test_missing_config(tmp_path):
    config = tmp_path / "missing.toml"
    out = tmp_path / "run"
    assert_one_line_error(invoke("train", "--config", config, "--out", out, "--quiet"),
                          ConfigError.exit_code, str(config), "config file not found")
    assert not out.exists()


@pytest.mark.parametrize("edit, needles", [
    (lambda c: c.replace("hidden = 4", "hiden = 4"), ("[model] kwargs", "'hiden'")),
    (lambda c: c.replace("hidden = 4", "hidden = -4"), ("[model] kwargs", "'hidden': -4")),
])
def test_bad_model_kwargs(base, tmp_path, edit, needles):
    config = tmp_path / "bad.toml"
    config.write_text(edit(base["config"].read_text()))
    out = tmp_path / "run"
    assert_one_line_error(invoke("train", "--config", config, "--out", out, "--quiet"),
                          ConfigError.exit_code, *needles)
    assert not out.exists()


def test_missing_dataset(base, tmp_path):
    config = tmp_path / "run.toml"
    missing = tmp_path / "missing.npz"
    write_config(config, missing)
    out = tmp_path / "run"
    assert_one_line_error(invoke("train", "--config", config, "--out", out, "--quiet"),
                          DataError.exit_code, str(missing), "file not found")
    assert not out.exists()


def test_missing_svhn_files_say_where_to_put_them(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'[data]\ndataset = "svhn:{tmp_path / "svhn"}"\n')
    out = tmp_path / "run"
    assert_one_line_error(invoke("train", "--config", config, "--out", out, "--quiet"),
                          DataError.exit_code, str(tmp_path / "svhn"), "train_32x32.mat not found",
                          "http://ufldl.stanford.edu/housenumbers/")
    assert not out.exists()


def test_train_into_non_empty_directory(base, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    line = assert_one_line_error(invoke("train", "--config", base["config"], "--out", out, "--quiet"),
                                 OutputError.exit_code, str(out), "not empty")
    assert "--overwrite" not in line  # it would refuse this directory too: not a fix to offer
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me\n"


def snapshot(directory: Path) -> dict:
    """Every file under ``directory`` by relative path, with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
            for p in sorted(directory.rglob("*"))}


def test_train_over_existing_run_keeps_it(base, run_copy):
    before = snapshot(run_copy)
    assert_one_line_error(invoke("train", "--config", base["config"], "--out", run_copy, "--quiet"),
                          OutputError.exit_code, str(run_copy), "not empty", "pass --overwrite")
    assert snapshot(run_copy) == before


def test_train_overwrite_replaces_the_run(base, run_copy):
    old_id = json.loads((run_copy / "manifest.json").read_text())["run_id"]
    result = invoke("train", "--config", base["config"], "--out", run_copy, "--quiet", "--overwrite")
    assert result.exit_code == 0, result.output
    manifest = json.loads((run_copy / "manifest.json").read_text())
    assert manifest["run_id"] != old_id and manifest["complete"]
    assert sorted(p.name for p in run_copy.iterdir()) == sorted(p.name for p in base["run"].iterdir())
    assert sorted(p.name for p in run_copy.parent.iterdir()) == ["run"]  # no staging, no old copy left
    assert invoke("check", run_copy).exit_code == 0


def test_train_overwrite_refuses_an_unfinished_run_written_to_just_now(base, run_copy):
    """Nothing locks a run directory: an unfinished run written to a moment ago may be training."""
    manifest_path = run_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "complete": False}))
    before = {p.name: p.read_bytes() for p in run_copy.iterdir()}
    result = invoke("train", "--config", base["config"], "--out", run_copy, "--quiet", "--overwrite")
    assert_one_line_error(result, OutputError.exit_code, str(run_copy), "may still be training", "--resume")
    assert {p.name: p.read_bytes() for p in run_copy.iterdir()} == before
    an_hour_ago = time.time() - 3600
    for p in run_copy.iterdir():
        os.utime(p, (an_hour_ago, an_hour_ago))
    result = invoke("train", "--config", base["config"], "--out", run_copy, "--quiet", "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads(manifest_path.read_text())["complete"]


def first_row_only(in_shape, num_classes):
    """A model whose output has one row whatever the batch: `plgk train` refuses it at the first
    update, after the run directory has been started."""
    import torch

    class FirstRow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(in_shape[0], num_classes)

        def forward(self, x):
            return self.linear(x)[:1]

    return FirstRow()


@pytest.mark.parametrize("edit, needles", [
    # refused when the config is read
    (lambda t: t.replace('name = "mlp"', 'name = "nosuch"'), ["nosuch"]),
    # read, refused when the optimizer is built
    (lambda t: t + '\n[[optim.groups]]\nparams = "nothing.*"\nlr = 0.1\n', ["[[optim.groups]]", "matches no"]),
    # refused at the first update, after the new run was started beside the old one
    (lambda t: t.replace('name = "mlp"\nkwargs = { hidden = 4 }', 'name = "test_cli_errors:first_row_only"'),
     ["one row per example"]),
], ids=["unknown-model", "group-matches-nothing", "model-output-one-row"])
def test_train_overwrite_with_a_bad_config_keeps_the_old_run(base, run_copy, tmp_path, edit, needles):
    config = tmp_path / "bad.toml"
    config.write_text(edit(base["config"].read_text()))
    before = snapshot(run_copy)
    assert_one_line_error(invoke("train", "--config", config, "--out", run_copy, "--quiet", "--overwrite"),
                          ConfigError.exit_code, *needles)
    assert snapshot(run_copy) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml", "run"]  # the new run is gone


def _unrelated(directory: Path) -> None:
    directory.mkdir()
    (directory / "notes.txt").write_text("keep me\n")


def _run_with_a_file_of_mine(directory: Path, base) -> None:
    shutil.copytree(base["run"], directory)
    (directory / "results.csv").write_text("mine\n")


def _run_with_a_folder(directory: Path, base) -> None:
    shutil.copytree(base["run"], directory)
    (directory / "plots").mkdir()
    (directory / "plots" / "a.png").write_bytes(b"png")


def _other_manifest(directory: Path) -> None:
    directory.mkdir()
    (directory / "manifest.json").write_text('{"name": "my-web-app"}')


@pytest.mark.parametrize("make, needles", [
    (lambda d, base: _unrelated(d), ["'notes.txt'", "not a file of a plgk run"]),
    (_run_with_a_file_of_mine, ["'results.csv'", "not a file of a plgk run"]),
    (_run_with_a_folder, ["'plots'", "not a file of a plgk run"]),
    (lambda d, base: _other_manifest(d), ["manifest.json", "may not be a plgk run directory"]),
], ids=["unrelated-folder", "run-plus-a-file", "run-plus-a-folder", "other-manifest"])
def test_train_overwrite_refuses_what_is_not_only_a_run(base, tmp_path, make, needles):
    out = tmp_path / "out"
    make(out, base)
    before = snapshot(out)
    assert_one_line_error(invoke("train", "--config", base["config"], "--out", out, "--quiet", "--overwrite"),
                          OutputError.exit_code, str(out), *needles)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_train_overwrite_with_resume_is_refused(base, run_copy):
    before = snapshot(run_copy)
    assert_one_line_error(invoke("train", "--config", base["config"], "--out", run_copy, "--quiet",
                                 "--overwrite", "--resume"),
                          ConfigError.exit_code, "--overwrite and --resume")
    assert snapshot(run_copy) == before


def test_train_overwrite_onto_a_new_or_empty_directory(base, tmp_path):
    """Nothing to replace: --overwrite trains into it as without."""
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        result = invoke("train", "--config", base["config"], "--out", out, "--quiet", "--overwrite")
        assert result.exit_code == 0, result.output
        assert json.loads((out / "manifest.json").read_text())["complete"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]


def test_dataset_not_an_npz(tmp_path):
    npz = tmp_path / "data.npz"
    npz.write_text("x_train,y_train\n")
    config = write_config(tmp_path / "run.toml", npz)
    out = tmp_path / "run"
    assert_one_line_error(invoke("train", "--config", config, "--out", out, "--quiet"),
                          DataError.exit_code, str(npz), "not an .npz archive")
    assert not out.exists()


def test_threads_option_sets_torch_threads(base, tmp_path):
    """--threads N is passed to torch; 0 is refused in one line before anything is written."""
    import torch

    before = torch.get_num_threads()
    try:
        result = invoke("train", "--config", base["config"], "--out", tmp_path / "run", "--quiet",
                        "--threads", "1")
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert_one_line_error(invoke("train", "--config", base["config"], "--out", tmp_path / "other",
                                 "--quiet", "--threads", "0"),
                          ConfigError.exit_code, "--threads", ">= 1")
    assert not (tmp_path / "other").exists()
