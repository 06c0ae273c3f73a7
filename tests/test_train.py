"""`plgk train` on tiny runs: the recorded trajectory format, the update records (batches, learning
rates, clip coefficients), an independent plain-torch recomputation of θ_1, load_run, and
bit-for-bit determinism; plus unit tests of train.learning_rate."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import train_tiny
from safetensors import safe_open
from safetensors.torch import load_file

from plgk_cli import train as train_module
from plgk_cli.config import ScheduleConfig, parse_config
from plgk_cli.data import load_dataset
from plgk_cli.errors import ConfigError
from plgk_cli.optimizers import HYPER_FIELDS
from plgk_cli.run import load_run
from plgk_cli.train import learning_rate
from plgk_cli.trajectory import (FORMAT, FORMAT_VERSION, check_steps, checkpoint_path, list_steps,
                                 read_manifest)

# conftest.write_tiny_npz defaults: 22 training rows of 6 features, 6 test rows, 3 classes;
# train_tiny defaults: 2 epochs of batch 8, mlp with hidden = 6, float64, seed 0.
NUM_TRAIN, NUM_TEST, NUM_FEATURES, NUM_CLASSES = 22, 6, 6, 3
BATCH_SIZE, EPOCHS, HIDDEN = 8, 2, 6
STEPS_PER_EPOCH = math.ceil(NUM_TRAIN / BATCH_SIZE)  # 3: batches of 8, 8 and 6
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS  # 6
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_ divides max_norm by (total_norm + 1e-6)
# mlp(depth=2): Flatten, Linear(6 -> 6), ReLU, Linear(6 -> 3)
EXPECTED_PARAMETERS = [("1.weight", [HIDDEN, NUM_FEATURES]), ("1.bias", [HIDDEN]),
                       ("3.weight", [NUM_CLASSES, HIDDEN]), ("3.bias", [NUM_CLASSES])]


@pytest.fixture(scope="module")
def adam_run(tmp_path_factory, tiny_npz):
    return train_tiny(tmp_path_factory.mktemp("adam") / "run", tiny_npz,
                      {"name": "adam", "lr": 0.01})


def _batches(run):
    return [run.checkpoint(t).batch for t in range(1, run.manifest["total_steps"] + 1)]


# --------------------------------------------------------------------------- format


def test_manifest(adam_run, tiny_npz):
    manifest = read_manifest(adam_run)
    assert manifest["format"] == FORMAT == "plgk-trajectory"
    assert manifest["format_version"] == FORMAT_VERSION == 4
    assert len(manifest["run_id"]) == 32 and int(manifest["run_id"], 16) >= 0  # uuid4().hex
    assert manifest["complete"] is True
    assert manifest["steps_per_epoch"] == STEPS_PER_EPOCH
    assert manifest["total_steps"] == TOTAL_STEPS
    assert (manifest["epochs"], manifest["batch_size"]) == (EPOCHS, BATCH_SIZE)
    assert [(p["name"], p["shape"]) for p in manifest["parameters"]] == EXPECTED_PARAMETERS
    assert all(p["dtype"] == "float64" for p in manifest["parameters"])
    assert manifest["dataset"]["spec"] == f"npz:{tiny_npz}"
    assert (manifest["dataset"]["num_train"], manifest["dataset"]["num_test"]) == (NUM_TRAIN,
                                                                                   NUM_TEST)
    assert manifest["dataset"]["num_classes"] == NUM_CLASSES
    assert manifest["dataset"]["in_shape"] == [NUM_FEATURES]
    assert manifest["optimizer"]["name"] == "adam" and manifest["optimizer"]["lr"] == 0.01
    assert set(manifest["final"]) == {"train_loss", "train_accuracy", "test_loss", "test_accuracy"}


def test_step_files_contiguous(adam_run):
    assert list_steps(adam_run) == list(range(TOTAL_STEPS + 1))
    assert check_steps(adam_run, read_manifest(adam_run)) == list(range(TOTAL_STEPS + 1))
    assert load_run(adam_run).steps == list(range(TOTAL_STEPS + 1))
    leftovers = [p.name for p in adam_run.iterdir()
                 if p.name != "manifest.json" and not p.name.startswith("step_")]
    assert leftovers == []  # no .tmp files left behind
    run_id = read_manifest(adam_run)["run_id"]
    for t in range(TOTAL_STEPS + 1):
        with safe_open(str(checkpoint_path(adam_run, t)), framework="pt") as f:
            metadata = f.metadata()
        assert (metadata["step"], metadata["run_id"]) == (str(t), run_id)
        if t:
            assert metadata["epoch"] == str((t - 1) // STEPS_PER_EPOCH)


def test_checkpoint_zero_has_no_record(adam_run):
    ck = load_run(adam_run).checkpoint(0)
    assert (ck.batch, ck.lr, ck.clip_coef, ck.loss) == (None, None, None, None)
    assert ck.optim_state == {} and ck.optim_step == 0


def test_epoch_batches_are_permutations(adam_run):
    run = load_run(adam_run)
    batches = _batches(run)
    assert [len(b) for b in batches] == [8, 8, 6] * EPOCHS  # 22 = 8 + 8 + 6
    orders = []
    for epoch in range(EPOCHS):
        order = torch.cat(batches[epoch * STEPS_PER_EPOCH:(epoch + 1) * STEPS_PER_EPOCH])
        assert order.dtype == torch.int64
        assert sorted(order.tolist()) == list(range(NUM_TRAIN))
        orders.append(order)
    assert not torch.equal(orders[0], orders[1])  # reshuffled each epoch


def test_recorded_loss_matches_recomputed_forward(adam_run):
    """Checkpoint t's loss is the batch loss of θ_{t-1} on its batch; the final train loss is
    the last epoch's size-weighted mean of those losses."""
    run = load_run(adam_run)
    x, y = run.dataset.x_train, run.dataset.y_train
    model = run.build_model().to(run.dtype)
    weighted = 0.0
    for t in range(1, TOTAL_STEPS + 1):
        ck = run.checkpoint(t)
        model.load_state_dict(run.checkpoint(t - 1).params)
        with torch.no_grad():
            loss = F.cross_entropy(model(x[ck.batch]), y[ck.batch]).item()
        assert loss == pytest.approx(ck.loss, rel=1e-14, abs=1e-14)
        if t > TOTAL_STEPS - STEPS_PER_EPOCH:
            weighted += ck.loss * len(ck.batch)
    assert run.manifest["final"]["train_loss"] == pytest.approx(weighted / NUM_TRAIN, rel=1e-12)


