"""The fuzz suite of issue 17, in-process: every bad input plgk is known to meet, each held to the
error contract by tests/fuzz.py's `run_case` (one line naming the file, key, option or value; the
error class's exit code; no traceback; nothing written before changed), plus hypothesis over the
specs and config values users type. The signals, races and kills are in tests/test_fuzz_faults.py.
docs/bad-inputs.md is written from these cases by scripts/bad_inputs_page.py.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tomllib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, safe_open, save_file

from fuzz import Case, assert_documented_outcome, build_shared, interrupted_progress, run_case
from plgk_cli.trajectory import checksum_metadata, write_manifest
from test_cli_errors import invoke

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "bad-inputs.md"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return build_shared(tmp_path_factory.mktemp("fuzz"))


# --------------------------------------------------------------------------- helpers to build cases

TRAIN = ("train", "--config", "{config}", "--out", "{outdir}", "--quiet")
REPLAY = ("replay", "--ckpts", "{run}", "--audit-set", "test[:4]", "--out", "{out}", "--quiet")


def section(name: str, body: str):
    """An edit of the config text: [name]'s body replaced by ``body`` (added if absent)."""
    def edit(text: str) -> str:
        pattern = re.compile(rf"^\[{re.escape(name)}\]\n(?:[^\n\[][^\n]*\n?)*", re.M)
        block = f"[{name}]\n{body}\n\n"
        return pattern.sub(lambda m: block, text, count=1) if pattern.search(text) else text + "\n" + block
    return edit


def sub(old: str, new: str):
    def edit(text: str) -> str:
        assert old in text, old
        return text.replace(old, new)
    return edit


def append(extra: str):
    return lambda text: text + "\n" + extra + "\n"


def config_case(id, what, edit, needles, exit=10, group="plgk train: config", **kw):
    return Case(id, group, what, TRAIN, exit, tuple(needles), setup=lambda s: s.config(edit), **kw)


def data_case(id, what, arrays, needles, exit=11, group="plgk train: data", edit=None, **kw):
    """Train on an .npz of the shared arrays changed by ``arrays(base) -> dict`` (None: left out)."""
    def setup(s):
        npz = s.npz("bad.npz", **arrays(s.arrays()))
        s.config(edit, npz=npz)
    return Case(id, group, what, TRAIN, exit, ("{tmp}/bad.npz", *needles), setup=setup, **kw)


def replay_case(id, what, extra, needles, exit=13, group="plgk replay: options", audit_set="test[:4]",
                setup=None, run="run", **kw):
    argv = ("replay", "--ckpts", "{%s}" % run, "--audit-set", audit_set, "--out", "{out}", "--quiet", *extra)
    return Case(id, group, what, argv, exit, tuple(needles), setup=setup, **kw)


def audit_npz_case(id, what, arrays, needles, exit=13, group="plgk replay: audit set", **kw):
    def setup(s):
        np.savez(s.tmp / "audit.npz", **arrays(s.arrays()))
    return replay_case(id, what, (), ("--audit-set", "{tmp}/audit.npz", *needles), exit, group,
                       audit_set="{tmp}/audit.npz", setup=setup, **kw)


def subset_file_case(id, what, name, content, needles):
    def setup(s):
        if isinstance(content, np.ndarray):
            np.save(s.tmp / name, content)
        else:
            s.write(name, content)
    return replay_case(id, what, ("--train-subset", "{tmp}/" + name), ("--train-subset", *needles),
                       group="plgk replay: train subset", setup=setup)


def step(run: Path, t: int) -> Path:
    return run / f"step_{t:08d}.safetensors"


def rewrite_step(path: Path, edit) -> None:
    """Re-save a step file with ``edit`` applied to its tensors and fresh checksums: damage the
    writer itself could have written, caught by the check under test, not by the checksum."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={**metadata, **checksum_metadata(tensors)})


def run_damage_case(id, what, damage, needles, exit=12, group="plgk replay: the run directory", **kw):
    """Replay of a copy of the shared run damaged by ``damage(run, scratch)``."""
    def setup(s):
        damage(s.copy_run(), s)
    return Case(id, group, what, REPLAY, exit, tuple(needles), setup=setup, **kw)


def check_case(id, what, damage, needles, exit=12, **kw):
    def setup(s):
        damage(s.copy_run(), s)
    return Case(id, "plgk check", what, ("check", "{run}"), exit, tuple(needles), setup=setup, **kw)


def manifest_edit(edit, rewrite=True):
    """Damage: the manifest changed by ``edit(dict)``; ``rewrite``: written with write_manifest,
    which recomputes its checksum (a schema check must catch it), else by hand."""
    def damage(run, s):
        path = run / "manifest.json"
        manifest = json.loads(path.read_text())
        edit(manifest)
        if rewrite:
            write_manifest(run, manifest)
        else:
            path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return damage


def setitem(*keys_value):
    *keys, value = keys_value

    def edit(d):
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return edit


def delitem(*keys):
    def edit(d):
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]
    return edit


def flip(path: Path, where: slice) -> None:
    data = bytearray(path.read_bytes())
    for i in range(*where.indices(len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def tensor_data_offset(path: Path) -> int:
    """Where a safetensors file's tensor bytes start (after the 8-byte length and the header)."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def inspect_case(id, what, damage, needles, exit=15, extra=(), **kw):
    """inspect of a copy of the shared influences.h5 damaged by ``damage(path)``."""
    def setup(s):
        path = s.copy("h5", "damaged.h5")
        damage(path)
    return Case(id, "plgk inspect", what, ("inspect", "{h5}", *extra), exit, ("{h5}", *needles), setup=setup, **kw)


def h5_edit(edit):
    def damage(path):
        with h5py.File(path, "a") as f:
            edit(f)
    return damage


def influence_chunk_offset(path: Path) -> int:
    with h5py.File(path, "r") as f:
        ds = f["audit/loss/influence"]
        offset = ds.id.get_offset()
        if offset is None:  # chunked
            offset = ds.id.get_chunk_info(0).byte_offset
    return offset


