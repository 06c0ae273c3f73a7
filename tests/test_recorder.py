"""The Recorder around a plain PyTorch loop: the same trajectory and the same audit as `plgk train`
on the same run, the hyper-parameters read back from torch optimizers, the lr and clip coefficient
the updates actually used, and one clear error for every loop the record could not describe.

The "user's" model and data below live in this module and are named by it
(`test_recorder:user_mlp`, `py:test_recorder:user_data`), as a user's own code would be.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import train_tiny
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from plgk_cli.arguments import ReplayArguments
from plgk_cli.config import parse_config
from plgk_cli.data import load_dataset
from plgk_cli.check import validate_run
from plgk_cli.errors import (ConfigError, DataError, OutputError, RecorderError, TrajectoryError,
                             UpdateCheckError)
from plgk_cli.optimizers import HYPER_FIELDS, build_torch_optimizer
from plgk_cli.recorder import Recorder, hyper_from_optimizer
from plgk_cli.replay import replay
from plgk_cli.run import load_run
from plgk_cli.store import InfluenceFile
from plgk_cli.train import hyper_from_config
from plgk_cli.trajectory import (check_steps, checksum_metadata, read_checkpoint, read_manifest,
                                 recorded_by, write_manifest)

# conftest.train_tiny: mlp hidden 6, 2 epochs of batch 8, seed 0, float64, cpu; the tiny npz has
# 22 training rows of 6 features in 3 classes, so 3 updates per epoch (8 + 8 + 6).
EPOCHS, BATCH_SIZE, HIDDEN, SEED = 2, 8, 6, 0
STEPS = 6


def user_mlp(in_shape, num_classes, hidden):
    """The user's model: written out here, the same architecture as plgk's built-in mlp."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def user_data():
    """The user's data as tensors (for py:test_recorder:user_data): 20 rows of 5 features, 3 classes."""
    g = torch.Generator().manual_seed(3)
    return (torch.randn(20, 5, generator=g, dtype=torch.float64), torch.arange(20) % 3,
            torch.randn(7, 5, generator=g, dtype=torch.float64), torch.arange(7) % 3)


class LoopFailed(Exception):
    """The user's loop failing mid-run (plain_loop's fail_after)."""


def plain_loop(out, dataset: str, make_optimizer, *, clip=None, scheduler=None, epochs=EPOCHS,
               stop_after=None, fail_after=None, **recorder_kwargs):
    """An ordinary training loop: seed, model, optimizer, shuffled minibatches, mean cross-entropy,
    optional clipping and torch lr scheduler; the Recorder around it. Returns the run directory;
    ``stop_after`` ends the run early, ``fail_after`` raises LoopFailed in the with block."""
    data = load_dataset(dataset, 0, torch.float64)
    torch.manual_seed(SEED)
    model = user_mlp(data.in_shape, data.num_classes, HIDDEN).to(torch.float64)
    optimizer = make_optimizer(model.parameters())
    schedule = scheduler(optimizer) if scheduler else None
    generator = torch.Generator().manual_seed(SEED)
    with Recorder(out, model, optimizer, model_name="test_recorder:user_mlp",
                  model_kwargs={"hidden": HIDDEN}, dataset=dataset, batch_size=BATCH_SIZE,
                  epochs=epochs, **recorder_kwargs) as recorder:
        for _ in range(epochs):
            for batch in torch.randperm(len(data.y_train), generator=generator).split(BATCH_SIZE):
                optimizer.zero_grad()
                logits = model(data.x_train[batch])
                loss = F.cross_entropy(logits, data.y_train[batch])
                loss.backward()
                if clip:
                    recorder.clip_grad_norm(clip)
                optimizer.step()
                if schedule:
                    schedule.step()  # before recorder.step(): the record must keep the lr used
                recorder.step(batch, loss, logits)
                if recorder.step_count == stop_after:
                    return out
                if recorder.step_count == fail_after:
                    raise LoopFailed(f"after update {fail_after}")
    return out


def audit(run_dir, out):
    replay(ReplayArguments(ckpts=str(run_dir), audit_set="test[0:4]", out=str(out), device="cpu"),
           progress=False)
    return InfluenceFile(out)