# --------------------------------------------------------------------------- learning rates

LR = 0.1
SCHEDULE_CASES = {
    "constant": ({}, [LR] * TOTAL_STEPS),
    # halved every 2 optimizer steps
    "step": ({"name": "step", "step_size": 2, "gamma": 0.5},
             [LR, LR, LR / 2, LR / 2, LR / 4, LR / 4]),
    # 2 linear warmup steps (lr/2, lr), then cosine over the remaining 4: 0.5 lr (1 + cos(pi k/4))
    "cosine": ({"name": "cosine", "warmup_steps": 2},
               [LR / 2, LR] + [0.5 * LR * (1 + math.cos(math.pi * k / 4)) for k in range(4)]),
}


@pytest.mark.parametrize("name", sorted(SCHEDULE_CASES))
def test_recorded_lr_follows_schedule(tmp_path, tiny_npz, name):
    schedule, expected = SCHEDULE_CASES[name]
    run = load_run(train_tiny(tmp_path / "run", tiny_npz, {"name": "sgd", "lr": LR},
                              schedule=schedule or None))
    recorded = [run.checkpoint(t).lr for t in range(1, TOTAL_STEPS + 1)]
    config = run.config.schedule
    assert recorded == [learning_rate(config, LR, t, TOTAL_STEPS) for t in range(TOTAL_STEPS)]
    assert recorded == pytest.approx(expected, rel=1e-15)
    assert run.manifest["schedule"] == {**ScheduleConfig().__dict__, **schedule}


