"""Replay's audit against the true change of the audited quantities, and its variants
(targets, rules, stride, partial and grouped audits) against the full audit."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
import pytest

from conftest import tiny_config, train_tiny
from plgk_cli.arguments import ReplayArguments
from plgk_cli.replay import replay
from plgk_cli.store import InfluenceFile

ADAM_WD = {"name": "adam", "lr": 0.01, "weight_decay": 0.01}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_npz):
    return train_tiny(tmp_path_factory.mktemp("run") / "run", tiny_npz, ADAM_WD, epochs=3)


def _replay(run_dir, tmp_path, name="out.h5", **kwargs):
    kwargs.setdefault("audit_set", "test[0:5]")
    args = ReplayArguments(ckpts=str(run_dir), out=str(tmp_path / name), device="cpu", **kwargs)
    summary = replay(args, progress=False)
    return summary, InfluenceFile(tmp_path / name)


def _true_change(f, target="loss"):
    return f.array(target, "final") - f.array(target, "initial")


def test_complete_audit_reconstructs_the_true_loss_change(run_dir, tmp_path):
    summary, f = _replay(run_dir, tmp_path)
    with f:
        infl, residual = f.influence("loss").astype(np.float64), f.array("loss", "residual")
        reconstructed = infl.sum(0) + residual
        true = _true_change(f)
        assert np.abs(true).mean() > 1e-2  # the run moved the losses: the test has teeth
        assert np.abs(reconstructed - true).mean() == pytest.approx(summary.metrics["loss"]["mre"], rel=1e-3)
        assert summary.metrics["loss"]["mre"] < 1e-3 * np.abs(true).mean()
        assert np.any(residual != 0)  # L2 weight decay has no owner
        assert f.metrics("loss")["attribution_gap"] < 1e-6  # float32 storage of influence
        # the trace ends at the final reconstruction and starts at zero
        assert np.allclose(f.array("loss", "trace/true_change")[-1], true)
        assert np.all(f.array("loss", "trace/reconstructed")[0] == 0)
        # per-layer, per-epoch sums add up to the influence totals
        signed = f.array("loss", "by_layer_epoch/signed")
        assert signed.shape[:2] == (3, 2)  # 3 epochs, 2 Linear layers
        np.testing.assert_allclose(signed.sum((0, 1)), infl.sum(0), rtol=1e-5, atol=1e-9)
        assert np.all(f.array("loss", "by_layer_epoch/abs") >= np.abs(signed) - 1e-12)


def test_quadrature_rules_order(run_dir, tmp_path):
    mre = {rule: _replay(run_dir, tmp_path, f"{rule}.h5", rule=rule)[0].metrics["loss"]["mre"]
           for rule in ("euler", "trapezoid", "supersample:4")}
    assert mre["euler"] > 5 * mre["trapezoid"]
    assert mre["supersample:4"] < mre["trapezoid"]


@pytest.fixture(scope="module")
def large_steps(tmp_path_factory, tiny_npz):
    """Adam at lr 0.1: steps large enough that the trapezoid's error shows."""
    return train_tiny(tmp_path_factory.mktemp("large") / "run", tiny_npz, {"name": "adam", "lr": 0.1}, epochs=3)


