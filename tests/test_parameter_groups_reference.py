"""Parameter groups, per-step hyper-parameters, foreach, skipped parameters and unused embedding
rows: replay's influence matrix against a deliberately naive, independent float64 reference.

Every run is recorded through plgk_cli.recorder.Recorder around a hand-written training loop
(`train_loop`) that also keeps its own log: right before each optimizer.step() it reads, for every
parameter, the hyper-parameters of its group (lr, betas / momentum, dampening, nesterov,
weight_decay, eps, ...) and whether its grad is None. The reference takes the hyper-parameters
from that log only, never from the run's files; from the run it reads only θ_t and the minibatch
B_t of each update (plgk_cli.run.load_run(...).checkpoint(t)), as tests/test_replay_reference.py
does. It shares no code with plgk_cli.optimizers, .gradients, .replay or .audit:

- per-example gradients with an explicit loop, one autograd call per example;
- its own float64 re-implementation of torch's single-tensor SGD and Adam/AdamW rules, applied
  parameter by parameter with that parameter's group values at that step and, for Adam, that
  parameter's own step count in the bias corrections; a parameter whose grad is None at a step is
  skipped exactly as torch skips it (no state change, no step count increment, no weight decay);
- forward-time per-example copies of each parameter's linear buffer (SGD momentum buffer, Adam's
  exp_avg), fed only by the example's own share of the direction, so that its share of Δθ_t is
  the optimizer's formula applied to its copy (the opposite walk from replay's backward adjoints).

influence[m, n] = Σ_t (share of m in Δθ_t) · h_n(t), residual[n] = Σ_t (part of Δθ_t no example
owns) · h_n(t), h_n(t) the trapezoid average of ∇ audit-loss_n over θ_t -> θ_{t+1}.

`test_reference_rebuilds_torch_updates` checks the reference alone on plain torch loops (no plgk).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from plgk_cli.arguments import ReplayArguments
from plgk_cli.data import load_dataset
from plgk_cli.recorder import Recorder
from plgk_cli.replay import replay
from plgk_cli.run import load_run
from plgk_cli.store import InfluenceFile

MODULE = "test_parameter_groups_reference"
NUM_TRAIN, NUM_TEST, NUM_FEATURES, NUM_CLASSES, HIDDEN = 20, 6, 5, 3, 8
BATCH_SIZE, EPOCHS = 7, 6  # batches of 7, 7 and 6: 3 updates per epoch, 18 updates (step 10 exists)
TOTAL_STEPS = 18
SEED = 0
AUDIT_SET, NUM_AUDIT = "test[0:4]", 4
VOCAB, LENGTH, WIDTH = 12, 5, 4  # the token model: rows 8..11 never occur in the training split

INFLUENCE_RTOL = 1e-6  # influence is float32 on disk (~6e-8 relative rounding)
RESIDUAL_ATOL, RESIDUAL_RTOL = 1e-9, 1e-6
UPDATE_RTOL = 1e-10  # the reference's own decomposition against the recorded float64 update
REPLAY_UPDATE_ERROR = 1e-10  # replay's re-derived updates (ReplaySummary.max_update_error)
CONTROL_MIN_DIFF = 1e-3


# --------------------------------------------------------------------------- models and data


def mlp(in_shape, num_classes, hidden=HIDDEN):
    """The user's 2-layer MLP (tanh: no dead units to make a frozen layer trivially inert)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), hidden), nn.Tanh(),
                         nn.Linear(hidden, num_classes))


class BagOfTokens(nn.Module):
    def __init__(self, vocab, width, num_classes):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x).mean(1)))


def bag_of_tokens(in_shape, num_classes, vocab=VOCAB, width=WIDTH):
    """Embedding + Linear on int64 token ids (for py:test_parameter_groups_reference:token_data)."""
    return BagOfTokens(vocab, width, num_classes)


def token_data():
    """Token sequences: training rows use tokens 0..6, token 7 only in rows 0 and 1 (absent from
    most minibatches: Adam keeps moving its row by momentum), tokens 8..11 never (zero gradient
    at every step: their rows never move); the test split uses the whole vocabulary."""
    rng = np.random.default_rng(1)
    x_train = rng.integers(0, 7, size=(NUM_TRAIN, LENGTH))
    x_train[0, 0] = x_train[1, 2] = 7
    x_test = rng.integers(0, VOCAB, size=(NUM_TEST, LENGTH))
    y_train = (x_train[:, 0] + x_train[:, 1]) % NUM_CLASSES
    y_test = rng.integers(0, NUM_CLASSES, NUM_TEST)
    return x_train, y_train, x_test, y_test