# (plgk train [optim] and [schedule], the same optimizer built by hand, clip, torch scheduler)
CASES = {
    "adam": ({"name": "adam", "lr": 0.01}, None,
             lambda p: torch.optim.Adam(p, lr=0.01, foreach=False), None, None),
    # step schedule: lr 0.1, halved every 2 updates = StepLR(step_size=2, gamma=0.5) stepped per update
    "sgd-nesterov-clip-steplr": (
        {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "clip_grad_norm": 0.5},
        {"name": "step", "step_size": 2, "gamma": 0.5},
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, foreach=False), 0.5,
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)),
    "rmsprop-centered-wd": (
        {"name": "rmsprop", "lr": 0.01, "momentum": 0.5, "centered": True, "weight_decay": 0.01},
        None, lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True,
                                            weight_decay=0.01, foreach=False), None, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_plain_loop_gives_the_audit_of_plgk_train(case, tmp_path, tiny_npz):
    optim, schedule, make_optimizer, clip, scheduler = CASES[case]
    trained = train_tiny(tmp_path / "train", tiny_npz, optim, schedule=schedule)
    recorded = plain_loop(tmp_path / "own", f"npz:{tiny_npz}", make_optimizer, clip=clip,
                          scheduler=scheduler)

    a, b = load_run(trained), load_run(recorded)
    for t in range(STEPS + 1):  # the same trajectory, bit for bit
        ca, cb = a.checkpoint(t), b.checkpoint(t)
        assert (ca.lr, ca.clip_coef, ca.loss, ca.optim_step) == (cb.lr, cb.clip_coef, cb.loss,
                                                                 cb.optim_step), t
        assert ca.batch is None or torch.equal(ca.batch, cb.batch)
        for name in ca.params:
            assert torch.equal(ca.params[name], cb.params[name]), (t, name)
        assert {n: set(s) for n, s in ca.optim_state.items() if s} == \
            {n: set(s) for n, s in cb.optim_state.items() if s}
    if clip:  # max_norm 0.5 clips some updates and not others: both are compared
        coefs = [a.checkpoint(t).clip_coef for t in range(1, STEPS + 1)]
        assert min(coefs) < 0.9 and max(coefs) == 1.0, coefs
    same = ("dataset", "loss", "optimizer", "parameters", "dtype", "device", "batch_size", "epochs",
            "steps_per_epoch", "total_steps", "checkpoint_every", "complete", "final")
    assert {k: a.manifest[k] for k in same} == {k: b.manifest[k] for k in same}
    assert b.manifest["model"] == {"name": "test_recorder:user_mlp", "kwargs": {"hidden": HIDDEN}}
    assert b.manifest["config"] is None and b.config is None

    with audit(trained, tmp_path / "train.h5") as fa, audit(recorded, tmp_path / "own.h5") as fb:
        influence = fa.influence("loss")
        assert np.abs(influence).max() > 1e-4  # the audit found something to compare
        assert np.array_equal(influence, fb.influence("loss"))
        for name in ("residual", "initial", "final", "trace/true_change", "trace/reconstructed",
                     "by_layer_epoch/signed"):
            np.testing.assert_allclose(fa.array("loss", name), fb.array("loss", name), rtol=0,
                                       atol=1e-12, err_msg=name)
        assert fb.metrics("loss")["max_update_error"] < 1e-12  # replay re-derived every update


def test_recorded_lr_is_the_one_the_update_used(tmp_path, tiny_npz):
    """StepLR changes the lr after optimizer.step() and before recorder.step(); the record keeps
    the rate of the update: 0.1, 0.1, 0.05, 0.05, 0.025, 0.025."""
    _, _, make_optimizer, _, scheduler = CASES["sgd-nesterov-clip-steplr"]
    run = load_run(plain_loop(tmp_path / "run", f"npz:{tiny_npz}", make_optimizer, scheduler=scheduler))
    assert [run.checkpoint(t).lr for t in range(1, STEPS + 1)] == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    assert run.manifest["optimizer"]["lr"] == 0.1  # the base rate, not the last one
    assert run.manifest["optimizer"]["clip_grad_norm"] is None


