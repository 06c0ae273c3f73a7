"""The user's own code behind one boundary, and the contracts of what it returns.

A model builder (`[model] name = "mod:fn"`), a `py:` dataset or task, or a custom model's forward
that raises: exit 19 (UserCodeError) with one line naming the user's file and line and the
exception; `plgk --debug` shows the traceback with the user's exception as the cause. A model or
dataset that breaks a contract (a tuple from forward, no parameters, too few output columns, 1-D
inputs, labels of the wrong shape or range) is refused with the cause named, before the run
directory is written.

The user's modules are written into tmp_path, which is the working directory (and on sys.path),
each under a name of its own so that no test imports another test's module.
"""

from __future__ import annotations

import sys
import textwrap
import traceback
from pathlib import Path

import numpy as np
import pytest

from plgk_cli.errors import AuditSpecError, ConfigError, DataError, UserCodeError
from test_cli_errors import CONFIG, assert_one_line_error, invoke, write_config, write_npz

MLP = 'name = "mlp"\nkwargs = { hidden = 4 }'


@pytest.fixture
def here(tmp_path, monkeypatch):
    """tmp_path as the working directory the user's modules are imported from."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # a rewritten module is read again
    return tmp_path


def write_module(directory: Path, name: str, source: str) -> Path:
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    sys.modules.pop(name, None)
    return path


def line_of(path: Path, marker: str) -> int:
    """The number of the line of ``path`` holding ``marker``."""
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if marker in line)


def config_with(directory: Path, model: str = MLP, dataset: str | None = None, extra: str = "") -> Path:
    """The tiny config of test_cli_errors with another [model] section and/or dataset."""
    npz = write_npz(directory / "data.npz")
    text = CONFIG.format(npz=npz).replace(MLP, model)
    if dataset is not None:
        text = text.replace(f'dataset = "npz:{npz}"', f'dataset = "{dataset}"')
    path = directory / "run.toml"
    path.write_text(text + extra)
    return path


def train(config: Path, out: Path, *extra):
    return invoke(*extra, "train", "--config", config, "--out", out, "--quiet")


MODELS = '''\
import torch


def raises_key_error(in_shape, num_classes):
    settings = {}
    return settings["width"]  # BUILDER RAISES


def linear(in_shape, num_classes):
    return torch.nn.Linear(in_shape[0], num_classes)


class Failing(torch.nn.Module):
    def __init__(self, in_shape, num_classes):
        super().__init__()
        self.linear = torch.nn.Linear(in_shape[0], num_classes)

    def forward(self, x):
        raise ValueError("no forward today")  # FORWARD RAISES


def failing(in_shape, num_classes):
    return Failing(in_shape, num_classes)


class Pair(torch.nn.Module):
    def __init__(self, in_shape, num_classes):
        super().__init__()
        self.linear = torch.nn.Linear(in_shape[0], num_classes)

    def forward(self, x):
        return self.linear(x), x


def pair(in_shape, num_classes):
    return Pair(in_shape, num_classes)


def two_columns(in_shape, num_classes):
    return torch.nn.Linear(in_shape[0], 2)


def no_parameters(in_shape, num_classes):
    return torch.nn.Flatten()
'''


# --------------------------------------------------------------------------- user code raising


def test_a_builder_that_raises_names_its_file_and_line(here):
    path = write_module(here, "models_keyerror", MODELS)
    config = config_with(here, 'name = "models_keyerror:raises_key_error"')
    out = here / "run"
    assert_one_line_error(train(config, out), UserCodeError.exit_code,
                          "[model] name: models_keyerror:raises_key_error raised",
                          f"(models_keyerror.py:{line_of(path, 'BUILDER RAISES')}): KeyError: 'width'",
                          "plgk --debug")
    assert not out.exists()
    # a kwarg the builder does not take is the config's fault, not an error in the user's code
    config = config_with(here, 'name = "models_keyerror:linear"\nkwargs = { hiden = 4 }')
    assert_one_line_error(train(config, out), ConfigError.exit_code, "[model] kwargs",
                          "models_keyerror:linear", "'hiden'")
    assert not out.exists()


def test_debug_shows_the_traceback_of_the_users_exception(here):
    path = write_module(here, "models_debug", MODELS)
    config = config_with(here, 'name = "models_debug:raises_key_error"')
    result = train(config, here / "run", "--debug")
    assert isinstance(result.exception, UserCodeError), repr(result.exception)
    assert isinstance(result.exception.__cause__, KeyError)
    shown = "".join(traceback.format_exception(result.exception))
    assert "direct cause" in shown and "KeyError: 'width'" in shown
    assert f'{path}", line {line_of(path, "BUILDER RAISES")}' in shown


def test_a_syntax_error_in_a_py_dataset_module(here):
    path = write_module(here, "data_syntax", """\
        import numpy as np


        def load():
            return (np.zeros((4, 2)), np.arange(4) % 2,  # SYNTAX
                    np.zeros((2, 2)), np.arange(2)
        x = ]
    """)
    config = config_with(here, dataset="py:data_syntax:load")
    out = here / "run"
    line = assert_one_line_error(train(config, out), UserCodeError.exit_code,
                                 "dataset py:data_syntax:load: importing data_syntax raised",
                                 "data_syntax.py:", "SyntaxError")
    assert f"data_syntax.py:{line_of(path, 'x = ]')}" in line or \
        f"data_syntax.py:{line_of(path, 'SYNTAX')}" in line
    assert not out.exists()


def test_an_import_error_inside_user_code_and_a_missing_module(here):
    path = write_module(here, "models_imports", """\
        import torch
        import no_such_package_of_the_users  # IMPORT


        def build(in_shape, num_classes):
            return torch.nn.Linear(in_shape[0], num_classes)
    """)
    out = here / "run"
    config = config_with(here, 'name = "models_imports:build"')
    assert_one_line_error(train(config, out), UserCodeError.exit_code,
                          "[model] name models_imports:build: importing models_imports raised",
                          f"(models_imports.py:{line_of(path, 'IMPORT')}): ModuleNotFoundError",
                          "no_such_package_of_the_users")
    # the module itself missing, or its attribute: the config names what does not exist
    write_module(here, "models_importable", MODELS)
    for name in ("no_such_module_here:build", "models_importable:no_such_builder"):
        config = config_with(here, f'name = "{name}"')
        assert_one_line_error(train(config, out), ConfigError.exit_code, "[model] name",
                              "cannot import", name)
    assert not out.exists()


def test_a_py_dataset_that_raises(here):
    path = write_module(here, "data_raises", """\
        def load():
            with open("/no/such/data.csv") as f:  # OPEN
                return f.read()
    """)
    config = config_with(here, dataset="py:data_raises:load")
    assert_one_line_error(train(config, here / "run"), UserCodeError.exit_code,
                          "dataset py:data_raises:load: the function raised",
                          f"(data_raises.py:{line_of(path, 'OPEN')}): FileNotFoundError")
    assert not (here / "run").exists()


def test_a_custom_forward_that_raises(here):
    path = write_module(here, "models_forward", MODELS)
    config = config_with(here, 'name = "models_forward:failing"')
    out = here / "run"
    assert_one_line_error(train(config, out), UserCodeError.exit_code,
                          "[model] name: the forward of models_forward:failing raised",
                          f"(models_forward.py:{line_of(path, 'FORWARD RAISES')}): ValueError: no forward today")
    assert not out.exists()  # refused by the trial forward, before the run is started


def test_replay_builds_the_model_behind_the_same_boundary(here):
    path = write_module(here, "models_replay", MODELS)
    config = config_with(here, 'name = "models_replay:linear"')
    run = here / "run"
    result = train(config, run)
    assert result.exit_code == 0, result.output
    # the builder changed after training, and now raises
    path.write_text(MODELS.replace("    return torch.nn.Linear(in_shape[0], num_classes)\n",
                                   "    raise RuntimeError('changed since training')  # CHANGED\n", 1))
    sys.modules.pop("models_replay", None)
    out = here / "influences.h5"
    result = invoke("replay", "--ckpts", run, "--audit-set", "test[:2]", "--out", out, "--quiet")
    assert_one_line_error(result, UserCodeError.exit_code, "[model] name: models_replay:linear raised",
                          f"(models_replay.py:{line_of(path, 'CHANGED')}): RuntimeError: changed since training")
    assert not out.exists()


def test_replay_runs_the_forward_behind_the_same_boundary(here):
    """A model whose forward was edited after training to raise: replay's trial forward, before any
    work, names the user's line (not a traceback from inside the batched gradient passes)."""
    path = write_module(here, "models_forward", MODELS)
    config = config_with(here, 'name = "models_forward:failing"')
    source = MODELS.replace('        raise ValueError("no forward today")  # FORWARD RAISES\n',
                            "        return self.linear(x)\n", 1)
    path.write_text(source)
    run = here / "run"
    result = train(config, run)
    assert result.exit_code == 0, result.output
    path.write_text(MODELS)  # the forward raises again
    sys.modules.pop("models_forward", None)
    out = here / "influences.h5"
    result = invoke("replay", "--ckpts", run, "--audit-set", "test[:2]", "--out", out, "--quiet")
    assert_one_line_error(result, UserCodeError.exit_code, "[model] name: the forward of models_forward:failing raised",
                          f"(models_forward.py:{line_of(path, 'FORWARD RAISES')}): ValueError: no forward today")
    assert not out.exists()


