"""NaN and Inf are errors where they arise: in the data (refused when it is loaded, naming the
array, the first bad element and the file) and in training (the run stops at the first update
whose loss, gradients or updated parameters are not finite: NonFiniteError, exit 20, naming the
step; the run directory keeps the steps before it). `--allow-nonfinite` (the Recorder's
``allow_nonfinite=True``) records such a run anyway and marks its manifest.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from plgk_cli.data import load_dataset
from plgk_cli.errors import DataError, NonFiniteError
from plgk_cli.recorder import Recorder
from plgk_cli.trajectory import list_steps
from test_cli_errors import CONFIG, assert_one_line_error, invoke, write_config, write_npz

MLP = 'name = "mlp"\nkwargs = { hidden = 4 }'
STEP = re.compile(r"step (\d+) \(epoch 1\): ")


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def config_with(directory, *, optim: str = 'name = "adam"\nlr = 0.01', model: str = MLP,
                dtype: str = "float64"):
    npz = write_npz(directory / "data.npz")
    text = (CONFIG.format(npz=npz).replace('name = "adam"\nlr = 0.01', optim).replace(MLP, model)
            .replace('dtype = "float64"', f'dtype = "{dtype}"'))
    path = directory / "run.toml"
    path.write_text(text)
    return path


def train(config, out, *extra):
    return invoke("train", "--config", config, "--out", out, "--quiet", *extra)


def manifest(run) -> dict:
    return json.loads((run / "manifest.json").read_text())


MODELS = '''\
import torch


class Root(torch.nn.Module):
    """Adds sqrt(root) with root = 0: a finite loss whose gradient in root is not finite."""

    def __init__(self, in_shape, num_classes):
        super().__init__()
        self.linear = torch.nn.Linear(in_shape[0], num_classes)
        self.root = torch.nn.Parameter(torch.zeros(num_classes))

    def forward(self, x):
        return self.linear(x) + self.root.sqrt()


class Log(torch.nn.Module):
    """The log of a negative number: NaN outputs, a NaN loss."""

    def __init__(self, in_shape, num_classes):
        super().__init__()
        self.linear = torch.nn.Linear(in_shape[0], num_classes)

    def forward(self, x):
        return (self.linear(x) - 1e6).log()


class Loud(torch.nn.Module):
    """Outputs scaled by 1e3: gradients large enough that lr 1e306 takes the weights past float64."""

    def __init__(self, in_shape, num_classes):
        super().__init__()
        self.linear = torch.nn.Linear(in_shape[0], num_classes)

    def forward(self, x):
        return self.linear(x) * 1e3


def root(in_shape, num_classes):
    return Root(in_shape, num_classes)


def log(in_shape, num_classes):
    return Log(in_shape, num_classes)


def loud(in_shape, num_classes):
    return Loud(in_shape, num_classes)
'''


@pytest.fixture
def models(here):
    (here / "nonfinite_models.py").write_text(MODELS)
    sys.modules.pop("nonfinite_models", None)
    return "nonfinite_models"


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_diverging_run_stops_at_the_first_nonfinite_step(here, optimizer):
    config = config_with(here, optim=f'name = "{optimizer}"\nlr = 1e300')
    run = here / "run"
    line = assert_one_line_error(train(config, run), NonFiniteError.exit_code, "the run diverged",
                                 "lower the learning rate", f"the run so far is in {run}",
                                 "pass --allow-nonfinite to record it anyway")
    step = int(STEP.search(line).group(1))
    assert step >= 1
    # the failing update is not recorded: the run is the unfinished run of the updates before it
    assert list_steps(run) == list(range(step))
    assert manifest(run)["complete"] is False and "nonfinite" not in manifest(run)
    result = invoke("check", run)
    assert "Traceback" not in result.output + result.stderr, result.stderr
    assert isinstance(result.exception, SystemExit) and result.exit_code != 0
    assert str(run) in result.stderr

    # --allow-nonfinite records every update and marks the first non-finite one
    marked = here / "marked"
    result = train(config, marked, "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    assert list_steps(marked) == list(range(4))  # 20 examples, batch 8: 3 updates
    assert manifest(marked)["complete"] is True
    assert manifest(marked)["nonfinite"] == {"first_step": step}
    # ... which `plgk check` reports and replay refuses: its audit would be NaN
    result = invoke("check", marked)
    assert result.exit_code == NonFiniteError.exit_code and f"update {step} made the loss" in result.stderr
    out = here / "out.h5"
    assert_one_line_error(invoke("replay", "--ckpts", marked, "--audit-set", "test[:2]", "--out", out, "--quiet"),
                          NonFiniteError.exit_code, f"update {step}", "--allow-nonfinite")
    assert not out.exists()


@pytest.mark.parametrize("builder, needles", [
    ("log", ["step 1 (epoch 1): the training loss is nan"]),
    ("root", ["step 1 (epoch 1): a gradient of root is "]),
])
def test_a_model_that_computes_nan(here, models, builder, needles):
    config = config_with(here, model=f'name = "{models}:{builder}"')
    run = here / "run"
    assert_one_line_error(train(config, run), NonFiniteError.exit_code, *needles, "the run diverged")
    assert list_steps(run) == [0]


def test_a_parameter_that_the_update_takes_past_the_dtype(here, models):
    config = config_with(here, optim='name = "sgd"\nlr = 1e306', model=f'name = "{models}:loud"')
    run = here / "run"
    assert_one_line_error(train(config, run), NonFiniteError.exit_code,
                          "step 1 (epoch 1): parameter linear.", "is inf after the update")
    assert list_steps(run) == [0]


def test_an_lr_beyond_float32_is_refused_before_the_run(here):
    config = config_with(here, optim='name = "sgd"\nlr = 1e300', dtype="float32")
    run = here / "run"
    assert_one_line_error(train(config, run), 10, "[optim] lr = 1e+300", "float32")
    assert not run.exists()


# --------------------------------------------------------------------------- the Recorder


def own_loop(out, npz, lr: float, **recorder_kwargs):
    """A user's loop: Adam at ``lr`` on the tiny data, recorded."""
    data = load_dataset(f"npz:{npz}", 0, torch.float64)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    with Recorder(out, model, optimizer, model_name="test_nonfinite:own_model", dataset=f"npz:{npz}",
                  batch_size=8, epochs=2, **recorder_kwargs) as recorder:
        for _ in range(2):
            for batch in torch.arange(len(data.y_train)).split(8):
                optimizer.zero_grad()
                logits = model(data.x_train[batch])
                loss = F.cross_entropy(logits, data.y_train[batch])
                loss.backward()
                optimizer.step()
                recorder.step(batch, loss, logits)
    return recorder


