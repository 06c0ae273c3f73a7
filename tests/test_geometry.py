"""replay --kernel/--modes against naive references built from explicit per-sample loops."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch.func import functional_call

from conftest import train_tiny
from plgk_cli.arguments import ReplayArguments
from plgk_cli.cli import main
from plgk_cli.config import load_config
from plgk_cli.errors import StoreError
from plgk_cli.replay import replay
from plgk_cli.run import load_run
from plgk_cli.store import InfluenceFile
from plgk_cli.train import train

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"

ADAM = {"name": "adam", "lr": 0.05, "betas": [0.9, 0.99]}
KERNEL_STRIDE = 2  # 9 updates -> kernel checkpoints 0, 2, 4, 6, 8, 9


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_npz):
    return train_tiny(tmp_path_factory.mktemp("run") / "run", tiny_npz, ADAM, epochs=3)


def _replay(run_dir, out, **kwargs):
    replay(ReplayArguments(ckpts=str(run_dir), audit_set="test[0:5]", out=str(out), device="cpu",
                           kernel=True, kernel_stride=KERNEL_STRIDE, **kwargs), progress=False)
    return InfluenceFile(out)


def _loop_gradients(run, step, x, y):
    """Per-sample loss gradients (rows) at θ_step, one autograd call per example, float64."""
    model = run.build_model().double()
    recorded = run.checkpoint(step).params  # in the manifest's parameter order, like A_t below
    params = {p["name"]: recorded[p["name"]].double().requires_grad_(True)
              for p in run.manifest["parameters"]}
    rows = []
    for i in range(len(y)):
        loss = F.cross_entropy(functional_call(model, params, (x[i:i + 1].double(),)), y[i:i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))]))
    return torch.stack(rows)


def _adam_preconditioner(run, step):
    """A_t = 1/(sqrt(v/(1−β2^k)) + eps) of the update starting at θ_step (the last one's at T)."""
    ck = run.checkpoint(min(step + 1, run.steps[-1]))
    beta2, eps = ADAM["betas"][1], 1e-8
    v = torch.cat([ck.optim_state[p["name"]]["exp_avg_sq"].reshape(-1).double()
                   for p in run.manifest["parameters"]])
    return 1.0 / (v.sqrt() / math.sqrt(1 - beta2 ** ck.optim_step) + eps)


@pytest.mark.parametrize("precondition", [False, True])
def test_plgk_equals_naive_path_features(run_dir, tmp_path, precondition):
    run = load_run(run_dir)
    data = run.dataset
    with _replay(run_dir, tmp_path / "k.h5", precondition=precondition) as f:
        steps = f.kernel("step")
        assert list(steps) == [0, 2, 4, 6, 8, 9]
        # Φ_path: every kernel checkpoint's per-sample gradients, concatenated (paper eq. 13)
        audit_path, train_path = [], []
        for t in steps:
            scale = _adam_preconditioner(run, int(t)).sqrt() if precondition else 1.0
            audit_path.append(_loop_gradients(run, int(t), data.x_test[:5], data.y_test[:5]) * scale)
            train_path.append(_loop_gradients(run, int(t), data.x_train, data.y_train) * scale)
        a, m = torch.cat(audit_path, 1), torch.cat(train_path, 1)
        for name, expected in (("audit_gram", a @ a.T), ("audit_train_gram", a @ m.T),
                               ("train_norm_sq", (m * m).sum(1))):
            got = torch.from_numpy(f.kernel(name))
            assert float((got - expected).norm() / expected.norm()) <= 1e-6, name
        gram = f.kernel("audit_gram")
        assert np.array_equal(gram, gram.T)
        eig = np.linalg.eigvalsh(gram)
        assert eig[0] >= -1e-6 * eig[-1]
        assert np.allclose(np.diag(f.kernel("audit_ips")), 1.0, atol=1e-6)
        chord, angle = f.distances()
        assert np.allclose(np.diag(chord), 0.0, atol=1e-6)
        assert np.allclose(chord, 2 * np.sin(angle / 2), atol=1e-6)


def test_streamed_modes_match_the_materialised_svd(run_dir, tmp_path):
    run = load_run(run_dir)
    data = run.dataset
    with _replay(run_dir, tmp_path / "m.h5", modes=4) as f:
        name = f"step_{run.steps[-1]:08d}"
        phi = _loop_gradients(run, run.steps[-1], data.x_train, data.y_train)
        exact = torch.linalg.svdvals(phi)
        s = f.mode(name, "s")
        np.testing.assert_allclose(s, exact[:4].numpy(), rtol=1e-3)
        total = float((phi * phi).sum())
        assert f.mode_attrs(name)["total_energy"] == pytest.approx(total, rel=1e-9)
        curve = np.cumsum(exact.numpy() ** 2) / total
        for pct in (90, 95, 99):
            k = int(np.argmax(curve >= pct / 100)) + 1
            assert f.mode_attrs(name)[f"k_at_{pct}"] == (k if k <= 4 else -1)
        cr = f.mode(name, "cancellation")
        assert cr.shape == (6, 5, 4) and np.nanmax(cr) <= 1 + 1e-12 and np.nanmin(cr) >= 0


def test_modes_auto_holds_the_energy_and_stores_the_k_it_used(run_dir, tmp_path):
    run = load_run(run_dir)
    data = run.dataset
    with _replay(run_dir, tmp_path / "auto.h5", modes="auto:0.95") as f:
        name = f"step_{run.steps[-1]:08d}"
        phi = _loop_gradients(run, run.steps[-1], data.x_train, data.y_train)
        exact = torch.linalg.svdvals(phi)
        curve = np.cumsum(exact.numpy() ** 2) / float((phi * phi).sum())
        k = int(np.argmax(curve >= 0.95)) + 1
        attrs = f.mode_attrs(name)
        assert attrs["k"] == k == attrs["k_at_95"] and attrs["energy_target"] == 0.95
        assert attrs["converged"] and f.mode(name, "energy_curve")[-1] >= 0.95
        np.testing.assert_allclose(f.mode(name, "s"), exact[:k].numpy(), rtol=1e-3)
        assert json.loads(f.attrs["replay_arguments"])["modes"] == "auto:0.95"


def test_modes_auto_on_the_demo_holds_99_percent_of_the_energy(tmp_path):
    """The built-in demo (digits CNN, 230 Adam updates): --modes auto keeps exactly the K of the
    exact spectrum's 99 %, every value within 1e-3 of torch.linalg.svdvals of the materialised Φ."""
    train(load_config(DEMO), tmp_path / "demo", progress=False)
    run = load_run(tmp_path / "demo")
    total = run.steps[-1]
    replay(ReplayArguments(ckpts=str(tmp_path / "demo"), audit_set="test[0:2]", out=str(tmp_path / "d.h5"),
                           device="cpu", modes="auto", kernel_stride=total), progress=False)
    phi = _loop_gradients(run, total, run.dataset.x_train, run.dataset.y_train)
    exact = torch.linalg.svdvals(phi)
    curve = np.cumsum(exact.numpy() ** 2) / float((phi * phi).sum())
    k99 = int(np.argmax(curve >= 0.99)) + 1
    with InfluenceFile(tmp_path / "d.h5") as f:
        name = f"step_{total:08d}"
        attrs = f.mode_attrs(name)
        assert attrs["k"] == attrs["k_at_99"] == k99 and attrs["converged"]
        assert f.mode(name, "energy_curve")[-1] >= 0.99
        np.testing.assert_allclose(f.mode(name, "s"), exact[:k99].numpy(), rtol=1e-3)


def test_modes_short_of_what_was_asked_are_said():
    from plgk_cli.geometry import _modes_warnings
    from plgk_cli.modes import SVDModes

    def modes(**kw):
        s = torch.tensor([3.0, 2.0], dtype=torch.float64)  # energy share 13/14 of a total of 14
        return SVDModes(s=s, u=torch.eye(2, dtype=torch.float64), v=None, total_energy=14.0,
                        row_sq_norms=torch.zeros(2), sum_gradient=torch.zeros(2), **kw)
    assert _modes_warnings(7, modes()) == []
    assert _modes_warnings(7, modes(energy_target=0.9)) == []
    short, = _modes_warnings(7, modes(energy_target=0.99))
    assert "step 7" in short and "0.9286" in short and "auto:0.99" in short
    unconverged, = _modes_warnings(7, modes(converged=False, estimated_error=3e-3, passes=82))
    assert "did not converge in 82 passes" in unconverged and "3.0e-03" in unconverged


def test_inspect_kernel_json(run_dir, tmp_path):
    _replay(run_dir, tmp_path / "j.h5", modes=3).close()
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "j.h5"), "--kernel", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert set(summary["difficulty"]["table"]) == {"ips_l2_norm", "ips_class_margin", "max_softmax",
                                                   "logit_margin"}
    assert summary["regime"]["feature_overlap"][-1] == pytest.approx(1.0)


def test_datamodel_is_the_ridge_regression_on_the_path_kernel(run_dir, tmp_path):
    with _replay(run_dir, tmp_path / "k.h5", kernel_train=True) as f:
        k_tt, k_tn = f.kernel("train_gram"), f.kernel("audit_train_gram").T
        tau = f.datamodel(ridge=0.5)
        lam = 0.5 * np.mean(np.diag(k_tt))
        assert tau.shape == k_tn.shape == (len(k_tt), 5)
        np.testing.assert_allclose(((k_tt + k_tt.T) / 2 + lam * np.eye(len(k_tt))) @ tau, k_tn,
                                   rtol=0, atol=1e-9 * np.abs(k_tn).max())
        # a large ridge leaves the kernel itself, scaled: τ ≈ K_tn / λ
        big = f.datamodel(ridge=1e6)
        np.testing.assert_allclose(big * 1e6 * np.mean(np.diag(k_tt)), k_tn, rtol=1e-4, atol=1e-4 * np.abs(k_tn).max())
        with pytest.raises(StoreError, match="ridge must be"):
            f.datamodel(ridge=0)
    with _replay(run_dir, tmp_path / "nok.h5") as f, pytest.raises(StoreError, match="--kernel-train"):
        f.datamodel()