def test_a_py_task_that_raises_when_made(here):
    path = write_module(here, "task_raises", """\
        from plgk_cli.tasks.classification import Classification


        class Mine(Classification):
            def __init__(self):
                raise LookupError("no task settings")  # TASK
    """)
    config = config_with(here, extra='\n[task]\nname = "py:task_raises:Mine"\n')
    assert_one_line_error(train(config, here / "run"), UserCodeError.exit_code,
                          "[task] name: task_raises:Mine() raised",
                          f"(task_raises.py:{line_of(path, 'TASK')}): LookupError: no task settings")


# --------------------------------------------------------------------------- model contracts


@pytest.mark.parametrize("builder, needles", [
    ("pair", ["returned a tuple from forward", "a tensor of shape (batch, classes)",
              "Hugging Face output with .logits"]),
    ("two_columns", ["returned 2 columns for 3 classes"]),
    ("no_parameters", ["no trainable parameters"]),
])
def test_a_model_that_breaks_the_contract_is_refused_before_the_run_starts(here, builder, needles):
    write_module(here, f"models_{builder}", MODELS)
    config = config_with(here, f'name = "models_{builder}:{builder}"')
    out = here / "run"
    assert_one_line_error(train(config, out), ConfigError.exit_code,
                          f"[model] name: models_{builder}:{builder}", *needles)
    assert not out.exists()