TOKEN_SPEC = f"py:{MODULE}:token_data"


@pytest.fixture(scope="module")
def mlp_spec(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    y_train = rng.integers(0, NUM_CLASSES, NUM_TRAIN)
    y_train[:NUM_CLASSES] = np.arange(NUM_CLASSES)
    np.savez(path, x_train=rng.normal(size=(NUM_TRAIN, NUM_FEATURES)), y_train=y_train,
             x_test=rng.normal(size=(NUM_TEST, NUM_FEATURES)),
             y_test=rng.integers(0, NUM_CLASSES, NUM_TEST))
    return f"npz:{path}"


# --------------------------------------------------------------------------- the cases


def _weights_biases(model):
    named = list(model.named_parameters())
    return [p for n, p in named if n.endswith("weight")], [p for n, p in named if n.endswith("bias")]


def _adamw_groups(model):
    weights, biases = _weights_biases(model)
    return torch.optim.AdamW([{"params": weights, "weight_decay": 0.1},
                              {"params": biases, "weight_decay": 0.0, "lr": 0.02,
                               "betas": (0.8, 0.95), "eps": 1e-6}],
                             lr=0.05, betas=(0.9, 0.99), foreach=False)


def _sgd_groups(model):
    weights, biases = _weights_biases(model)
    return torch.optim.SGD([{"params": weights, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
                            {"params": biases, "momentum": 0.5, "lr": 0.2}],
                           lr=0.1, foreach=False)


@dataclass(frozen=True)
class Case:
    optimizer: Callable  # model -> torch optimizer
    scheduler: Callable | None = None  # optimizer -> scheduler, stepped after every optimizer.step()
    frozen: Callable = lambda t: ()  # update t -> names of the parameters frozen for it
    freeze_before_recorder: bool = False  # apply frozen(0) before the Recorder is created
    tokens: bool = False
    plateau: bool = False  # ReduceLROnPlateau: scheduler.step(loss)
    supported_now: bool = False  # one group, only lr changing: the engine before groups records it
    set_to_none: bool = True  # False: a frozen parameter keeps a zeroed grad and steps on it
    expect: tuple = ()  # what the loop's log must show for the case to test what it says


FIRST = ("1.weight", "1.bias")  # mlp's first Linear
LAST = ("3.weight", "3.bias")

CASES = {
    # 1. two AdamW groups (decay on weights only, own lr, betas, eps) and one lambda per group
    "adamw_groups_lambdalr": Case(
        _adamw_groups,
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, [lambda s: 0.85 ** s, lambda s: 1 + 0.1 * s]),
        expect=("groups", "lr_changes")),
    # per-group momentum and dampening (nesterov must agree between groups: the engine refuses
    # groups with different update rules), lr lowered by ReduceLROnPlateau on the batch loss
    "sgd_groups_plateau": Case(
        _sgd_groups,
        lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0, threshold=0.05),
        plateau=True, expect=("groups", "lr_changes")),
    # 2. SGD momentum and OneCycleLR (defaults but final_div_factor: with 1e4 the last update is
    # ~1e-7 θ, where the float64 rounding of θ_{t+1} − θ_t alone is 1e-10 of it): cycle_momentum,
    # momentum changes every update
    "sgd_momentum_onecycle": Case(
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, foreach=False),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.3, total_steps=TOTAL_STEPS,
                                                        final_div_factor=100),
        expect=("momentum_changes", "lr_changes")),
    # 3. Adam (L2 decay: a residual) and OneCycleLR: β1 cycled every update
    "adam_onecycle": Case(
        lambda m: torch.optim.Adam(m.parameters(), lr=0.01, weight_decay=0.01, foreach=False),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=TOTAL_STEPS,
                                                        final_div_factor=100),
        expect=("momentum_changes", "lr_changes")),
    # 4. the first layer frozen for updates 0..9, trained from update 10: its Adam state starts
    # then, its bias corrections count from 1 while the others' count from 11
    "adam_frozen_until_10": Case(
        lambda m: torch.optim.Adam(m.parameters(), lr=0.05, weight_decay=0.01, foreach=False),
        frozen=lambda t: FIRST if t < 10 else (), expect=("skips",)),
    "adam_frozen_until_10_before_recorder": Case(
        lambda m: torch.optim.Adam(m.parameters(), lr=0.05, weight_decay=0.01, foreach=False),
        frozen=lambda t: FIRST if t < 10 else (), freeze_before_recorder=True, expect=("skips",)),
    # the last layer trained, frozen for updates 4..7 (state kept, decoupled decay skipped too),
    # then trained again
    "adamw_paused_layer": Case(
        lambda m: torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1, foreach=False),
        frozen=lambda t: LAST if 4 <= t < 8 else (), expect=("skips",)),
    # SGD momentum with a paused layer: the buffer is kept, not decayed, while skipped
    "sgd_momentum_paused_layer": Case(
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, foreach=False),
        frozen=lambda t: FIRST if 3 <= t < 9 else (), expect=("skips",)),
    # frozen with zero_grad(set_to_none=False): the grad is zeros, not None, so torch steps the
    # layer on a zero gradient: Adam's momentum keeps moving it, decoupled decay shrinks it
    "adamw_frozen_zeroed_grads": Case(
        lambda m: torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1, foreach=False),
        frozen=lambda t: LAST if 4 <= t < 8 else (), set_to_none=False, expect=("zero_grads",)),
    # 5. foreach=True (torch's multi-tensor arithmetic)
    "adam_foreach": Case(
        lambda m: torch.optim.Adam(m.parameters(), lr=0.05, weight_decay=0.01, foreach=True)),
    "sgd_nesterov_foreach_groups": Case(
        lambda m: torch.optim.SGD([{"params": _weights_biases(m)[0]},
                                   {"params": _weights_biases(m)[1], "lr": 0.2, "momentum": 0.5}],
                                  lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, foreach=True),
        expect=("groups",)),
    # 6. Embedding + Linear on tokens; rows 8..11 never used, row 7 in 2 of 20 examples
    "embedding_adam_unused_rows": Case(
        lambda m: torch.optim.Adam(m.parameters(), lr=0.05, foreach=False), tokens=True,
        supported_now=True),
    # what the engine before groups already records: they check the reference against replay now
    "adam_l2_constant": Case(
        lambda m: torch.optim.Adam(m.parameters(), lr=0.05, weight_decay=0.01, foreach=False),
        supported_now=True),
    "sgd_momentum_lambdalr": Case(
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, dampening=0.1, foreach=False),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.9 ** s),
        supported_now=True, expect=("lr_changes",)),
}