def raise_oserror(code: int):
    def failing(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return failing


def fail_write(target: str, code: int):
    """Fault: ``module.attribute`` (a write call) raises OSError(code)."""
    module, _, attribute = target.rpartition(".")

    def fault(mp, s):
        mp.setattr(f"{module}.{attribute}", raise_oserror(code))
    return fault


# --------------------------------------------------------------------------- plgk train: config

CONFIG_CASES = [
    config_case("config-unknown-section", "a misspelt section (`[trainer]`)", append("[trainer]\nepochs = 2"),
                ["{config}", "[trainer]"]),
    config_case("config-unknown-key-optim", "a misspelt key (`[optim] learning_rate`)",
                sub("lr = 0.01", "lr = 0.01\nlearning_rate = 0.1"), ["{config}", "learning_rate"]),
    config_case("config-unknown-key-train", "`[train] epoch` for epochs", sub("epochs = 1", "epoch = 1"),
                ["{config}", "epoch"]),
    config_case("config-unknown-key-data", "`[data] path`", sub("seed = 0\n\n[model]", "seed = 0\npath = 'x'\n\n[model]"),
                ["{config}", "path"]),
    config_case("config-unknown-key-model", "`[model] kwarg` for kwargs", sub("kwargs =", "kwarg ="),
                ["{config}", "kwarg"]),
    config_case("config-unknown-key-checkpoint", "`[checkpoint] interval`", section("checkpoint", "interval = 2"),
                ["{config}", "interval"]),
    config_case("config-unknown-key-schedule", "`[schedule] warmup`", section("schedule", "warmup = 2"),
                ["{config}", "warmup"]),
    config_case("config-unknown-key-task", "`[task] kind`", section("task", 'kind = "classification"'),
                ["{config}", "kind"]),
    config_case("config-section-not-a-table", "a section given as a value (`task = 3` at the top)",
                lambda t: "task = 3\n" + t, ["{config}", "task"]),
    config_case("config-top-level-key", "a key outside any section (`lr = 0.1` at the top)",
                lambda t: "lr = 0.1\n" + t, ["{config}", "lr"]),
    config_case("config-invalid-toml", "invalid TOML (`epochs = = 1`)", sub("epochs = 1", "epochs = = 1"),
                ["{config}", "TOML"]),
    config_case("config-duplicate-key", "a key given twice", sub("epochs = 1", "epochs = 1\nepochs = 2"),
                ["{config}", "TOML"]),
    config_case("config-utf16", "the config saved as UTF-16", lambda t: t.encode("utf-16"), ["{config}", "UTF-8"]),
    config_case("config-binary", "a binary file as the config", lambda t: bytes(range(256)) * 4, ["{config}"]),
    Case("config-missing", "plgk train: config", "the config file does not exist",
         ("train", "--config", "{tmp}/missing.toml", "--out", "{outdir}", "--quiet"), 10,
         ("{tmp}/missing.toml", "not found")),
    config_case("optim-lr-zero", "`lr = 0`", sub("lr = 0.01", "lr = 0"), ["[optim] lr", "0"]),
    config_case("optim-lr-negative", "`lr = -0.01`", sub("lr = 0.01", "lr = -0.01"), ["[optim] lr", "-0.01"]),
    config_case("optim-lr-string", '`lr = "0.01"` (a string)', sub("lr = 0.01", 'lr = "0.01"'), ["[optim] lr", "'0.01'"]),
    config_case("optim-lr-bool", "`lr = true` (a boolean)", sub("lr = 0.01", "lr = true"), ["[optim] lr", "True"]),
    config_case("optim-lr-array", "`lr = [0.1]` (an array)", sub("lr = 0.01", "lr = [0.1]"), ["[optim] lr"]),
    config_case("optim-name-unknown", '`[optim] name = "lbfgs"`', sub('name = "adam"', 'name = "lbfgs"'),
                ["[optim] name", "'lbfgs'"]),
    config_case("optim-name-number", "`[optim] name = 3`", sub('name = "adam"', "name = 3"), ["[optim] name"]),
    config_case("optim-momentum-one", "SGD `momentum = 1.0` (the top of [0, 1))",
                section("optim", 'name = "sgd"\nlr = 0.1\nmomentum = 1.0'), ["[optim] momentum", "1.0"]),
    config_case("optim-momentum-negative", "SGD `momentum = -0.1`",
                section("optim", 'name = "sgd"\nlr = 0.1\nmomentum = -0.1'), ["[optim] momentum", "-0.1"]),
    config_case("optim-dampening-one", "SGD `dampening = 1`",
                section("optim", 'name = "sgd"\nlr = 0.1\nmomentum = 0.5\ndampening = 1'), ["[optim] dampening"]),
    config_case("optim-alpha-above-one", "RMSprop `alpha = 1.5`",
                section("optim", 'name = "rmsprop"\nlr = 0.01\nalpha = 1.5'), ["[optim] alpha", "1.5"]),
    config_case("optim-betas-one-value", "`betas = [0.9]`", sub("lr = 0.01", "lr = 0.01\nbetas = [0.9]"),
                ["[optim] betas"]),
    config_case("optim-beta2-one", "`betas = [0.9, 1.0]`", sub("lr = 0.01", "lr = 0.01\nbetas = [0.9, 1.0]"),
                ["[optim] betas", "1.0"]),
    config_case("optim-betas-string", '`betas = "0.9,0.999"`', sub("lr = 0.01", 'lr = 0.01\nbetas = "0.9,0.999"'),
                ["[optim] betas"]),
    config_case("optim-eps-zero", "`eps = 0`", sub("lr = 0.01", "lr = 0.01\neps = 0"), ["[optim] eps"]),
    config_case("optim-weight-decay-negative", "`weight_decay = -1`", sub("lr = 0.01", "lr = 0.01\nweight_decay = -1"),
                ["[optim] weight_decay", "-1"]),
    config_case("optim-clip-zero", "`clip_grad_norm = 0`", sub("lr = 0.01", "lr = 0.01\nclip_grad_norm = 0"),
                ["[optim] clip_grad_norm"]),
    config_case("optim-nesterov-string", 'SGD `nesterov = "yes"`',
                section("optim", 'name = "sgd"\nlr = 0.1\nmomentum = 0.9\nnesterov = "yes"'), ["[optim] nesterov", "'yes'"]),
    config_case("optim-nesterov-adam", "`nesterov = true` with adam", sub("lr = 0.01", "lr = 0.01\nnesterov = true"),
                ["nesterov"]),
    config_case("optim-nesterov-no-momentum", "SGD `nesterov = true` with momentum 0",
                section("optim", 'name = "sgd"\nlr = 0.1\nnesterov = true'), ["nesterov", "momentum"]),
    config_case("optim-amsgrad-sgd", "`amsgrad` with sgd (not an SGD key)",
                section("optim", 'name = "sgd"\nlr = 0.1\namsgrad = true'), ["amsgrad", "sgd"]),
    config_case("optim-momentum-adam", "`momentum` with adam (not an Adam key)",
                sub("lr = 0.01", "lr = 0.01\nmomentum = 0.9"), ["momentum", "adam"]),
    config_case("optim-centered-adagrad", "`centered` with adagrad",
                section("optim", 'name = "adagrad"\nlr = 0.1\ncentered = true'), ["centered", "adagrad"]),
    config_case("optim-groups-not-tables", "`groups = 3`", sub("lr = 0.01", "lr = 0.01\ngroups = 3"), ["groups"]),
    config_case("optim-group-unknown-key", "a group with a switch (`amsgrad`)",
                append('[[optim.groups]]\nparams = ["*.bias"]\namsgrad = true'), ["[[optim.groups]] #1", "amsgrad"]),
    config_case("optim-group-empty-params", "a group with `params = []`",
                append("[[optim.groups]]\nparams = []\nlr = 0.1"), ["[[optim.groups]] #1", "params"]),
    config_case("optim-group-negative-lr", "a group with `lr = -1`",
                append('[[optim.groups]]\nparams = ["*.bias"]\nlr = -1'), ["[[optim.groups]] #1", "lr"]),
    config_case("optim-group-matches-nothing", 'a group whose `params = ["*.gamma"]` match no parameter',
                append('[[optim.groups]]\nparams = ["*.gamma"]\nlr = 0.1'), ["[[optim.groups]] #1", "*.gamma"]),
    config_case("optim-group-nesterov-momentum", "nesterov with a group of momentum 0",
                lambda t: section("optim", 'name = "sgd"\nlr = 0.1\nmomentum = 0.9\nnesterov = true')(t)
                + '\n[[optim.groups]]\nparams = ["*.bias"]\nmomentum = 0\n', ["[[optim.groups]] #1", "momentum"]),
    config_case("schedule-unknown-name", '`[schedule] name = "linear"`', section("schedule", 'name = "linear"'),
                ["[schedule] name", "'linear'"]),
    config_case("schedule-warmup-negative", "`warmup_steps = -1`", section("schedule", "warmup_steps = -1"),
                ["[schedule] warmup_steps"]),
    config_case("schedule-warmup-bool", "`warmup_steps = true`", section("schedule", "warmup_steps = true"),
                ["[schedule] warmup_steps"]),
    config_case("schedule-step-size-zero", "step schedule with `step_size = 0`",
                section("schedule", 'name = "step"\nstep_size = 0'), ["[schedule] step_size"]),
    config_case("schedule-step-size-float", "step schedule with `step_size = 1.5`",
                section("schedule", 'name = "step"\nstep_size = 1.5'), ["[schedule] step_size", "1.5"]),
    config_case("schedule-gamma-zero", "step schedule with `gamma = 0`",
                section("schedule", 'name = "step"\ngamma = 0'), ["[schedule] gamma"]),
    config_case("schedule-pct-start-one", "onecycle with `pct_start = 1.0`",
                section("schedule", 'name = "onecycle"\npct_start = 1.0'), ["[schedule] pct_start"]),
    config_case("schedule-pct-start-cosine", "`pct_start` with the cosine schedule",
                section("schedule", 'name = "cosine"\npct_start = 0.3'), ["pct_start", "cosine"]),
    config_case("schedule-div-factor-negative", "onecycle with `div_factor = -1`",
                section("schedule", 'name = "onecycle"\ndiv_factor = -1'), ["[schedule] div_factor"]),
    config_case("schedule-base-momentum-one", "onecycle with `base_momentum = 1`",
                section("schedule", 'name = "onecycle"\nbase_momentum = 1'), ["[schedule] base_momentum"]),
    config_case("schedule-cycle-momentum-adagrad", "onecycle cycling the momentum of adagrad",
                lambda t: section("schedule", 'name = "onecycle"')(section("optim", 'name = "adagrad"\nlr = 0.1')(t)),
                ["cycle_momentum", "adagrad"]),
    config_case("schedule-final-div-factor-cyclic", "`final_div_factor` with the cyclic schedule",
                section("schedule", 'name = "cyclic"\nfinal_div_factor = 10'), ["final_div_factor", "cyclic"]),
    config_case("train-epochs-zero", "`epochs = 0`", sub("epochs = 1", "epochs = 0"), ["[train] epochs", "0"]),
    config_case("train-epochs-float", "`epochs = 1.5`", sub("epochs = 1", "epochs = 1.5"), ["[train] epochs", "1.5"]),
    config_case("train-epochs-string", '`epochs = "3"`', sub("epochs = 1", 'epochs = "3"'), ["[train] epochs", "'3'"]),
    config_case("train-batch-size-zero", "`batch_size = 0`", sub("batch_size = 8", "batch_size = 0"),
                ["[train] batch_size", "0"]),
    config_case("train-batch-size-negative", "`batch_size = -8`", sub("batch_size = 8", "batch_size = -8"),
                ["[train] batch_size", "-8"]),
    config_case("train-seed-negative", "`[train] seed = -1`", sub('seed = 0\ndevice', 'seed = -1\ndevice'), ["[train] seed", "-1"]),
    config_case("data-seed-negative", "`[data] seed = -1`", sub('seed = 0\n\n[model]', 'seed = -1\n\n[model]'),
                ["[data] seed", "-1"]),
    config_case("train-device-tpu", '`device = "tpu"`', sub('device = "cpu"', 'device = "tpu"'), ["[train] device", "'tpu'"]),
    config_case("train-device-cuda-absent", '`device = "cuda"` on a machine without CUDA',
                sub('device = "cpu"', 'device = "cuda"'), ["[train] device", "cuda"]),
    config_case("train-dtype-float16", '`dtype = "float16"`', sub('dtype = "float64"', 'dtype = "float16"'),
                ["[train] dtype", "'float16'"]),
    config_case("train-dtype-number", "`dtype = 64`", sub('dtype = "float64"', "dtype = 64"), ["[train] dtype"]),
    config_case("checkpoint-every-zero", "`[checkpoint] every = 0`", section("checkpoint", "every = 0"),
                ["[checkpoint] every", "0"]),
    config_case("checkpoint-every-string", '`[checkpoint] every = "1"`', section("checkpoint", 'every = "1"'),
                ["[checkpoint] every"]),
    config_case("task-unknown", '`[task] name = "ranking"`', section("task", 'name = "ranking"'),
                ["[task] name", "'ranking'"]),
    config_case("task-py-malformed", '`[task] name = "py:nomodule"` (no class)', section("task", 'name = "py:nomodule"'),
                ["[task] name", "py:nomodule"]),
    config_case("task-py-missing-module", "a `py:` task whose module does not exist",
                section("task", 'name = "py:fz_no_such_module:Task"'), ["[task] name", "fz_no_such_module"]),
    config_case("data-dataset-number", "`dataset = 5`", sub('dataset = "npz:', 'dataset = 5\n# "npz:'), ["[data] dataset"]),
    config_case("data-dataset-unknown-prefix", '`dataset = "csv:data.csv"`',
                lambda t: re.sub(r'dataset = "[^"]*"', 'dataset = "csv:data.csv"', t), ["[data] dataset", "csv:data.csv"]),
    config_case("data-dataset-no-path", '`dataset = "npz:"` (no path)',
                lambda t: re.sub(r'dataset = "[^"]*"', 'dataset = "npz:"', t), ["[data] dataset", "npz:"]),
    config_case("data-dataset-py-malformed", '`dataset = "py:module"` (no function)',
                lambda t: re.sub(r'dataset = "[^"]*"', 'dataset = "py:module"', t), ["[data] dataset", "py:module"]),
    config_case("model-unknown", '`[model] name = "nosuch"`', sub('name = "mlp"', 'name = "nosuch"'), ["[model] name", "nosuch"]),
    config_case("model-name-empty", '`[model] name = ""`', sub('name = "mlp"', 'name = ""'), ["[model] name"]),
    config_case("model-kwargs-number", "`kwargs = 3`", sub("kwargs = { hidden = 4 }", "kwargs = 3"), ["[model] kwargs"]),
    config_case("model-kwarg-misspelt", "a kwarg the model does not take (`hiden`)", sub("hidden = 4", "hiden = 4"),
                ["[model] kwargs", "hiden"]),
    config_case("model-kwarg-negative", "`hidden = -4`", sub("hidden = 4", "hidden = -4"), ["[model] kwargs", "-4"]),
    config_case("model-kwarg-string", '`hidden = "four"`', sub("hidden = 4", 'hidden = "four"'), ["[model] kwargs", "four"]),
    config_case("model-transformer-on-rows", "`transformer` on rows of 6 features (not token sequences)",
                sub('name = "mlp"\nkwargs = { hidden = 4 }', 'name = "transformer"'), ["[model]", "transformer"]),
    config_case("model-cnn-on-rows", "`cnn` on rows of 6 features (not images)",
                sub('name = "mlp"\nkwargs = { hidden = 4 }', 'name = "cnn"'), ["[model]", "cnn"]),
    config_case("sparse-with-dropout", "an mlp with dropout and `[checkpoint] every = 2`",
                lambda t: section("checkpoint", "every = 2")(sub("hidden = 4", "hidden = 4, dropout = 0.2")(t)),
                ["[checkpoint] every", "dropout"]),
    Case("train-overwrite-and-resume", "plgk train: config", "`--overwrite` with `--resume`",
         TRAIN + ("--overwrite", "--resume"), 10, ("--overwrite", "--resume"), setup=lambda s: s.config()),
    Case("train-threads-zero", "plgk train: config", "`--threads 0`", TRAIN + ("--threads", "0"), 10,
         ("--threads", "0"), setup=lambda s: s.config()),
    Case("train-threads-negative", "plgk train: config", "`--threads -2`", TRAIN + ("--threads", "-2"), 10,
         ("--threads", "-2"), setup=lambda s: s.config()),
    Case("train-threads-beyond-cpus", "plgk train: config", "`--threads 100000`, beyond the machine's CPUs",
         TRAIN + ("--threads", "100000"), 10, ("--threads", "100000"), setup=lambda s: s.config()),
]

# --------------------------------------------------------------------------- plgk train: data


def _one_d(a):
    return {"x_train": a["x_train"][:, 0], "x_test": a["x_test"][:, 0]}


DATA_CASES = [
    Case("data-npz-missing", "plgk train: data", "the dataset .npz does not exist", TRAIN, 11,
         ("{tmp}/missing.npz", "not found"), setup=lambda s: s.config(npz=s.tmp / "missing.npz")),
    Case("data-npz-text", "plgk train: data", "a text file as the dataset .npz", TRAIN, 11,
         ("{tmp}/bad.npz", "npz"), setup=lambda s: s.config(npz=s.write("bad.npz", "x_train,y_train\n"))),
    Case("data-npz-empty-file", "plgk train: data", "an empty file as the dataset .npz", TRAIN, 11,
         ("{tmp}/bad.npz",), setup=lambda s: s.config(npz=s.write("bad.npz", b""))),
    Case("data-npz-truncated", "plgk train: data", "the dataset .npz cut to half its bytes", TRAIN, 11,
         ("{tmp}/bad.npz",), setup=lambda s: (truncate(s.npz("bad.npz")), s.config(npz=s.tmp / "bad.npz"))),
    Case("data-npz-corrupt-member", "plgk train: data", "bytes flipped inside the dataset .npz's x_train member",
         TRAIN, 11, ("{tmp}/bad.npz",),
         setup=lambda s: (flip(s.npz("bad.npz"), slice(200, 260)), s.config(npz=s.tmp / "bad.npz"))),
    data_case("data-missing-y-test", "the .npz lacks y_test", lambda a: {"y_test": None}, ["y_test"]),
    data_case("data-missing-x-train", "the .npz lacks x_train", lambda a: {"x_train": None}, ["x_train"]),
    data_case("data-x-one-dimensional", "x_train and x_test 1-D (one number per example)", _one_d, ["x_train"],
              exit=11),
    data_case("data-y-column", "y_train of shape (N, 1)", lambda a: {"y_train": a["y_train"][:, None]}, ["y_train"]),
    data_case("data-y-float", "float class labels", lambda a: {"y_train": a["y_train"].astype(float)}, ["y_train"]),
    data_case("data-y-negative", "a negative class label", lambda a: {"y_train": np.r_[-1, a["y_train"][1:]]},
              ["y_train", "negative"]),
    data_case("data-y-strings", "class labels as strings", lambda a: {"y_train": a["y_train"].astype(str)}, ["y_train"]),
    data_case("data-rows-mismatch", "x_train with one row more than y_train",
              lambda a: {"y_train": a["y_train"][:-1]}, ["x_train", "y_train"]),
    data_case("data-feature-mismatch", "x_test with 5 features, x_train 6", lambda a: {"x_test": a["x_test"][:, :5]},
              ["x_test"]),
    data_case("data-train-empty", "an empty training split", lambda a: {"x_train": a["x_train"][:0], "y_train": a["y_train"][:0]},
              ["training split", "empty"]),
    data_case("data-x-complex", "complex inputs", lambda a: {"x_train": a["x_train"] + 1j, "x_test": a["x_test"] + 1j},
              ["x_train"]),
    data_case("data-x-object", "inputs stored as a pickled object array",
              lambda a: {"x_train": np.array([None] * 20, dtype=object)}, []),
    data_case("data-x-scalar", "x_train a 0-d array", lambda a: {"x_train": np.float64(1.0)}, ["x_train"]),
    data_case("data-diabetes-classification", "regression targets (floats) for the classification task",
              lambda a: {"y_train": a["y_train"] + 0.5, "y_test": a["y_test"] + 0.5}, ["y_train", "classification"]),
    data_case("data-regression-y-shape-mismatch", "regression targets (N,) in train and (N, 2) in test",
              lambda a: {"y_train": a["x_train"][:, 0], "y_test": a["x_test"][:, :2]}, ["y_train", "y_test"],
              edit=section("task", 'name = "regression"')),
    Case("data-text-missing", "plgk train: data", "a `text:` dataset that does not exist", TRAIN, 11,
         ("{tmp}/corpus.txt",), setup=lambda s: s.config(lambda t: re.sub(
             r'dataset = "[^"]*"', f'dataset = "text:{s.tmp}/corpus.txt"', t))),
    Case("data-mnist-missing", "plgk train: data", "an `mnist:` folder that does not exist", TRAIN, 11,
         ("{tmp}/mnist",), setup=lambda s: s.config(lambda t: re.sub(
             r'dataset = "[^"]*"', f'dataset = "mnist:{s.tmp}/mnist"', t))),
    Case("data-mnist-garbage", "plgk train: data", "an `mnist:` folder whose IDX files are garbage", TRAIN, 11,
         ("{tmp}/mnist",), setup=lambda s: (
             [s.write(f"mnist/{n}", b"garbage") for n in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                          "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")],
             s.config(lambda t: re.sub(r'dataset = "[^"]*"', f'dataset = "mnist:{s.tmp}/mnist"', t)))),
    Case("data-changed-after-training", "plgk replay: the run directory", "the dataset .npz edited after training",
         REPLAY, 11, ("{tmp}/data.npz", "fingerprint"),
         setup=lambda s: _train_then(s, lambda npz: np.savez(npz, **{**s.arrays(), "x_train": s.arrays()["x_train"] + 1}))),
    Case("data-deleted-after-training", "plgk replay: the run directory", "the dataset .npz deleted after training",
         REPLAY, 11, ("{tmp}/data.npz",), setup=lambda s: _train_then(s, lambda npz: npz.unlink())),
]