# --------------------------------------------------------------------------- clipping, θ_1


@pytest.fixture(scope="module")
def sgd_runs(tmp_path_factory, tiny_npz):
    """Plain SGD (lr 0.5) without clipping and with a tiny clip_grad_norm (1e-3)."""
    root = tmp_path_factory.mktemp("sgd")
    runs = {}
    for clip in (None, 1e-3):
        optim = {"name": "sgd", "lr": 0.5} | ({"clip_grad_norm": clip} if clip else {})
        runs[clip] = train_tiny(root / f"clip_{clip}", tiny_npz, optim)
    return runs


def test_clip_coef_without_clipping(sgd_runs):
    run = load_run(sgd_runs[None])
    assert [run.checkpoint(t).clip_coef for t in range(1, TOTAL_STEPS + 1)] == [1.0] * TOTAL_STEPS


def test_clip_coef_with_tiny_max_norm(sgd_runs):
    run = load_run(sgd_runs[1e-3])
    coefs = [run.checkpoint(t).clip_coef for t in range(1, TOTAL_STEPS + 1)]
    assert all(0 < c < 1e-2 for c in coefs), coefs  # gradient norms are O(0.1..1) >> 1e-3


@pytest.mark.parametrize("clip", [None, 1e-3], ids=["unclipped", "clipped"])
def test_theta_1_matches_plain_torch_sgd(sgd_runs, clip):
    """θ_1 from θ_0, the recorded batch and lr, with torch.optim.SGD and hand-clipped grads."""
    run = load_run(sgd_runs[clip])
    ck0, ck1 = run.checkpoint(0), run.checkpoint(1)
    model = run.build_model().to(torch.float64)
    model.load_state_dict(ck0.params)
    x = run.dataset.x_train[ck1.batch]
    y = run.dataset.y_train[ck1.batch]
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
    coef = min(1.0, clip / (norm + CLIP_EPS)) if clip else 1.0
    assert ck1.clip_coef == pytest.approx(coef, rel=1e-12)
    unclipped = {n: p.detach() - ck1.lr * p.grad for n, p in model.named_parameters()}
    for g in grads:
        g.mul_(coef)
    torch.optim.SGD(model.parameters(), lr=ck1.lr).step()
    assert ck1.lr == 0.5
    for name, p in model.named_parameters():
        assert ck1.params[name].dtype == torch.float64
        torch.testing.assert_close(ck1.params[name], p.detach(), rtol=0, atol=1e-12)
    if clip:  # clipping changed the step by far more than the tolerance
        assert max(float((ck1.params[n] - unclipped[n]).abs().max()) for n in unclipped) > 1e-3


# --------------------------------------------------------------------------- load_run