# --------------------------------------------------------------------------- the training loop


@dataclass
class Trajectory:
    names: list
    thetas: list  # θ_0..θ_T as the loop saw them: name -> float64 tensor
    batches: list  # B_0..B_{T-1}
    log: list  # per update: {"groups": [hyper dict], "group_of": {name: i}, "has_grad": {name: bool}}
    run_dir: object = None
    data: object = None
    extra: dict = field(default_factory=dict)


def _hyper_of(optimizer, group) -> dict:
    hp = {k: (tuple(float(b) for b in v) if k == "betas" else v) for k, v in group.items() if k != "params"}
    hp["family"] = "adam" if isinstance(optimizer, torch.optim.Adam) else "sgd"
    hp["decoupled"] = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay"))
    return hp


def _snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_loop(case: Case, spec: str, out=None) -> Trajectory:
    """The user's loop; with ``out`` the Recorder records it there. Logs the hyper-parameters
    each update uses, read from optimizer.param_groups right before optimizer.step()."""
    data = load_dataset(spec, 0, torch.float64)
    torch.manual_seed(SEED)
    builder, kwargs = (bag_of_tokens, {}) if case.tokens else (mlp, {"hidden": HIDDEN})
    model = builder(data.in_shape, data.num_classes, **kwargs).to(torch.float64)
    named = dict(model.named_parameters())
    optimizer = case.optimizer(model)
    schedule = case.scheduler(optimizer) if case.scheduler else None
    name_of = {id(p): n for n, p in named.items()}

    def freeze(t):
        for n, p in named.items():
            p.requires_grad_(n not in case.frozen(t))

    if case.freeze_before_recorder:
        freeze(0)
    recorder = None
    if out is not None:
        recorder = Recorder(out, model, optimizer, model_name=f"{MODULE}:{builder.__name__}",
                            model_kwargs=kwargs, dataset=spec, batch_size=BATCH_SIZE, epochs=EPOCHS)
    traj = Trajectory(list(named), [_snapshot(model)], [], [], out, data)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        for batch in torch.randperm(NUM_TRAIN, generator=generator).split(BATCH_SIZE):
            t = len(traj.batches)
            freeze(t)
            optimizer.zero_grad(set_to_none=case.set_to_none)
            logits = model(data.x_train[batch])
            loss = F.cross_entropy(logits, data.y_train[batch])
            loss.backward()
            traj.log.append({
                "groups": [_hyper_of(optimizer, g) for g in optimizer.param_groups],
                "group_of": {name_of[id(p)]: i for i, g in enumerate(optimizer.param_groups)
                             for p in g["params"]},
                "has_grad": {n: p.grad is not None for n, p in named.items()},
                "trainable": {n: p.requires_grad for n, p in named.items()}})
            optimizer.step()
            if schedule is not None:
                schedule.step(float(loss.detach())) if case.plateau else schedule.step()
            if recorder is not None:
                recorder.step(batch, loss, logits)
            traj.thetas.append(_snapshot(model))
            traj.batches.append(batch.clone())
    if recorder is not None:
        recorder.finish()
    assert len(traj.batches) == TOTAL_STEPS
    return traj