def test_clip_grad_norm_is_torchs(tmp_path, tiny_npz):
    """recorder.clip_grad_norm clips the gradients exactly as torch.nn.utils.clip_grad_norm_ and
    records c = min(1, max_norm / (‖g‖ + 1e-6))."""
    data = load_dataset(f"npz:{tiny_npz}", 0, torch.float64)
    torch.manual_seed(0)
    model = user_mlp(data.in_shape, data.num_classes, HIDDEN).double()
    twin = user_mlp(data.in_shape, data.num_classes, HIDDEN).double()
    twin.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, foreach=False)
    recorder = Recorder(tmp_path / "run", model, optimizer, model_name="test_recorder:user_mlp",
                        model_kwargs={"hidden": HIDDEN}, dataset=data, batch_size=8, epochs=1)
    batch = torch.tensor([3, 1, 4, 15, 9, 2, 6])
    for m in (model, twin):
        F.cross_entropy(m(data.x_train[batch]), data.y_train[batch]).backward()
    norm = float(torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.05))
    coef = recorder.clip_grad_norm(0.05)
    assert coef == pytest.approx(min(1.0, 0.05 / (norm + 1e-6)), rel=1e-15) and coef < 0.5
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)
    optimizer.step()
    recorder.step(batch, 0.0)
    assert load_run(tmp_path / "run").checkpoint(1).clip_coef == coef
    assert read_manifest(tmp_path / "run")["optimizer"]["clip_grad_norm"] == 0.05


def test_py_dataset_and_early_stop(tmp_path):
    """Data from the user's function; a loop that stops after 4 of 6 planned updates."""
    make = lambda p: torch.optim.Adam(p, lr=0.05, foreach=False)  # noqa: E731
    run_dir = plain_loop(tmp_path / "run", "py:test_recorder:user_data", make, stop_after=4)
    manifest = read_manifest(run_dir)
    # 20 rows: batches of 8, 8, 4 -> 3 updates per epoch; 4 updates = epochs 0 and 1
    assert (manifest["total_steps"], manifest["epochs"], manifest["steps_per_epoch"]) == (4, 2, 3)
    assert manifest["complete"] and manifest["dataset"]["spec"] == "py:test_recorder:user_data"
    assert check_steps(run_dir, manifest) == [0, 1, 2, 3, 4]
    assert manifest["final"]["train_loss"] == pytest.approx(load_run(run_dir).checkpoint(4).loss)
    with audit(run_dir, tmp_path / "out.h5") as f:  # replay reloads the data from the function
        true = f.array("loss", "final") - f.array("loss", "initial")
        got = f.influence("loss").astype(np.float64).sum(0) + f.array("loss", "residual")
        assert np.abs(true).mean() > 1e-3
        assert np.abs(got - true).mean() < 1e-2 * np.abs(true).mean()


def test_interrupted_loop_leaves_an_incomplete_run(tmp_path, tiny_npz):
    make = lambda p: torch.optim.SGD(p, lr=0.1, foreach=False)  # noqa: E731
    data = load_dataset(f"npz:{tiny_npz}", 0, torch.float64)
    model = user_mlp(data.in_shape, data.num_classes, HIDDEN).double()
    optimizer = make(model.parameters())
    with pytest.raises(KeyboardInterrupt):
        with Recorder(tmp_path / "run", model, optimizer, model_name="test_recorder:user_mlp",
                      model_kwargs={"hidden": HIDDEN}, dataset=data, batch_size=8, epochs=2) as rec:
            for batch in (torch.arange(8), torch.arange(8, 16)):
                F.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
                optimizer.step()
                rec.step(batch, 0.0)
            raise KeyboardInterrupt
    manifest = read_manifest(tmp_path / "run")
    assert manifest["complete"] is False and "final" not in manifest
    assert check_steps(tmp_path / "run", manifest) == [0, 1, 2]
    optimizer.step()  # the hooks are gone: stepping after the run is the user's business


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, foreach=False)


def test_interrupted_recorder_run_is_advised_what_applies_to_a_loop(tmp_path, tiny_npz):
    """`plgk check` and replay's refusal of an unfinished Recorder run do not advise `plgk train
    --resume`, which cannot continue a loop of the user's own."""
    run = tmp_path / "run"
    with pytest.raises(LoopFailed):
        plain_loop(run, f"npz:{tiny_npz}", _sgd, fail_after=2)
    assert read_manifest(run)["recorded_by"] == "Recorder"
    advice = [p.message for p in validate_run(run) if "did not finish" in p.message]
    assert len(advice) == 1
    assert "your own training loop" in advice[0] and "Recorder(..., resume=True)" in advice[0]
    assert "plgk train --config" not in advice[0] and "--resume" not in advice[0]
    with pytest.raises(TrajectoryError) as refused:
        replay(ReplayArguments(ckpts=str(run), audit_set="test[0:4]", out=str(tmp_path / "a.h5"),
                               device="cpu"), progress=False)
    assert str(refused.value).startswith(advice[0])
    assert not (tmp_path / "a.h5").exists()