# --------------------------------------------------------------------------- dataset contracts


def arrays(**changes) -> dict:
    rng = np.random.default_rng(0)
    base = dict(x_train=rng.normal(size=(20, 6)), y_train=np.arange(20) % 3,
                x_test=rng.normal(size=(8, 6)), y_test=np.arange(8) % 3)
    return {**base, **changes}


@pytest.mark.parametrize("change, needles", [
    (lambda a: dict(a, x_train=a["x_train"][:, 0], x_test=a["x_test"][:, 0]),
     ["x_train has shape (20,)", "each example must be at least 1-D", "x.reshape(20, 1)"]),
    (lambda a: dict(a, y_train=a["y_train"][:, None]),
     ["y_train has shape (20, 1)", "class labels must be 1-D integers", "y.reshape(-1)"]),
    (lambda a: dict(a, y_test=np.where(np.arange(8) == 5, -2, a["y_test"])),
     ["y_test has negative labels", "y_test[5] is -2"]),
    (lambda a: dict(a, y_train=np.where(np.arange(20) == 7, 1.5, a["y_train"])),
     ["y_train must hold integer class labels", "y_train[7] is 1.5", "regression"]),
    (lambda a: dict(a, y_train=a["y_train"].astype(np.float64)),
     ["y_train must hold integer class labels", "not float64", "astype(numpy.int64)"]),
], ids=["1-D x", "y (N, 1)", "negative label", "fractional label", "float labels"])
def test_a_dataset_that_breaks_the_contract(here, change, needles):
    npz = here / "bad.npz"
    np.savez(npz, **change(arrays()))
    config = write_config(here / "run.toml", npz)
    assert_one_line_error(train(config, here / "run"), DataError.exit_code, str(npz), *needles)
    assert not (here / "run").exists()


def test_a_label_beyond_the_tasks_classes_is_a_data_error(here):
    """The class count from the task (a py: task of two classes), not from the labels."""
    write_module(here, "task_two", """\
        from plgk_cli.tasks.classification import Classification


        class TwoClasses(Classification):
            def output_width(self, y_train, y_test):
                return 2
    """)
    npz = here / "data.npz"
    np.savez(npz, **arrays())  # labels 0..2
    config = write_config(here / "run.toml", npz)
    config.write_text(config.read_text() + '\n[task]\nname = "py:task_two:TwoClasses"\n')
    assert_one_line_error(train(config, here / "run"), DataError.exit_code, str(npz),
                          "y_train[2] is label 2", "2 classes")
    assert not (here / "run").exists()


# --------------------------------------------------------------------------- audit targets


def test_margin_needs_two_classes(here):
    npz = here / "one_class.npz"
    np.savez(npz, **arrays(y_train=np.zeros(20, np.int64), y_test=np.zeros(8, np.int64)))
    run = here / "run"
    result = train(write_config(here / "run.toml", npz), run)
    assert result.exit_code == 0, result.output
    out = here / "influences.h5"
    result = invoke("replay", "--ckpts", run, "--audit-set", "test[:2]", "--target", "margin",
                    "--out", out, "--quiet")
    assert_one_line_error(result, AuditSpecError.exit_code,
                          "--target margin: needs at least 2 classes; the run has 1")
    assert not out.exists()