def check_scenario(case: Case, traj: Trajectory) -> None:
    """The loop's log shows what the case claims to test."""
    log = traj.log
    if "groups" in case.expect:
        assert len(log[0]["groups"]) == 2
    if "lr_changes" in case.expect:
        for i in range(len(log[0]["groups"])):
            assert len({e["groups"][i]["lr"] for e in log}) > 2, f"group {i}: lr never changed"
    if "momentum_changes" in case.expect:
        key = "betas" if log[0]["groups"][0]["family"] == "adam" else "momentum"
        values = [e["groups"][0][key] for e in log]
        changes = sum(a != b for a, b in zip(values, values[1:]))
        assert changes >= len(values) - 2, f"{key} changed at {changes} of {len(values) - 1} updates"
    if "skips" in case.expect:
        assert any(not all(e["has_grad"].values()) for e in log)
        assert all(any(e["has_grad"].values()) for e in log)
    if "zero_grads" in case.expect:  # frozen with a zeroed grad, and it still moves
        zeroed = [t for t, e in enumerate(log) if any(e["has_grad"][n] and not e["trainable"][n] for n in LAST)]
        assert zeroed and all(not torch.equal(traj.thetas[t + 1][LAST[0]], traj.thetas[t][LAST[0]]) for t in zeroed)
    if case.tokens:  # rows 8..11 never move, row 7 moves at updates whose batch lacks it
        rows = traj.thetas[0]["embed.weight"]
        assert all(torch.equal(th["embed.weight"][8:], rows[8:]) for th in traj.thetas)
        absent = [t for t, b in enumerate(traj.batches)
                  if 0 not in b.tolist() and 1 not in b.tolist() and t > 0]
        assert any(not torch.equal(traj.thetas[t + 1]["embed.weight"][7], traj.thetas[t]["embed.weight"][7])
                   for t in absent), "row 7 never moved by momentum alone"


# --------------------------------------------------------------------------- naive gradients


def per_example_gradients(module, names, theta: dict, x, y) -> dict:
    """name -> (len(x), *shape): one autograd call per example, on purpose."""
    rows = {n: [] for n in names}
    for i in range(len(y)):
        leaves = {n: theta[n].detach().clone().requires_grad_(True) for n in names}
        loss = F.cross_entropy(functional_call(module, leaves, (x[i:i + 1],)), y[i:i + 1])
        grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads):
            rows[n].append(torch.zeros_like(leaves[n]) if g is None else g)
    return {n: torch.stack(r) for n, r in rows.items()}


def flat_rows(per_name: dict, names) -> torch.Tensor:
    return torch.cat([per_name[n].reshape(per_name[n].shape[0], -1) for n in names], 1)