def test_load_run_dataset_equals_load_dataset(adam_run, tiny_npz):
    run = load_run(adam_run)
    expected = load_dataset(f"npz:{tiny_npz}", 0, torch.float64)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        got, want = getattr(run.dataset, name), getattr(expected, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert run.dataset.num_classes == NUM_CLASSES
    assert run.dataset.fingerprint() == run.manifest["dataset"]["fingerprint"]


def test_load_run_config_and_hyper(adam_run):
    run = load_run(adam_run)
    assert run.config == parse_config({"data": {"dataset": run.manifest["dataset"]["spec"]},
                                       "model": {"name": "mlp", "kwargs": {"hidden": HIDDEN}},
                                       "optim": {"name": "adam", "lr": 0.01},
                                       "train": {"epochs": EPOCHS, "batch_size": BATCH_SIZE,
                                                 "seed": 0, "dtype": "float64",
                                                 "device": "cpu"}})
    assert run.dtype == torch.float64
    assert run.hyper.name == "adam" and run.hyper.betas == (0.9, 0.999)
    assert run.epoch_of(0) == 0 and run.epoch_of(STEPS_PER_EPOCH) == 1


def test_rebuilt_model_reproduces_trained_predictions(tmp_path, tiny_npz, monkeypatch):
    """The model trained in-process and run.build_model() loaded with θ_T give identical logits."""
    trained = []
    real_build = train_module.build_model

    def capture(*args, **kwargs):
        trained.append(real_build(*args, **kwargs))
        return trained[-1]

    monkeypatch.setattr(train_module, "build_model", capture)
    out = train_tiny(tmp_path / "run", tiny_npz, {"name": "adam", "lr": 0.05})
    monkeypatch.undo()
    run = load_run(out)
    model = run.build_model().to(run.dtype)
    model.load_state_dict(run.checkpoint(TOTAL_STEPS).params)
    x = torch.cat([run.dataset.x_train, run.dataset.x_test])
    with torch.no_grad():
        expected = trained[0](x)
        logits = model(x)
        initial = run.build_model().to(run.dtype)
        initial.load_state_dict(run.checkpoint(0).params)
        untrained = initial(x)
    assert torch.equal(logits, expected)
    assert not torch.allclose(logits, untrained)  # training moved the model
    test_logits = logits[NUM_TRAIN:]
    accuracy = float((test_logits.argmax(1) == run.dataset.y_test).double().mean())
    # train() averages in float32 (`.float().mean()`), hence a float32-rounded value
    assert run.manifest["final"]["test_accuracy"] == pytest.approx(accuracy, rel=1e-7)


# --------------------------------------------------------------------------- optimizer state

# torch.optim state keys kept per parameter (tensors of the parameter's shape)
STATE_KEYS = [
    ({"name": "adam", "lr": 0.01}, {"exp_avg", "exp_avg_sq"}),
    ({"name": "adam", "lr": 0.01, "amsgrad": True}, {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    ({"name": "adamw", "lr": 0.01, "weight_decay": 0.1}, {"exp_avg", "exp_avg_sq"}),
    ({"name": "sgd", "lr": 0.1, "momentum": 0.9}, {"momentum_buffer"}),
    ({"name": "sgd", "lr": 0.1}, set()),
    ({"name": "rmsprop", "lr": 0.01}, {"square_avg"}),
    ({"name": "rmsprop", "lr": 0.01, "momentum": 0.5, "centered": True},
     {"square_avg", "momentum_buffer", "grad_avg"}),
    ({"name": "adagrad", "lr": 0.1}, {"sum"}),
]


@pytest.mark.parametrize("optim, keys", STATE_KEYS,
                         ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items() if k != "lr")
                         if isinstance(v, dict) else "")
def test_optimizer_state_keys_and_shapes(tmp_path, tiny_npz, optim, keys):
    run = load_run(train_tiny(tmp_path / "run", tiny_npz, optim, epochs=1))
    shapes = {p["name"]: p["shape"] for p in run.manifest["parameters"]}
    for t in range(1, STEPS_PER_EPOCH + 1):
        ck = run.checkpoint(t)
        state = {name: s for name, s in ck.optim_state.items() if s}
        if keys:
            assert set(state) == set(shapes)
        for name, s in state.items():
            assert set(s) == keys, (name, set(s))
            for key, tensor in s.items():
                assert list(tensor.shape) == shapes[name], (name, key)
                assert tensor.dtype == torch.float64
        if not keys:
            assert state == {}
        assert ck.optim_step == t  # torch's own step counter, or the step index for SGD


def test_adam_state_matches_recorded_moments(adam_run):
    """exp_avg after step 1 is (1 - beta1) g_0 and exp_avg_sq is (1 - beta2) g_0² (torch.optim.Adam
    with zero initial moments), for g_0 the batch gradient at θ_0."""
    run = load_run(adam_run)
    ck0, ck1 = run.checkpoint(0), run.checkpoint(1)
    model = run.build_model().to(run.dtype)
    model.load_state_dict(ck0.params)
    F.cross_entropy(model(run.dataset.x_train[ck1.batch]),
                    run.dataset.y_train[ck1.batch]).backward()
    beta1, beta2 = 0.9, 0.999  # torch.optim.Adam defaults, used by adam_run
    for name, p in model.named_parameters():
        torch.testing.assert_close(ck1.optim_state[name]["exp_avg"], (1 - beta1) * p.grad,
                                   rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(ck1.optim_state[name]["exp_avg_sq"], (1 - beta2) * p.grad ** 2,
                                   rtol=1e-12, atol=1e-18)


# --------------------------------------------------------------------------- determinism


def test_training_twice_is_bit_identical(tmp_path, tiny_npz):
    optim = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "clip_grad_norm": 0.5}
    schedule = {"name": "cosine", "warmup_steps": 1}
    a = train_tiny(tmp_path / "a", tiny_npz, optim, schedule)
    b = train_tiny(tmp_path / "b", tiny_npz, optim, schedule)
    manifest_a, manifest_b = read_manifest(a), read_manifest(b)
    assert manifest_a["run_id"] != manifest_b["run_id"]
    for volatile in ("run_id", "created", "checksum"):  # the checksum covers the run id
        del manifest_a[volatile], manifest_b[volatile]
    assert manifest_a == manifest_b
    assert list_steps(a) == list_steps(b) == list(range(TOTAL_STEPS + 1))
    for t in list_steps(a):
        tensors_a = load_file(str(checkpoint_path(a, t)))
        tensors_b = load_file(str(checkpoint_path(b, t)))
        assert tensors_a.keys() == tensors_b.keys()
        for key in tensors_a:
            assert tensors_a[key].dtype == tensors_b[key].dtype, (t, key)
            assert torch.equal(tensors_a[key], tensors_b[key]), (t, key)
        metadata = []
        for run_dir in (a, b):
            with safe_open(str(checkpoint_path(run_dir, t)), framework="pt") as f:
                metadata.append({k: v for k, v in f.metadata().items() if k != "run_id"})
        assert metadata[0] == metadata[1]


def test_float32_run_records_float32(tmp_path, tiny_npz):
    run = load_run(train_tiny(tmp_path / "run", tiny_npz, {"name": "adam", "lr": 0.01},
                              dtype="float32", epochs=1))
    assert run.dtype == torch.float32 and run.dataset.x_train.dtype == torch.float32
    ck = run.checkpoint(1)
    assert all(t.dtype == torch.float32 for t in ck.params.values())
    assert isinstance(ck.lr, float) and ck.lr == 0.01


def test_refuses_non_empty_output_directory(tmp_path, tiny_npz, adam_run):
    from plgk_cli.errors import OutputError

    out = tmp_path / "copy"
    shutil.copytree(adam_run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputError, match="not empty; pass --overwrite"):
        train_tiny(out, tiny_npz, {"name": "adam", "lr": 0.01})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _tiny_run_config(tiny_npz):
    from conftest import tiny_config

    return parse_config(tiny_config(tiny_npz, {"name": "adam", "lr": 0.01}, device="cpu"))


def test_overwrite_replaces_the_run(tmp_path, tiny_npz, adam_run):
    out = tmp_path / "copy"
    shutil.copytree(adam_run, out)
    old_id = read_manifest(out)["run_id"]
    manifest = train_module.train(_tiny_run_config(tiny_npz), out, progress=False, overwrite=True)
    assert manifest["run_id"] != old_id and read_manifest(out)["run_id"] == manifest["run_id"]
    assert manifest["recorded_by"] == "plgk train"
    assert check_steps(out, manifest) == list(range(TOTAL_STEPS + 1))
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # neither the staging nor the old run left
    for t in range(TOTAL_STEPS + 1):  # the same config: the same trajectory, under the new run id
        assert torch.equal(load_file(checkpoint_path(out, t))["loss" if t else "param/1.weight"],
                           load_file(checkpoint_path(adam_run, t))["loss" if t else "param/1.weight"])


def test_overwrite_keeps_the_old_run_when_training_fails(tmp_path, tiny_npz, adam_run, monkeypatch):
    """A crash at the 3rd checkpoint of the new run: the old run is as it was, the new one gone."""
    out = tmp_path / "copy"
    shutil.copytree(adam_run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setenv("PLGK_FAULT", "after_checkpoint:3:CRASH")
    monkeypatch.setenv("PLGK_FAULT_COUNT", "0")
    with pytest.raises(RuntimeError, match="injected crash"):
        train_module.train(_tiny_run_config(tiny_npz), out, progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]


# --------------------------------------------------------------------------- learning_rate


def _schedule(**kwargs) -> ScheduleConfig:
    return ScheduleConfig(**kwargs)


def test_learning_rate_constant():
    assert [learning_rate(_schedule(), 0.3, s, 10) for s in range(10)] == [0.3] * 10


def test_learning_rate_warmup_is_linear_from_lr_over_warmup_to_lr():
    warmup, base = 4, 0.2
    schedule = _schedule(warmup_steps=warmup)
    lrs = [learning_rate(schedule, base, s, 20) for s in range(warmup + 3)]
    assert lrs[:warmup] == pytest.approx([base / 4, base / 2, 3 * base / 4, base], rel=1e-15)
    assert lrs[warmup:] == [base] * 3
    steps = [b - a for a, b in zip(lrs, lrs[1:warmup])]
    assert steps == pytest.approx([base / warmup] * (warmup - 1), rel=1e-12)  # linear


def test_learning_rate_step_decay():
    schedule = _schedule(name="step", step_size=3, gamma=0.1)
    lrs = [learning_rate(schedule, 1.0, s, 100) for s in range(9)]
    assert lrs == pytest.approx([1.0] * 3 + [0.1] * 3 + [0.01] * 3, rel=1e-12)


def test_learning_rate_step_decay_counts_after_warmup():
    schedule = _schedule(name="step", warmup_steps=2, step_size=3, gamma=0.5)
    lrs = [learning_rate(schedule, 1.0, s, 100) for s in range(8)]
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5], rel=1e-15)


def test_learning_rate_cosine():
    total, base = 1000, 0.4
    schedule = _schedule(name="cosine")
    lrs = [learning_rate(schedule, base, s, total) for s in range(total + 1)]
    assert lrs[0] == base
    assert lrs[total // 2] == pytest.approx(base / 2, rel=1e-12)
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))  # non-increasing
    # the last update (step total - 1) is 0.5 (1 + cos(pi (1 - 1/total))) ~ (pi/total)²/4 of lr
    assert lrs[total - 1] == pytest.approx(base * (math.pi / total) ** 2 / 4, rel=1e-5)
    assert lrs[total - 1] < 1e-5 * base
    assert lrs[total] == pytest.approx(0.0, abs=1e-15)


