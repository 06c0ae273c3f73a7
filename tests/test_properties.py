"""Property-based tests (hypothesis) of the parsers that read what users type: the run
configuration (plgk_cli/config.py) and the replay specs (plgk_cli/arguments.py).

The contract: any input either parses to exactly what it says or raises the parser's PlgkError
naming what is wrong; no other exception ever escapes (it would reach the user as a traceback).
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plgk_cli.arguments import MAX_SUB_INTERVALS, parse_rule, resolve_audit_set, resolve_train_subset
from plgk_cli.config import (COMMON_OPTIMIZER_KEYS, CYCLE_ONLY_KEYS, OPTIMIZER_KEYS, OPTIMIZERS,
                             SCHEDULE_KEYS, SCHEDULES,
                             SECTIONS, GroupConfig, RunConfig, config_from_dict, parse_config)
from plgk_cli.errors import AuditSpecError, ConfigError

FAST = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

INT64 = st.integers(-2**63, 2**63 - 1)
KEYS = {name: [f for f in cls.__dataclass_fields__] for name, cls in SECTIONS.items()}

# --------------------------------------------------------------------------- config

# Everything TOML can hold (no None; integers of any length, as tomllib reads them).
toml_scalars = st.one_of(st.booleans(), INT64, st.integers(), st.floats(), st.text(max_size=20))
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8)


@st.composite
def known_keys_random_values(draw):
    """Known sections and keys, any TOML value: valid or not."""
    doc = {}
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), unique=True)):
        keys = draw(st.lists(st.sampled_from(KEYS[section]), unique=True))
        doc[section] = {key: draw(st.one_of(VALID[section][key], toml_values)) for key in keys}
    return doc


positive = st.floats(min_value=0, exclude_min=True, allow_nan=False, allow_infinity=False)
non_negative = st.floats(min_value=0, allow_nan=False, allow_infinity=False)
below_one = st.floats(min_value=0, max_value=1, exclude_max=True)
name_text = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=12)

VALID = {
    "task": {
        "name": st.one_of(st.sampled_from(["classification", "regression"]),
                          st.builds("py:{}:{}".format, name_text.filter(lambda s: ":" not in s),
                                    name_text)),
    },
    "data": {
        "dataset": st.one_of(st.sampled_from(["digits", "diabetes", "synthetic-text"]),
                             st.builds("{}{}".format, st.sampled_from(["npz:", "mnist:", "svhn:"]),
                                       name_text),
                             st.builds("py:{}:{}".format, name_text.filter(lambda s: ":" not in s),
                                       name_text)),
        "seed": st.integers(0, 2**63 - 1),
    },
    "model": {
        "name": st.one_of(st.sampled_from(["mlp", "cnn", "lenet5", "transformer"]),
                          st.builds("{}:{}".format, name_text.filter(lambda s: ":" not in s),
                                    name_text)),
        "kwargs": st.dictionaries(st.text(max_size=8), st.one_of(INT64, st.booleans()),
                                  max_size=3),
    },
    "optim": {
        "name": st.sampled_from(OPTIMIZERS),
        "lr": st.one_of(positive, st.integers(1, 2**63 - 1)),
        "momentum": below_one, "dampening": below_one,
        "alpha": st.floats(min_value=0, max_value=1),
        "nesterov": st.booleans(), "amsgrad": st.booleans(), "centered": st.booleans(),
        "betas": st.lists(below_one, min_size=2, max_size=2),
        "eps": positive, "weight_decay": st.one_of(non_negative, st.integers(0, 10)),
        "clip_grad_norm": positive,
        # values every family reads, so that a group never holds a key its optimizer ignores
        "groups": st.lists(st.fixed_dictionaries(
            {"params": st.one_of(name_text, st.lists(name_text, min_size=1, max_size=3))},
            optional={"lr": positive, "weight_decay": non_negative}), max_size=3),
    },
    "schedule": {
        "name": st.sampled_from(SCHEDULES), "warmup_steps": st.integers(0, 2**63 - 1),
        "step_size": st.integers(1, 2**63 - 1), "gamma": positive,
        "pct_start": st.floats(min_value=0, max_value=1, exclude_min=True, exclude_max=True),
        "div_factor": positive, "final_div_factor": positive, "cycle_momentum": st.booleans(),
        "base_momentum": below_one, "max_momentum": below_one,
    },
    "train": {
        "epochs": st.integers(1, 2**63 - 1), "batch_size": st.integers(1, 2**63 - 1),
        "seed": st.integers(0, 2**63 - 1), "device": st.sampled_from(["auto", "cpu", "cuda"]),
        "dtype": st.sampled_from(["float32", "float64"]),
    },
    "checkpoint": {"every": st.integers(1, 2**63 - 1)},
}
assert {s: sorted(k) for s, k in VALID.items()} == {s: sorted(k) for s, k in KEYS.items()}


@st.composite
def valid_documents(draw):
    """Documents that must parse: valid values, only the chosen optimizer's keys, nesterov only
    where torch allows it."""
    doc = {}
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), unique=True)):
        keys = draw(st.lists(st.sampled_from(KEYS[section]), unique=True))
        doc[section] = {key: draw(VALID[section][key]) for key in keys}
    if "optim" in doc:
        optim = doc["optim"]
        allowed = COMMON_OPTIMIZER_KEYS | OPTIMIZER_KEYS[optim.get("name", "adam")]
        doc["optim"] = optim = {k: v for k, v in optim.items() if k in allowed}
        if optim.get("nesterov") and not (optim.get("momentum", 0) > 0
                                          and optim.get("dampening", 0) == 0):
            optim["nesterov"] = False
    if "schedule" in doc:  # only the schedule's own keys (the older ones ignore the rest, as before)
        schedule = doc["schedule"]
        name = schedule.get("name", "constant")
        doc["schedule"] = schedule = {k: v for k, v in schedule.items() if k == "name" or (
            k in SCHEDULE_KEYS[name] if name in ("onecycle", "cyclic") else k not in CYCLE_ONLY_KEYS)}
        if name in ("onecycle", "cyclic") and doc.get("optim", {}).get("name") == "adagrad":
            schedule["cycle_momentum"] = False
    return doc


def assert_names_a_given_key(exc: ConfigError, doc: dict):
    m = re.match(r"src\.toml: \[(\w+)\] (\w+): ", str(exc))
    group = re.match(r"src\.toml: \[\[optim\.groups\]\] #\d+ (\w+): ", str(exc))
    assert m or group, str(exc)
    section, key = m.groups() if m else ("optim", "groups")
    assert key in doc.get(section, {}), (str(exc), doc)


@FAST
@given(known_keys_random_values())
def test_config_parses_or_names_the_key(doc):
    try:
        config = parse_config(doc, source="src.toml")
    except ConfigError as exc:
        assert_names_a_given_key(exc, doc)
    else:
        assert isinstance(config, RunConfig)
        assert config_from_dict(config.to_dict()) == config


@FAST
@given(st.dictionaries(st.text(max_size=10), toml_values, max_size=4)
       | st.dictionaries(st.sampled_from(sorted(SECTIONS)),
                         st.dictionaries(st.text(max_size=10), toml_values, max_size=3)
                         | toml_values, max_size=3))
def test_config_junk_raises_only_config_error(doc):
    try:
        parse_config(doc, source="src.toml")
    except ConfigError as exc:
        assert str(exc).startswith("src.toml: ")
        assert len(str(exc).splitlines()) == 1, str(exc)  # a quoted key may hold a line break


def expected_value(section: str, key: str, value):
    field_type = SECTIONS[section].__dataclass_fields__[key].type
    if key == "betas":
        return tuple(float(b) for b in value)
    if key == "groups":  # GroupConfig tables: compared field by field in the test
        return tuple(GroupConfig(params=(g["params"],) if isinstance(g["params"], str) else tuple(g["params"]),
                                 **{k: float(v) for k, v in g.items() if k != "params"}) for g in value)
    if "float" in str(field_type):
        return float(value)
    return value


@FAST
@given(valid_documents())
def test_valid_config_round_trips(doc):
    config = parse_config(doc, source="src.toml")
    for section, body in doc.items():
        for key, value in body.items():
            got = getattr(getattr(config, section), key)
            assert got == expected_value(section, key, value), (section, key)
            assert type(got) is type(expected_value(section, key, value)), (section, key)
    assert config_from_dict(config.to_dict()) == config
    again = config_from_dict(json.loads(json.dumps(config.to_dict())))  # as in a manifest
    assert again == config


def test_toml_integer_beyond_64_bits_is_a_config_error():
    """tomllib reads integers of any length; float() of one overflows."""
    with pytest.raises(ConfigError, match=r"\[optim\] lr: .*64-bit"):
        parse_config({"optim": {"lr": 10**400}}, source="src.toml")
    with pytest.raises(ConfigError, match=r"\[train\] seed: .*64-bit"):
        parse_config({"train": {"seed": 2**64}}, source="src.toml")


def test_toml_integer_too_long_to_convert_is_a_config_error(tmp_path):
    from plgk_cli.config import load_config

    path = tmp_path / "long.toml"
    path.write_text("[optim]\nlr = 1" + "0" * 5000 + "\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


# --------------------------------------------------------------------------- audit set, subset


class FakeDataset:
    """What resolve_audit_set reads of a Dataset: split(name), in_shape, num_classes, x_train."""

    in_shape = (2,)
    num_classes = 3

    def __init__(self, n_train: int, n_test: int):
        self.x_train = torch.arange(2 * n_train, dtype=torch.float64).reshape(n_train, 2)
        self.y_train = torch.arange(n_train) % 3
        self.x_test = -torch.arange(2 * n_test, dtype=torch.float64).reshape(n_test, 2)
        self.y_test = torch.arange(n_test) % 3

    def split(self, name):
        return (self.x_train, self.y_train) if name == "train" else (self.x_test, self.y_test)


@pytest.fixture(scope="module", autouse=True)
def empty_cwd(tmp_path_factory):
    """Junk specs are relative paths: resolve them where no file can match by accident."""
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(previous)


def accepted(start, stop, n) -> bool:
    """plgk's rule: bounds inside the split (negative from the end, like Python), START < STOP;
    Python would clamp or return an empty slice instead."""
    lo = 0 if start is None else start + (n if start < 0 else 0)
    hi = n if stop is None else stop + (n if stop < 0 else 0)
    return 0 <= lo <= n and 0 <= hi <= n and lo < hi


bound = st.none() | st.integers(-40, 40) | st.integers(-10**30, 10**30)
fmt = lambda b: "" if b is None else str(b)  # noqa: E731


@FAST
@given(st.sampled_from(["train", "test"]), bound, bound, st.booleans(),
       st.integers(0, 30), st.integers(0, 30))
def test_audit_slice_is_python_slice_or_error(split, start, stop, bare, n_train, n_test):
    data = FakeDataset(n_train, n_test)
    spec = split if bare else f"{split}[{fmt(start)}:{fmt(stop)}]"
    if bare:
        start = stop = None
    n = n_train if split == "train" else n_test
    try:
        audit = resolve_audit_set(spec, data)
    except AuditSpecError as exc:
        assert not accepted(start, stop, n), (spec, n)
        assert str(exc).startswith(f"--audit-set: {spec!r}")
        return
    assert accepted(start, stop, n), (spec, n)
    rows = list(range(n))[slice(start, stop)]
    x, y = data.split(split)
    assert audit.index.tolist() == rows and audit.split == split and audit.source == spec
    assert torch.equal(audit.x, x[rows]) and torch.equal(audit.y, y[rows])


SPEC_ALPHABET = "traintes[]:-+0123456789 .npzy_/\n\t٣"
junk = (st.text(max_size=30) | st.text(SPEC_ALPHABET, max_size=16)
        | st.builds("{}.npz".format, st.text(max_size=300))
        | st.builds("{}[{}:{}]".format, st.sampled_from(["train", "test"]),
                    st.text("-0123456789 +", max_size=4), st.text("-0123456789 +", max_size=4)))
STRICT_SLICE = re.compile(r"(train|test)(?:\[(-?[0-9]+)?:(-?[0-9]+)?\])?")
STRICT_SUBSET = re.compile(r"(?:train)?\[(-?[0-9]+)?:(-?[0-9]+)?\]|(-?[0-9]+)?:(-?[0-9]+)?")


def as_int(s):
    return None if s is None else int(s)


@FAST
@given(junk)
def test_audit_set_junk_is_an_audit_spec_error(spec):
    data = FakeDataset(7, 5)
    try:
        audit = resolve_audit_set(spec, data)
    except AuditSpecError as exc:
        assert str(exc).startswith("--audit-set: ")
        return
    m = STRICT_SLICE.fullmatch(spec)  # only a well-formed slice of a split can succeed
    assert m, spec
    n = 7 if m.group(1) == "train" else 5
    assert audit.index.tolist() == list(range(n))[slice(as_int(m.group(2)), as_int(m.group(3)))]


@FAST
@given(bound, bound, st.sampled_from(["{}", "[{}]", "train[{}]"]), st.integers(0, 30))
def test_train_subset_is_python_slice_or_error(start, stop, form, n):
    spec = form.format(f"{fmt(start)}:{fmt(stop)}")
    try:
        index = resolve_train_subset(spec, n)
    except AuditSpecError as exc:
        assert not accepted(start, stop, n), (spec, n)
        assert str(exc).startswith(f"--train-subset: {spec!r}")
        return
    assert accepted(start, stop, n), (spec, n)
    assert index.tolist() == list(range(n))[slice(start, stop)]


@FAST
@given(junk)
def test_train_subset_junk_is_an_audit_spec_error(spec):
    try:
        index = resolve_train_subset(spec, 9)
    except AuditSpecError as exc:
        assert str(exc).startswith("--train-subset: ")
        return
    m = STRICT_SUBSET.fullmatch(spec)
    assert m, spec
    start, stop = (m.group(1), m.group(2)) if spec.endswith("]") else (m.group(3), m.group(4))
    assert index.tolist() == list(range(9))[slice(as_int(start), as_int(stop))]


index_arrays = st.one_of(
    st.lists(st.integers(-3, 12), max_size=8).map(lambda v: np.array(v, dtype=np.int64)),
    st.lists(st.floats(-3, 12), max_size=4).map(lambda v: np.array(v, dtype=np.float64)),
    st.lists(st.text(max_size=3), max_size=3).map(np.array),
    st.lists(st.booleans(), max_size=3).map(lambda v: np.array(v, dtype=bool)),
)


@FAST
@given(index_arrays, st.sampled_from(["npy", "txt"]), st.none() | st.binary(max_size=40))
def test_train_subset_file_is_its_indices_or_error(values, kind, raw):
    """A file of indices (text, one per line, or .npy): the sorted unique indices if they are
    integers in 0..8, else AuditSpecError; raw bytes instead of a proper file too."""
    path = f"subset.{kind}"
    if raw is not None:
        with open(path, "wb") as f:
            f.write(raw)
    elif kind == "npy":
        np.save(path, values)
    else:
        with open(path, "w") as f:
            f.write("".join(f"{v}\n" for v in values.tolist()))
    try:
        index = resolve_train_subset(path, 9)
    except AuditSpecError as exc:
        assert str(exc).startswith(f"--train-subset: {path}")
        return
    assert raw is not None or (values.dtype.kind in "iu" or kind == "txt")
    assert len(index) and index.min() >= 0 and index.max() < 9
    assert index.tolist() == sorted(set(index.tolist()))
    if raw is None and values.dtype.kind in "iu":
        assert index.tolist() == sorted(set(values.tolist()))


@FAST
@given(st.text(max_size=20) | st.builds("supersample:{}".format, st.text("-0123456789", max_size=4))
       | st.builds("adaptive:{}".format, st.text("-0123456789.e", max_size=6)))
def test_rule_parses_or_is_an_audit_spec_error(rule):
    try:
        parsed = parse_rule(rule)
    except AuditSpecError as exc:
        assert str(exc).startswith((f"--rule: unknown rule {rule!r}", f"--rule: {rule!r}: the tolerance",
                                    f"--rule: {rule!r}: K of supersample:K must be in 1..{MAX_SUB_INTERVALS}"))
        return
    k = parsed.sub_intervals
    m = re.fullmatch(r"supersample:(\d+)", rule)
    assert parsed.adaptive == rule.startswith("adaptive")
    assert parsed.adaptive or (rule, k) in (("euler", 0), ("trapezoid", 1)) or (m and int(m.group(1)) == k >= 1)
