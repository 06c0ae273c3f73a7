"""ReplayArguments checks every field's type and range on construction, as the CLI's parser would,
so that a Python caller's ``chunk_size="8"`` or ``commit_seconds=nan`` is one AuditSpecError naming
the option, before any work."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from plgk_cli.arguments import MAX_SUB_INTERVALS, ReplayArguments, parse_rule
from plgk_cli.errors import AuditSpecError


def arguments(**fields) -> ReplayArguments:
    return ReplayArguments(**{"ckpts": "run", "audit_set": "test[:4]", "out": "o.h5", **fields})


@pytest.mark.parametrize("fields, needle", [
    ({"chunk_size": "8"}, "--chunk-size"),
    ({"chunk_size": 8.0}, "--chunk-size"),
    ({"chunk_size": True}, "--chunk-size"),
    ({"chunk_size": 1 << 30}, "--chunk-size"),
    ({"stride": 0}, "--stride"),
    ({"stride": "2"}, "--stride"),
    ({"commit_every": -1}, "--commit-every"),
    ({"commit_seconds": math.nan}, "--commit-seconds"),
    ({"commit_seconds": math.inf}, "--commit-seconds"),
    ({"commit_seconds": 0}, "--commit-seconds"),
    ({"commit_seconds": "60"}, "--commit-seconds"),
    ({"memory_budget": -1.0}, "--memory-budget"),
    ({"memory_budget": math.inf}, "--memory-budget"),
    ({"max_update_error": math.nan}, "--accept-update-error"),
    ({"max_update_error": 0.0}, "--accept-update-error"),
    ({"max_update_error": "1e-3"}, "--accept-update-error"),
    ({"modes": -1}, "--modes"),
    ({"modes": 10 ** 9}, "--modes"),
    ({"modes": "²"}, "--modes"),
    ({"modes": "auto:٠.٩"}, "--modes"),
    ({"modes": "auto: 0.5"}, "--modes"),
    ({"modes": True}, "--modes"),
    ({"modes": "auto:1"}, "--modes"),
    ({"modes": "auto:nan"}, "--modes"),
    ({"modes": "auto:"}, "--modes"),
    ({"modes": "automatic"}, "--modes"),
    ({"modes": "auto", "modes_method": "oja"}, "--modes auto"),
    ({"kernel_stride": -1}, "--kernel-stride"),
    ({"modes": 2, "modes_at": (-1,)}, "--modes-at"),
    ({"modes": 2, "modes_at": ("3",)}, "--modes-at"),
    ({"modes": 2, "modes_at": 3}, "--modes-at"),
    ({"overwrite": "yes"}, "--overwrite"),
    ({"kernel": 1}, "--kernel"),
    ({"device": "tpu"}, "--device"),
    ({"out": 5}, "--out"),
    ({"targets": 5}, "--target"),
    ({"targets": ()}, "--target"),
    ({"rule": None}, "--rule"),
    ({"rule": f"supersample:{MAX_SUB_INTERVALS + 1}"}, "--rule"),
])
def test_wrong_type_or_range_is_one_audit_spec_error(fields, needle):
    with pytest.raises(AuditSpecError) as caught:
        arguments(**fields)
    assert needle in str(caught.value), str(caught.value)


def test_modes_auto_has_one_spelling_and_its_energy():
    assert arguments(modes="auto").modes == "auto:0.99" and arguments(modes="auto").modes_energy == 0.99
    assert arguments(modes="auto:0.9").modes_energy == 0.9 and arguments(modes=20).modes_energy is None
    assert arguments(modes="auto:95e-2").modes == "auto:0.95"
    assert arguments(modes="auto:0.9999999").modes == "auto:0.9999999"  # stored as used, not rounded
    assert arguments(modes="20").modes == 20  # the command line's digits


def test_paths_and_a_single_target_name_are_taken_as_given():
    args = arguments(ckpts=Path("runs/a"), out=Path("o.h5"), train_subset=Path("idx.npy"), targets="margin")
    assert (args.ckpts, args.out, args.train_subset, args.targets) == ("runs/a", "o.h5", "idx.npy", ("margin",))
    assert args.to_dict()["ckpts"] == "runs/a"


def test_supersample_bound():
    assert parse_rule(f"supersample:{MAX_SUB_INTERVALS}").sub_intervals == MAX_SUB_INTERVALS
    for rule in ("supersample:0", f"supersample:{MAX_SUB_INTERVALS + 1}", "supersample:" + "9" * 5000,
                 "supersample:١٢"):  # Arabic-Indic digits are not a K
        with pytest.raises(AuditSpecError):
            parse_rule(rule)
