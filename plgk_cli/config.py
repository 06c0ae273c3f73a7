"""The run configuration (`plgk train --config run.toml`): parsed, validated, frozen.

Every section is a frozen dataclass. Unknown keys and bad values raise ConfigError naming the
file, the section and the key, so that a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plgk_cli.errors import ConfigError
from plgk_cli.tasks import BUILTIN_TASKS

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad")
SCHEDULES = ("constant", "step", "cosine", "onecycle", "cyclic")
BUILTIN_MODELS = ("mlp", "cnn", "lenet5", "transformer", "gpt")
BUILTIN_DATASETS = ("digits", "diabetes", "synthetic-text", "addition")
DATASET_PREFIXES = ("npz:", "text:", "mnist:", "svhn:", "py:")


@dataclass(frozen=True)
class TaskConfig:
    name: str = "classification"  # or regression, or py:package.module:Name (plgk_cli.tasks)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    name: str = "cnn"
    kwargs: dict = field(default_factory=dict)


# What a parameter group may set for its own parameters; the rest comes from [optim]. The
# switches (nesterov, amsgrad, centered) hold for every group: replay models one update rule.
GROUP_KEYS = ("lr", "momentum", "dampening", "betas", "eps", "alpha", "weight_decay")


@dataclass(frozen=True)
class GroupConfig:
    """One [[optim.groups]] table: the parameters whose names match one of ``params`` (fnmatch
    patterns such as "*.bias"; the first group that matches takes a parameter, the others stay in
    [optim]'s own group) and the values that differ from [optim]'s (None: [optim]'s)."""

    params: tuple = ()
    lr: float | None = None
    momentum: float | None = None
    dampening: float | None = None
    betas: tuple | None = None
    eps: float | None = None
    alpha: float | None = None
    weight_decay: float | None = None


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    nesterov: bool = False
    dampening: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float | None = None  # None: torch's default for the optimizer
    alpha: float = 0.99
    weight_decay: float = 0.0
    amsgrad: bool = False
    centered: bool = False
    clip_grad_norm: float | None = None
    groups: tuple = ()  # GroupConfig, in the order given

    def resolved_eps(self) -> float:
        if self.eps is not None:
            return self.eps
        return {"rmsprop": 1e-8, "adagrad": 1e-10}.get(self.name, 1e-8)


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = "constant"
    warmup_steps: int = 0
    step_size: int = 1000  # in optimizer steps (cyclic: the steps of each half cycle)
    gamma: float = 0.1
    # onecycle and cyclic, as torch's OneCycleLR and CyclicLR with each group's lr as max_lr
    pct_start: float = 0.3
    div_factor: float = 25.0  # initial (onecycle) or base (cyclic) lr = max_lr / div_factor
    final_div_factor: float = 1e4
    cycle_momentum: bool = True  # momentum (SGD, RMSprop) or β1 (Adam) cycled inversely to the lr
    base_momentum: float = 0.85
    max_momentum: float = 0.95


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 1


@dataclass(frozen=True)
class RunConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {
    "task": TaskConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
}


def _toml_key(name: str) -> str:
    """A key as TOML writes it: bare, or quoted with escapes (a quoted key may hold a newline)."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def _fail(source: str, section: str, key: str, problem: str) -> ConfigError:
    where = section if section.startswith("[") else f"[{_toml_key(section)}]"  # [[optim.groups]] #2
    return ConfigError(f"{source}: {where} {_toml_key(key)}: {problem}")


def _number(source, section, key, value, *, integer=False, low=None, high=None, low_open=False,
            high_open=False):
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            integer and not isinstance(value, int)):
        raise _fail(source, section, key, f"expected {kind}, got {value!r}")
    if isinstance(value, int) and not -2**63 <= value < 2**63:  # tomllib reads any length
        raise _fail(source, section, key, f"expected {kind} in TOML's 64-bit integer range, got "
                                          f"one of about {int(value.bit_length() * 0.30103) + 1} digits")
    if not integer and not math.isfinite(value):
        raise _fail(source, section, key, f"expected a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        bound = f"> {low}" if low_open else f">= {low}"
        raise _fail(source, section, key, f"must be {bound}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        bound = f"< {high}" if high_open else f"<= {high}"
        raise _fail(source, section, key, f"must be {bound}, got {value!r}")
    return int(value) if integer else float(value)


def _choice(source, section, key, value, choices):
    if value not in choices:
        raise _fail(source, section, key, f"expected one of {', '.join(choices)}; got {value!r}")
    return value


def _bool(source, section, key, value):
    if not isinstance(value, bool):
        raise _fail(source, section, key, f"expected true or false, got {value!r}")
    return value


def _validate_section(source: str, section: str, raw: dict, where: str | None = None) -> dict:
    """Type- and range-check one section's keys; returns the converted values. ``where`` names
    the table in messages where it is not [section] itself (a parameter group)."""
    s = section
    at = where or section
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if s == "task":
            if key == "name":
                if not isinstance(value, str) or not (value in BUILTIN_TASKS or (
                        value.startswith("py:") and all(value[3:].partition(":")[::2]))):
                    raise _fail(source, at, key, f"expected one of {', '.join(BUILTIN_TASKS)} or "
                                                f'"py:package.module:Name"; got {value!r}')
                out[key] = value
        elif s == "data":
            if key == "dataset":
                if not isinstance(value, str) or not (
                        value in BUILTIN_DATASETS or value.startswith(DATASET_PREFIXES)):
                    raise _fail(source, at, key, 'expected "digits", "diabetes", "synthetic-text", "addition", '
                                '"npz:PATH", "text:PATH", "mnist:DIR", "svhn:DIR" or "py:package.module:function"; '
                                f'got {value!r}')
                if value.startswith(("npz:", "text:", "mnist:", "svhn:")) and not value.split(":", 1)[1]:
                    raise _fail(source, at, key, f"{value!r} names no path")
                if value.startswith("py:") and not all(value[3:].partition(":")[::2]):
                    raise _fail(source, at, key, f"{value!r}: expected py:package.module:function")
                out[key] = value
            elif key == "seed":
                out[key] = _number(source, at, key, value, integer=True, low=0)
        elif s == "model":
            if key == "name":
                if not isinstance(value, str) or not (value in BUILTIN_MODELS or (
                        ":" in value and all(value.split(":", 1)))):
                    raise _fail(source, at, key, f"expected one of {', '.join(BUILTIN_MODELS)} or "
                                                f'"package.module:function"; got {value!r}')
                out[key] = value
            elif key == "kwargs":
                if not isinstance(value, dict):
                    raise _fail(source, at, key, "expected a table, e.g. kwargs = { hidden = 64 }")
                out[key] = dict(value)
        elif s == "optim":
            if key == "name":
                out[key] = _choice(source, at, key, value, OPTIMIZERS)
            elif key == "lr":
                out[key] = _number(source, at, key, value, low=0, low_open=True)
            elif key in ("momentum", "dampening"):
                out[key] = _number(source, at, key, value, low=0, high=1, high_open=True)
            elif key == "alpha":
                out[key] = _number(source, at, key, value, low=0, high=1)
            elif key in ("nesterov", "amsgrad", "centered"):
                out[key] = _bool(source, at, key, value)
            elif key == "betas":
                if not isinstance(value, list) or len(value) != 2:
                    raise _fail(source, at, key, f"expected [beta1, beta2], got {value!r}")
                out[key] = tuple(_number(source, at, key, b, low=0, high=1, high_open=True)
                                 for b in value)
            elif key == "eps":
                out[key] = _number(source, at, key, value, low=0, low_open=True)
            elif key == "weight_decay":
                out[key] = _number(source, at, key, value, low=0)
            elif key == "clip_grad_norm":
                out[key] = _number(source, at, key, value, low=0, low_open=True)
            elif key == "groups":
                out[key] = _groups(source, value)
        elif s == "schedule":
            if key == "name":
                out[key] = _choice(source, at, key, value, SCHEDULES)
            elif key == "warmup_steps":
                out[key] = _number(source, at, key, value, integer=True, low=0)
            elif key == "step_size":
                out[key] = _number(source, at, key, value, integer=True, low=1)
            elif key in ("gamma", "div_factor", "final_div_factor"):
                out[key] = _number(source, at, key, value, low=0, low_open=True)
            elif key == "pct_start":
                out[key] = _number(source, at, key, value, low=0, high=1, low_open=True, high_open=True)
            elif key in ("base_momentum", "max_momentum"):
                out[key] = _number(source, at, key, value, low=0, high=1, high_open=True)
            elif key == "cycle_momentum":
                out[key] = _bool(source, at, key, value)
        elif s == "train":
            if key in ("epochs", "batch_size"):
                out[key] = _number(source, at, key, value, integer=True, low=1)
            elif key == "seed":
                out[key] = _number(source, at, key, value, integer=True, low=0)
            elif key == "device":
                out[key] = _choice(source, at, key, value, ("auto", "cpu", "cuda"))
            elif key == "dtype":
                out[key] = _choice(source, at, key, value, ("float32", "float64"))
        elif s == "checkpoint":
            if key == "every":
                out[key] = _number(source, at, key, value, integer=True, low=1)
    return out


def _groups(source: str, value) -> tuple:
    """[[optim.groups]]: a list of tables, each with params (a pattern or a list of them) and
    values of GROUP_KEYS."""
    if not isinstance(value, list) or not all(isinstance(g, dict) for g in value):
        raise _fail(source, "optim", "groups", "expected [[optim.groups]] tables, each with params = "
                                               '["*.bias", ...] and the values that differ')
    groups = []
    for number, table in enumerate(value, start=1):
        where = f"[[optim.groups]] #{number}"
        for key in table:
            if key not in ("params", *GROUP_KEYS):
                raise _fail(source, where, key, f"unknown key; a group sets params and any of "
                                                f"{', '.join(GROUP_KEYS)} (the switches nesterov, amsgrad "
                                                "and centered hold for every group: set them in [optim])")
        patterns = table.get("params")
        patterns = [patterns] if isinstance(patterns, str) else patterns
        if not isinstance(patterns, list) or not patterns or not all(
                isinstance(p, str) and p for p in patterns):
            raise _fail(source, where, "params", f"expected a parameter-name pattern or a list of them, "
                                                 f'e.g. params = ["*.bias"]; got {table.get("params")!r}')
        values = _validate_section(source, "optim", {k: v for k, v in table.items() if k != "params"}, where)
        groups.append(GroupConfig(params=tuple(patterns), **values))
    return tuple(groups)


def parse_config(raw: dict, source: str = "config") -> RunConfig:
    """Build a RunConfig from a parsed TOML document, rejecting unknown sections and keys."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a TOML table at the top level")
    sections = {}
    for name, body in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{_toml_key(name)}]; known sections: "
                              f"{', '.join('[' + s + ']' for s in SECTIONS)}")
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        cls = SECTIONS[name]
        known = [f.name for f in dataclasses.fields(cls)]
        for key in body:
            if key not in known:
                raise _fail(source, name, key, f"unknown key; known keys: {', '.join(known)}")
        sections[name] = cls(**_validate_section(source, name, body))
    config = RunConfig(**sections)
    _check_optimizer_keys(config.optim.name, raw.get("optim", {}), source)
    for number, group in enumerate(raw.get("optim", {}).get("groups", []), start=1):
        _check_optimizer_keys(config.optim.name, {k: v for k, v in group.items() if k != "params"},
                              source, f"[[optim.groups]] #{number}")
    _check_combinations(config, source, raw)
    return config


