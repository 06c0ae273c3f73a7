"""`plgk inspect --audit N`: signs in words per target (the task's helpful direction, stored on every
influence dataset), where the audit point comes from, the audit point's own row in a self-influence
audit, and files written before the direction was stored."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import train_tiny, write_tiny_npz
from plgk_cli.arguments import ReplayArguments
from plgk_cli.cli import main
from plgk_cli.config import parse_config
from plgk_cli.inspect import format_top, top_examples
from plgk_cli.replay import replay
from plgk_cli.store import InfluenceFile
from plgk_cli.tasks import (DIRECTIONS, HELPFUL_DOWN, HELPFUL_UP, NO_HELPFUL, TRUE_CLASS_UP, Task,
                            column_direction, known_direction, task_for)
from plgk_cli.tasks.classification import Classification
from plgk_cli.train import train

TARGETS = ("loss", "margin", "logits")
OLD_SIGN = ("influence[m, n] < 0: training example m pushed the audited quantity of audit point n down "
            "over training (for the loss: helpful); > 0: pushed it up (harmful)")  # before per-target signs


class MarginLowered(Classification):
    """A task that declares the margin a quantity to lower: inspect must take the file's word for it."""

    helpful_directions = {**Classification.helpful_directions, "margin": HELPFUL_DOWN}


def audit(run, out, audit_set, **kwargs):
    replay(ReplayArguments(ckpts=str(run), audit_set=audit_set, out=str(out), device="cpu", **kwargs),
           progress=False)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    npz = write_tiny_npz(root / "tiny.npz")
    run = train_tiny(root / "run", npz, {"name": "sgd", "lr": 0.1, "momentum": 0.9})
    data = np.load(npz)
    np.savez(root / "points.npz", x=data["x_test"][:3], y=data["y_test"][:3])
    return {"run": run, "root": root,
            "test": audit(run, root / "test.h5", "test[0:4]", targets=TARGETS),
            "train": audit(run, root / "train.h5", "train[0:4]", targets=TARGETS),
            "npz": audit(run, root / "npz.h5", str(root / "points.npz")),
            "subset": audit(run, root / "subset.h5", "train[0:4]", train_subset="train[4:22]")}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_every_builtin_target_states_a_direction():
    expected = {"classification": {"loss": HELPFUL_DOWN, "logit": HELPFUL_UP, "margin": HELPFUL_UP,
                                   "logits": TRUE_CLASS_UP},
                "regression": {"loss": HELPFUL_DOWN, "output": NO_HELPFUL},
                "language-model": {"loss": HELPFUL_DOWN, "sequence-logprob": HELPFUL_UP,
                                   "token-losses": HELPFUL_DOWN}}
    for name, directions in expected.items():
        task = task_for(name)
        assert {t: task.helpful_direction(t) for t in task.targets} == directions
        assert {t: known_direction(name, t) for t in task.targets} == directions
    assert Task().helpful_direction("loss") == HELPFUL_DOWN
    assert Task().helpful_direction("something-else") == NO_HELPFUL  # no claim the task did not make
    assert set(expected["classification"].values()) | {NO_HELPFUL} <= set(DIRECTIONS)
    assert column_direction(TRUE_CLASS_UP, 2, 2) == HELPFUL_UP and column_direction(TRUE_CLASS_UP, 1, 2) == HELPFUL_DOWN


def test_sign_attribute_speaks_of_its_own_target(files):
    with h5py.File(files["test"], "r") as f:
        attrs = {t: dict(f[f"audit/{t}/influence"].attrs) for t in TARGETS}
    assert {t: a["helpful_direction"] for t, a in attrs.items()} == {
        "loss": HELPFUL_DOWN, "margin": HELPFUL_UP, "logits": TRUE_CLASS_UP}
    assert "influence < 0 pushed the loss down: helpful" in attrs["loss"]["sign"]
    assert "influence > 0 pushed the margin up: helpful" in attrs["margin"]["sign"]
    assert "loss" not in attrs["margin"]["sign"]
    assert attrs["logits"]["sign"].startswith("influence[m, n, c]:")
    assert "up for the class that is audit point n's label, down for every other class" in attrs["logits"]["sign"]