def test_manifest_without_recorded_by_reads_and_resumes(tmp_path, tiny_npz):
    """A manifest from before recorded_by: its producer is told by its config (null: a loop), and a
    Recorder resumes it (the missing key is no setting that differs)."""
    run = tmp_path / "run"
    with pytest.raises(LoopFailed):
        plain_loop(run, f"npz:{tiny_npz}", _sgd, fail_after=2)
    manifest = read_manifest(run)
    del manifest["recorded_by"]
    write_manifest(run, manifest)
    assert recorded_by(manifest) == "Recorder" and recorded_by({**manifest, "config": {}}) == "plgk train"
    assert "Recorder(..., resume=True)" in next(p.message for p in validate_run(run)
                                                if "did not finish" in p.message)
    data = load_dataset(f"npz:{tiny_npz}", 0, torch.float64)
    model = user_mlp(data.in_shape, data.num_classes, HIDDEN).double()
    recorder = Recorder(run, model, _sgd(model.parameters()), model_name="test_recorder:user_mlp",
                        model_kwargs={"hidden": HIDDEN}, dataset=f"npz:{tiny_npz}", batch_size=BATCH_SIZE,
                        epochs=EPOCHS, resume=True)
    assert recorder.step_count == 2
    recorder.finish()
    manifest = read_manifest(run)
    assert manifest["complete"] and manifest["recorded_by"] == "Recorder"


def test_overwrite_replaces_a_run_only_once_the_new_one_is_complete(tmp_path, tiny_npz):
    run = tmp_path / "run"
    plain_loop(run, f"npz:{tiny_npz}", _sgd)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(OutputError, match="pass overwrite=True"):
        plain_loop(run, f"npz:{tiny_npz}", _sgd)
    # the loop fails midway: the new run is deleted, the old one untouched
    with pytest.raises(LoopFailed):
        plain_loop(run, f"npz:{tiny_npz}", _sgd, fail_after=3, overwrite=True)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    with pytest.raises(ConfigError, match="resume=True continues .* overwrite=True replaces"):
        plain_loop(run, f"npz:{tiny_npz}", _sgd, overwrite=True, resume=True)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before

    plain_loop(run, f"npz:{tiny_npz}", _sgd, overwrite=True, stop_after=4)
    manifest = read_manifest(run)
    assert manifest["complete"] and manifest["total_steps"] == 4
    assert manifest["run_id"] != json.loads(before["manifest.json"])["run_id"]
    assert check_steps(run, manifest) == [0, 1, 2, 3, 4]  # no step file of the old run's 6 is left
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_overwrite_refuses_a_directory_that_is_not_only_a_run(tmp_path, tiny_npz):
    run = tmp_path / "run"
    plain_loop(run, f"npz:{tiny_npz}", _sgd)
    (run / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(OutputError, match="holds 'notes.txt'"):
        plain_loop(run, f"npz:{tiny_npz}", _sgd, overwrite=True)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_recorder_keeps_the_global_random_stream(tmp_path, tiny_npz):
    """Checking the model builder builds (and initialises) a model; the user's next random draw
    must be what it would have been without the Recorder."""
    data = load_dataset(f"npz:{tiny_npz}", 0, torch.float64)
    torch.manual_seed(5)
    model = user_mlp(data.in_shape, data.num_classes, HIDDEN).double()
    expected = torch.rand(3)
    torch.manual_seed(5)
    model = user_mlp(data.in_shape, data.num_classes, HIDDEN).double()
    Recorder(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.1, foreach=False),
             model_name="test_recorder:user_mlp", model_kwargs={"hidden": HIDDEN}, dataset=data,
             batch_size=8, epochs=1)
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------- hyper-parameters

