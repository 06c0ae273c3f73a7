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


def _stat_ok(st, n):
    assert st["n"] == n == len(st["all"])
    assert st["mean"] == pytest.approx(sum(st["all"]) / n)
    assert math.isnan(st["sd"]) if n == 1 else st["sd"] >= 0


def test_pruning(out):
    import exp_common as C
    _run("exp_pruning", out, "--fractions", "0.1", "0.5", "--rule", "euler")
    assert (out / "pruning.png").stat().st_size > 0
    result = json.loads((out / "pruning.json").read_text())
    seeds = result["seeds"]
    assert seeds == [0, 1]
    assert 0 <= result["no_pruning"]["mean"] <= 1
    assert result["retrain_full_test"] == pytest.approx(result["recorded_full_test"])
    assert set(result["tables"]) == {"steps", "epochs"}
    for budget, rows in result["tables"].items():
        assert [r["p"] for r in rows] == [0.1, 0.5]
        for r in rows:
            assert r["dropped"] + r["kept"] == C.QUICK_TRAIN and r["dropped"] > 0
            if budget == "steps":
                assert r["updates"] == result["full_updates"]
            else:
                assert r["updates"] <= result["full_updates"]
            for key in ("least_sum", "least_abs", "least_abs_cb", "random", "most_harmful", "most_helpful",
                        "most_abs"):
                _stat_ok(r[key], len(seeds))
                assert all(0 <= a <= 1 for a in r[key]["all"])
                if key != "random":
                    diff = [a - b for a, b in zip(r[key]["all"], r["random"]["all"])]
                    assert r["minus_random"][key]["all"] == pytest.approx(diff)
                    assert r[key]["dropped"] == pytest.approx(r["dropped"], abs=10)  # class-balanced: rounding
    assert list((out / "pruning").glob("*/least-sum-p10.npz"))
    assert list((out / "pruning").glob("*/least-sum-p10.toml"))


def test_retrain_budget():
    """The steps budget gives a pruned set the full run's number of updates; without it the loop is
    plgk train's (epochs x ceil(m / batch)), so budgets differ exactly when rows are pruned."""
    import dataclasses

    import exp_common as C
    import numpy as np
    import torch

    from plgk_cli.config import load_config
    from plgk_cli.data import load_dataset

    config = load_config(ROOT / "configs" / "demo.toml")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=1, batch_size=32))
    d = load_dataset("digits", 0, torch.float32)
    data = dataclasses.replace(d, x_train=d.x_train[:96], y_train=d.y_train[:96])
    keep = np.arange(40)
    assert C.steps_of(config, 96) == 3 and C.steps_of(config, 40) == 2
    full = {k: v.clone() for k, v in C.retrain(config, data, keep, total_steps=2).state_dict().items()}
    plain = C.retrain(config, data, keep).state_dict()  # 2 updates: the same model
    assert all(torch.equal(full[k], plain[k]) for k in full)
    more = C.retrain(config, data, keep, total_steps=3).state_dict()  # one more update
    assert not all(torch.equal(full[k], more[k]) for k in full)
    other = C.retrain(config, data, keep, seed=1, total_steps=2).state_dict()
    assert not all(torch.equal(full[k], other[k]) for k in full)
    st = C.mean_sd_se([0.5, 0.7])
    assert st["mean"] == pytest.approx(0.6) and st["sd"] == pytest.approx(0.1414213562) \
        and st["se"] == pytest.approx(0.1)


def test_adversarial(out):
    _run("exp_adversarial", out, "--n", "2", "--seeds", "2", "--modes", "4", "--cure-modes", "3",
         "--cure-steps", "3", "--tau-rel", "1", "5", "--rule", "euler")
    assert (out / "adversarial.png").stat().st_size > 0
    result = json.loads((out / "adversarial.json").read_text())
    assert 0 <= result["robust_accuracy"] <= 1 and 0 <= result["clean_accuracy"] <= 1
    assert set(result["cure"]) == {"1.0", "5.0"}
    for tau in result["cure"].values():
        table = tau["accuracy"]
        assert set(table) == {"Clean", "Random", "Adversarial", "Cured Adversarial", "Cured Random",
                              "Adversarial + Random Perturbation", "Adversarial + Random (matched ‖δ‖₂)"}
        for st in table.values():
            _stat_ok(st, 2)
            assert all(0 <= a <= 1 for a in st["all"])
        assert table["Clean"]["all"] == [1.0, 1.0]  # the clean points are chosen correctly classified
        assert all(-1 - 1e-6 <= c <= 1 + 1e-6 for c in tau["cure_adv_cosine"]["all"])
    for g in result["groups"].values():
        for a, b in zip(g["gross"]["all"], g["net"]["all"]):
            assert a >= abs(b) - 1e-9  # Σ|P| ≥ |ΣP| (per seed: mean G ≥ |mean S|)
        assert all(0 <= c <= 1 + 1e-9 for c in g["cr_at_K"]["all"])
    clean = __import__("numpy").load(out / "adversarial" / "clean.npz")
    assert len(set(clean["test_index"].tolist())) == 4  # two disjoint blocks of 2 points
    for name in ("clean", "adversarial", "random"):
        assert (out / "adversarial" / f"{name}.npz").is_file()