def test_margin_ranks_the_largest_positive_influences_most_helpful(files):
    with InfluenceFile(files["test"]) as f:
        column = f.influence("margin")[:, 1].astype(np.float64)
        margin = top_examples(f, 1, 4, "margin")
        loss = top_examples(f, 1, 4, "loss")
        loss_column = f.influence("loss")[:, 1].astype(np.float64)
    assert column.max() > 0 > column.min()  # both lists are meaningful
    assert [e["influence"] for e in margin["helpful"]] == pytest.approx(np.sort(column)[::-1][:4].tolist())
    assert [e["influence"] for e in margin["harmful"]] == pytest.approx(np.sort(column)[:4].tolist())
    assert [e["influence"] for e in loss["helpful"]] == pytest.approx(np.sort(loss_column)[:4].tolist())
    assert margin["helpful_direction"] == "up" and loss["helpful_direction"] == "down"
    text = format_top(margin)
    assert text.splitlines()[-1] == ("(influence > 0 pushed the margin up: helpful, a higher margin is better "
                                     "for the audit point; < 0 pushed it down: harmful)")
    assert "most helpful training examples:" in text and "most harmful training examples:" in text


def test_logits_of_another_class_help_by_going_down(files):
    with InfluenceFile(files["test"]) as f:
        label = int(f.audit_label[0])
        other = (label + 1) % 3
        column = f.influence("logits")[:, 0, other].astype(np.float64)
        top = top_examples(f, 0, 3, "logits", klass=other)
    assert top["helpful_direction"] == "down"
    assert [e["influence"] for e in top["helpful"]] == pytest.approx(np.sort(column)[:3].tolist())
    assert f"lower logit of class {other} is better" in format_top(top)
    assert f"class {other} is not the audit point's label" in format_top(top)


def test_header_says_where_the_audit_point_comes_from(files):
    with InfluenceFile(files["test"]) as f:
        test = top_examples(f, 2, 3)
    with InfluenceFile(files["npz"]) as f:
        row = top_examples(f, 1, 3)
    assert test["audit_where"] == "test index 2" and test["audit_split"] == "test" and not test["self_influence"]
    assert format_top(test).startswith("audit point 2 (test index 2, label ")
    assert "*" not in format_top(test) and not any(e["is_audit_point"] for e in test["helpful"])
    assert row["audit_where"] == "row 1 of points.npz" and row["audit_index"] is None
    assert format_top(row).startswith("audit point 1 (row 1 of points.npz, label ")


def test_self_influence_marks_the_audit_points_own_row(files):
    result = invoke("inspect", files["train"], "--audit", 3, "--top", 22, "--target", "loss", "--json")
    assert result.exit_code == 0, result.output
    top = json.loads(result.output)
    assert top["audit_where"] == "train index 3" and top["audit_split"] == "train" and top["self_influence"]
    own = [e for e in top["helpful"] if e["is_audit_point"]]
    assert len(own) == 1 and own[0]["train_index"] == 3
    assert top["audit_point_row"] == {"train_index": 3, "rank": own[0]["rank"], "of": 22,
                                      "influence": own[0]["influence"]}
    result = invoke("inspect", files["train"], "--audit", 3, "--top", 22, "--target", "loss")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("audit point 3 (train index 3, label ")
    marked = [line for line in lines if "*" in line and not line.startswith("*")]
    assert len(marked) == 2 and all(line.split()[1] == "3*" for line in marked)  # once in each list
    assert f"* the audit point itself (train index 3, self-influence): rank {own[0]['rank']} of 22" in result.output


def test_self_influence_says_when_the_own_row_was_not_audited(files):
    with InfluenceFile(files["subset"]) as f:
        top = top_examples(f, 0, 3)
    assert top["self_influence"] and top["audit_point_row"] is None
    assert "the audit point itself (train index 0) is not among the audited training rows" in format_top(top)