VALID_OPTIM = [
    {"name": "sgd", "lr": 0.1},
    {"name": "sgd", "lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
    {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
    {"name": "adam", "lr": 0.01, "betas": [0.8, 0.99], "eps": 1e-7, "amsgrad": True},
    {"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
    {"name": "rmsprop", "lr": 0.01, "alpha": 0.9, "momentum": 0.5, "centered": True},
    {"name": "adagrad", "lr": 0.1, "eps": 1e-9, "weight_decay": 0.01},
]


@pytest.mark.parametrize("optim", VALID_OPTIM, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_hyper_read_from_torch_equals_the_config(optim):
    """What the Recorder reads back from a torch optimizer is what `plgk train` configured."""
    config = parse_config({"optim": optim})
    model = nn.Linear(3, 2)
    named = dict(model.named_parameters())
    optimizer = build_torch_optimizer(hyper_from_config(config), list(named.values()), optim["lr"])
    assert hyper_from_optimizer(optimizer) == hyper_from_config(config)


def test_adam_with_decoupled_weight_decay_is_adamw():
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), weight_decay=0.1, decoupled_weight_decay=True, foreach=False)
    assert hyper_from_optimizer(opt).name == "adamw"


def _model_and_params():
    model = user_mlp((6,), 3, HIDDEN).double()
    return model, list(model.parameters())


REFUSED = {
    "nadam": (lambda p: torch.optim.NAdam(p, foreach=False), "torch.optim.nadam.NAdam is not supported: "
              "its update is linear in the gradients given its recorded state, but plgk has no decomposition"),
    "rprop": (lambda p: torch.optim.Rprop(p), "Rprop is not supported: its step, the sign of the gradient"),
    "adafactor": (lambda p: torch.optim.Adafactor(p), "Adafactor is not supported: its update is divided by "
                  "its own root mean square"),
    "nesterov in one group": (lambda p: torch.optim.SGD(
        [{"params": p[:2], "nesterov": True}, {"params": p[2:]}], lr=0.1, momentum=0.9),
        r"nesterov differs between parameter groups \(\[True, False\]\)"),
    "missing param": (lambda p: torch.optim.SGD(p[:3], lr=0.1, foreach=False),
                      "does not hold the trainable parameter '3.bias'; add it to a parameter group, or "
                      "freeze it"),
    "foreign param": (lambda p: torch.optim.SGD(p + [nn.Parameter(torch.zeros(2))], lr=0.1),
                      "holds tensors that are not parameters of the model"),
    "maximize": (lambda p: torch.optim.SGD(p, lr=0.1, maximize=True, foreach=False), "maximize=True"),
    "adagrad lr_decay": (lambda p: torch.optim.Adagrad(p, lr_decay=0.1, foreach=False), "lr_decay"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_optimizer_is_refused_before_writing(case, tmp_path, tiny_npz):
    make, message = REFUSED[case]
    model, params = _model_and_params()
    with pytest.raises(ConfigError, match=message):
        Recorder(tmp_path / "run", model, make(params), model_name="test_recorder:user_mlp",
                 model_kwargs={"hidden": HIDDEN}, dataset=f"npz:{tiny_npz}", batch_size=8, epochs=1)
    assert not (tmp_path / "run").exists()


def test_foreach_none_is_accepted_on_cpu(tmp_path, tiny_npz):
    model, params = _model_and_params()
    Recorder(tmp_path / "run", model, torch.optim.Adam(params), model_name="test_recorder:user_mlp",
             model_kwargs={"hidden": HIDDEN}, dataset=f"npz:{tiny_npz}", batch_size=8, epochs=1)
    assert (tmp_path / "run" / "step_00000000.safetensors").is_file()


# --------------------------------------------------------------------------- the loop's mistakes


@pytest.fixture
def started(tmp_path, tiny_npz):
    """A Recorder over SGD with momentum, and a function that computes one batch's gradient."""
    data = load_dataset(f"npz:{tiny_npz}", 0, torch.float64)
    model = user_mlp(data.in_shape, data.num_classes, HIDDEN).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=False)
    recorder = Recorder(tmp_path / "run", model, optimizer, model_name="test_recorder:user_mlp",
                        model_kwargs={"hidden": HIDDEN}, dataset=data, batch_size=8, epochs=1)

    def backward(batch=torch.arange(8)):
        optimizer.zero_grad()
        F.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()

    return recorder, model, optimizer, backward


def test_step_without_an_optimizer_step(started):
    recorder, _, _, backward = started
    backward()
    with pytest.raises(RecorderError, match="no optimizer.step"):
        recorder.step(torch.arange(8), 1.0)


def test_second_optimizer_step_is_refused_before_it_runs(started):
    recorder, model, optimizer, backward = started
    backward()
    optimizer.step()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RecorderError, match="twice without recorder.step"):
        optimizer.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # θ untouched
    recorder.step(torch.arange(8), 1.0)  # the record can still go on
    assert recorder.step_count == 1


def test_changed_switch_is_refused_and_changed_values_are_recorded(started, tmp_path):
    recorder, _, optimizer, backward = started
    backward()
    optimizer.step()
    recorder.step(torch.arange(8), 1.0)
    optimizer.param_groups[0]["momentum"] = 0.5  # values may change: each update records its own
    optimizer.param_groups[0]["lr"] = 0.01
    backward()
    optimizer.step()
    recorder.step(torch.arange(8), 1.0)
    hyper = read_checkpoint(tmp_path / "run", 2).hyper
    assert hyper[0, HYPER_FIELDS.index("momentum")] == 0.5 and hyper[0, HYPER_FIELDS.index("lr")] == 0.01
    assert read_checkpoint(tmp_path / "run", 1).hyper[0, HYPER_FIELDS.index("momentum")] == 0.9
    optimizer.param_groups[0]["nesterov"] = True  # a switch changes the update rule itself
    backward()
    with pytest.raises(RecorderError, match="nesterov False -> True changed during the run"):
        optimizer.step()


def test_added_parameter_group_is_refused(started):
    recorder, model, optimizer, backward = started
    extra = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    model.register_parameter("extra", extra)
    optimizer.add_param_group({"params": [extra]})
    backward()
    with pytest.raises(RecorderError, match="parameter groups changed during the run"):
        optimizer.step()


def test_clip_after_the_step_is_refused(started):
    recorder, _, optimizer, backward = started
    backward()
    optimizer.step()
    with pytest.raises(RecorderError, match="after optimizer.step"):
        recorder.clip_grad_norm(1.0)


def test_clip_before_backward_is_refused(started):
    recorder = started[0]
    with pytest.raises(RecorderError, match="no gradients"):
        recorder.clip_grad_norm(1.0)
    with pytest.raises(ConfigError, match="max_norm must be a finite number > 0"):
        recorder.clip_grad_norm(0.0)


@pytest.mark.parametrize("batch, message", [
    (torch.tensor([0, 22]), r"outside the training split \(0..21\)"),
    (torch.tensor([-1, 2]), "outside the training split"),
    (torch.tensor([0.0, 1.0]), "integer indices"),
    (torch.zeros(22, dtype=torch.bool), "integer indices"),
    (torch.tensor([], dtype=torch.int64), "non-empty"),
])
def test_bad_batch_indices(started, batch, message):
    recorder, _, optimizer, backward = started
    backward()
    optimizer.step()
    with pytest.raises(RecorderError, match=message):
        recorder.step(batch, 1.0)


def test_list_batch_and_finish_twice(started, tmp_path):
    recorder, _, optimizer, backward = started
    backward()
    optimizer.step()
    recorder.step(list(range(8)), torch.tensor(1.5))
    first = recorder.finish()
    assert recorder.finish() is first and first["final"]["train_accuracy"] is None  # no logits
    ck = load_run(tmp_path / "run").checkpoint(1)
    assert ck.batch.dtype == torch.int64 and ck.batch.tolist() == list(range(8)) and ck.loss == 1.5
    assert set(ck.optim_state["1.weight"]) == {"momentum_buffer"}
    with pytest.raises(RecorderError, match="after finish"):
        recorder.step([0], 1.0)


def test_finish_refuses_an_unrecorded_step(started):
    recorder, _, optimizer, backward = started
    with pytest.raises(RecorderError, match="no update was recorded"):
        recorder.finish()
    backward()
    optimizer.step()
    with pytest.raises(RecorderError, match="last optimizer.step"):
        recorder.finish()


# --------------------------------------------------------------------------- the start


def _start(tmp_path, model, optimizer, dataset, **kwargs):
    kwargs = {"model_name": "test_recorder:user_mlp", "model_kwargs": {"hidden": HIDDEN},
              "batch_size": 8, "epochs": 1} | kwargs
    return Recorder(tmp_path / "run", model, optimizer, dataset=dataset, **kwargs)


def test_model_the_builder_does_not_build(tmp_path, tiny_npz):
    model = user_mlp((6,), 3, 5).double()  # hidden 5, the name says 6
    with pytest.raises(ConfigError, match=r"builds parameters \[1.weight \[6, 6\].*has \[1.weight \[5, 6\]"):
        _start(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), f"npz:{tiny_npz}")
    with pytest.raises(ConfigError, match="cannot import"):
        _start(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), f"npz:{tiny_npz}",
               model_name="no_such_module:f")
    assert not (tmp_path / "run").exists()