def test_modes_k(out):
    _run("exp_modes_k", out, "--modes", "auto", "--audit-n", "2", "--eval-iters", "2", "--seeds", "2")
    assert (out / "modes_k.png").stat().st_size > 0
    result = json.loads((out / "modes_k.json").read_text())
    assert result["seeds"] == [0, 1] and len(result["per_seed"]) == 2
    for seed in result["per_seed"]:
        for r in seed.values():
            ks = [r["k90"], r["k95"], r["k99"]]
            assert 1 <= ks[0] <= ks[1] <= ks[2] <= r["k_computed"]  # auto: K@99 always reached
            curve = r["energy_curve"]
            assert all(0 <= c <= 1 + 1e-9 for c in curve) and curve == sorted(curve)
            for level, k in zip((0.90, 0.95, 0.99), ks):  # K@X is the first K whose curve reaches X
                assert curve[k - 1] >= level - 1e-12 and (k == 1 or curve[k - 2] < level)
            assert 0 <= r["robust_acc"] <= 1 and 0 <= r["clean_acc"] <= 1
            assert r["adv_clean_energy_ratio"] > 0
    for key in ("k90", "k95", "k99"):
        st = result["summary"]["Standard"][key]
        assert st["all"] == [seed["Standard"][key] for seed in result["per_seed"]]
        assert result["summary"]["Ratio"][key]["all"] == pytest.approx(
            [seed["PGD-AT"][key] / seed["Standard"][key] for seed in result["per_seed"]])


def test_fidelity(out):
    _run("exp_fidelity", out, "--audit-n", "4", "--rules", "euler", "adaptive:1e-2")
    assert (out / "fidelity.png").stat().st_size > 0
    rows = {r["method"]: r for r in json.loads((out / "fidelity.json").read_text())["rows"]}
    # the quick run has one update: TRAK on θ_T only, no ensemble over checkpoints
    assert set(rows) == {"Audit (euler)", "Audit (adaptive:1e-2)", "TracIn (last layer)", "TracIn (all layers)",
                         "TRAK (1 ckpt: θ_T)"}
    assert rows["TRAK (1 ckpt: θ_T)"]["steps"] == [1]
    for r in rows.values():
        assert r["mre"] >= 0 and r["time_s"] >= 0
        assert math.isnan(r["lc"]) or -1 - 1e-9 <= r["lc"] <= 1 + 1e-9