def audit_direction(module, names, theta_t, theta_next, x_audit, y_audit) -> torch.Tensor:
    """(N, P): the trapezoid average of ∇ loss_n over θ_t -> θ_{t+1} (replay's default rule)."""
    a = flat_rows(per_example_gradients(module, names, theta_t, x_audit, y_audit), names)
    b = flat_rows(per_example_gradients(module, names, theta_next, x_audit, y_audit), names)
    return 0.5 * (a + b)


# --------------------------------------------------------------------------- naive optimizer


class ParamState:
    """One parameter's optimizer state, with a per-example copy of its linear buffer."""

    def __init__(self, m_train, shape):
        self.step = 0  # Adam's per-parameter step count
        self.started = False  # SGD: momentum_buffer exists
        self.v = torch.zeros(shape, dtype=torch.float64)  # exp_avg_sq
        self.v_max = torch.zeros(shape, dtype=torch.float64)
        self.buf = torch.zeros((m_train, *shape), dtype=torch.float64)  # per example
        self.ibuf = torch.zeros(shape, dtype=torch.float64)  # what the L2 term feeds


def reference_param_step(s: ParamState, hp: dict, share, theta):
    """Torch's single-tensor rule for one parameter at one step, on the per-example shares of
    its gradient ((M, *shape), summing to the batch gradient). Returns (per-example Δ, Δ no
    example owns)."""
    lr, wd = float(hp["lr"]), float(hp["weight_decay"])
    if hp["family"] == "adam":
        b1, b2 = hp["betas"]
        l2 = 0.0 if hp["decoupled"] else wd
        ind = l2 * theta
        d = share.sum(0) + ind
        s.step += 1
        s.v = b2 * s.v + (1 - b2) * d * d
        second = s.v
        if hp.get("amsgrad"):
            s.v_max = torch.maximum(s.v_max, s.v)
            second = s.v_max
        denom = second.sqrt() / math.sqrt(1 - b2 ** s.step) + hp["eps"]
        step_size = lr / (1 - b1 ** s.step)  # torch: the current β1 to the power of the count
        s.buf = b1 * s.buf + (1 - b1) * share
        s.ibuf = b1 * s.ibuf + (1 - b1) * ind
        delta = -step_size * s.buf / denom
        idelta = -step_size * s.ibuf / denom
        if hp["decoupled"]:
            idelta = idelta - lr * wd * theta
        return delta, idelta
    mu, tau, nesterov = float(hp["momentum"]), float(hp["dampening"]), bool(hp["nesterov"])
    ind = wd * theta
    if mu == 0:
        return -lr * share, -lr * ind
    if not s.started:  # torch starts the buffer as the direction itself: no dampening
        s.buf, s.ibuf, s.started = share.clone(), ind.clone(), True
    else:
        s.buf = mu * s.buf + (1 - tau) * share
        s.ibuf = mu * s.ibuf + (1 - tau) * ind
    if nesterov:
        return -lr * (share + mu * s.buf), -lr * (ind + mu * s.ibuf)
    return -lr * s.buf, -lr * s.ibuf


def _hyper_for(log, t, name, control):
    entry = log[t]
    group = entry["group_of"][name]
    if control == "group0":  # wrong: every parameter with the first group's values
        group = 0
    hp = dict(entry["groups"][group])
    if control == "fixed_momentum":  # wrong: the momentum / β1 of the first update throughout
        first = log[0]["groups"][group]
        hp["momentum" if hp["family"] == "sgd" else "betas"] = first.get(
            "momentum" if hp["family"] == "sgd" else "betas")
    return hp


def relative_error(approx, exact) -> float:
    approx, exact = np.asarray(approx, dtype=np.float64), np.asarray(exact, dtype=np.float64)
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