def test_learning_rate_cosine_with_warmup():
    total, warmup, base = 110, 10, 1.0
    schedule = _schedule(name="cosine", warmup_steps=warmup)
    assert learning_rate(schedule, base, 0, total) == pytest.approx(base / warmup)
    assert learning_rate(schedule, base, warmup - 1, total) == base
    assert learning_rate(schedule, base, warmup, total) == base  # cosine starts at its peak
    assert learning_rate(schedule, base, warmup + 50, total) == pytest.approx(0.5, rel=1e-12)
    assert learning_rate(schedule, base, total, total) == pytest.approx(0.0, abs=1e-15)


# --------------------------------------------------------------------------- groups and schedules

ADAMW_GROUPS = {"name": "adamw", "lr": 0.02, "weight_decay": 0.1,
                "groups": [{"params": "*.bias", "weight_decay": 0.0, "lr": 0.05}]}


def _replayed(run_dir, out):
    from plgk_cli.arguments import ReplayArguments
    from plgk_cli.replay import replay
    return replay(ReplayArguments(ckpts=str(run_dir), audit_set="test[:4]", out=str(out), device="cpu"),
                  progress=False)


@pytest.mark.parametrize("schedule", [{"name": "onecycle"}, {"name": "cosine", "warmup_steps": 2},
                                      {"name": "cyclic", "step_size": 2}], ids=lambda s: s["name"])