def own_model(in_shape, num_classes):
    """own_loop's model, for the Recorder's check that model_name builds the same parameters."""
    return torch.nn.Sequential(torch.nn.Linear(in_shape[0], 4), torch.nn.ReLU(), torch.nn.Linear(4, num_classes))


def test_the_recorder_stops_a_users_loop_at_the_step(here):
    npz = write_npz(here / "data.npz")
    run = here / "own"
    with pytest.raises(NonFiniteError) as info:
        own_loop(run, npz, lr=1e300)
    message = str(info.value)
    assert "the run diverged" in message and "allow_nonfinite=True" in message and str(run) in message
    step = int(STEP.search(message).group(1))
    assert list_steps(run) == list(range(step))
    assert manifest(run)["complete"] is False

    recorder = own_loop(here / "marked", npz, lr=1e300, allow_nonfinite=True)
    assert recorder.manifest["complete"] and recorder.manifest["nonfinite"] == {"first_step": step}
    assert manifest(here / "marked")["nonfinite"] == {"first_step": step}
    assert list_steps(here / "marked") == list(range(7))  # 2 epochs of 3 updates

    recorder = own_loop(here / "fine", npz, lr=0.01, allow_nonfinite=True)  # finite: nothing to mark
    assert recorder.manifest["complete"] and "nonfinite" not in manifest(here / "fine")


# --------------------------------------------------------------------------- data


def tiny_arrays(**changes) -> dict:
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.normal(size=(20, 6)), y_train=np.arange(20) % 3,
                  x_test=rng.normal(size=(8, 6)), y_test=np.arange(8) % 3)
    for key, (index, value) in changes.items():
        arrays[key] = arrays[key].astype(np.float64)
        arrays[key][index] = value
    return arrays


REGRESSION = "\n[task]\nname = \"regression\"\n"


@pytest.mark.parametrize("changes, dtype, task, needles", [
    ({"x_train": ((4, 2), np.nan)}, "float64", "", ["x_train holds NaN or Inf: x_train[4, 2] is nan"]),
    ({"x_test": ((1, 0), -np.inf)}, "float64", "", ["x_test holds NaN or Inf: x_test[1, 0] is -inf"]),
    ({"x_train": ((5, 1), 1e39)}, "float32", "", ["x_train[5, 1] is 1e+39", "float32", "float64"]),
    ({"y_train": (3, np.nan)}, "float64", REGRESSION, ["y_train holds NaN or Inf: y_train[3] is nan"]),
    ({"y_test": (2, np.inf)}, "float64", REGRESSION, ["y_test holds NaN or Inf: y_test[2] is inf"]),
    ({"y_test": (6, -1e39)}, "float32", REGRESSION, ["y_test[6] is -1e+39", "float32"]),
], ids=["nan x_train", "inf x_test", "x overflows float32", "nan target", "inf target",
        "target overflows float32"])
def test_nonfinite_data_is_refused_at_load(here, changes, dtype, task, needles):
    npz = here / "bad.npz"
    np.savez(npz, **tiny_arrays(**changes))
    config = write_config(here / "run.toml", npz)
    config.write_text(config.read_text().replace('dtype = "float64"', f'dtype = "{dtype}"') + task)
    run = here / "run"
    assert_one_line_error(train(config, run), DataError.exit_code, f"dataset npz:{npz}", *needles)
    assert not run.exists()


def test_nonfinite_data_from_a_py_function_is_refused(here):
    (here / "nonfinite_data.py").write_text(textwrap.dedent("""\
        import numpy as np


        def load():
            x = np.ones((4, 3))
            x[2, 1] = np.nan
            return x, np.arange(4) % 2, np.ones((2, 3)), np.arange(2)
    """))
    sys.modules.pop("nonfinite_data", None)
    with pytest.raises(DataError, match=re.escape("dataset py:nonfinite_data:load: x_train holds NaN or "
                                                  "Inf: x_train[2, 1] is nan")):
        load_dataset("py:nonfinite_data:load")