def _train_then(s, damage):
    """A run of its own on a copy of the data, then ``damage(npz)``; {run} names it."""
    npz = Path(shutil.copy(s.shared["npz"], s.tmp / "data.npz"))
    s.paths["run"] = s.train(s.config(npz=npz, name="run.toml"), s.tmp / "run")
    damage(npz)


# --------------------------------------------------------------------------- user code

def user_model_case(id, what, source, needles, exit=19, kwargs="", group="user code", **kw):
    def setup(s):
        module = s.module_file(source)
        s.config(section("model", f'name = "{module}:build"' + (f"\nkwargs = {{ {kwargs} }}" if kwargs else "")))
    return Case(id, group, what, TRAIN, exit, tuple(needles), setup=setup, chdir=True, **kw)


def user_dataset_case(id, what, source, needles, exit=19, **kw):
    def setup(s):
        module = s.module_file(source)
        s.config(lambda t: re.sub(r'dataset = "[^"]*"', f'dataset = "py:{module}:load"', t))
    return Case(id, "user code", what, TRAIN, exit, tuple(needles), setup=setup, chdir=True, **kw)


LINEAR = """\
import torch


class Net(torch.nn.Module):
    def __init__(self, features, width):
        super().__init__()
        self.linear = torch.nn.Linear(features, width)

    def forward(self, x):
        {forward}


def build(in_shape, num_classes):
    return Net(in_shape[0], {width})
"""


def linear(forward="return self.linear(x)", width="num_classes"):
    return LINEAR.format(forward=forward, width=width)


DATASET = """\
import numpy as np


def load():
    rng = np.random.default_rng(0)
    {body}
"""

STARTED = ("{outdir}",)  # failures at the first update: the started run may stay, for --resume

USER_CODE_CASES = [
    user_model_case("user-model-builder-keyerror", "a model builder that raises KeyError",
                    "def build(in_shape, num_classes):\n    return {}['missing']\n",
                    ["{module}.py", "KeyError"]),
    user_model_case("user-model-builder-zerodivision", "a model builder that raises ZeroDivisionError",
                    "def build(in_shape, num_classes):\n    return 1 / 0\n", ["{module}.py", "ZeroDivisionError"]),
    user_model_case("user-model-builder-typeerror-inside", "a model builder whose body raises TypeError",
                    "def build(in_shape, num_classes):\n    return len(5)\n", ["{module}.py", "TypeError"]),
    user_model_case("user-model-syntax-error", "a model module with a SyntaxError",
                    "def build(in_shape, num_classes)\n    return None\n", ["{module}.py", "SyntaxError"]),
    user_model_case("user-model-import-raises", "a model module that raises when imported",
                    "raise RuntimeError('broken at import')\n", ["{module}.py", "RuntimeError"]),
    user_model_case("user-model-missing-function", "a model module without the named function",
                    "def other(in_shape, num_classes):\n    pass\n", ["{module}:build"], exit=10),
    user_model_case("user-model-returns-int", "a model builder that returns 3, not a Module",
                    "def build(in_shape, num_classes):\n    return 3\n", ["{module}:build", "int"], exit=10),
    user_model_case("user-model-not-callable", "a model name naming a module-level number",
                    "build = 3\n", ["{module}:build"], exit=10),
    user_model_case("user-model-unexpected-kwarg", "a model builder given a kwarg it does not take",
                    linear(), ["[model] kwargs", "depth"], exit=10, kwargs="depth = 2"),
    user_model_case("user-forward-raises", "a forward that raises RuntimeError",
                    linear("raise RuntimeError('forward broke')"), ["{module}.py", "RuntimeError"],
                    may_create=STARTED),
    user_model_case("user-forward-tuple", "a forward returning a tuple",
                    linear("return (self.linear(x), x)"), ["{module}:build", "tuple"], exit=10, may_create=STARTED),
    user_model_case("user-forward-dict", "a forward returning a dict without logits",
                    linear("return {'scores': self.linear(x)}"), ["{module}:build"], exit=10, may_create=STARTED),
    user_model_case("user-forward-pooled", "a forward that averages over the batch (no row per example)",
                    linear("return self.linear(x).mean(0)"), ["{module}:build", "one row per example"], exit=10,
                    may_create=STARTED),
    user_model_case("user-forward-one-d", "a forward returning one number per example (B,)",
                    linear("return self.linear(x)[:, 0]"), ["{module}:build"], exit=10, may_create=STARTED),
    user_model_case("user-output-narrower", "an output of width 2 for 3 classes",
                    linear(width="2"), ["{module}:build", "3"], exit=10, may_create=STARTED),
    user_model_case("user-output-integer", "a forward returning integer scores",
                    linear("return self.linear(x).long()"), ["{module}:build"], exit=10, may_create=STARTED),
    user_model_case("user-no-trainable-parameters", "a model with no trainable parameters",
                    linear().replace("return Net(in_shape[0], num_classes)",
                                     "return Net(in_shape[0], num_classes).requires_grad_(False)"),
                    ["{module}:build", "trainable"], exit=10),
    user_model_case("user-model-no-parameters", "a model without parameters at all (torch.nn.Identity)",
                    "import torch\n\n\ndef build(in_shape, num_classes):\n    return torch.nn.Identity()\n",
                    ["{module}:build"], exit=10),
    user_dataset_case("user-dataset-raises", "a `py:` dataset function that raises ValueError",
                      DATASET.format(body="raise ValueError('no data today')"), ["{module}.py", "ValueError"]),
    user_dataset_case("user-dataset-syntax-error", "a `py:` dataset module with a SyntaxError",
                      "def load(:\n    pass\n", ["{module}.py", "SyntaxError"]),
    Case("user-dataset-missing-module", "user code", "a `py:` dataset whose module does not exist", TRAIN, 11,
         ("py:fz_absent_module:load",), chdir=True,
         setup=lambda s: s.config(lambda t: re.sub(r'dataset = "[^"]*"', 'dataset = "py:fz_absent_module:load"', t))),
    user_dataset_case("user-dataset-missing-function", "a `py:` dataset module without the named function",
                      "def other():\n    pass\n", ["{module}:load"], exit=11),
    user_dataset_case("user-dataset-three-arrays", "a `py:` dataset returning 3 arrays, not 4",
                      DATASET.format(body="return rng.normal(size=(8, 6)), np.zeros(8, int), rng.normal(size=(4, 6))"),
                      ["{module}:load", "tuple"], exit=11),
    user_dataset_case("user-dataset-strings", "a `py:` dataset returning strings",
                      DATASET.format(body="return ['a'] * 8, np.zeros(8, int), ['b'] * 4, np.zeros(4, int)"),
                      ["{module}:load", "x_train"], exit=11),
    user_dataset_case("user-dataset-nan", "a `py:` dataset whose x_train holds NaN",
                      DATASET.format(body="x = rng.normal(size=(8, 6)); x[2, 3] = np.nan\n    "
                                          "return x, np.arange(8) % 3, rng.normal(size=(4, 6)), np.arange(4) % 3"),
                      ["{module}:load", "x_train"], exit=11),
    Case("user-task-loss-raises", "user code", "a `py:` task whose loss_terms raises", TRAIN, 19,
         ("{module}.py", "IndexError"), chdir=True, may_create=STARTED,
         setup=lambda s: s.config(section("task", f'name = "py:{s.module_file(TASK_RAISING)}:Broken"'))),
]

TASK_RAISING = """\
from plgk_cli.tasks.classification import Classification


class Broken(Classification):
    def loss_terms(self, output, y):
        return [][0]

    def batch_loss(self, output, y):
        return self.loss_terms(output, y)
"""

# --------------------------------------------------------------------------- non-finite numbers

NF = "non-finite numbers"


def _overflow(a):
    return {"x_train": a["x_train"] * 1e300, "x_test": a["x_test"]}