def test_segment_errors_are_what_the_trace_misses(large_steps, tmp_path):
    """quadrature/segment_error is each segment's Δθ·h − Δq, measured: they add up to the audit's
    completeness error (Σ influence + residual − true change) of every audit point."""
    _, f = _replay(large_steps, tmp_path, rule="trapezoid")
    with f:
        q = f.quadrature("loss")
        assert q["segment_error"].shape == (9, 5) and (q["sub_intervals"] == 1).all()
        gap = f.influence("loss").astype(np.float64).sum(0) + f.array("loss", "residual") - _true_change(f)
        np.testing.assert_allclose(q["segment_error"].sum(0), gap, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("tolerance", [1e-2, 1e-3])
def test_adaptive_rule_certifies_its_tolerance_and_bounds_each_entry(large_steps, tmp_path, tolerance):
    """adaptive:TOL refines where a segment's measured error is large: the rel. MRE stays within
    TOL (each segment within TOL / K of the mean true change), below the trapezoid's; the
    influence approaches supersample:64's, whose difference the stored error bound covers."""
    trapezoid, _ = _replay(large_steps, tmp_path, "trapezoid.h5", rule="trapezoid")
    summary, f = _replay(large_steps, tmp_path, f"adaptive{tolerance}.h5", rule=f"adaptive:{tolerance}")
    _, fine = _replay(large_steps, tmp_path, "fine.h5", rule="supersample:64")
    with f, fine:
        assert trapezoid.metrics["loss"]["rmre"] > tolerance  # the run needs refining at all
        assert summary.metrics["loss"]["rmre"] <= tolerance
        pieces = f.quadrature("loss")["sub_intervals"][:, 0]
        assert pieces.max() > 1 and pieces.min() >= 1
        a, b, bound = f.influence("loss").astype(np.float64), fine.influence("loss"), f.error_bound("loss")
        assert bound.shape == a.shape and (bound >= 0).all()
        assert np.mean(np.abs(a - b) <= bound + 2.0 ** -23 * (np.abs(a) + np.abs(b))) >= 0.95
        assert bound.max() < 0.2 * np.abs(a).max()  # a bound that says something
        assert f.quadrature("loss")["gradient_error"].shape == (9, 5)


def test_an_accepted_update_error_is_recorded_and_said(run_dir, tmp_path):
    from plgk_cli.inspect import format_summary, summary
    _, f = _replay(run_dir, tmp_path, max_update_error=1e-2)
    with f:
        assert f.attrs["accepted_update_error"] == 1e-2
        assert "update errors up to 0.01 were accepted (--accept-update-error)" in format_summary(summary(f))
    _, default = _replay(run_dir, tmp_path, "default.h5")
    with default:
        assert "accepted_update_error" not in default.attrs


def test_targets_together_equal_targets_alone(run_dir, tmp_path):
    _, together = _replay(run_dir, tmp_path, "all.h5", targets=("loss", "margin", "logits"))
    _, margin = _replay(run_dir, tmp_path, "margin.h5", targets=("margin",))
    with together, margin:
        np.testing.assert_allclose(together.influence("margin"), margin.influence("margin"), rtol=1e-6)
        logits = together.influence("logits")
        assert logits.shape == (22, 5, 3)
        reconstructed = logits.astype(np.float64).sum(0) + together.array("logits", "residual")
        true = _true_change(together, "logits")
        # logits bend more along the path than the loss: a looser quadrature bound
        assert np.abs(reconstructed - true).mean() < 5e-3 * np.abs(true).mean()


def test_grouped_audit_sums_the_full_audit_by_label(run_dir, tmp_path):
    _, full = _replay(run_dir, tmp_path, "full.h5")
    _, grouped = _replay(run_dir, tmp_path, "grouped.h5", group_by="label")
    with full, grouped:
        labels, groups = full.train_label, grouped.train_group
        expected = np.stack([full.influence()[labels == g].astype(np.float64).sum(0) for g in groups])
        np.testing.assert_allclose(grouped.influence(), expected, rtol=1e-5, atol=1e-8)
        assert grouped.metrics("loss")["mre"] == pytest.approx(full.metrics("loss")["mre"], rel=1e-3)


def test_partial_audit_rows_equal_full_audit_rows(run_dir, tmp_path):
    _, full = _replay(run_dir, tmp_path, "full.h5")
    _, part = _replay(run_dir, tmp_path, "part.h5", train_subset="3:11")
    with full, part:
        assert list(part.train_index) == list(range(3, 11))
        np.testing.assert_allclose(part.influence(), full.influence()[3:11], rtol=1e-6)
        assert not part.attrs["complete_audit"]
        assert part.metrics("loss")["lc"] == part.metrics("loss")["lc"]  # LC still reported


def test_stride_keeps_the_decomposition_exact(run_dir, tmp_path):
    summary, f = _replay(run_dir, tmp_path, "stride.h5", stride=2)
    with f:
        assert list(f.array("loss", "trace/step")) == [0, 2, 4, 6, 8, 9]
        assert f.metrics("loss")["attribution_gap"] < 1e-6
        reference = _replay(run_dir, tmp_path, "s1.h5")[0]
        assert summary.metrics["loss"]["mre"] > reference.metrics["loss"]["mre"]


def test_npz_audit_set_and_determinism(run_dir, tmp_path, tiny_npz):
    data = np.load(tiny_npz)
    np.savez(tmp_path / "audit.npz", x=data["x_test"][:5] + 0.1, y=data["y_test"][:5])
    _, a = _replay(run_dir, tmp_path, "a.h5", audit_set=str(tmp_path / "audit.npz"))
    _, b = _replay(run_dir, tmp_path, "b.h5", audit_set=str(tmp_path / "audit.npz"))
    _, clean = _replay(run_dir, tmp_path, "c.h5")
    with a, b, clean:
        assert a.audit_index is None and a.audit_source.endswith("audit.npz")
        assert np.array_equal(a.influence(), b.influence())  # bit-identical on CPU
        assert not np.allclose(a.influence(), clean.influence())  # perturbed points differ


def test_net_and_gross_influence_by_epoch(run_dir, tmp_path):
    """S(e) from the epoch snapshots equals the running sum of the per-layer, per-epoch sums (a
    separate accumulation); at the last epoch S and G are the influence matrix's column sums and
    absolute column sums."""
    _, f = _replay(run_dir, tmp_path, "ng.h5")
    with f:
        net, gross = f.array("loss", "by_epoch/net"), f.array("loss", "by_epoch/gross")
        signed = f.array("loss", "by_layer_epoch/signed")
        np.testing.assert_allclose(net, np.cumsum(signed.sum(1), 0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(net[-1], f.influence().astype(np.float64).sum(0), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(gross[-1], np.abs(f.influence().astype(np.float64)).sum(0), rtol=1e-5)
        assert np.all(gross >= np.abs(net) - 1e-12)


def test_memory_budget_picks_small_chunks_with_the_same_result(run_dir, tmp_path):
    _, default = _replay(run_dir, tmp_path, "default.h5")
    _, budgeted = _replay(run_dir, tmp_path, "budget.h5", memory_budget=0.03)  # a few examples a chunk
    with default, budgeted:
        np.testing.assert_allclose(budgeted.influence(), default.influence(), rtol=1e-6, atol=1e-9)
    from plgk_cli.errors import AuditSpecError

    with pytest.raises(AuditSpecError, match="--memory-budget: .* too small"):
        _replay(run_dir, tmp_path, "tiny.h5", memory_budget=1e-4)


def _image_npz(path):
    rng = np.random.default_rng(5)
    np.savez(path, x_train=rng.normal(size=(24, 1, 6, 6)), y_train=np.arange(24) % 3,
             x_test=rng.normal(size=(8, 1, 6, 6)), y_test=np.arange(8) % 3)
    return path


@pytest.mark.parametrize("model", [{"name": "mlp", "kwargs": {"hidden": 6, "depth": 3}},
                                   {"name": "cnn", "kwargs": {"channels": 2, "hidden": 5}}])
def test_ghost_dot_products_give_the_materialised_audit(tmp_path, tiny_npz, model):
    """Plain SGD (L2, clipping), euler: crediting the Linear layers by ghost dot products gives the
    audit of the per-example gradients, layer by layer, for every target (float64)."""
    npz = tiny_npz if model["name"] == "mlp" else _image_npz(tmp_path / "images.npz")
    run = train_tiny(tmp_path / "run", npz, {"name": "sgd", "lr": 0.2, "weight_decay": 0.01,
                                             "clip_grad_norm": 0.5}, model=model)
    files = {}
    for ghost in (False, True):
        out = tmp_path / f"ghost{ghost}.h5"
        replay(ReplayArguments(ckpts=str(run), audit_set="test[0:4]", out=str(out), rule="euler",
                               targets=("loss", "margin", "logits"), device="cpu", ghost=ghost),
               progress=False)
        files[ghost] = InfluenceFile(out)
    plain, ghost = files[False], files[True]
    for target in ("loss", "margin", "logits"):
        for name in ("influence", "residual", "by_layer_epoch/signed", "by_layer_epoch/abs", "trace/reconstructed"):
            a, b = plain.array(target, name), ghost.array(target, name)
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-12 * max(1.0, np.abs(a).max()),
                                       err_msg=f"{target} {name}")
        assert ghost.metrics(target)["mre"] == pytest.approx(plain.metrics(target)["mre"], rel=1e-6)
    np.testing.assert_allclose(ghost.update_error, plain.update_error, atol=1e-14)


def test_ghost_is_refused_where_it_is_not_the_audit(run_dir, tmp_path, tiny_npz):
    from plgk_cli.errors import AuditSpecError

    with pytest.raises(AuditSpecError, match="--ghost: needs --rule euler and --stride 1"):
        ReplayArguments(ckpts=str(run_dir), audit_set="test[0:4]", out=str(tmp_path / "a.h5"), ghost=True)
    momentum = train_tiny(tmp_path / "momentum", tiny_npz, {"name": "sgd", "lr": 0.1, "momentum": 0.9})
    with pytest.raises(AuditSpecError, match="--ghost: the run's optimizer is sgd with momentum 0.9"):
        replay(ReplayArguments(ckpts=str(momentum), audit_set="test[0:4]", out=str(tmp_path / "b.h5"),
                               rule="euler", device="cpu", ghost=True), progress=False)
    assert not (tmp_path / "b.h5").exists()


def logreg(in_shape, num_classes):
    """A model that is one Linear layer (its parameters are named weight and bias)."""
    return nn.Linear(in_shape[0], num_classes)


def bias_only(in_shape, num_classes):
    """BitFit-style: the hidden Linear's weight is frozen (and seeded, so that replay rebuilds
    it identically), its bias trains."""
    body = nn.Linear(in_shape[0], 5)
    with torch.no_grad():
        body.weight.copy_(torch.randn(body.weight.shape, generator=torch.Generator().manual_seed(7)))
    body.weight.requires_grad_(False)
    return nn.Sequential(body, nn.Tanh(), nn.Linear(5, num_classes))


def sequence_head(in_shape, num_classes):
    """A Linear applied to (batch, 2, 3) inputs."""
    return nn.Sequential(nn.Unflatten(1, (2, 3)), nn.Linear(3, 4), nn.Flatten(), nn.Linear(8, num_classes))


@pytest.mark.parametrize("builder", ["logreg", "bias_only"])
def test_ghost_on_a_bare_linear_and_a_frozen_weight(tmp_path, tiny_npz, builder):
    run = train_tiny(tmp_path / "run", tiny_npz, {"name": "sgd", "lr": 0.2},
                     model={"name": f"test_replay:{builder}"})
    arrays = []
    for ghost in (False, True):
        out = tmp_path / f"ghost{ghost}.h5"
        replay(ReplayArguments(ckpts=str(run), audit_set="test[0:4]", out=str(out), rule="euler",
                               targets=("loss", "logits"), device="cpu", ghost=ghost), progress=False)
        with InfluenceFile(out) as f:
            arrays.append([f.array(t, n) for t in ("loss", "logits")
                           for n in ("influence", "by_layer_epoch/signed", "residual")])
    for plain, ghost in zip(*arrays):
        np.testing.assert_allclose(ghost, plain, rtol=1e-6, atol=1e-12 * max(1.0, np.abs(plain).max()))


def test_ghost_refuses_a_linear_on_sequences_in_one_line(tmp_path, tiny_npz):
    from click.testing import CliRunner

    from plgk_cli.cli import main

    run = train_tiny(tmp_path / "run", tiny_npz, {"name": "sgd", "lr": 0.2},
                     model={"name": "test_replay:sequence_head"})
    result = CliRunner().invoke(main, ["replay", "--ckpts", str(run), "--audit-set", "test[0:4]", "--out",
                                       str(tmp_path / "out.h5"), "--rule", "euler", "--ghost", "--quiet"])
    assert result.exit_code == 13, result.output
    assert "Traceback" not in result.output
    assert "--ghost: layer '1' sees inputs of shape" in result.output and "drop --ghost" in result.output
    assert not (tmp_path / "out.h5").exists()


def frozen_body(in_shape, num_classes):
    """A frozen, randomly drawn first layer (and a buffer): replay must use the drawn values."""
    model = nn.Sequential(nn.Linear(in_shape[0], 5), nn.Tanh(), nn.Linear(5, num_classes))
    model[0].requires_grad_(False)
    model.register_buffer("offset", torch.randn(in_shape[0]))
    return model


def test_frozen_parameters_and_buffers_replay_as_trained(tmp_path, tiny_npz):
    from plgk_cli.run import load_run
    from plgk_cli.trajectory import read_fixed

    run_dir = train_tiny(tmp_path / "run", tiny_npz, {"name": "adam", "lr": 0.05},
                         model={"name": "test_replay:frozen_body"})
    run = load_run(run_dir)
    torch.manual_seed(12345)  # a different draw than training's: the record must win
    rebuilt = run.build_model()
    trained_state = run.checkpoint(0)
    assert {n for n, p in rebuilt.named_parameters() if p.requires_grad} == set(trained_state.params)
    assert torch.equal(rebuilt.offset, read_fixed(run_dir)["offset"])
    summary = replay(ReplayArguments(ckpts=str(run_dir), audit_set="test[0:4]", out=str(tmp_path / "a.h5"),
                                     device="cpu"), progress=False)
    assert summary.max_update_error < 1e-10  # float64: the update check sees training's frozen layer


class _Tied(nn.Module):
    def __init__(self, features, num_classes):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                                  nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, num_classes))
        self.body[4].weight = self.body[2].weight
        self.frozen = nn.Linear(features, features)
        self.frozen.requires_grad_(False)
        self.alias = self.frozen

    def forward(self, x):
        return self.body(x + 0.1 * self.alias(x))


def tied_layers(in_shape, num_classes):
    """Two Linear layers sharing one trainable weight, and a frozen Linear under two names."""
    return _Tied(in_shape[0], num_classes)


def test_tied_weights_train_and_replay(tmp_path, tiny_npz):
    """A weight shared by two layers is one trainable parameter; a frozen module registered twice
    is recorded once; replay falls back to vmap for the shared layer and stays exact."""
    run_dir = train_tiny(tmp_path / "run", tiny_npz, {"name": "sgd", "lr": 0.1},
                         model={"name": "test_replay:tied_layers"})
    summary = replay(ReplayArguments(ckpts=str(run_dir), audit_set="test[0:4]", out=str(tmp_path / "a.h5"),
                                     device="cpu"), progress=False)
    assert summary.max_update_error < 1e-10
    assert summary.metrics["loss"]["lc"] > 0.99


@pytest.fixture(scope="module")
def float32_runs(tmp_path_factory, tiny_npz):
    """float32 runs, where the update check shows how its batch gradient was formed: the sum of the
    per-example gradients misses training's own float32 gradient by ~1e-7, which Adam's state
    shows (the digits demo: 7.3e-8 from the sum, 1e-8 or less from a batch-mean pass)."""
    from plgk_cli.config import parse_config
    from plgk_cli.train import train

    runs = {}
    for name, optim, task in (("adam", ADAM_WD, None), ("sgd", {"name": "sgd", "lr": 0.2}, None),
                              ("weighted", ADAM_WD, "py:test_tasks:ClassWeighted")):
        config = tiny_config(tiny_npz, optim, "float32", epochs=3, device="cpu")
        if task:
            config["task"] = {"name": task}
        runs[name] = tmp_path_factory.mktemp(name) / "run"
        train(parse_config(config), runs[name], progress=False)
    return runs


@pytest.mark.parametrize("run, options", [
    ("adam", {}),  # stride 1: the training side shares the audit side's pass
    ("adam", {"stride": 2}),  # a separate training-side pass
    ("sgd", {"ghost": True, "rule": "euler"}),
    ("weighted", {}),  # w_m from the whole batch
], ids=["shared-pass", "separate-pass", "ghost", "weighted-task"])
@pytest.mark.parametrize("subset", ["3:11", "0:1"], ids=["some-of-each-batch", "most-batches-none"])
def test_partial_audit_update_check_is_the_full_audits(float32_runs, tmp_path, run, options, subset):
    """A partial audit re-derives each update from the per-example gradients of the whole
    minibatch, as the full audit does: the same update errors bit for bit, and the same rows."""
    full_summary, full = _replay(float32_runs[run], tmp_path, "full.h5", **options)
    part_summary, part = _replay(float32_runs[run], tmp_path, "part.h5", train_subset=subset, **options)
    start, stop = map(int, subset.split(":"))
    with full, part:
        assert full.update_error.max() > 0  # float32: the check measures rounding, not zero
        np.testing.assert_array_equal(part.update_error, full.update_error)
        assert part_summary.max_update_error == full_summary.max_update_error
        np.testing.assert_allclose(part.influence(), full.influence()[start:stop], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("where, needle", [("value", "is inf at step"), ("gradient", "non-finite gradient")])
@pytest.mark.parametrize("theta_step", [None, 1])  # at θ_T (evaluated first), inside the walk
def test_non_finite_audit_quantity_stops_the_replay_naming_the_point(run_dir, tmp_path, monkeypatch, where,
                                                                     needle, theta_step):
    """A NaN/Inf audited quantity (or gradient) would make its influences and the completeness
    metrics NaN: replay stops with NonFiniteError naming the audit point, target and step, and
    writes nothing. The fault is injected into the audit side's result for point 2's margin."""
    from plgk_cli import replay as replay_module
    from plgk_cli.errors import NonFiniteError

    targets = ("loss", "margin")

    def poisoned(side):
        def wrapper(plan, theta, *args, **kwargs):
            values, grads, *rest = side(plan, theta, *args, **kwargs)
            if torch.equal(theta, plan.theta(plan.total if theta_step is None else theta_step)):
                column = 2 * len(targets) + 1  # point 2, its margin
                if where == "value":
                    values[column] = float("inf")
                else:
                    grads[0, column] = float("nan")
            return (values, grads, *rest)
        return wrapper

    for name in ("audit_side", "audit_and_training_side"):  # the walk shares the pass where it can
        monkeypatch.setattr(replay_module.ReplayPlan, name, poisoned(getattr(replay_module.ReplayPlan, name)))
    with pytest.raises(NonFiniteError) as caught:
        _replay(run_dir, tmp_path, targets=targets, rule="euler")
    message = str(caught.value)
    step = "step 1" if theta_step == 1 else "step "
    assert "audit point 2's margin" in message and needle in message and step in message, message
    assert not list(tmp_path.iterdir())
