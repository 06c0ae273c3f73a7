"""Smoke tests of the paper-experiment scripts (scripts/exp_*.py) at --quick scale: each runs,
writes its figure and JSON, and its numbers are in valid ranges."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")  # shared: the base run is trained once


def _run(module_name, out, *extra):
    module = __import__(module_name)
    assert module.main(["--quick", "--out-dir", str(out), *extra]) == 0


def test_pruning(out):
    _run("exp_pruning", out, "--fractions", "0.1", "0.5")
    assert (out / "pruning.png").stat().st_size > 0
    result = json.loads((out / "pruning.json").read_text())
    assert 0 <= result["no_pruning"] <= 1
    assert result["retrain_full_test"] == pytest.approx(result["recorded_full_test"])
    assert [r["p"] for r in result["rows"]] == [0.1, 0.5]
    for r in result["rows"]:
        for key in ("least_sum", "least_abs", "most_sum", "random_mean"):
            assert 0 <= r[key] <= 1
        assert all(0 <= a <= 1 for a in r["random_all"])
    assert list((out / "pruning").glob("*/least-sum-p10.npz"))
    assert list((out / "pruning").glob("*/least-sum-p10.toml"))


def test_adversarial(out):
    _run("exp_adversarial", out, "--n", "4", "--modes", "4", "--cure-steps", "3")
    assert (out / "adversarial.png").stat().st_size > 0
    result = json.loads((out / "adversarial.json").read_text())
    assert set(result["table2"]) == {"Clean", "Random", "Adversarial", "Cured Adversarial", "Cured Random",
                                     "Adversarial + Random Perturbation"}
    assert all(0 <= a <= 1 for a in result["table2"].values())
    assert result["table2"]["Clean"] == 1.0  # the clean points are chosen correctly classified
    for g in result["groups"].values():
        assert g["gross"] >= abs(g["net"]) - 1e-9  # Σ|P| ≥ |ΣP|
        assert 0 <= g["cr_at_K"] <= 1 + 1e-9
    for name in ("clean", "adversarial", "random"):
        assert (out / "adversarial" / f"{name}.npz").is_file()


def test_modes_k(out):
    _run("exp_modes_k", out, "--modes", "8", "--audit-n", "2", "--eval-iters", "2")
    assert (out / "modes_k.png").stat().st_size > 0
    result = json.loads((out / "modes_k.json").read_text())
    for r in result["results"].values():
        ks = [r["k90"], r["k95"], r["k99"]]
        reached = [k for k in ks if k > 0]
        assert reached == sorted(reached)  # K@90 ≤ K@95 ≤ K@99
        assert all(k == -1 or 1 <= k <= 8 for k in ks)
        assert all(k == -1 for k in ks[len(reached):])  # once not reached, higher levels are not either
        curve = r["energy_curve"]
        assert all(0 <= c <= 1 + 1e-9 for c in curve) and curve == sorted(curve)
        assert 0 <= r["clean_acc"] <= 1 and 0 <= r["robust_acc"] <= 1


def test_fidelity(out):
    _run("exp_fidelity", out, "--audit-n", "4", "--rules", "euler")
    assert (out / "fidelity.png").stat().st_size > 0
    rows = {r["method"]: r for r in json.loads((out / "fidelity.json").read_text())["rows"]}
    assert set(rows) == {"Audit (euler)", "TracIn (last layer)", "TracIn (all layers)"}
    for r in rows.values():
        assert r["mre"] >= 0 and r["time_s"] >= 0
        assert math.isnan(r["lc"]) or -1 - 1e-9 <= r["lc"] <= 1 + 1e-9