NONFINITE_CASES = [
    config_case("nonfinite-lr-nan", "`lr = nan`", sub("lr = 0.01", "lr = nan"), ["[optim] lr", "nan"], group=NF),
    config_case("nonfinite-lr-inf", "`lr = inf`", sub("lr = 0.01", "lr = inf"), ["[optim] lr", "inf"], group=NF),
    config_case("nonfinite-weight-decay-inf", "`weight_decay = inf`", sub("lr = 0.01", "lr = 0.01\nweight_decay = inf"),
                ["[optim] weight_decay", "inf"], group=NF),
    config_case("nonfinite-clip-nan", "`clip_grad_norm = nan`", sub("lr = 0.01", "lr = 0.01\nclip_grad_norm = nan"),
                ["[optim] clip_grad_norm", "nan"], group=NF),
    config_case("nonfinite-eps-inf", "`eps = inf`", sub("lr = 0.01", "lr = 0.01\neps = inf"), ["[optim] eps"], group=NF),
    config_case("nonfinite-gamma-inf", "step schedule `gamma = inf`", section("schedule", 'name = "step"\ngamma = inf'),
                ["[schedule] gamma"], group=NF),
    config_case("nonfinite-diverged-lr", "a run that diverges (`lr = 1e300`)", sub("lr = 0.01", "lr = 1e300"),
                [], exit=20, group=NF, may_create=STARTED),
    config_case("nonfinite-diverged-sgd", "SGD that overflows to Inf (`lr = 1e308`, momentum 0.9)",
                section("optim", 'name = "sgd"\nlr = 1e308\nmomentum = 0.9'), [], exit=20, group=NF, may_create=STARTED),
    data_case("nonfinite-data-nan", "x_train holds a NaN", lambda a: {"x_train": np.where(np.eye(20, 6, dtype=bool), np.nan, a["x_train"])},
              ["x_train"], group=NF),
    data_case("nonfinite-data-inf", "x_test holds an Inf", lambda a: {"x_test": np.r_[[[np.inf] * 6], a["x_test"][1:]]},
              ["x_test"], group=NF),
    data_case("nonfinite-data-float32-overflow", "x_train of 1e300s, which overflow float32",
              _overflow, ["x_train", "float32"], group=NF, edit=sub('dtype = "float64"', 'dtype = "float32"')),
    data_case("nonfinite-regression-y-inf", "regression targets holding an Inf",
              lambda a: {"y_train": np.r_[np.inf, a["x_train"][1:, 0]], "y_test": a["x_test"][:, 0]}, ["y_train"],
              group=NF, edit=section("task", 'name = "regression"')),
    user_model_case("nonfinite-forward-nan", "a model whose forward returns NaN",
                    linear("return self.linear(x) * float('nan')"), [], exit=20, group=NF, may_create=STARTED),
    replay_case("nonfinite-commit-seconds-nan", "`--commit-seconds nan`", ("--commit-seconds", "nan"),
                ["--commit-seconds", "nan"], group=NF),
    replay_case("nonfinite-commit-seconds-inf", "`--commit-seconds inf`", ("--commit-seconds", "inf"),
                ["--commit-seconds", "inf"], group=NF),
    replay_case("nonfinite-memory-budget-nan", "`--memory-budget nan`", ("--memory-budget", "nan"),
                ["--memory-budget", "nan"], group=NF),
    replay_case("nonfinite-memory-budget-inf", "`--memory-budget inf`", ("--memory-budget", "inf"),
                ["--memory-budget", "inf"], group=NF),
    replay_case("nonfinite-accept-update-error-nan", "`--accept-update-error nan`", ("--accept-update-error", "nan"),
                ["--accept-update-error", "nan"], group=NF),
    replay_case("nonfinite-accept-update-error-inf", "`--accept-update-error inf`", ("--accept-update-error", "inf"),
                ["--accept-update-error", "inf"], group=NF),
    replay_case("nonfinite-rule-adaptive-nan", "`--rule adaptive:nan`", ("--rule", "adaptive:nan"),
                ["--rule", "adaptive:nan"], group=NF),
    audit_npz_case("nonfinite-audit-x-inf", "an audit point whose x holds an Inf",
                   lambda a: {"x": np.r_[[[np.inf] * 6], a["x_test"][1:4]], "y": a["y_test"][:4]}, ["Inf"], group=NF),
    audit_npz_case("nonfinite-audit-x-nan", "an audit point whose x holds a NaN",
                   lambda a: {"x": np.r_[[[np.nan] * 6], a["x_test"][1:4]], "y": a["y_test"][:4]}, ["NaN"], group=NF),
    audit_npz_case("nonfinite-audit-x-huge", "an audit point of 1e308s, whose loss overflows",
                   lambda a: {"x": np.full((4, 6), 1e308), "y": a["y_test"][:4]}, [], exit=20, group=NF),
    run_damage_case("nonfinite-nan-in-parameters", "NaN written into θ of a checkpoint (checksums recomputed)",
                    lambda run, s: rewrite_step(step(run, 2), lambda t: t["param/1.weight"].view(-1).__setitem__(0, float("nan"))),
                    ["step_00000002.safetensors", "param/1.weight", "NaN"], group=NF),
    run_damage_case("nonfinite-inf-in-optimizer", "Inf written into an optimizer state tensor",
                    lambda run, s: rewrite_step(step(run, 3), lambda t: t["optim/1.weight/exp_avg_sq"].view(-1).__setitem__(0, float("inf"))),
                    ["step_00000003.safetensors", "exp_avg_sq", "Inf"], group=NF),
    run_damage_case("nonfinite-nan-loss-record", "a NaN recorded as a step's loss",
                    lambda run, s: rewrite_step(step(run, 1), lambda t: t.__setitem__("loss", torch.full_like(t["loss"], float("nan")))),
                    ["step_00000001.safetensors", "loss"], group=NF),
    Case("nonfinite-margin-one-class", NF, "`--target margin` on a run whose data hold one class (no other logit)",
         REPLAY + ("--target", "margin"), 13, ("--target", "margin"), setup=lambda s: _one_class_run(s)),
]


def _one_class_run(s):
    a = s.arrays()
    npz = s.npz("one.npz", y_train=np.zeros_like(a["y_train"]), y_test=np.zeros_like(a["y_test"]))
    s.paths["run"] = s.train(s.config(npz=npz, name="one.toml"), s.tmp / "run")


# --------------------------------------------------------------------------- plgk replay: options

OPT = "plgk replay: options"

REPLAY_OPTION_CASES = [
    replay_case("replay-stride-zero", "`--stride 0`", ("--stride", "0"), ["--stride", "0"]),
    replay_case("replay-stride-negative", "`--stride -3`", ("--stride", "-3"), ["--stride", "-3"]),
    replay_case("replay-chunk-size-zero", "`--chunk-size 0`", ("--chunk-size", "0"), ["--chunk-size", "0"]),
    replay_case("replay-chunk-size-negative", "`--chunk-size -5`", ("--chunk-size", "-5"), ["--chunk-size", "-5"]),
    replay_case("replay-memory-budget-negative", "`--memory-budget -1`", ("--memory-budget", "-1"), ["--memory-budget", "-1"]),
    replay_case("replay-memory-budget-tiny", "`--memory-budget 0.000001`, below the walk's needs",
                ("--memory-budget", "0.000001"), ["--memory-budget"]),
    replay_case("replay-commit-seconds-zero", "`--commit-seconds 0`", ("--commit-seconds", "0"), ["--commit-seconds", "0"]),
    replay_case("replay-commit-seconds-negative", "`--commit-seconds -1`", ("--commit-seconds", "-1"),
                ["--commit-seconds", "-1"]),
    replay_case("replay-commit-every-negative", "`--commit-every -1`", ("--commit-every", "-1"), ["--commit-every", "-1"]),
    replay_case("replay-threads-zero", "`--threads 0`", ("--threads", "0"), ["--threads", "0"]),
    replay_case("replay-threads-negative", "`--threads -1`", ("--threads", "-1"), ["--threads", "-1"]),
    replay_case("replay-threads-beyond-cpus", "`--threads 100000`, beyond the machine's CPUs", ("--threads", "100000"),
                ["--threads", "100000"]),
    replay_case("replay-rule-unknown", "`--rule simpson`", ("--rule", "simpson"), ["--rule", "simpson"]),
    replay_case("replay-rule-supersample-zero", "`--rule supersample:0`", ("--rule", "supersample:0"), ["--rule", "supersample:0"]),
    replay_case("replay-rule-supersample-negative", "`--rule supersample:-2`", ("--rule", "supersample:-2"),
                ["--rule", "supersample:-2"]),
    replay_case("replay-rule-supersample-huge", "`--rule supersample:100000000` (would run for days)",
                ("--rule", "supersample:100000000"), ["--rule", "100000000"], timeout=20),
    replay_case("replay-rule-supersample-word", "`--rule supersample:many`", ("--rule", "supersample:many"),
                ["--rule", "supersample:many"]),
    replay_case("replay-rule-adaptive-two", "`--rule adaptive:2` (tolerance outside (0, 1))", ("--rule", "adaptive:2"),
                ["--rule", "adaptive:2"]),
    replay_case("replay-rule-adaptive-zero", "`--rule adaptive:0`", ("--rule", "adaptive:0"), ["--rule", "adaptive:0"]),
    replay_case("replay-rule-euler-suffix", "`--rule euler:3`", ("--rule", "euler:3"), ["--rule", "euler:3"]),
    replay_case("replay-rule-empty", "`--rule ''`", ("--rule", ""), ["--rule"]),
    replay_case("replay-target-unknown", "`--target gradnorm`", ("--target", "gradnorm"), ["--target", "gradnorm"]),
    replay_case("replay-target-empty", "`--target ''` (no target)", ("--target", ""), ["--target"]),
    replay_case("replay-target-commas", "`--target ,,` (no target)", ("--target", ",,"), ["--target"]),
    replay_case("replay-target-symbols", "`--target 'loss;rm'`", ("--target", "loss;rm"), ["--target", "loss;rm"]),
    replay_case("replay-target-output-classification", "`--target output` on a classification run",
                ("--target", "output"), ["--target", "output", "classification"]),
    replay_case("replay-target-token-losses-classification", "`--target token-losses` on a classification run",
                ("--target", "token-losses"), ["--target", "token-losses"]),
    Case("replay-target-margin-regression", OPT, "`--target margin` on a regression run",
         REPLAY + ("--target", "margin"), 13, ("--target", "margin", "regression"), setup=lambda s: _regression_run(s)),
    Case("replay-group-by-regression", OPT, "`--group-by label` on a regression run",
         REPLAY + ("--group-by", "label"), 13, ("--group-by",), setup=lambda s: _regression_run(s)),
    replay_case("replay-accept-update-error-zero", "`--accept-update-error 0`", ("--accept-update-error", "0"),
                ["--accept-update-error", "0"]),
    replay_case("replay-accept-update-error-negative", "`--accept-update-error -1`", ("--accept-update-error", "-1"),
                ["--accept-update-error", "-1"]),
    replay_case("replay-ghost-trapezoid", "`--ghost` with the default rule", ("--ghost",), ["--ghost", "euler"]),
    replay_case("replay-ghost-stride", "`--ghost --rule euler --stride 2`", ("--ghost", "--rule", "euler", "--stride", "2"),
                ["--ghost", "--stride"]),
    replay_case("replay-ghost-adam", "`--ghost --rule euler` on an Adam run (ghost needs plain SGD)",
                ("--ghost", "--rule", "euler"), ["--ghost"]),
    replay_case("replay-kernel-stride-negative", "`--kernel --kernel-stride -1`", ("--kernel", "--kernel-stride", "-1"),
                ["--kernel-stride", "-1"]),
    replay_case("replay-modes-negative", "`--modes -1`", ("--modes", "-1"), ["--modes", "-1"]),
    replay_case("replay-modes-auto-energy", "`--modes auto:1` (the energy share must be below 1)",
                ("--modes", "auto:1"), ["--modes", "auto:1"]),
    replay_case("replay-modes-auto-oja", "`--modes auto --modes-method oja` (oja keeps a fixed K)",
                ("--modes", "auto", "--modes-method", "oja"), ["--modes auto", "oja"]),
    replay_case("replay-modes-at-without-modes", "`--modes-at 1` without `--modes`", ("--modes-at", "1"), ["--modes-at"]),
    replay_case("replay-modes-at-outside", "`--modes 1 --modes-at 99`, past the run's last step",
                ("--modes", "1", "--modes-at", "99"), ["--modes-at", "99"]),
    replay_case("replay-modes-at-oja", "`--modes-at` with `--modes-method oja`",
                ("--modes", "1", "--modes-at", "1", "--modes-method", "oja"), ["--modes-at", "oja"]),
    replay_case("replay-save-modes-without-modes", "`--save-modes` without `--modes`", ("--save-modes",), ["--save-modes"]),
    replay_case("replay-kernel-train-alone", "`--kernel-train` without `--kernel`", ("--kernel-train",), ["--kernel-train"]),
    replay_case("replay-precondition-alone", "`--precondition` without `--kernel`", ("--precondition",), ["--precondition"]),
    replay_case("replay-device-cuda-absent", "`--device cuda` on a machine without CUDA", ("--device", "cuda"),
                ["cuda"], exit=10),
    replay_case("replay-resume-complete", "`--resume` of a finished output (no progress left)", ("--resume",),
                ["{out}", "--overwrite"], exit=14, setup=lambda s: shutil.copy(s.shared["h5"], s.tmp / "out.h5")),
]


def _regression_run(s):
    a = s.arrays()
    npz = s.npz("reg.npz", y_train=a["x_train"][:, 0] * 2.0, y_test=a["x_test"][:, 0] * 2.0)
    config = s.config(section("task", 'name = "regression"'), npz=npz, name="reg.toml")
    s.paths["run"] = s.train(config, s.tmp / "run")


# --------------------------------------------------------------------------- audit sets and train subsets

AUD = "plgk replay: audit set"