def test_lds(tmp_path):
    """exp_lds --quick (every method but kronfluence, which is not in the `test` extra): the LDS of
    every method is the Spearman correlation recomputed here from the saved subsets, outputs and
    scores; the subsets' outputs are those of the model retrained on that subset; the scores are
    the replay's influence, the exp_fidelity TracIn, the datamodel's ridge solution, with the signs
    the script states; the top-k removal dropped each method's top k, flips mean misclassified."""
    import argparse

    import exp_common as C
    import exp_fidelity
    import exp_lds as L
    import numpy as np
    from scipy.stats import spearmanr

    from plgk_cli.store import InfluenceFile

    methods = [m for m in L.METHODS if m != "kronfluence"]
    _run("exp_lds", tmp_path, "--methods", *methods, "--adaptive-rule", "euler")  # euler: the same code, faster
    assert (tmp_path / "lds.png").stat().st_size > 0
    result = json.loads((tmp_path / "lds.json").read_text())
    arrays = np.load(tmp_path / "lds.npz")
    masks, n_audit = arrays["masks"], result["audit_n"]
    assert masks.shape == (result["subsets"], C.QUICK_TRAIN) and (masks.sum(1) == result["subset_keep"]).all()
    assert len({row.tobytes() for row in masks}) == len(masks)  # distinct subsets
    for name in methods:
        for q in L.QUANTITIES:
            scores, outputs = arrays[f"score_{name}_{q}"], arrays[f"outputs_{q}"]
            assert scores.shape == (C.QUICK_TRAIN, n_audit)
            st = result["lds"][name][q]
            _stat_ok(st, n_audit)
            assert st["se"] == pytest.approx(st["sd"] / math.sqrt(n_audit))
            pred = masks.astype(float) @ scores
            expect = [spearmanr(pred[:, n], outputs[:, n]).statistic for n in range(n_audit)]
            assert st["all"] == pytest.approx(expect, abs=1e-9, nan_ok=True)
    for name in ("trak", "trak-ens", "plgk-dm", "plgk-dm-pre", "plgk-kernel", "plgk-kernel-pre"):
        assert np.array_equal(arrays[f"score_{name}_loss"], -arrays[f"score_{name}_margin"])

    # the subsets' outputs come from models retrained on them (subset 0, seed --subset-seed)
    run = Path(result["runs"][0])
    data = C.load_run_data(run)
    x_a, y_a = data.x_test[:n_audit], data.y_test[:n_audit]
    config = C.make_config(argparse.Namespace(config=str(ROOT / "configs" / "demo.toml"), mnist=None, quick=True,
                                              epochs=L.QUICK_EPOCHS, batch_size=None, out_dir=str(tmp_path)))
    model = C.retrain(config, data, np.nonzero(masks[0])[0], seed=result["subset_seeds"][0])
    ev = L.evaluate(model, x_a, y_a)
    for q in L.QUANTITIES:
        assert arrays[f"outputs_{q}"][0] == pytest.approx(ev[q], rel=1e-5, abs=1e-6)

    # plgk: the replay's influence, which adds up to the loss change over training (sign check)
    with InfluenceFile(tmp_path / "lds" / "plgk-s0.h5") as f:
        for q in L.QUANTITIES:
            assert arrays[f"score_plgk_{q}"][f.train_index] == pytest.approx(f.influence(q), rel=1e-6, abs=1e-9)
        change = f.array("loss", "final") - f.array("loss", "initial")
    assert np.corrcoef(arrays["score_plgk_loss"].sum(0), change)[0, 1] > 0.9
    # TracIn: the exp_fidelity implementation (loss, all layers)
    assert arrays["score_tracin_loss"] == pytest.approx(
        exp_fidelity.tracin(run, x_a, y_a, last_layer_only=False).numpy(), rel=1e-4, abs=1e-9)
    # the datamodel: (K_tt + λ I) τ = K_tn, K from the kernel replay
    with InfluenceFile(tmp_path / "lds" / "plgk-dm.h5") as f:
        k_tt, k_tn = f.kernel("train_gram"), f.kernel("audit_train_gram").T
    tau = arrays["score_plgk-dm_margin"]
    assert ((k_tt + k_tt.T) / 2 + result["plgk-dm_lambda"] * np.eye(len(k_tt))) @ tau == pytest.approx(k_tn, rel=1e-6,
                                                                                                      abs=1e-9)
    assert arrays["score_plgk-kernel_margin"] == pytest.approx(k_tn)

    # top-k removal
    points = result["topk_points"]
    assert points and all(result["reference_margin"][n] > 0 for n in points)  # correct under the reference
    assert points == arrays["topk_points"].tolist()
    assert set(result["topk"]) == set(methods) - set(L.LDS_ONLY)
    for name, by_k in result["topk"].items():
        for k in result["ks"]:
            r = by_k[str(k)]
            assert len(r["flipped"]) == len(points) and r["flip_share"] == pytest.approx(np.mean(r["flipped"]))
            assert all(f == (mg < 0) for f, mg in zip(r["flipped"], r["margin_after"]))
            for n, drop in zip(points, r["dropped"]):
                top = np.argsort(-arrays[f"score_{name}_margin"][:, n], kind="stable")[:k]
                assert drop == top.tolist()
    for st in result["ceiling"].values():
        _stat_ok(st, n_audit)
    assert result["total"]["wall_s"] > 0 and result["total"]["cpu_s"] > 0
    assert all(c["wall_s"] >= 0 and c["cpu_s"] >= 0 for c in result["cost"].values())