def reference_audit(traj: Trajectory, thetas: list, batches: list, *, tokens: bool,
                    control: str | None = None, audit: bool = True):
    """(influence (M, N), residual (N,), worst rebuild error) by forward-time per-example buffers.

    ``thetas``/``batches``: θ_t and B_t (from the run, or the loop's own); hyper-parameters and
    which parameters have a gradient come from ``traj.log`` only. ``control`` names a wrong
    reference (negative controls): "group0", "fixed_momentum", "ignore_skip" (a parameter
    whose grad is None steps as if its gradient were zero) or "global_step" (one step count for
    all parameters, the number of updates so far).
    """
    data = traj.data
    x_train, y_train = data.x_train, data.y_train
    x_audit, y_audit = data.x_test[:NUM_AUDIT], data.y_test[:NUM_AUDIT]
    torch.manual_seed(123)  # the reference's own module: its initial values are never used
    module = (bag_of_tokens(data.in_shape, data.num_classes) if tokens
              else mlp(data.in_shape, data.num_classes)).to(torch.float64)
    names = [n for n, _ in module.named_parameters()]
    assert names == traj.names
    m_train = len(y_train)
    states = {n: ParamState(m_train, thetas[0][n].shape) for n in names}
    influence = torch.zeros(m_train, NUM_AUDIT, dtype=torch.float64)
    residual = torch.zeros(NUM_AUDIT, dtype=torch.float64)
    worst = 0.0
    for t, batch in enumerate(batches):
        theta, theta_next = thetas[t], thetas[t + 1]
        g = per_example_gradients(module, names, theta, x_train[batch], y_train[batch])
        deltas, independent = {}, {}
        for n in names:
            shape = theta[n].shape
            has_grad = traj.log[t]["has_grad"][n]
            if not has_grad and control != "ignore_skip":  # torch skips it entirely
                assert torch.equal(theta_next[n], theta[n]), f"update {t}: skipped {n} moved"
                deltas[n] = torch.zeros((m_train, *shape), dtype=torch.float64)
                independent[n] = torch.zeros(shape, dtype=torch.float64)
                continue
            share = torch.zeros((m_train, *shape), dtype=torch.float64)
            if has_grad and traj.log[t]["trainable"][n]:  # each example's share of the batch-mean
                share[batch] = g[n] / len(batch)  # gradient; a frozen parameter's grad is zeros
            hp = _hyper_for(traj.log, t, n, control)
            if control == "global_step":  # wrong: Adam's bias corrections count every update
                states[n].step = t
            deltas[n], independent[n] = reference_param_step(states[n], hp, share, theta[n])
        delta = flat_rows(deltas, names)
        independent_delta = torch.cat([independent[n].reshape(-1) for n in names])
        recorded = torch.cat([(theta_next[n] - theta[n]).reshape(-1) for n in names])
        err = relative_error(delta.sum(0) + independent_delta, recorded)
        worst = max(worst, err)
        if control is None:
            assert err <= UPDATE_RTOL, f"update {t}: reference decomposition off by {err:.2e}"
        if audit:
            h = audit_direction(module, names, theta, theta_next, x_audit, y_audit)
            influence += delta @ h.T
            residual += h @ independent_delta
    return influence.numpy(), residual.numpy(), worst