def test_model_with_dropout_records_the_generator_state_of_each_forward(tmp_path, tiny_npz):
    torch.manual_seed(0)
    model = dropout_model((6,), 3).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, foreach=False)
    recorder = _start(tmp_path, model, optimizer, f"npz:{tiny_npz}",
                      model_name="test_recorder:dropout_model", model_kwargs={})
    data = recorder.dataset
    states = []
    for batch in (torch.arange(8), torch.arange(8, 16)):
        states.append(torch.get_rng_state())
        optimizer.zero_grad()
        F.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
        optimizer.step()
        recorder.step(batch, 0.0)
    recorder.finish()
    run = load_run(tmp_path / "run")
    assert run.manifest["forward"]["random"] and run.faithful
    for t, state in ((1, states[0]), (2, states[1])):
        assert torch.equal(run.checkpoint(t).rng["cpu"], state)  # what the forward started from


def dropout_model(in_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), num_classes), nn.Dropout(0.1))


def test_dataset_of_another_dtype(tmp_path, tiny_npz):
    model = user_mlp((6,), 3, HIDDEN).double()
    data32 = load_dataset(f"npz:{tiny_npz}", 0, torch.float32)
    with pytest.raises(DataError, match="x_train is torch.float32 but the model is torch.float64"):
        _start(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), data32)