# The [optim] keys each optimizer reads (torch's names); any other key given is a mistake.
OPTIMIZER_KEYS = {
    "sgd": {"momentum", "nesterov", "dampening"},
    "adam": {"betas", "eps", "amsgrad"},
    "adamw": {"betas", "eps", "amsgrad"},
    "rmsprop": {"alpha", "eps", "momentum", "centered"},
    "adagrad": {"eps"},
}
COMMON_OPTIMIZER_KEYS = {"name", "lr", "weight_decay", "clip_grad_norm", "groups"}


def _check_optimizer_keys(name: str, given: dict, source: str, where: str = "optim") -> None:
    for key in given:
        if key not in COMMON_OPTIMIZER_KEYS | OPTIMIZER_KEYS[name]:
            users = [o for o, keys in OPTIMIZER_KEYS.items() if key in keys]
            raise _fail(source, where, key, f"not used by {name} (only by {', '.join(users)}); "
                                            "remove it")


def _check_combinations(config: RunConfig, source: str, raw: dict) -> None:
    o = config.optim
    if o.nesterov and (o.name != "sgd" or o.momentum <= 0 or o.dampening != 0):
        raise _fail(source, "optim", "nesterov",
                    "needs name = \"sgd\", momentum > 0 and dampening = 0 (as torch.optim.SGD)")
    for number, group in enumerate(o.groups, start=1):
        momentum = o.momentum if group.momentum is None else group.momentum
        dampening = o.dampening if group.dampening is None else group.dampening
        if o.nesterov and (momentum <= 0 or dampening != 0):
            raise _fail(source, f"[[optim.groups]] #{number}", "momentum",
                        "[optim] nesterov = true needs every group's momentum > 0 and dampening = 0")
    sch = config.schedule
    given = set(raw.get("schedule", {})) - {"name"}
    if sch.name not in ("onecycle", "cyclic"):  # the older schedules ignore each other's keys, as before
        given &= CYCLE_ONLY_KEYS
    unused = sorted(given - SCHEDULE_KEYS[sch.name])
    if unused:
        users = [n for n, keys in SCHEDULE_KEYS.items() if unused[0] in keys]
        raise _fail(source, "schedule", unused[0], f"not used by schedule {sch.name!r} (only by "
                                                   f"{', '.join(users)}); remove it")
    if sch.name in ("onecycle", "cyclic") and sch.cycle_momentum and o.name == "adagrad":
        raise _fail(source, "schedule", "cycle_momentum", "adagrad has no momentum to cycle; set "
                                                          "cycle_momentum = false")