def run_trajectory(run_dir, names):
    """θ_t and B_t as the run recorded them (all that the reference takes from the run)."""
    run = load_run(run_dir)
    thetas, batches = [], []
    for t in run.steps:
        ck = run.checkpoint(t)
        missing = [n for n in names if n not in ck.params]
        assert not missing, f"step {t}: the run holds no θ for {missing}"
        thetas.append({n: ck.params[n].to(torch.float64) for n in names})
        if t > 0:
            batches.append(ck.batch)
    return thetas, batches


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def recorded(mlp_spec, tmp_path_factory):
    """case -> (trajectory, replay summary, influence, residual), each recorded and replayed once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            case = CASES[name]
            base = tmp_path_factory.mktemp(name)
            traj = train_loop(case, TOKEN_SPEC if case.tokens else mlp_spec, base / "run")
            out = base / "influences.h5"
            summary = replay(ReplayArguments(ckpts=str(base / "run"), audit_set=AUDIT_SET, out=str(out),
                                             targets=("loss",), device="cpu"), progress=False)
            with InfluenceFile(out) as f:
                assert np.array_equal(f.train_index, np.arange(NUM_TRAIN))
                assert np.array_equal(f.audit_index, np.arange(NUM_AUDIT))
                influence = f.influence("loss").astype(np.float64)
                residual = f.array("loss", "residual").astype(np.float64)
            cache[name] = (traj, summary, influence, residual)
        return cache[name]

    return get


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_rebuilds_torch_updates(name, mlp_spec):
    """The reference alone, on the loop without plgk: its per-example decomposition rebuilds
    every update torch made to 1e-10 (the hyper-parameters and skips taken from the log)."""
    case = CASES[name]
    traj = train_loop(case, TOKEN_SPEC if case.tokens else mlp_spec)
    check_scenario(case, traj)
    _, _, worst = reference_audit(traj, traj.thetas, traj.batches, tokens=case.tokens, audit=False)
    assert worst <= UPDATE_RTOL


@pytest.mark.parametrize("name", sorted(CASES))
def test_replay_matches_naive_reference(name, recorded):
    case = CASES[name]
    start = time.perf_counter()
    traj, summary, influence, residual = recorded(name)
    check_scenario(case, traj)
    thetas, batches = run_trajectory(traj.run_dir, traj.names)
    assert len(batches) == TOTAL_STEPS
    for t in range(TOTAL_STEPS + 1):  # the Recorder recorded the loop's trajectory, bit for bit
        for n in traj.names:
            assert torch.equal(thetas[t][n], traj.thetas[t][n]), (t, n)
        assert t == 0 or torch.equal(batches[t - 1], traj.batches[t - 1])

    ref_influence, ref_residual, worst = reference_audit(traj, thetas, batches, tokens=case.tokens)
    assert worst <= UPDATE_RTOL  # (a)
    assert np.linalg.norm(ref_influence) > 1e-3  # a non-trivial audit
    err = relative_error(influence, ref_influence)
    print(f"\n{name}: influence rel err {err:.3e}, residual max abs diff "
          f"{np.abs(residual - ref_residual).max():.3e} (|ref residual| max "
          f"{np.abs(ref_residual).max():.3e}), replay update error {summary.max_update_error:.2e}, "
          f"{time.perf_counter() - start:.2f}s")
    assert err <= INFLUENCE_RTOL  # (b)
    np.testing.assert_allclose(residual, ref_residual, rtol=RESIDUAL_RTOL, atol=RESIDUAL_ATOL)
    assert summary.max_update_error <= REPLAY_UPDATE_ERROR  # (c)


CONTROLS = [("adamw_groups_lambdalr", "group0"), ("sgd_groups_plateau", "group0"),
            ("sgd_momentum_onecycle", "fixed_momentum"), ("adam_onecycle", "fixed_momentum"),
            ("adamw_paused_layer", "ignore_skip"), ("sgd_momentum_paused_layer", "ignore_skip"),
            ("adam_frozen_until_10", "global_step")]


@pytest.mark.parametrize("name,control", CONTROLS, ids=[f"{n}-{c}" for n, c in CONTROLS])
def test_comparison_is_sensitive(name, control, recorded):
    """Negative controls: a reference that gets the groups, the cycling or the skips wrong
    misses the recorded updates and does NOT match replay."""
    case = CASES[name]
    traj, _, influence, _ = recorded(name)
    thetas, batches = run_trajectory(traj.run_dir, traj.names)
    right, _, _ = reference_audit(traj, thetas, batches, tokens=case.tokens)
    wrong, _, worst = reference_audit(traj, thetas, batches, tokens=case.tokens, control=control)
    err = relative_error(influence, wrong)
    print(f"\nnegative control {name} {control}: rebuild error {worst:.2e}, rel diff to replay "
          f"{err:.3e}, to the right reference {relative_error(right, wrong):.3e}")
    assert worst > 1e-6  # the wrong reference does not even rebuild the updates
    assert relative_error(right, wrong) > CONTROL_MIN_DIFF
    assert err > CONTROL_MIN_DIFF


@pytest.mark.parametrize("name,control", CONTROLS, ids=[f"{n}-{c}" for n, c in CONTROLS])
def test_wrong_reference_misses_torch_updates(name, control, mlp_spec):
    """The controls' premise on the loop without plgk: each wrong reference fails to rebuild the
    updates torch made (so the right one's 1e-10 is not vacuous)."""
    case = CASES[name]
    traj = train_loop(case, TOKEN_SPEC if case.tokens else mlp_spec)
    _, _, worst = reference_audit(traj, traj.thetas, traj.batches, tokens=case.tokens,
                                  control=control, audit=False)
    assert worst > 1e-6