def test_float16_model_and_bad_sizes(tmp_path, tiny_npz):
    model = user_mlp((6,), 3, HIDDEN).half()
    with pytest.raises(ConfigError, match="float32 or all float64"):
        _start(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), f"npz:{tiny_npz}")
    model = user_mlp((6,), 3, HIDDEN).double()
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
        _start(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), f"npz:{tiny_npz}",
               batch_size=0)


def test_optimizer_that_already_stepped(tmp_path, tiny_npz):
    model = user_mlp((6,), 3, HIDDEN).double()
    optimizer = torch.optim.Adam(model.parameters(), foreach=False)
    F.cross_entropy(model(torch.zeros(2, 6, dtype=torch.float64)), torch.tensor([0, 1])).backward()
    optimizer.step()
    with pytest.raises(RecorderError, match="already taken steps"):
        _start(tmp_path, model, optimizer, f"npz:{tiny_npz}")


def test_non_empty_directory_and_unserialisable_kwargs(tmp_path, tiny_npz):
    model = user_mlp((6,), 3, HIDDEN).double()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        _start(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), f"npz:{tiny_npz}")
    (tmp_path / "run" / "notes.txt").unlink()
    with pytest.raises(ConfigError, match="must be JSON values"):
        _start(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), f"npz:{tiny_npz}",
               model_kwargs={"hidden": torch.tensor(6)})
    assert list((tmp_path / "run").iterdir()) == []


def test_float32_run_and_manifest_json(tmp_path, tiny_npz):
    data = load_dataset(f"npz:{tiny_npz}", 0, torch.float32)
    model = user_mlp(data.in_shape, data.num_classes, HIDDEN)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.1)
    with Recorder(tmp_path / "run", model, optimizer, model_name="test_recorder:user_mlp",
                  model_kwargs={"hidden": HIDDEN}, dataset=data, batch_size=30, epochs=1) as rec:
        logits = model(data.x_train)
        loss = F.cross_entropy(logits, data.y_train)
        loss.backward()
        optimizer.step()
        rec.step(torch.arange(22), loss, logits)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["dtype"] == "float32" and manifest["batch_size"] == 22  # capped at num_train
    assert manifest["optimizer"]["name"] == "adagrad" and manifest["optimizer"]["eps"] == 1e-10
    expected = float((logits.argmax(1) == data.y_train).double().mean())
    assert manifest["final"]["train_accuracy"] == expected
    ck = load_run(tmp_path / "run").checkpoint(1)
    assert ck.params["1.weight"].dtype == torch.float32 and set(ck.optim_state["1.weight"]) == {"sum"}