AUDIT_SET_CASES = [
    replay_case("audit-slice-past-split", "an audit slice past the split (`test[0:999]`)", (), ["--audit-set", "test[0:999]"],
                group=AUD, audit_set="test[0:999]"),
    replay_case("audit-slice-empty", "an empty audit slice (`test[3:3]`)", (), ["--audit-set", "test[3:3]"],
                group=AUD, audit_set="test[3:3]"),
    replay_case("audit-slice-reversed", "a reversed audit slice (`test[4:1]`)", (), ["--audit-set", "test[4:1]"],
                group=AUD, audit_set="test[4:1]"),
    replay_case("audit-slice-negative-start", "a negative start before the split (`test[-99:]`)", (),
                ["--audit-set", "test[-99:]"], group=AUD, audit_set="test[-99:]"),
    replay_case("audit-slice-unknown-split", "an unknown split (`valid[0:4]`)", (), ["--audit-set", "valid[0:4]"],
                group=AUD, audit_set="valid[0:4]"),
    replay_case("audit-slice-words", "words as bounds (`test[a:b]`)", (), ["--audit-set", "test[a:b]"],
                group=AUD, audit_set="test[a:b]"),
    replay_case("audit-slice-unclosed", "an unclosed bracket (`test[0:4`)", (), ["--audit-set", "test[0:4"],
                group=AUD, audit_set="test[0:4"),
    replay_case("audit-slice-step", "a slice with a step (`test[0:4:2]`)", (), ["--audit-set", "test[0:4:2]"],
                group=AUD, audit_set="test[0:4:2]"),
    replay_case("audit-empty", "an empty `--audit-set`", (), ["--audit-set"], group=AUD, audit_set=""),
    replay_case("audit-file-missing", "an audit .npz that does not exist", (), ["--audit-set", "{tmp}/none.npz"],
                group=AUD, audit_set="{tmp}/none.npz"),
    replay_case("audit-file-directory", "a folder named like an audit .npz", (), ["--audit-set", "{tmp}/dir.npz"],
                group=AUD, audit_set="{tmp}/dir.npz", setup=lambda s: (s.tmp / "dir.npz").mkdir()),
    audit_npz_case("audit-npz-wrong-width", "an audit .npz whose x has 5 features, not 6",
                   lambda a: {"x": a["x_test"][:4, :5], "y": a["y_test"][:4]}, ["(4, 5)"]),
    audit_npz_case("audit-npz-label-out-of-range", "an audit .npz with label 3 for 3 classes",
                   lambda a: {"x": a["x_test"][:4], "y": np.array([0, 1, 2, 3])}, ["0..2"]),
    audit_npz_case("audit-npz-negative-label", "an audit .npz with label -1",
                   lambda a: {"x": a["x_test"][:4], "y": np.array([0, 1, 2, -1])}, ["0..2"]),
    audit_npz_case("audit-npz-float-labels", "an audit .npz with float labels",
                   lambda a: {"x": a["x_test"][:4], "y": np.array([0.0, 1.0, 2.0, 0.5])}, []),
    audit_npz_case("audit-npz-no-y", "an audit .npz without y", lambda a: {"x": a["x_test"][:4]}, ["x and y"]),
    audit_npz_case("audit-npz-renamed", "an audit .npz with x_test, y_test instead of x, y",
                   lambda a: {"x_test": a["x_test"][:4], "y_test": a["y_test"][:4]}, ["x and y"]),
    audit_npz_case("audit-npz-empty", "an audit .npz of 0 points", lambda a: {"x": a["x_test"][:0], "y": a["y_test"][:0]}, []),
    audit_npz_case("audit-npz-rows-mismatch", "an audit .npz with 4 x rows and 3 labels",
                   lambda a: {"x": a["x_test"][:4], "y": a["y_test"][:3]}, []),
    audit_npz_case("audit-npz-three-d", "an audit .npz whose x is (4, 6, 1)",
                   lambda a: {"x": a["x_test"][:4, :, None], "y": a["y_test"][:4]}, ["(4, 6, 1)"]),
    replay_case("audit-npz-text", "a text file named audit.npz", (), ["--audit-set", "{tmp}/audit.npz", "npz"],
                group=AUD, audit_set="{tmp}/audit.npz", setup=lambda s: s.write("audit.npz", "not an npz\n")),
    replay_case("audit-jsonl-classification", "a .jsonl of prompts on a classification run", (),
                ["--audit-set", "{tmp}/prompts.jsonl"], group=AUD, audit_set="{tmp}/prompts.jsonl",
                setup=lambda s: s.write("prompts.jsonl", '{"prompt": "1+1=", "continuation": "2"}\n')),
    replay_case("audit-path-newline", "an audit path holding a newline", (), ["--audit-set"], group=AUD,
                audit_set="{tmp}/two\nlines.npz"),
]

SUBSET_CASES = [
    replay_case("subset-slice-past-split", "`--train-subset 0:99`", ("--train-subset", "0:99"), ["--train-subset", "0:99"],
                group="plgk replay: train subset"),
    replay_case("subset-slice-empty", "`--train-subset 5:5`", ("--train-subset", "5:5"), ["--train-subset", "5:5"],
                group="plgk replay: train subset"),
    replay_case("subset-slice-negative", "`--train-subset -99:`", ("--train-subset", "-99:"), ["--train-subset", "-99:"],
                group="plgk replay: train subset"),
    replay_case("subset-test-split", "`--train-subset test[0:4]` (not the train split)", ("--train-subset", "test[0:4]"),
                ["--train-subset", "test[0:4]"], group="plgk replay: train subset"),
    replay_case("subset-missing-file", "`--train-subset` naming a file that does not exist",
                ("--train-subset", "{tmp}/none.txt"), ["--train-subset", "{tmp}/none.txt"], group="plgk replay: train subset"),
    subset_file_case("subset-file-word", "a subset file holding a word", "subset.txt", "0\nx7\n", ["x7"]),
    subset_file_case("subset-file-out-of-range", "a subset file with index 20 of 0..19", "subset.txt", "0\n20\n", ["20"]),
    subset_file_case("subset-file-negative", "a subset file with index -1", "subset.txt", "0\n-1\n", ["-1"]),
    subset_file_case("subset-file-empty", "an empty subset file", "subset.txt", "", []),
    subset_file_case("subset-file-float", "a subset file holding 1.5", "subset.txt", "1.5\n", ["1.5"]),
    subset_file_case("subset-file-binary", "a subset file of binary bytes", "subset.txt", bytes(range(256)), []),
    subset_file_case("subset-npy-floats", "a subset .npy of floats", "subset.npy", np.array([0.0, 1.5]), ["float64"]),
    subset_file_case("subset-npy-out-of-range", "a subset .npy with index 99", "subset.npy", np.array([0, 99]), ["99"]),
    subset_file_case("subset-npy-corrupt", "a subset .npy that is text", "subset.npy", "not numpy\n", []),
]

# --------------------------------------------------------------------------- plgk replay: the run directory

RUN = "plgk replay: the run directory"


def _set_complete_false(run, s):
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["complete"] = False
    write_manifest(run, manifest)
    step(run, 3).unlink()


def _swap_in_other(path_name):
    def damage(run, s):
        shutil.copy(s.shared["other"] / path_name, run / path_name)
    return damage


RUN_CASES = [
    run_damage_case("run-gap", "a checkpoint file deleted (gap)", lambda run, s: step(run, 2).unlink(),
                    ["step_00000002.safetensors", "gap"]),
    run_damage_case("run-first-step-missing", "step 0's file deleted", lambda run, s: step(run, 0).unlink(),
                    ["step_00000000.safetensors"]),
    run_damage_case("run-last-step-missing", "the last step's file deleted", lambda run, s: step(run, 3).unlink(),
                    ["step_00000003.safetensors"]),
    run_damage_case("run-step-truncated", "a checkpoint truncated to half", lambda run, s: truncate(step(run, 2)),
                    ["step_00000002.safetensors"]),
    run_damage_case("run-step-empty", "a checkpoint emptied (0 bytes)", lambda run, s: truncate(step(run, 1), 0),
                    ["step_00000001.safetensors"]),
    run_damage_case("run-step-header-only", "a checkpoint cut just after its header",
                    lambda run, s: step(run, 1).write_bytes(step(run, 1).read_bytes()[:tensor_data_offset(step(run, 1))]),
                    ["step_00000001.safetensors"]),
    run_damage_case("run-step-random-bytes", "a checkpoint replaced by random bytes",
                    lambda run, s: step(run, 1).write_bytes(np.random.default_rng(0).bytes(4096)),
                    ["step_00000001.safetensors"]),
    run_damage_case("run-step-json-flipped", "bytes flipped in a checkpoint's JSON header",
                    lambda run, s: flip(step(run, 1), slice(8, 24)), ["step_00000001.safetensors"]),
    run_damage_case("run-step-length-flipped", "bytes flipped in a checkpoint's header length",
                    lambda run, s: flip(step(run, 1), slice(0, 8)), ["step_00000001.safetensors"]),
    run_damage_case("run-step-data-bit", "one bit flipped in a checkpoint's tensor data",
                    lambda run, s: flip(step(run, 2), slice(tensor_data_offset(step(run, 2)) + 3,
                                                            tensor_data_offset(step(run, 2)) + 4)),
                    ["step_00000002.safetensors", "checksum"]),
    run_damage_case("run-step-is-directory", "a step file replaced by a folder",
                    lambda run, s: (step(run, 2).unlink(), step(run, 2).mkdir()), ["step_00000002.safetensors"]),
    run_damage_case("run-step-from-other-run", "one checkpoint copied from another run",
                    _swap_in_other("step_00000002.safetensors"), ["step_00000002.safetensors"]),
    run_damage_case("run-step-duplicated", "step 2's file copied over step 1's name",
                    lambda run, s: shutil.copy(step(run, 2), step(run, 1)), ["step_00000001.safetensors", "2"]),
    run_damage_case("run-step-past-end", "step 3's file copied to step 4 (past the end)",
                    lambda run, s: shutil.copy(step(run, 3), step(run, 4)), ["step_00000004.safetensors"]),
    run_damage_case("run-step-wrong-shape", "a checkpoint re-saved with a parameter of another shape",
                    lambda run, s: rewrite_step(step(run, 1), lambda t: t.__setitem__("param/1.weight", torch.zeros(3, 3, dtype=torch.float64))),
                    ["step_00000001.safetensors", "param/1.weight"]),
    run_damage_case("run-step-wrong-dtype", "a checkpoint re-saved with a float32 parameter",
                    lambda run, s: rewrite_step(step(run, 1), lambda t: t.__setitem__("param/1.weight", t["param/1.weight"].float())),
                    ["step_00000001.safetensors", "param/1.weight"]),
    run_damage_case("run-step-parameter-missing", "a checkpoint re-saved without one parameter",
                    lambda run, s: rewrite_step(step(run, 1), lambda t: t.pop("param/3.bias")),
                    ["step_00000001.safetensors", "3.bias"]),
    run_damage_case("run-step-batch-index-high", "a recorded batch index = num_train",
                    lambda run, s: rewrite_step(step(run, 2), lambda t: t["batch"].view(-1).__setitem__(0, 20)),
                    ["step_00000002.safetensors", "20"]),
    run_damage_case("run-step-batch-index-negative", "a negative recorded batch index",
                    lambda run, s: rewrite_step(step(run, 2), lambda t: t["batch"].view(-1).__setitem__(0, -1)),
                    ["step_00000002.safetensors", "-1"]),
    run_damage_case("run-manifest-missing", "manifest.json deleted", lambda run, s: (run / "manifest.json").unlink(),
                    ["{run}/manifest.json"]),
    run_damage_case("run-manifest-not-json", "manifest.json not JSON", lambda run, s: (run / "manifest.json").write_text("{not json"),
                    ["{run}/manifest.json"]),
    run_damage_case("run-manifest-empty", "manifest.json emptied", lambda run, s: (run / "manifest.json").write_text(""),
                    ["{run}/manifest.json"]),
    run_damage_case("run-manifest-list", "manifest.json a JSON list", lambda run, s: (run / "manifest.json").write_text("[1, 2]"),
                    ["{run}/manifest.json"]),
    run_damage_case("run-manifest-binary", "manifest.json of binary bytes",
                    lambda run, s: (run / "manifest.json").write_bytes(bytes(range(256))), ["{run}/manifest.json"]),
    run_damage_case("run-manifest-from-other-run", "manifest.json copied from another run",
                    _swap_in_other("manifest.json"), ["{run}/manifest.json"]),
    run_damage_case("run-manifest-hand-edited", "a hand-edited manifest (lr changed, checksum not updated)",
                    manifest_edit(setitem("optimizer", "lr", 0.5), rewrite=False), ["{run}/manifest.json", "checksum"]),
    run_damage_case("run-manifest-hand-edited-steps", "a hand-edited manifest (total_steps 2, checksum not updated)",
                    manifest_edit(setitem("total_steps", 2), rewrite=False), ["{run}/manifest.json", "checksum"]),
    run_damage_case("run-manifest-future-version", "manifest `format_version` 99 (newer)",
                    manifest_edit(setitem("format_version", 99)), ["{run}/manifest.json", "99"]),
    run_damage_case("run-manifest-version-string", 'manifest `format_version` "1" (a string)',
                    manifest_edit(setitem("format_version", "1")), ["{run}/manifest.json", "'1'"]),
    run_damage_case("run-manifest-other-format", "manifest of another `format`",
                    manifest_edit(setitem("format", "something-else")), ["{run}/manifest.json", "something-else"]),
    run_damage_case("run-manifest-no-dataset", "manifest without `dataset`", manifest_edit(delitem("dataset")),
                    ["{run}/manifest.json", "dataset"]),
    run_damage_case("run-manifest-total-steps-string", 'manifest `total_steps` "3" (a string)',
                    manifest_edit(setitem("total_steps", "3")), ["{run}/manifest.json", "total_steps"]),
    run_damage_case("run-manifest-total-steps-negative", "manifest `total_steps` -1",
                    manifest_edit(setitem("total_steps", -1)), ["{run}/manifest.json", "total_steps"]),
    run_damage_case("run-manifest-batch-size-zero", "manifest `batch_size` 0",
                    manifest_edit(setitem("batch_size", 0)), ["{run}/manifest.json", "batch_size"]),
    run_damage_case("run-manifest-checkpoint-every-zero", "manifest `checkpoint_every` 0",
                    manifest_edit(setitem("checkpoint_every", 0)), ["{run}/manifest.json", "checkpoint_every"]),
    run_damage_case("run-manifest-complete-string", 'manifest `complete` "yes"',
                    manifest_edit(setitem("complete", "yes")), ["{run}/manifest.json", "complete"]),
    run_damage_case("run-manifest-parameters-not-list", "manifest `parameters` a string",
                    manifest_edit(setitem("parameters", "all")), ["{run}/manifest.json", "parameters"]),
    run_damage_case("run-manifest-num-train-negative", "manifest `dataset.num_train` -1",
                    manifest_edit(setitem("dataset", "num_train", -1)), ["{run}/manifest.json", "num_train"]),
    run_damage_case("run-manifest-num-classes-zero", "manifest `dataset.num_classes` 0",
                    manifest_edit(setitem("dataset", "num_classes", 0)), ["{run}/manifest.json", "num_classes"]),
    run_damage_case("run-manifest-in-shape-string", 'manifest `dataset.in_shape` "6"',
                    manifest_edit(setitem("dataset", "in_shape", "6")), ["{run}/manifest.json", "in_shape"]),
    run_damage_case("run-manifest-dtype-unknown", 'manifest `dtype` "float16"',
                    manifest_edit(setitem("dtype", "float16")), ["{run}/manifest.json", "dtype"]),
    run_damage_case("run-manifest-run-id-number", "manifest `run_id` a number",
                    manifest_edit(setitem("run_id", 5)), ["{run}/manifest.json", "run_id"]),
    run_damage_case("run-manifest-optimizer-unknown", 'manifest `optimizer.name` "lbfgs"',
                    manifest_edit(setitem("optimizer", "name", "lbfgs")), ["{run}/manifest.json", "lbfgs"]),
    run_damage_case("run-manifest-model-name-number", "manifest `model.name` a number",
                    manifest_edit(setitem("model", "name", 7)), ["{run}/manifest.json", "model"]),
    run_damage_case("run-manifest-lr-string", 'manifest `optimizer.lr` "fast"',
                    manifest_edit(setitem("optimizer", "lr", "fast")), ["{run}/manifest.json", "lr"]),
    run_damage_case("run-unfinished", "an unfinished run (`complete = false`, last step missing)", _set_complete_false,
                    ["{run}", "--resume"]),
    Case("run-directory-missing", RUN, "the run directory does not exist",
         ("replay", "--ckpts", "{tmp}/nowhere", "--audit-set", "test[:4]", "--out", "{out}", "--quiet"), 12,
         ("{tmp}/nowhere",)),
    Case("run-directory-empty", RUN, "an empty folder as the run directory",
         ("replay", "--ckpts", "{tmp}/empty", "--audit-set", "test[:4]", "--out", "{out}", "--quiet"), 12,
         ("{tmp}/empty",), setup=lambda s: (s.tmp / "empty").mkdir()),
    Case("run-directory-is-file", RUN, "a file as the run directory",
         ("replay", "--ckpts", "{tmp}/file", "--audit-set", "test[:4]", "--out", "{out}", "--quiet"), 12,
         ("{tmp}/file",), setup=lambda s: s.write("file", "x")),
    Case("run-directory-is-h5", RUN, "an influences.h5 given as the run directory",
         ("replay", "--ckpts", "{h5}", "--audit-set", "test[:4]", "--out", "{out}", "--quiet"), 12, ("{h5}",)),
]