def test_parameter_groups_and_schedules_are_recorded_and_replay_exactly(tmp_path, tiny_npz, schedule):
    """Weights and biases in their own groups (lr, weight decay), each group scheduled from its
    own lr; onecycle and cyclic also cycle β1 every update. Every update's values are in its step
    file, and replay re-derives every float64 update from them."""
    run = load_run(train_tiny(tmp_path / "run", tiny_npz, ADAMW_GROUPS, schedule, epochs=3))
    groups = run.manifest["optimizer"]["groups"]
    assert [g["params"] for g in groups] == [["1.weight", "3.weight"], ["1.bias", "3.bias"]]
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.02, 0.1), (0.05, 0.0)]
    fields = HYPER_FIELDS
    rows = torch.stack([run.checkpoint(t).hyper for t in range(1, run.manifest["total_steps"] + 1)])
    lr, beta1 = rows[..., fields.index("lr")], rows[..., fields.index("beta1")]
    torch.testing.assert_close(lr[:, 1] / lr[:, 0], torch.full_like(lr[:, 0], 0.05 / 0.02))  # one shape, two lrs
    assert len(set(lr[:, 0].tolist())) >= 3
    assert (len(set(beta1[:, 0].tolist())) >= 3) == (schedule["name"] != "cosine")
    assert rows[:, 1, fields.index("weight_decay")].eq(0).all() and rows[:, 0, fields.index("weight_decay")].eq(0.1).all()
    summary = _replayed(run.path, tmp_path / "out.h5")
    assert summary.max_update_error <= 1e-10