def test_the_file_states_the_direction_not_a_table_in_inspect(files, tmp_path):
    """A task's own direction travels in the file: a py: task that declares the margin a quantity
    to lower is ranked that way by inspect, without importing the task."""
    config = {"data": {"dataset": f"npz:{files['root'] / 'tiny.npz'}"},
              "model": {"name": "mlp", "kwargs": {"hidden": 6}}, "task": {"name": "py:test_inspect:MarginLowered"},
              "optim": {"name": "sgd", "lr": 0.1}, "train": {"epochs": 1, "batch_size": 8, "device": "cpu"}}
    train(parse_config(config), tmp_path / "run", progress=False)
    out = audit(tmp_path / "run", tmp_path / "own.h5", "test[0:2]", targets=("margin",))
    with InfluenceFile(out) as f:
        assert f.helpful_direction("margin") == HELPFUL_DOWN
        column = f.influence("margin")[:, 0].astype(np.float64)
        top = top_examples(f, 0, 3, "margin")
    assert [e["influence"] for e in top["helpful"]] == pytest.approx(np.sort(column)[:3].tolist())
    assert "a lower margin is better" in top["sign"]


def test_files_without_a_stored_direction_still_read(files, tmp_path):
    """Files written before the direction was stored carry only the old loss-speaking `sign`: they
    are read with the built-in direction of each target, ranked as new files are."""
    old = shutil.copy(files["test"], tmp_path / "old.h5")
    with h5py.File(old, "r+") as f:
        for target in TARGETS:
            del f[f"audit/{target}/influence"].attrs["helpful_direction"]
            f[f"audit/{target}/influence"].attrs["sign"] = OLD_SIGN
    for target in TARGETS:
        with InfluenceFile(files["test"]) as new, InfluenceFile(old) as before:
            assert before.helpful_direction(target) == new.helpful_direction(target)
            assert top_examples(before, 1, 3, target) == top_examples(new, 1, 3, target)
    result = invoke("inspect", old, "--audit", 1, "--target", "margin")
    assert result.exit_code == 0, result.output
    assert "influence > 0 pushed the margin up: helpful" in result.output


def test_regression_output_has_no_helpful_direction(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "reg.npz"
    np.savez(npz, x_train=rng.normal(size=(20, 4)), y_train=rng.normal(size=(20, 2)),
             x_test=rng.normal(size=(4, 4)), y_test=rng.normal(size=(4, 2)))
    config = {"data": {"dataset": f"npz:{npz}"}, "model": {"name": "mlp", "kwargs": {"hidden": 6}},
              "task": {"name": "regression"}, "optim": {"name": "sgd", "lr": 0.05},
              "train": {"epochs": 1, "batch_size": 5, "dtype": "float64", "device": "cpu"}}
    train(parse_config(config), tmp_path / "run", progress=False)
    out = audit(tmp_path / "run", tmp_path / "reg.h5", "test[0:2]", targets=("loss", "output"))
    with h5py.File(out, "r") as f:
        attrs = dict(f["audit/output/influence"].attrs)
    assert attrs["helpful_direction"] == NO_HELPFUL and "neither is helpful or harmful" in attrs["sign"]
    with InfluenceFile(out) as f:
        column = f.influence("output")[:, 0, 1].astype(np.float64)
        top = top_examples(f, 0, 3, "output", klass=1)
    assert top["helpful_direction"] == NO_HELPFUL and top["column"] == "column"
    assert top["headings"] == {"helpful": "training examples that raised the output 1 most",
                               "harmful": "training examples that lowered the output 1 most"}
    assert [e["influence"] for e in top["helpful"]] == pytest.approx(np.sort(column)[::-1][:3].tolist())
    text = format_top(top)
    assert "training examples that raised the output 1 most:" in text and "most helpful" not in text
    assert "neither is helpful or harmful" in text.splitlines()[-1]


@pytest.mark.parametrize("extra, code, needle", [
    (("--top", "0"), 13, "--top"),  # without --audit too: never silently dropped
    (("--target", "gradnorm"), 15, "'gradnorm'"),
    (("--class", "1"), 13, "--class"),
    (("--audit", "0", "--top", "-3"), 13, "--top"),
])
def test_options_that_would_be_ignored_are_refused(files, extra, code, needle):
    result = invoke("inspect", files["test"], *extra)
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("plgk: error: ") and needle in lines[0], lines
    assert result.stdout == ""