# The [schedule] keys each schedule reads; any other key given is a mistake.
_CYCLE = {"div_factor", "cycle_momentum", "base_momentum", "max_momentum"}
SCHEDULE_KEYS = {
    "constant": {"warmup_steps"},
    "step": {"warmup_steps", "step_size", "gamma"},
    "cosine": {"warmup_steps"},
    "onecycle": {"pct_start", "final_div_factor"} | _CYCLE,
    "cyclic": {"step_size"} | _CYCLE,
}
CYCLE_ONLY_KEYS = (SCHEDULE_KEYS["onecycle"] | SCHEDULE_KEYS["cyclic"]) - {"warmup_steps", "step_size", "gamma"}


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; give a TOML run configuration "
                          "(see configs/)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        raw = tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError, or an integer too long for Python to convert
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return parse_config(raw, source=str(path))


def config_from_dict(d: dict) -> RunConfig:
    """Inverse of RunConfig.to_dict (used when reading a manifest)."""
    d = {k: dict(v) for k, v in d.items()}  # a manifest written before [task] existed lacks it
    if "betas" in d.get("optim", {}):
        d["optim"]["betas"] = tuple(d["optim"]["betas"])
    if "groups" in d.get("optim", {}):  # JSON gives lists back where the config held tuples
        d["optim"]["groups"] = tuple(
            GroupConfig(**{**g, "params": tuple(g["params"]),
                           "betas": None if g.get("betas") is None else tuple(g["betas"])})
            for g in d["optim"]["groups"])
    return RunConfig(**{name: SECTIONS[name](**body) for name, body in d.items()})