def test_example_script(tmp_path, capsys, monkeypatch):
    """scripts/record_own_loop.py: a digits CNN in a plain loop (AdamW with no decay on the biases,
    cosine scheduler, clipping), recorded and replayed."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "scripts"))
    import record_own_loop

    out = tmp_path / "own"
    assert record_own_loop.main(["--epochs", "1", "--audit-set", "test[:4]", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "recorded 23 steps" in printed and f"wrote {out}.h5" in printed  # 1438 / 64 -> 23 updates
    manifest = read_manifest(out)
    assert manifest["optimizer"]["name"] == "adamw" and manifest["optimizer"]["clip_grad_norm"] == 1.0
    assert [g["weight_decay"] for g in manifest["optimizer"]["groups"]] == [1e-2, 0.0]  # weights, biases
    lrs = [load_run(out).checkpoint(t).lr for t in (1, 23)]
    assert lrs[0] == 3e-3 and lrs[1] < 1e-4  # the cosine schedule, as the updates used it
    with InfluenceFile(f"{out}.h5") as f:
        assert f.metrics("loss")["lc"] > 0.99
    # the documented command run again: refused without --overwrite, naming it; replaced with it
    old_id = manifest["run_id"]
    assert record_own_loop.main(["--epochs", "1", "--out", str(out)]) == OutputError.exit_code
    assert "pass --overwrite to replace the run" in capsys.readouterr().err
    assert read_manifest(out)["run_id"] == old_id
    argv = ["--epochs", "1", "--audit-set", "test[:4]", "--out", str(out), "--overwrite"]
    assert record_own_loop.main(argv) == 0 and record_own_loop.main(argv) == 0
    assert read_manifest(out)["run_id"] != old_id and read_manifest(out)["complete"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["own", "own.h5"]


def test_sparse_run_keeps_batches_a_loop_reuses_in_place(tmp_path, tiny_npz):
    """checkpoint_every=4 keeps a block's records until its file: the batch indices must be copied,
    since this loop shuffles one numpy permutation in place each epoch."""
    data = load_dataset(f"npz:{tiny_npz}", 0, torch.float64)
    torch.manual_seed(SEED)
    model = user_mlp(data.in_shape, data.num_classes, HIDDEN).to(torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, foreach=False)
    permutation, rng, used = np.arange(len(data.y_train)), np.random.default_rng(0), []
    with Recorder(tmp_path / "run", model, optimizer, model_name="test_recorder:user_mlp",
                  model_kwargs={"hidden": HIDDEN}, dataset=f"npz:{tiny_npz}", batch_size=BATCH_SIZE,
                  epochs=EPOCHS, checkpoint_every=4) as recorder:
        for _ in range(EPOCHS):
            rng.shuffle(permutation)
            for start in range(0, len(permutation), BATCH_SIZE):
                batch = permutation[start:start + BATCH_SIZE]  # a view of the reused buffer
                used.append(batch.copy())
                optimizer.zero_grad()
                F.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
                optimizer.step()
                recorder.step(batch, 0.0)
    run = load_run(tmp_path / "run")
    assert [run.checkpoint(t).batch.tolist() for t in range(1, STEPS + 1)] == [b.tolist() for b in used]


def test_a_frozen_layer_is_recorded_and_a_record_that_contradicts_it_stops_replay(tmp_path, tiny_npz):
    """The first layer is frozen (.grad None) for updates 0-3: its step files say so (grad,
    optim_steps) and replay passes its coordinates through. Marking it as stepped in one record
    makes Adam's bias correction 1 − β^0 = 0 there: a NaN update error, which must fail the gate."""
    data = load_dataset(f"npz:{tiny_npz}", 0, torch.float64)
    torch.manual_seed(0)
    model = user_mlp(data.in_shape, data.num_classes, HIDDEN).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    run = tmp_path / "run"
    with Recorder(run, model, optimizer, model_name="test_recorder:user_mlp", model_kwargs={"hidden": HIDDEN},
                  dataset=data, batch_size=8, epochs=3) as recorder:
        for t, batch in enumerate(torch.arange(22).repeat(2).split(8)[:6]):
            model[1].requires_grad_(t >= 4)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            loss.backward()
            optimizer.step()
            recorder.step(batch, loss)
    first = read_checkpoint(run, 1)
    assert first.grad.tolist() == [0, 0, 1, 1] and first.optim_steps.tolist() == [0, 0, 1, 1]
    assert read_checkpoint(run, 5).optim_steps.tolist() == [1, 1, 5, 5]
    assert read_manifest(run)["optimizer"]["frozen"] == ["1.bias", "1.weight"]
    summary = replay(ReplayArguments(ckpts=str(run), audit_set="test[:4]", out=str(tmp_path / "a.h5"),
                                     device="cpu"), progress=False)
    assert summary.max_update_error <= 1e-10

    path = run / "step_00000002.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["grad"][:] = 1  # "every parameter took the loss's gradient": not what happened
    save_file(tensors, str(path), metadata={**metadata, **checksum_metadata(tensors)})
    with pytest.raises(UpdateCheckError, match=r"update 1 -> 2 .* by nan \(gate 1e-08; most in 1\.weight \(nan\)\)"):
        replay(ReplayArguments(ckpts=str(run), audit_set="test[:4]", out=str(tmp_path / "b.h5"),
                               device="cpu"), progress=False)