# --------------------------------------------------------------------------- plgk check

CHECK_CASES = [
    Case("check-missing", "plgk check", "the run directory does not exist", ("check", "{tmp}/nowhere"), 12,
         ("{tmp}/nowhere",)),
    Case("check-file", "plgk check", "a file given as the run directory", ("check", "{tmp}/file"), 12,
         ("{tmp}/file",), setup=lambda s: s.write("file", "x")),
    Case("check-empty", "plgk check", "an empty folder", ("check", "{tmp}/empty"), 12, ("{tmp}/empty",),
         setup=lambda s: (s.tmp / "empty").mkdir()),
    check_case("check-manifest-missing", "manifest.json deleted", lambda run, s: (run / "manifest.json").unlink(),
               ["manifest.json"]),
    check_case("check-manifest-not-json", "manifest.json not JSON", lambda run, s: (run / "manifest.json").write_text("{"),
               ["manifest.json"]),
    check_case("check-manifest-hand-edited", "a hand-edited manifest (checksum not updated)",
               manifest_edit(setitem("epochs", 7), rewrite=False), ["manifest.json", "checksum"]),
    check_case("check-manifest-total-steps-string", 'manifest `total_steps` "3"',
               manifest_edit(setitem("total_steps", "3")), ["manifest.json", "total_steps"]),
    check_case("check-manifest-total-steps-huge", "manifest `total_steps` 10**12",
               manifest_edit(setitem("total_steps", 10 ** 12)), ["1000000000000"]),
    check_case("check-manifest-parameters-null", "manifest `parameters` null",
               manifest_edit(setitem("parameters", None)), ["manifest.json", "parameters"]),
    check_case("check-manifest-shape-negative", "manifest parameter shape [-4, 6]",
               manifest_edit(lambda m: m["parameters"][0].__setitem__("shape", [-4, 6])), ["manifest.json", "shape"]),
    check_case("check-manifest-dataset-string", 'manifest `dataset` "digits" (not an object)',
               manifest_edit(setitem("dataset", "digits")), ["manifest.json", "dataset"]),
    check_case("check-manifest-epochs-negative", "manifest `epochs` -2", manifest_edit(setitem("epochs", -2)),
               ["manifest.json", "epochs"]),
    check_case("check-gap-and-nan", "a gap and a NaN in θ (two problems)",
               lambda run, s: (step(run, 2).unlink(), rewrite_step(step(run, 1), lambda t: t["param/1.weight"].view(-1).__setitem__(0, float("nan")))),
               ["step_00000002.safetensors", "step_00000001.safetensors", "NaN"]),
    check_case("check-truncated", "a truncated checkpoint", lambda run, s: truncate(step(run, 3)), ["step_00000003.safetensors"]),
    check_case("check-data-bit", "one flipped bit in tensor data",
               lambda run, s: flip(step(run, 1), slice(tensor_data_offset(step(run, 1)) + 1, tensor_data_offset(step(run, 1)) + 2)),
               ["step_00000001.safetensors", "checksum"]),
    check_case("check-unfinished", "an unfinished run", _set_complete_false, ["--resume"]),
    check_case("check-foreign-step", "a checkpoint of another run", _swap_in_other("step_00000001.safetensors"),
               ["step_00000001.safetensors"]),
    Case("check-data-changed", "plgk check", "the dataset edited after training", ("check", "{run}"), 11,
         ("{tmp}/data.npz", "fingerprint"),
         setup=lambda s: _train_then(s, lambda npz: np.savez(npz, **{**s.arrays(), "y_train": s.arrays()["y_train"][::-1]}))),
]

# --------------------------------------------------------------------------- plgk inspect

INS = "plgk inspect"

INSPECT_CASES = [
    Case("inspect-missing", INS, "the file does not exist", ("inspect", "{tmp}/nope.h5"), 15, ("{tmp}/nope.h5",)),
    Case("inspect-text", INS, "a text file", ("inspect", "{tmp}/x.h5"), 15, ("{tmp}/x.h5",),
         setup=lambda s: s.write("x.h5", "this is not hdf5\n")),
    Case("inspect-empty", INS, "an empty file", ("inspect", "{tmp}/x.h5"), 15, ("{tmp}/x.h5",),
         setup=lambda s: s.write("x.h5", b"")),
    Case("inspect-directory", INS, "a folder", ("inspect", "{tmp}/dir.h5"), 15, ("{tmp}/dir.h5",),
         setup=lambda s: (s.tmp / "dir.h5").mkdir()),
    Case("inspect-run-directory", INS, "a run directory given to inspect", ("inspect", "{run}"), 15, ("{run}",)),
    Case("inspect-foreign-h5", INS, "an HDF5 file of something else", ("inspect", "{tmp}/other.h5"), 15,
         ("{tmp}/other.h5",), setup=lambda s: _foreign_h5(s.tmp / "other.h5")),
    inspect_case("inspect-truncated", "an influences.h5 cut to half", truncate, []),
    inspect_case("inspect-truncated-tail", "an influences.h5 missing its last 100 bytes",
                 lambda p: p.write_bytes(p.read_bytes()[:-100]), []),
    inspect_case("inspect-corrupt-chunk", "bytes flipped inside the influence dataset's stored chunk",
                 lambda p: flip(p, slice(influence_chunk_offset(p), influence_chunk_offset(p) + 16)), ["influence"]),
    inspect_case("inspect-superblock-flipped", "bytes flipped in the HDF5 superblock", lambda p: flip(p, slice(0, 8)), []),
    inspect_case("inspect-missing-attr-schema", "the root attribute schema_version deleted",
                 h5_edit(lambda f: f.attrs.__delitem__("schema_version")), ["schema_version"]),
    inspect_case("inspect-missing-attr-rule", "the root attribute rule deleted",
                 h5_edit(lambda f: f.attrs.__delitem__("rule")), ["rule"]),
    inspect_case("inspect-missing-attr-manifest", "the root attribute manifest deleted",
                 h5_edit(lambda f: f.attrs.__delitem__("manifest")), ["manifest"]),
    inspect_case("inspect-missing-attr-mre", "the loss group's mre attribute deleted",
                 h5_edit(lambda f: f["audit/loss"].attrs.__delitem__("mre")), ["mre"]),
    inspect_case("inspect-attr-manifest-not-json", "the root attribute manifest is not JSON",
                 h5_edit(lambda f: f.attrs.__setitem__("manifest", "{not json")), ["manifest"]),
    inspect_case("inspect-schema-newer", "schema_version 99 (newer)",
                 h5_edit(lambda f: f.attrs.__setitem__("schema_version", 99)), ["99"]),
    inspect_case("inspect-schema-string", 'schema_version "five"',
                 h5_edit(lambda f: f.attrs.__setitem__("schema_version", "five")), ["schema_version"]),
    inspect_case("inspect-missing-influence", "the influence dataset deleted",
                 h5_edit(lambda f: f.__delitem__("audit/loss/influence")), ["influence"]),
    inspect_case("inspect-missing-train-group", "the /train group deleted",
                 h5_edit(lambda f: f.__delitem__("train")), ["train"]),
    inspect_case("inspect-missing-audit-group", "the /audit group deleted",
                 h5_edit(lambda f: f.__delitem__("audit")), ["audit"]),
    inspect_case("inspect-influence-wrong-shape", "the influence dataset replaced by one of another shape",
                 h5_edit(lambda f: (f.__delitem__("audit/loss/influence"), f.create_dataset("audit/loss/influence", data=np.zeros((3, 2))))),
                 ["influence"], extra=("--audit", "0")),
    Case("inspect-audit-past", INS, "`--audit 4` of 4 points", ("inspect", "{h5}", "--audit", "4"), 13, ("--audit", "4")),
    Case("inspect-audit-negative", INS, "`--audit -1`", ("inspect", "{h5}", "--audit", "-1"), 13, ("--audit", "-1")),
    Case("inspect-audit-huge", INS, "`--audit 999`", ("inspect", "{h5}", "--audit", "999"), 13, ("--audit", "999")),
    Case("inspect-top-zero", INS, "`--top 0`", ("inspect", "{h5}", "--audit", "0", "--top", "0"), 13, ("--top", "0")),
    Case("inspect-top-negative", INS, "`--top -1`", ("inspect", "{h5}", "--audit", "0", "--top", "-1"), 13, ("--top", "-1")),
    Case("inspect-target-absent", INS, "`--target margin`, not in the file",
         ("inspect", "{h5}", "--audit", "0", "--target", "margin"), 15, ("margin",)),
    Case("inspect-target-empty", INS, "`--target ''`", ("inspect", "{h5}", "--audit", "0", "--target", ""), 15, ()),
    Case("inspect-class-past", INS, "`--class 5` of 3 classes", ("inspect", "{logits_h5}", "--audit", "0", "--target",
                                                                  "logits", "--class", "5"), 13, ("--class", "5")),
    Case("inspect-class-negative", INS, "`--class -1`", ("inspect", "{logits_h5}", "--audit", "0", "--target",
                                                          "logits", "--class", "-1"), 13, ("--class", "-1")),
    Case("inspect-kernel-absent", INS, "`--kernel` on a replay without --kernel", ("inspect", "{h5}", "--kernel"), 15,
         ("--kernel",)),
    Case("inspect-unfinished", INS, "inspect while a replay is interrupted (its progress left)", ("inspect", "{out}"), 15,
         ("{out}", "--resume"), setup=lambda s: shutil.copy(interrupted_progress(s.shared), s.tmp / "out.h5.progress")),
]