def test_group_matching_no_parameter_is_refused(tmp_path, tiny_npz):
    with pytest.raises(ConfigError, match=r"\[\[optim.groups\]\] #1 params \['\*.gamma'\]: matches "
                                                      r"no trainable parameter of the model \(its names are like "
                                                      r"'1.weight', '1.bias', '3.weight'\)"):
        train_tiny(tmp_path / "run", tiny_npz, {"name": "adam", "groups": [{"params": "*.gamma", "lr": 0.1}]})
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_sparse_run_replays_its_schedule_from_the_block_records(tmp_path, tiny_npz):
    """[checkpoint] every = 4 with onecycle: the steps between stored checkpoints carry their
    per-group values in record/hyper, and re-simulation uses them (drift at float64 rounding)."""
    config = {"data": {"dataset": f"npz:{tiny_npz}"}, "model": {"name": "mlp", "kwargs": {"hidden": 6}},
              "optim": ADAMW_GROUPS, "schedule": {"name": "onecycle"}, "checkpoint": {"every": 4},
              "train": {"epochs": 3, "batch_size": 8, "dtype": "float64", "device": "cpu"}}
    train_module.train(parse_config(config), tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run")
    assert not checkpoint_path(run.path, 2).exists()
    assert run.checkpoint(2).hyper is not None and run.checkpoint(2).hyper.shape == (2, len(HYPER_FIELDS))
    summary = _replayed(run.path, tmp_path / "out.h5")
    assert summary.max_update_error <= 1e-10 and summary.max_drift <= 1e-12
