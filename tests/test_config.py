"""Direct tests of the run configuration: parse_config, load_config and config_from_dict.

The CLI's one-line error messages for bad configs are covered by tests/test_cli_errors.py; here
the parser is called directly: defaults, each optimizer family's full config, the cross-key
combination rules, the value checks the CLI tests do not exercise, the to_dict round trip and the
shipped configs/*.toml.

Property-based tests (hypothesis) of the parser are in tests/test_properties.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest

from plgk_cli.config import (OPTIMIZERS, CheckpointConfig, DataConfig, ModelConfig, OptimConfig,
                             RunConfig, ScheduleConfig, TrainConfig, config_from_dict, load_config,
                             parse_config)
from plgk_cli.errors import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"

# torch.optim's documented default eps per optimizer (Adam/AdamW/RMSprop 1e-8, Adagrad 1e-10).
TORCH_DEFAULT_EPS = {"sgd": 1e-8, "adam": 1e-8, "adamw": 1e-8, "rmsprop": 1e-8, "adagrad": 1e-10}


# --------------------------------------------------------------------------- defaults


def test_empty_document_gives_all_defaults():
    assert parse_config({}) == RunConfig()


def test_default_sections():
    config = parse_config({})
    assert config.data == DataConfig(dataset="digits", seed=0)
    assert config.model.name == "cnn" and config.model.kwargs == {}
    o = config.optim
    assert (o.name, o.lr) == ("adam", 1e-3)  # torch.optim.Adam's default lr
    assert (o.momentum, o.nesterov, o.dampening) == (0.0, False, 0.0)
    assert o.betas == (0.9, 0.999)  # torch.optim.Adam's default betas
    assert o.eps is None and o.resolved_eps() == 1e-8
    assert o.alpha == 0.99  # torch.optim.RMSprop's default alpha
    assert (o.weight_decay, o.amsgrad, o.centered, o.clip_grad_norm) == (0.0, False, False, None)
    assert config.schedule == ScheduleConfig(name="constant", warmup_steps=0, step_size=1000,
                                             gamma=0.1)
    assert config.train == TrainConfig(epochs=5, batch_size=64, seed=0, device="auto",
                                       dtype="float32")
    assert config.checkpoint == CheckpointConfig(every=1)


def test_partial_section_keeps_other_defaults():
    config = parse_config({"optim": {"lr": 0.5}, "train": {"epochs": 2}})
    assert config.optim == dataclasses.replace(OptimConfig(), lr=0.5)
    assert config.train == dataclasses.replace(TrainConfig(), epochs=2)
    assert config.data == DataConfig() and config.schedule == ScheduleConfig()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resolved_eps_defaults_to_torch(name):
    assert parse_config({"optim": {"name": name}}).optim.resolved_eps() == TORCH_DEFAULT_EPS[name]


@pytest.mark.parametrize("name", [o for o in OPTIMIZERS if o != "sgd"])
def test_explicit_eps_wins(name):
    assert parse_config({"optim": {"name": name, "eps": 3e-7}}).optim.resolved_eps() == 3e-7


@pytest.mark.parametrize("name, key, value", [
    ("sgd", "eps", 1e-7), ("sgd", "betas", [0.9, 0.99]), ("adam", "momentum", 0.9),
    ("adam", "alpha", 0.9), ("adagrad", "amsgrad", True), ("rmsprop", "dampening", 0.1),
])
def test_a_key_the_optimizer_ignores_is_rejected(name, key, value):
    with pytest.raises(ConfigError, match=rf"\[optim\] {key}: not used by {name}"):
        parse_config({"optim": {"name": name, key: value}})


# --------------------------------------------------------------------------- full configs

FULL_CONFIGS = {
    "sgd": """
        [data]
        dataset = "npz:data/tiny.npz"
        seed = 3
        [model]
        name = "mlp"
        kwargs = { hidden = 16, depth = 3 }
        [optim]
        name = "sgd"
        lr = 0.05
        momentum = 0.9
        nesterov = true
        dampening = 0.0
        weight_decay = 1e-4
        clip_grad_norm = 2.5
        [schedule]
        name = "step"
        step_size = 30
        gamma = 0.5
        [train]
        epochs = 3
        batch_size = 32
        seed = 7
        device = "cpu"
        dtype = "float64"
        [checkpoint]
        every = 1
    """,
    "adam": """
        [model]
        name = "lenet5"
        [optim]
        name = "adam"
        lr = 2e-3
        betas = [0.8, 0.99]
        eps = 1e-7
        weight_decay = 0.01
        amsgrad = true
        [schedule]
        name = "cosine"
        warmup_steps = 10
    """,
    "adamw": """
        [optim]
        name = "adamw"
        lr = 3e-3
        betas = [0.95, 0.98]
        weight_decay = 0.05
        clip_grad_norm = 1.0
    """,
    "rmsprop": """
        [data]
        dataset = "mnist:/data/mnist"
        [optim]
        name = "rmsprop"
        lr = 1e-3
        alpha = 0.9
        momentum = 0.5
        centered = true
        eps = 1e-6
    """,
    "adagrad": """
        [optim]
        name = "adagrad"
        lr = 0.05
        weight_decay = 1e-4
    """,
}

EXPECTED_OPTIM = {
    "sgd": OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, dampening=0.0,
                       weight_decay=1e-4, clip_grad_norm=2.5),
    "adam": OptimConfig(name="adam", lr=2e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.01,
                        amsgrad=True),
    "adamw": OptimConfig(name="adamw", lr=3e-3, betas=(0.95, 0.98), weight_decay=0.05,
                         clip_grad_norm=1.0),
    "rmsprop": OptimConfig(name="rmsprop", lr=1e-3, alpha=0.9, momentum=0.5, centered=True,
                           eps=1e-6),
    "adagrad": OptimConfig(name="adagrad", lr=0.05, weight_decay=1e-4),
}

EXPECTED_RESOLVED_EPS = {"sgd": 1e-8, "adam": 1e-7, "adamw": 1e-8, "rmsprop": 1e-6,
                         "adagrad": 1e-10}


def _write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(line.strip() for line in text.splitlines()) + "\n")
    return path


@pytest.mark.parametrize("family", sorted(FULL_CONFIGS))
def test_full_config_of_each_optimizer(tmp_path, family):
    config = load_config(_write(tmp_path, FULL_CONFIGS[family]))
    assert config.optim == EXPECTED_OPTIM[family]
    assert config.optim.resolved_eps() == EXPECTED_RESOLVED_EPS[family]
    assert type(config.optim.betas) is tuple and all(type(b) is float for b in config.optim.betas)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim.lr = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim = OptimConfig()  # type: ignore[misc]


def test_full_sgd_config_other_sections(tmp_path):
    config = load_config(_write(tmp_path, FULL_CONFIGS["sgd"]))
    assert config.data == DataConfig(dataset="npz:data/tiny.npz", seed=3)
    assert config.model == ModelConfig(name="mlp", kwargs={"hidden": 16, "depth": 3})
    assert config.schedule == ScheduleConfig(name="step", warmup_steps=0, step_size=30, gamma=0.5)
    assert config.train == TrainConfig(epochs=3, batch_size=32, seed=7, device="cpu",
                                       dtype="float64")
    assert config.checkpoint == CheckpointConfig(every=1)
    for section in (config.data, config.model, config.schedule, config.train, config.checkpoint):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(section, dataclasses.fields(section)[0].name, None)


def test_integer_lr_is_stored_as_float():
    optim = parse_config({"optim": {"name": "sgd", "lr": 1}}).optim
    assert optim.lr == 1.0 and type(optim.lr) is float


# --------------------------------------------------------------------------- combinations


@pytest.mark.parametrize("optim, key", [
    ({"name": "adam", "nesterov": True}, "nesterov"),
    ({"name": "sgd", "nesterov": True}, "nesterov"),  # momentum 0
    ({"name": "sgd", "nesterov": True, "momentum": 0.9, "dampening": 0.1}, "nesterov"),
    ({"name": "rmsprop", "nesterov": True, "momentum": 0.9}, "nesterov"),
    ({"name": "adam", "momentum": 0.9}, "momentum"),
    ({"name": "adamw", "momentum": 0.5}, "momentum"),
    ({"name": "adagrad", "momentum": 0.1}, "momentum"),
    ({"name": "sgd", "amsgrad": True}, "amsgrad"),
    ({"name": "rmsprop", "amsgrad": True}, "amsgrad"),
    ({"name": "adagrad", "amsgrad": True}, "amsgrad"),
    ({"name": "sgd", "centered": True}, "centered"),
    ({"name": "adam", "centered": True}, "centered"),
    ({"name": "adamw", "centered": True}, "centered"),
    ({"name": "adagrad", "centered": True}, "centered"),
])
def test_invalid_combination_names_the_key(optim, key):
    with pytest.raises(ConfigError) as info:
        parse_config({"optim": optim}, source="combo.toml")
    message = str(info.value)
    assert message.startswith("combo.toml: ")
    assert f"[optim] {key}:" in message


@pytest.mark.parametrize("optim", [
    {"name": "sgd", "nesterov": True, "momentum": 0.9, "dampening": 0.0},
    {"name": "sgd", "momentum": 0.9, "dampening": 0.5},
    {"name": "rmsprop", "momentum": 0.9, "centered": True},
    {"name": "adam", "amsgrad": True},
    {"name": "adamw", "amsgrad": True},
])
def test_valid_combinations_parse(optim):
    config = parse_config({"optim": optim})
    for key, value in optim.items():
        assert getattr(config.optim, key) == value


def test_combination_error_from_file_names_the_file(tmp_path):
    path = _write(tmp_path, '[optim]\nname = "adam"\ncentered = true\n')
    with pytest.raises(ConfigError, match=r"\[optim\] centered: not used by adam \(only by rmsprop\)") as info:
        load_config(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- single values
# (bad values not already exercised through the CLI in tests/test_cli_errors.py)


@pytest.mark.parametrize("raw, section, key, needle", [
    ({"optim": {"nesterov": 1}}, "optim", "nesterov", "true or false"),
    ({"optim": {"betas": [0.9, 0.99, 0.999]}}, "optim", "betas", "[beta1, beta2]"),
    ({"optim": {"betas": [0.9, 1.0]}}, "optim", "betas", "< 1"),
    ({"optim": {"momentum": 1.0, "name": "sgd"}}, "optim", "momentum", "< 1"),
    ({"optim": {"alpha": 1.5, "name": "rmsprop"}}, "optim", "alpha", "<= 1"),
    ({"optim": {"lr": math.inf}}, "optim", "lr", "finite"),
    ({"optim": {"lr": math.nan}}, "optim", "lr", "finite"),
    ({"optim": {"eps": 0.0}}, "optim", "eps", "> 0"),
    ({"optim": {"clip_grad_norm": 0}}, "optim", "clip_grad_norm", "> 0"),
    ({"optim": {"name": "lion"}}, "optim", "name", "'lion'"),
    ({"train": {"epochs": True}}, "train", "epochs", "expected an integer"),
    ({"train": {"batch_size": 0}}, "train", "batch_size", ">= 1"),
    ({"train": {"dtype": "float16"}}, "train", "dtype", "'float16'"),
    ({"schedule": {"name": "linear"}}, "schedule", "name", "'linear'"),
    ({"schedule": {"step_size": 0}}, "schedule", "step_size", ">= 1"),
    ({"schedule": {"gamma": 0.0}}, "schedule", "gamma", "> 0"),
    ({"schedule": {"warmup_steps": 2.5}}, "schedule", "warmup_steps", "expected an integer"),
    ({"data": {"dataset": "npz:"}}, "data", "dataset", "names no path"),
    ({"data": {"dataset": "cifar10"}}, "data", "dataset", "'cifar10'"),
    ({"data": {"seed": -1}}, "data", "seed", ">= 0"),
    ({"model": {"name": "resnet"}}, "model", "name", "'resnet'"),
    ({"model": {"name": "pkg.module:"}}, "model", "name", "package.module:function"),
    ({"model": {"kwargs": 64}}, "model", "kwargs", "expected a table"),
    ({"checkpoint": {"every": 0}}, "checkpoint", "every", ">= 1"),
])
def test_bad_value_names_section_and_key(raw, section, key, needle):
    with pytest.raises(ConfigError) as info:
        parse_config(raw, source="src.toml")
    message = str(info.value)
    assert message.startswith(f"src.toml: [{section}] {key}: ")
    assert needle in message


def test_boundary_values_accepted():
    config = parse_config({"optim": {"name": "rmsprop", "alpha": 1.0, "momentum": 0.0},
                           "data": {"dataset": "mnist:/some/dir"},
                           "model": {"name": "my_pkg.models:build"},
                           "schedule": {"warmup_steps": 0, "step_size": 1, "gamma": 2.0}})
    assert config.optim.alpha == 1.0
    assert config.data.dataset == "mnist:/some/dir"
    assert config.model.name == "my_pkg.models:build"
    assert (config.schedule.step_size, config.schedule.gamma) == (1, 2.0)


@pytest.mark.parametrize("raw, needle", [
    ([], "expected a TOML table at the top level"),
    ({"optim": 3}, "[optim] must be a table"),
])
def test_bad_document_shape(raw, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        parse_config(raw)


def test_unknown_key_lists_known_keys():
    with pytest.raises(ConfigError) as info:
        parse_config({"schedule": {"warmup": 5}})
    message = str(info.value)
    assert "[schedule] warmup: unknown key" in message
    for known in ("name", "warmup_steps", "step_size", "gamma"):
        assert known in message


# --------------------------------------------------------------------------- round trip

ROUND_TRIP_DOCUMENTS = [
    {},
    {"optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True,
               "clip_grad_norm": 0.5, "weight_decay": 1e-3},
     "model": {"name": "mlp", "kwargs": {"hidden": 6, "depth": 3}},
     "data": {"dataset": "npz:x.npz", "seed": 4}},
    {"optim": {"name": "adamw", "betas": [0.5, 0.75], "eps": 1e-6, "amsgrad": True},
     "schedule": {"name": "cosine", "warmup_steps": 3}},
    {"optim": {"name": "rmsprop", "alpha": 0.5, "momentum": 0.25, "centered": True},
     "schedule": {"name": "step", "step_size": 7, "gamma": 0.3},
     "train": {"epochs": 1, "batch_size": 3, "seed": 9, "device": "cpu", "dtype": "float64"}},
    {"optim": {"name": "adagrad", "lr": 0.01}},
    {"optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.05,
               "groups": [{"params": ["*.bias", "*norm*"], "weight_decay": 0.0},
                          {"params": "head.*", "lr": 1e-2, "betas": [0.8, 0.99]}]},
     "schedule": {"name": "onecycle", "pct_start": 0.25, "div_factor": 10.0, "cycle_momentum": True}},
    {"optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
     "schedule": {"name": "cyclic", "step_size": 5, "base_momentum": 0.8, "max_momentum": 0.9}},
]


@pytest.mark.parametrize("raw", ROUND_TRIP_DOCUMENTS)
def test_to_dict_round_trip(raw):
    config = parse_config(raw)
    again = config_from_dict(config.to_dict())
    assert again == config
    assert type(again.optim.betas) is tuple


@pytest.mark.parametrize("raw", ROUND_TRIP_DOCUMENTS)
def test_round_trip_through_json_as_in_a_manifest(raw):
    config = parse_config(raw)
    again = config_from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert type(again.optim.betas) is tuple  # JSON turns the tuple into a list


def test_to_dict_is_plain_data_with_every_section():
    d = parse_config(ROUND_TRIP_DOCUMENTS[1]).to_dict()
    assert set(d) == {"task", "data", "model", "optim", "schedule", "train", "checkpoint"}
    assert d["optim"]["momentum"] == 0.9 and d["model"]["kwargs"] == {"hidden": 6, "depth": 3}
    assert json.loads(json.dumps(d))["optim"]["betas"] == [0.9, 0.999]  # JSON-serializable


def test_config_from_dict_partial_sections_default():
    config = config_from_dict({"optim": {"name": "sgd", "lr": 0.2}})
    assert config.optim == OptimConfig(name="sgd", lr=0.2)
    assert config.train == TrainConfig()


# --------------------------------------------------------------------------- shipped configs

SHIPPED = sorted(CONFIGS_DIR.glob("*.toml"))


def test_configs_are_shipped():
    assert SHIPPED, f"no configs in {CONFIGS_DIR}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    config = load_config(path)
    assert isinstance(config, RunConfig)
    assert config_from_dict(config.to_dict()) == config
    # A file named after an optimizer (sgd_nesterov.toml, adamw_clip_cosine.toml, ...) uses it.
    family = path.stem.split("_")[0]
    if family in OPTIMIZERS:
        assert config.optim.name == family


# --------------------------------------------------------------------------- parameter groups, schedules


def test_groups_parse_in_order_with_their_own_values():
    config = parse_config({"optim": {"name": "adamw", "weight_decay": 0.1, "groups": [
        {"params": "*.bias", "weight_decay": 0.0}, {"params": ["0.*", "2.weight"], "lr": 0.5}]}})
    first, second = config.optim.groups
    assert first.params == ("*.bias",) and first.weight_decay == 0.0 and first.lr is None
    assert second.params == ("0.*", "2.weight") and second.lr == 0.5 and second.weight_decay is None


@pytest.mark.parametrize("raw, needle", [
    ({"optim": {"groups": [{"params": "*.bias", "nesterov": True}]}},
     "[[optim.groups]] #1 nesterov: unknown key; a group sets params and any of lr, momentum"),
    ({"optim": {"groups": [{"weight_decay": 0.0}]}},
     "[[optim.groups]] #1 params: expected a parameter-name pattern or a list of them"),
    ({"optim": {"groups": [{"params": []}]}}, "[[optim.groups]] #1 params: expected a parameter-name"),
    ({"optim": {"groups": [{"params": "a"}, {"params": "b", "lr": -1.0}]}},
     "[[optim.groups]] #2 lr: must be > 0, got -1.0"),
    ({"optim": {"name": "adam", "groups": [{"params": "a", "momentum": 0.9}]}},
     "[[optim.groups]] #1 momentum: not used by adam (only by sgd, rmsprop)"),
    ({"optim": {"groups": {"params": "a"}}}, "[optim] groups: expected [[optim.groups]] tables"),
    ({"optim": {"name": "sgd", "momentum": 0.9, "nesterov": True, "groups": [{"params": "a", "momentum": 0.0}]}},
     "[[optim.groups]] #1 momentum: [optim] nesterov = true needs every group's momentum > 0"),
    ({"schedule": {"name": "cosine", "pct_start": 0.2}},
     "[schedule] pct_start: not used by schedule 'cosine' (only by onecycle); remove it"),
    ({"schedule": {"name": "onecycle", "gamma": 0.5}}, "[schedule] gamma: not used by schedule 'onecycle'"),
    ({"schedule": {"name": "onecycle", "warmup_steps": 5}}, "[schedule] warmup_steps: not used by schedule"),
    ({"schedule": {"name": "step", "div_factor": 5.0}}, "[schedule] div_factor: not used by schedule 'step' "
                                                         "(only by onecycle, cyclic)"),
    ({"optim": {"name": "adagrad"}, "schedule": {"name": "onecycle"}},
     "[schedule] cycle_momentum: adagrad has no momentum to cycle"),
    ({"schedule": {"name": "onecycle", "pct_start": 1.0}}, "[schedule] pct_start: must be < 1"),
])
def test_bad_group_or_schedule_names_the_place(raw, needle):
    with pytest.raises(ConfigError) as excinfo:
        parse_config(raw, source="run.toml")
    assert str(excinfo.value).startswith("run.toml: ") and needle in str(excinfo.value), str(excinfo.value)


def test_groups_from_a_toml_file(tmp_path):
    path = _write(tmp_path, """
[optim]
name = "adamw"
weight_decay = 0.01

[[optim.groups]]
params = ["*.bias"]
weight_decay = 0.0

[[optim.groups]]
params = "2.*"
lr = 0.01
""")
    groups = load_config(path).optim.groups
    assert [g.params for g in groups] == [("*.bias",), ("2.*",)]
    assert groups[0].weight_decay == 0.0 and groups[1].lr == 0.01