def _foreign_h5(path):
    with h5py.File(path, "w") as f:
        f["numbers"] = np.arange(4)

# --------------------------------------------------------------------------- outputs and races

OUT = "outputs and races"


def _progress_setup(damage=None):
    def setup(s):
        progress = Path(shutil.copy(interrupted_progress(s.shared), s.tmp / "out.h5.progress"))
        if damage:
            damage(progress)
    return setup


RESUME = REPLAY + ("--commit-every", "1", "--resume")


def _edit_progress_header(path):
    """Change one digit of the header's JSON, keeping its length (so the file still parses)."""
    data = bytearray(path.read_bytes())
    end = tensor_data_offset(path)
    header = data[8:end].decode()
    match = re.search(r'"step":\s*"?(\d)', header) or re.search(r"\d", header)
    i = 8 + (match.start(1) if match.groups() else match.start())
    data[i] = ord("7") if data[i] != ord("7") else ord("8")
    path.write_bytes(bytes(data))


OUTPUT_CASES = [
    Case("replay-out-exists", OUT, "`--out` exists, no `--overwrite`", REPLAY, 14, ("{out}", "--overwrite"),
         setup=lambda s: s.write("out.h5", "precious\n")),
    Case("replay-out-directory", OUT, "`--out` is a folder (with `--overwrite`)",
         ("replay", "--ckpts", "{run}", "--audit-set", "test[:4]", "--out", "{tmp}/results", "--quiet", "--overwrite"), 14,
         ("{tmp}/results",), setup=lambda s: s.write("results/keep.txt", "keep\n")),
    Case("replay-out-parent-missing", OUT, "`--out` in a folder that does not exist",
         ("replay", "--ckpts", "{run}", "--audit-set", "test[:4]", "--out", "{tmp}/no/such/out.h5", "--quiet"), 14,
         ("{tmp}/no/such",)),
    Case("replay-out-parent-is-file", OUT, "`--out` under a file",
         ("replay", "--ckpts", "{run}", "--audit-set", "test[:4]", "--out", "{tmp}/file/out.h5", "--quiet"), 14,
         ("{tmp}/file",), setup=lambda s: s.write("file", "x")),
    Case("replay-out-manifest", OUT, "`--out RUN/manifest.json --overwrite` (the run's own manifest)",
         ("replay", "--ckpts", "{run}", "--audit-set", "test[:4]", "--out", "{run}/manifest.json", "--quiet", "--overwrite"),
         14, ("manifest.json",), setup=lambda s: s.copy_run()),
    Case("replay-out-step-file", OUT, "`--out` a step file of the run, with `--overwrite`",
         ("replay", "--ckpts", "{run}", "--audit-set", "test[:4]", "--out", "{run}/step_00000003.safetensors", "--quiet",
          "--overwrite"), 14, ("step_00000003.safetensors",), setup=lambda s: s.copy_run()),
    Case("replay-out-inside-run", OUT, "`--out` a new file inside the run directory",
         ("replay", "--ckpts", "{run}", "--audit-set", "test[:4]", "--out", "{run}/influences.h5", "--quiet"),
         14, ("{run}",), setup=lambda s: s.copy_run()),
    Case("replay-out-dataset", OUT, "`--out` the run's dataset .npz, with `--overwrite`",
         ("replay", "--ckpts", "{run}", "--audit-set", "test[:4]", "--out", "{tmp}/data.npz", "--quiet", "--overwrite"),
         14, ("data.npz",), setup=lambda s: _train_then(s, lambda npz: None)),
    Case("replay-out-audit-npz", OUT, "`--out` the audit .npz itself, with `--overwrite`",
         ("replay", "--ckpts", "{run}", "--audit-set", "{tmp}/audit.npz", "--out", "{tmp}/audit.npz", "--quiet", "--overwrite"),
         14, ("audit.npz",), setup=lambda s: np.savez(s.tmp / "audit.npz", x=s.arrays()["x_test"][:4], y=s.arrays()["y_test"][:4])),
    Case("replay-out-train-subset", OUT, "`--out` the --train-subset file, with `--overwrite`",
         REPLAY[:-3] + ("--out", "{tmp}/subset.txt", "--quiet", "--overwrite", "--train-subset", "{tmp}/subset.txt"),
         14, ("subset.txt",), setup=lambda s: s.write("subset.txt", "0\n1\n2\n")),
    Case("replay-progress-in-the-way", OUT, "an interrupted replay's progress left, replay again without `--resume`",
         REPLAY + ("--commit-every", "1"), 14, ("{out}.progress", "--resume"), setup=_progress_setup()),
    Case("replay-resume-other-rule", OUT, "`--resume` with another `--rule`", RESUME + ("--rule", "euler"), 13,
         ("{out}.progress", "rule"), setup=_progress_setup()),
    Case("replay-resume-other-audit-set", OUT, "`--resume` with another `--audit-set`",
         ("replay", "--ckpts", "{run}", "--audit-set", "test[:2]", "--out", "{out}", "--quiet", "--commit-every", "1",
          "--resume"), 13, ("{out}.progress", "audit"), setup=_progress_setup()),
    Case("replay-resume-other-run", OUT, "`--resume` of a progress file made from another run",
         ("replay", "--ckpts", "{other}", "--audit-set", "test[:4]", "--out", "{out}", "--quiet", "--commit-every", "1",
          "--resume"), 13, ("{out}.progress",), setup=_progress_setup()),
    Case("replay-progress-header-flipped", OUT, "`--resume` of a progress file with bytes flipped in its header",
         RESUME, 15, ("{out}.progress",), setup=_progress_setup(lambda p: flip(p, slice(20, 28)))),
    Case("replay-progress-header-edited", OUT, "`--resume` of a progress file whose header step was edited (same length)",
         RESUME, 15, ("{out}.progress",), setup=_progress_setup(_edit_progress_header)),
    Case("replay-progress-data-flipped", OUT, "`--resume` of a progress file with a flipped bit in its data",
         RESUME, 15, ("{out}.progress", "checksum"),
         setup=_progress_setup(lambda p: flip(p, slice(tensor_data_offset(p) + 2, tensor_data_offset(p) + 3)))),
    Case("replay-progress-truncated", OUT, "`--resume` of a progress file cut to half", RESUME, 15,
         ("{out}.progress",), setup=_progress_setup(truncate)),
    Case("replay-progress-empty", OUT, "`--resume` of an empty progress file", RESUME, 15, ("{out}.progress",),
         setup=_progress_setup(lambda p: truncate(p, 0))),
    Case("replay-progress-text", OUT, "`--resume` of a progress file that is text", RESUME, 15, ("{out}.progress",),
         setup=_progress_setup(lambda p: p.write_text("not progress\n"))),
    Case("train-out-not-empty", OUT, "`plgk train --out` a folder holding a file", TRAIN, 14, ("{outdir}",),
         setup=lambda s: (s.config(), s.write("newrun/notes.txt", "keep\n"))),
    Case("train-out-existing-run", OUT, "`plgk train --out` an existing run, no `--overwrite`",
         ("train", "--config", "{config}", "--out", "{run}", "--quiet"), 14, ("{run}", "--overwrite"),
         setup=lambda s: (s.copy_run(), s.config())),
    Case("train-overwrite-unrelated", OUT, "`plgk train --overwrite` onto a folder that is not a run",
         TRAIN + ("--overwrite",), 14, ("{outdir}", "notes.txt"), setup=lambda s: (s.config(), s.write("newrun/notes.txt", "keep\n"))),
    Case("train-overwrite-holding-the-data", OUT, "`plgk train --overwrite` onto the folder holding its own dataset",
         ("train", "--config", "{config}", "--out", "{tmp}/data", "--quiet", "--overwrite"), 14, ("{tmp}/data",),
         setup=lambda s: s.config(npz=Path(shutil.copy(s.shared["npz"], s.write("data/keep", "x").parent / "data.npz")))),
    Case("train-out-inside-run", OUT, "`plgk train --out` a folder inside an existing run",
         ("train", "--config", "{config}", "--out", "{run}/sub", "--quiet"), 14, ("{run}",),
         setup=lambda s: (s.copy_run(), s.config())),
    Case("train-resume-complete", OUT, "`plgk train --resume` of a finished run",
         ("train", "--config", "{config}", "--out", "{run}", "--quiet", "--resume"), 16, ("{run}",),
         setup=lambda s: (s.copy_run(), s.config())),
    Case("train-resume-nothing", OUT, "`plgk train --resume` with no run in --out", TRAIN + ("--resume",), 14,
         ("{outdir}", "--resume"), setup=lambda s: (s.config(), (s.tmp / "newrun").mkdir())),
    Case("train-resume-other-config", OUT, "`plgk train --resume` with another config",
         ("train", "--config", "{config}", "--out", "{run}", "--quiet", "--resume"), 16, ("{run}",),
         setup=lambda s: (s.copy_run(), _set_complete_false(s["run"], s), s.config(sub("lr = 0.01", "lr = 0.02")))),
]


# --------------------------------------------------------------------------- disk and permissions

DISK = "disk and permissions"
CHECKPOINT_WRITE = "plgk_cli.trajectory.save_file"
MANIFEST_WRITE = "plgk_cli.trajectory._atomic_write_text"
H5_WRITE = "plgk_cli.store._write"
PROGRESS_WRITE = "plgk_cli.progress.save_file"


def disk_case(id, what, command, target, code, needles, **kw):
    if command == "train":
        return Case(id, DISK, what, TRAIN, 14, ("full" if code == errno.ENOSPC else "", *needles),
                    setup=lambda s: s.config(), fault=fail_write(target, code), may_create=STARTED, **kw)
    argv = REPLAY + (("--commit-every", "1") if target == PROGRESS_WRITE else ())
    return Case(id, DISK, what, argv, 14, ("full" if code == errno.ENOSPC else "", *needles),
                fault=fail_write(target, code), **kw)


DISK_CASES = [
    disk_case("disk-full-train-checkpoint", "the disk fills while train writes a checkpoint", "train",
              CHECKPOINT_WRITE, errno.ENOSPC, ["{outdir}"]),
    disk_case("disk-full-train-manifest", "the disk fills while train writes the manifest", "train",
              MANIFEST_WRITE, errno.ENOSPC, ["{outdir}"]),
    disk_case("disk-full-replay-output", "the disk fills while replay writes influences.h5", "replay",
              H5_WRITE, errno.ENOSPC, ["{out}"], may_create=("{out}.progress",)),
    disk_case("disk-full-replay-progress", "the disk fills at replay's first progress commit", "replay",
              PROGRESS_WRITE, errno.ENOSPC, ["{out}"]),
    disk_case("disk-quota-train", "the disk quota is exceeded while train writes a checkpoint", "train",
              CHECKPOINT_WRITE, errno.EDQUOT, ["quota"]),
    disk_case("disk-quota-replay", "the disk quota is exceeded while replay writes influences.h5", "replay",
              H5_WRITE, errno.EDQUOT, ["quota"], may_create=("{out}.progress",)),
    disk_case("disk-unwritable-train", "train's output folder is not writable (EACCES on the checkpoint)", "train",
              CHECKPOINT_WRITE, errno.EACCES, ["permission denied"]),
    disk_case("disk-unwritable-replay", "replay's output folder is not writable (EACCES on influences.h5)", "replay",
              H5_WRITE, errno.EACCES, ["permission denied"], may_create=("{out}.progress",)),
    disk_case("disk-readonly-train", "train's output on a read-only file system", "train",
              CHECKPOINT_WRITE, errno.EROFS, ["read-only"]),
    disk_case("disk-readonly-progress", "replay's progress on a read-only file system", "replay",
              PROGRESS_WRITE, errno.EROFS, ["read-only"]),
    Case("disk-full-train-overwrite", DISK, "the disk fills during `plgk train --overwrite` (the old run is kept)",
         ("train", "--config", "{config}", "--out", "{run}", "--quiet", "--overwrite"), 14, ("full",),
         setup=lambda s: (s.copy_run(), s.config()), fault=fail_write(CHECKPOINT_WRITE, errno.ENOSPC)),
    Case("disk-full-replay-overwrite", DISK, "the disk fills during `replay --overwrite` (the old output is kept)",
         REPLAY + ("--overwrite",), 14, ("full",), setup=lambda s: shutil.copy(s.shared["h5"], s.tmp / "out.h5"),
         fault=fail_write(H5_WRITE, errno.ENOSPC), may_create=("{out}.progress",)),
    Case("disk-free-bytes-zero", DISK, "no free space at all (`PLGK_FREE_BYTES=0`)", REPLAY, 14, ("free",),
         env={"PLGK_FREE_BYTES": "0"}),
    Case("disk-mkdir-denied", DISK, "train cannot create its --out folder (EACCES)", TRAIN, 14,
         ("{outdir}", "permission denied"), setup=lambda s: s.config(), fault=lambda mp, s: mp.setattr(
             "os.mkdir", raise_oserror(errno.EACCES))),
]

def _replace_dataset(f, name: str, values) -> None:
    del f[name]
    f.create_dataset(name, data=values)


def _nan_influence(f) -> None:
    values = f["audit/loss/influence"][()]
    values[0, 0] = np.nan
    _replace_dataset(f, "audit/loss/influence", values)


def _fifo_step(run: Path, step_number: int) -> None:
    path = step(run, step_number)
    path.unlink(missing_ok=True)
    os.mkfifo(path)


# Found by reading the change adversarially (a review after the suite passed): each failed before
# its fix, in the class named.
REVIEW_CASES = [
    run_damage_case("run-fifo-step-file", "a FIFO in place of a step file (opening it blocked for ever: a hang)",
                    lambda run, s: _fifo_step(run, 2), ["step_00000002.safetensors", "not a regular file"]),
    Case("data-optimizer-state-overflow", NF, "inputs of 1e200 whose squared gradients overflow Adam's state "
         "(recorded as a success)", TRAIN, 20, ("step 1", "exp_avg_sq", "inf"), may_create=STARTED,
         setup=lambda s: s.config(npz=s.npz("bad.npz", x_train=np.full((20, 6), 1e200)))),
    data_case("data-zero-width-examples", "examples of shape (0,): x_train (20, 0) (trained, then refused by replay)",
              lambda a: {"x_train": np.ones((20, 0)), "x_test": np.ones((8, 0))}, ["(20, 0)"]),
    config_case("model-zero-width-layer", "`hidden = 0`: a layer without elements (replay tracebacked)",
                lambda c: c.replace("hidden = 4", "hidden = 0"), ["1.weight", "no elements"]),
    data_case("data-label-beyond-int64", "uint64 labels of 2**63 + 5 (a traceback)",
              lambda a: {"y_train": np.full(20, 2 ** 63 + 5, np.uint64)}, ["y_train[0]", "9223372036854775813"]),
    data_case("data-label-huge", "a label of 10**12 (blamed on the model's kwargs)",
              lambda a: {"y_train": np.where(np.arange(20) == 3, 10 ** 12, a["y_train"])}, ["y_train[3]", "1000000000000"]),
    config_case("train-epochs-beyond-step-names", "`epochs = 10**12` (3*10**12 updates: would run for ever)",
                lambda c: c.replace("epochs = 1", "epochs = 1000000000000"), ["[train] epochs", "99999999"]),
    inspect_case("inspect-nan-influence", "an influence dataset rewritten to hold a NaN (ranked silently)",
                 h5_edit(_nan_influence), ["/audit/loss/influence", "NaN"]),
    inspect_case("inspect-short-train-index", "/train/index shorter than the influence rows (a traceback)",
                 h5_edit(lambda f: _replace_dataset(f, "train/index", f["train/index"][()][:5])), ["/train/index"]),
    inspect_case("inspect-short-audit-index", "/audit/index shorter than the audit points (a traceback)",
                 h5_edit(lambda f: _replace_dataset(f, "audit/index", f["audit/index"][()][:1])), ["/audit/index"]),
    inspect_case("inspect-manifest-attribute-wrong", "the file's manifest attribute holding `{\"dataset\": \"digits\"}`",
                 h5_edit(lambda f: f.attrs.__setitem__("manifest", '{"dataset": "digits"}')), ["manifest"]),
    Case("inspect-plot-under-a-file", "plgk inspect", "`--plot` a folder under a file (a traceback)",
         ("inspect", "{h5}", "--plot", "{tmp}/afile/sub"), 14, ("afile",),
         setup=lambda s: (s.copy("h5", "damaged.h5"), s.write("afile", "x\n"))),
    Case("inspect-plot-into-a-run", "plgk inspect", "`--plot` the run directory itself (unguarded)",
         ("inspect", "{h5}", "--plot", "{run}"), 14, ("{run}", "run directory"),
         setup=lambda s: (s.copy("h5", "damaged.h5"), s.copy_run())),
    Case("train-out-name-too-long", OUT, "`--out` with a 300-character name (a traceback)",
         ("train", "--config", "{config}", "--out", "{tmp}/" + "x" * 300, "--quiet"), 14, ("File name too long",),
         setup=lambda s: s.config()),
    Case("env-fault-hook-malformed", OUT, "`PLGK_FAULT=after_checkpoint:x` (a traceback)", TRAIN, 10,
         ("PLGK_FAULT",), setup=lambda s: s.config(), env={"PLGK_FAULT": "after_checkpoint:x"}, may_create=STARTED),
    Case("env-free-bytes-malformed", DISK, "`PLGK_FREE_BYTES=lots` (a traceback)", REPLAY, 14, ("PLGK_FREE_BYTES",),
         env={"PLGK_FREE_BYTES": "lots"}),
]

CASES = (CONFIG_CASES + DATA_CASES + USER_CODE_CASES + NONFINITE_CASES + REPLAY_OPTION_CASES
         + AUDIT_SET_CASES + SUBSET_CASES + RUN_CASES + CHECK_CASES + INSPECT_CASES + OUTPUT_CASES + DISK_CASES
         + REVIEW_CASES)


def test_case_ids_are_unique_and_kebab_case():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", i) for i in ids), [i for i in ids if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", i)]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case, tmp_path, shared):
    run_case(case, tmp_path, shared)


def test_the_page_lists_every_case():
    """docs/bad-inputs.md is written from these cases: a case without its row means the page was
    not regenerated (python scripts/bad_inputs_page.py)."""
    from test_fuzz_faults import FAULT_IDS

    text = PAGE.read_text()
    missing = [i for i in [c.id for c in CASES] + list(FAULT_IDS) if f"`{i}`" not in text]
    assert not missing, f"docs/bad-inputs.md lacks rows for {missing}: run scripts/bad_inputs_page.py"


# --------------------------------------------------------------------------- hypothesis

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])
SPEC_TEXT = st.one_of(
    st.text(max_size=20),
    st.builds(lambda split, a, b: f"{split}[{a}:{b}]", st.sampled_from(["train", "test", "", "x"]),
              st.one_of(st.none().map(lambda _: ""), st.integers(-30, 30).map(str), st.text(max_size=3)),
              st.one_of(st.none().map(lambda _: ""), st.integers(-30, 30).map(str), st.text(max_size=3))),
)


def _fuzzed_replay(shared, tmp_path, *extra, audit_set="test[:2]"):
    out = tmp_path / "fuzzed.h5"
    for p in tmp_path.glob("fuzzed.h5*"):
        p.unlink()
    result = invoke("replay", "--ckpts", shared["run"], "--audit-set", audit_set, "--out", out, "--quiet", *extra)
    assert_documented_outcome(result)
    if result.exit_code:
        assert not list(tmp_path.glob("fuzzed.h5*")), "a failing replay left files"
    return result


@FUZZ
@given(spec=SPEC_TEXT)
def test_hypothesis_audit_set(shared, tmp_path, spec):
    _fuzzed_replay(shared, tmp_path, audit_set=spec)


@FUZZ
@given(rule=st.one_of(st.text(max_size=16), st.builds(lambda name, k: f"{name}:{k}",
                                                        st.sampled_from(["supersample", "adaptive", "euler", "trapezoid"]),
                                                        st.one_of(st.integers(-5, 40).map(str), st.floats().map(str),
                                                                  st.text(max_size=4)))))
def test_hypothesis_rule(shared, tmp_path, rule):
    _fuzzed_replay(shared, tmp_path, "--rule", rule)


@FUZZ
@given(subset=SPEC_TEXT)
def test_hypothesis_train_subset(shared, tmp_path, subset):
    _fuzzed_replay(shared, tmp_path, "--train-subset", subset)


TOML_VALUES = st.one_of(st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.floats(), st.text(max_size=8),
                        st.lists(st.floats(-2, 2), max_size=3))
FUZZED_KEYS = [("optim", "lr"), ("optim", "eps"), ("optim", "weight_decay"), ("optim", "clip_grad_norm"),
               ("optim", "betas"), ("schedule", "warmup_steps"), ("checkpoint", "every"), ("data", "seed"),
               ("train", "seed"), ("train", "dtype"), ("model", "name"), ("task", "name")]


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if value != value else ("inf" if value == float("inf") else "-inf" if value == -float("inf") else repr(value))
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return str(value)


@FUZZ
@given(key=st.sampled_from(FUZZED_KEYS), value=TOML_VALUES)
def test_hypothesis_config_values(shared, tmp_path, key, value):
    """Any TOML value for a key of the shared config: a run (3 updates), or one line with a
    documented code."""
    document = tomllib.loads(shared["config"].read_text())
    section_name, name = key
    document.setdefault(section_name, {})[name] = value
    config = tmp_path / "fuzzed.toml"
    config.write_text("".join(f"[{s}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in body.items()) + "\n"
                              for s, body in document.items()))
    out = tmp_path / "fuzzed_run"
    shutil.rmtree(out, ignore_errors=True)
    assert_documented_outcome(invoke("train", "--config", config, "--out", out, "--quiet"))


MANIFEST_KEYS = ["total_steps", "batch_size", "epochs", "checkpoint_every", "complete", "dtype", "parameters",
                 "run_id", "format_version", "dataset", "optimizer", "model"]


@FUZZ
@given(key=st.sampled_from(MANIFEST_KEYS), value=st.one_of(TOML_VALUES, st.none(), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)))
def test_hypothesis_manifest_values(shared, tmp_path, key, value):
    """A manifest value of any JSON type, written with a valid checksum: `plgk check` says ok or
    lists problems, never a traceback."""
    run = tmp_path / "fuzzed_run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(shared["run"], run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest[key] = value if not (isinstance(value, float) and value != value) else None
    write_manifest(run, manifest)
    result = invoke("check", run)
    text = result.output + (result.stderr or "")
    assert "Traceback" not in text, text
    assert isinstance(result.exception, (SystemExit, type(None))), repr(result.exception)
    assert result.exit_code in {0, *range(10, 21)}, (result.exit_code, text)
    if result.exit_code:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert all(line.startswith("plgk: problem: ") for line in lines[:-1]) and len(lines) >= 2, result.stderr
