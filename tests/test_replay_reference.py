"""Replay's influence matrix against a deliberately naive, independent float64 reference.

The reference re-derives the audit from the recorded trajectory alone (θ_t, the minibatch B_t, the
learning rate and the clip coefficient of every update) and shares no code with
plgk_cli.optimizers, .gradients, .replay or .audit:

- per-sample gradients with an explicit Python loop, one autograd call per example;
- its own float64 re-implementation of each torch.optim update rule (single-tensor paths, as read
  from torch/optim/{sgd,adam,rmsprop,adagrad}.py), run forward in time on the batch-mean gradient,
  which gives the preconditioner shared by all examples;
- "forward-time per-sample momentum buffers": every training example keeps its own copy of the
  optimizer's linear buffer (SGD/RMSprop momentum buffer, Adam's exp_avg), fed only by its own
  contributions c_s g_{m,s}/|B_s|, and its share of Δθ_t is the optimizer's formula applied to that
  copy. This is the opposite walk from replay's backward adjoints, so agreement is a real check.

influence[m, n] = Σ_t (share of m in Δθ_t) · h_n(t), residual[n] = Σ_t (sample-independent part
of Δθ_t) · h_n(t), with h_n(t) the quadrature average of the audit loss gradient over θ_t -> θ_{t+1}.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from plgk_cli.arguments import ReplayArguments
from plgk_cli.config import parse_config
from plgk_cli.replay import replay
from plgk_cli.run import load_run
from plgk_cli.store import InfluenceFile
from plgk_cli.train import train

NUM_TRAIN = 22  # batch 8: batches of 8, 8 and 6, so the last batch is smaller
NUM_TEST = 6
NUM_FEATURES = 6
NUM_CLASSES = 3
AUDIT_SET = "test[0:4]"
NUM_AUDIT = 4
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: c = min(1, C / (||G|| + 1e-6))

INFLUENCE_RTOL = 1e-6  # influence is float32 on disk (~6e-8 relative rounding)
RESIDUAL_ATOL, RESIDUAL_RTOL = 1e-9, 1e-6
UPDATE_RTOL = 1e-10  # the reference's own decomposition against the recorded float64 update

# Optimizer settings of each case. Learning rates are large enough that momentum and the
# adaptive preconditioners matter over the 6 updates; RMSprop's first steps are ~lr/sqrt(1-alpha)
# per coordinate (10x lr, more when centered), so it gets a smaller lr to stay in a sane regime.
OPTIM_CASES = {
    "sgd_plain": {"name": "sgd", "lr": 0.2},
    "sgd_momentum_dampening": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "dampening": 0.1},
    "sgd_nesterov_l2": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True,
                        "weight_decay": 0.01},
    "adam": {"name": "adam", "lr": 0.05, "betas": [0.9, 0.99]},
    "adam_l2_amsgrad": {"name": "adam", "lr": 0.05, "weight_decay": 0.01, "amsgrad": True},
    "adamw_clip_cosine": {"name": "adamw", "lr": 0.05, "weight_decay": 0.1, "clip_grad_norm": 0.5},
    "rmsprop_centered_momentum": {"name": "rmsprop", "lr": 0.01, "momentum": 0.5, "centered": True},
    "rmsprop_plain": {"name": "rmsprop", "lr": 0.01},
    "adagrad_l2": {"name": "adagrad", "lr": 0.1, "weight_decay": 0.01},
    # the quadrature-rule variants run on this one (L2 decay so that the residual is not zero)
    "adam_l2": {"name": "adam", "lr": 0.05, "betas": [0.9, 0.99], "weight_decay": 0.01},
}
SCHEDULES = {"adamw_clip_cosine": {"name": "cosine", "warmup_steps": 2}}

# (optimizer case, quadrature rule) pairs compared against the reference
COMPARED = [(name, "trapezoid") for name in OPTIM_CASES if name != "adam_l2"] + [
    ("adam_l2", "trapezoid"), ("adam_l2", "euler"), ("adam_l2", "supersample:3")]


# --------------------------------------------------------------------------- producing runs


@pytest.fixture(scope="module")
def dataset_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    y_train = rng.integers(0, NUM_CLASSES, NUM_TRAIN)
    y_train[:NUM_CLASSES] = np.arange(NUM_CLASSES)  # every class present
    np.savez(path, x_train=rng.normal(size=(NUM_TRAIN, NUM_FEATURES)), y_train=y_train,
             x_test=rng.normal(size=(NUM_TEST, NUM_FEATURES)),
             y_test=rng.integers(0, NUM_CLASSES, NUM_TEST))
    return path


@pytest.fixture(scope="module")
def trained(dataset_path, tmp_path_factory):
    """Train each optimizer case once per module (the rule variants share a run)."""
    runs = {}

    def get(case: str):
        if case not in runs:
            run_dir = tmp_path_factory.mktemp(f"run_{case}")
            cfg = parse_config({
                "data": {"dataset": f"npz:{dataset_path}"},
                "model": {"name": "mlp", "kwargs": {"hidden": 6}},
                "optim": OPTIM_CASES[case],
                "schedule": SCHEDULES.get(case, {"name": "constant"}),
                "train": {"epochs": 2, "batch_size": 8, "seed": 0, "dtype": "float64", "device": "cpu"},
            })
            train(cfg, run_dir, progress=False)
            runs[case] = run_dir
        return runs[case]

    return get


def replay_influence(run_dir, rule: str, out_dir):
    """(influence (M, N), residual (N,)) as replay writes them, in float64."""
    out = out_dir / f"influences_{rule.replace(':', '_')}.h5"
    replay(ReplayArguments(ckpts=str(run_dir), audit_set=AUDIT_SET, out=str(out), rule=rule,
                           targets=("loss",), device="cpu"), progress=False)
    with InfluenceFile(out) as f:
        assert np.array_equal(f.train_index, np.arange(NUM_TRAIN))  # rows in train-split order
        assert np.array_equal(f.audit_index, np.arange(NUM_AUDIT))
        return f.influence("loss").astype(np.float64), f.array("loss", "residual").astype(np.float64)


# --------------------------------------------------------------------------- naive gradients


class FlatModel:
    """The run's architecture as a function of one flat float64 parameter vector."""

    def __init__(self, run):
        self.module = run.build_model().to(torch.float64)
        self.names = [n for n, _ in self.module.named_parameters()]
        self.shapes = [p.shape for _, p in self.module.named_parameters()]

    def flatten(self, params: dict) -> torch.Tensor:
        return torch.cat([params[n].detach().to(torch.float64).reshape(-1) for n in self.names])

    def loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of ONE example (x, y) at θ."""
        params, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = int(np.prod(shape))
            params[name] = theta[offset:offset + size].reshape(shape)
            offset += size
        logits = functional_call(self.module, params, (x[None],))
        return F.cross_entropy(logits, y[None])

    def per_sample_gradients(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(len(x), P): one autograd call per example, on purpose (no vmap, no batching)."""
        rows = []
        for i in range(len(x)):
            leaf = theta.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(self.loss(leaf, x[i], y[i]), leaf)
            rows.append(g)
        return torch.stack(rows)


def quadrature_points(rule: str) -> list[tuple[float, float]]:
    """(position s in [0, 1] along θ_t -> θ_{t+1}, weight) of each rule."""
    if rule == "euler":
        return [(0.0, 1.0)]
    k = 1 if rule == "trapezoid" else int(rule.split(":")[1])  # supersample:K
    return [(j / k, (0.5 if j in (0, k) else 1.0) / k) for j in range(k + 1)]


def audit_direction(model: FlatModel, theta_t, theta_next, x_audit, y_audit, rule: str) -> torch.Tensor:
    """h_n(t) for every audit point, (N, P): the rule's average of ∇ loss_n over the segment."""
    h = torch.zeros(len(x_audit), theta_t.numel(), dtype=torch.float64)
    for s, weight in quadrature_points(rule):
        h += weight * model.per_sample_gradients(theta_t + s * (theta_next - theta_t), x_audit, y_audit)
    return h


# --------------------------------------------------------------------------- naive optimizers
#
# Each family splits into (a) shared state that only the full direction d_t = c_t G_t + λ₂ θ_t
# feeds (second moments -> the preconditioner), advanced by `observe`, and (b) a linear rule
# `linear_step(buf, d) -> (buf_next, Δ)` that is applied to the full direction for the real update
# and, by linearity, to each example's own share of d_t with its own copy of the buffer.


class ReferenceSGD:
    def __init__(self, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, **_):
        self.mu, self.tau, self.nesterov = momentum, dampening, nesterov
        self.l2, self.decoupled = weight_decay, 0.0
        self.step = 0

    def observe(self, d, lr):
        self.lr, self.first = lr, self.step == 0
        self.step += 1

    def linear_step(self, buf, d):
        if self.mu == 0:
            return buf, -self.lr * d
        # torch starts the buffer as d itself on the first step: no dampening there.
        buf_next = d.clone() if self.first else self.mu * buf + (1 - self.tau) * d
        direction = d + self.mu * buf_next if self.nesterov else buf_next
        return buf_next, -self.lr * direction


class ReferenceAdam:
    def __init__(self, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, decoupled=False, **_):
        self.b1, self.b2 = betas
        self.eps, self.amsgrad = eps, amsgrad
        self.l2, self.decoupled = (0.0, weight_decay) if decoupled else (weight_decay, 0.0)
        self.v = self.v_max = None
        self.step = 0

    def observe(self, d, lr):
        self.step += 1
        self.lr = lr
        self.v = (1 - self.b2) * d * d if self.v is None else self.b2 * self.v + (1 - self.b2) * d * d
        if self.amsgrad:
            self.v_max = self.v.clone() if self.v_max is None else torch.maximum(self.v_max, self.v)
        second = self.v_max if self.amsgrad else self.v
        bc2 = 1 - self.b2 ** self.step
        self.denom = second.sqrt() / bc2 ** 0.5 + self.eps

    def linear_step(self, m, d):
        m_next = self.b1 * m + (1 - self.b1) * d
        bc1 = 1 - self.b1 ** self.step
        return m_next, -(self.lr / bc1) * m_next / self.denom


class ReferenceRMSprop:
    def __init__(self, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, **_):
        self.alpha, self.eps, self.mu, self.centered = alpha, eps, momentum, centered
        self.l2, self.decoupled = weight_decay, 0.0
        self.square_avg = self.grad_avg = 0.0

    def observe(self, d, lr):
        self.lr = lr
        self.square_avg = self.alpha * self.square_avg + (1 - self.alpha) * d * d
        if self.centered:  # grad_avg is linear in d but sits under the sqrt: it is preconditioner
            self.grad_avg = self.alpha * self.grad_avg + (1 - self.alpha) * d
            self.avg = (self.square_avg - self.grad_avg * self.grad_avg).sqrt() + self.eps
        else:
            self.avg = self.square_avg.sqrt() + self.eps

    def linear_step(self, buf, d):
        if self.mu == 0:
            return buf, -self.lr * d / self.avg
        buf_next = self.mu * buf + d / self.avg  # torch's buffer accumulates d / avg, lr outside
        return buf_next, -self.lr * buf_next


class ReferenceAdagrad:
    def __init__(self, eps=1e-10, weight_decay=0.0, **_):
        self.eps, self.l2, self.decoupled = eps, weight_decay, 0.0
        self.sum = 0.0

    def observe(self, d, lr):
        self.lr = lr  # lr_decay = 0: clr = lr
        self.sum = self.sum + d * d
        self.std = self.sum.sqrt() + self.eps

    def linear_step(self, buf, d):
        return buf, -self.lr * d / self.std


def reference_optimizer(manifest_optimizer: dict):
    o = manifest_optimizer
    kw = dict(momentum=o["momentum"], dampening=o["dampening"], nesterov=o["nesterov"],
              betas=tuple(o["betas"]), eps=o["eps"], alpha=o["alpha"], weight_decay=o["weight_decay"],
              amsgrad=o["amsgrad"], centered=o["centered"])
    if o["name"] == "sgd":
        return ReferenceSGD(**kw)
    if o["name"] in ("adam", "adamw"):
        return ReferenceAdam(**kw, decoupled=o["name"] == "adamw")
    if o["name"] == "rmsprop":
        return ReferenceRMSprop(**kw)
    if o["name"] == "adagrad":
        return ReferenceAdagrad(**kw)
    raise ValueError(o["name"])


# --------------------------------------------------------------------------- the reference audit


def relative_error(approx, exact) -> float:
    approx, exact = np.asarray(approx, dtype=np.float64), np.asarray(exact, dtype=np.float64)
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


def reference_audit(run_dir, rule: str, *, truncate_memory: bool = False):
    """(influence (M, N), residual (N,), clip coefficients) by forward-time per-sample buffers.

    truncate_memory=True is the negative control: each example's buffer is emptied before every
    update, i.e. an example only owns the update of the step its gradient was taken at.
    """
    run = load_run(run_dir)
    model = FlatModel(run)
    data = run.dataset
    x_train, y_train = data.x_train.to(torch.float64), data.y_train
    x_audit, y_audit = data.x_test[:NUM_AUDIT].to(torch.float64), data.y_test[:NUM_AUDIT]
    clip_norm = run.manifest["optimizer"]["clip_grad_norm"]
    opt = reference_optimizer(run.manifest["optimizer"])

    m_train = len(y_train)
    p = sum(int(np.prod(s)) for s in model.shapes)
    per_sample_buf = torch.zeros(m_train, p, dtype=torch.float64)  # one linear buffer per example
    independent_buf = torch.zeros(p, dtype=torch.float64)  # what the L2 term θ_t feeds
    influence = torch.zeros(m_train, NUM_AUDIT, dtype=torch.float64)
    residual = torch.zeros(NUM_AUDIT, dtype=torch.float64)
    clips = []

    ck = run.checkpoint(0)
    for t in run.steps[:-1]:
        ck_next = run.checkpoint(t + 1)  # holds the record of update t -> t+1
        theta_t, theta_next = model.flatten(ck.params), model.flatten(ck_next.params)
        batch = ck_next.batch
        g = model.per_sample_gradients(theta_t, x_train[batch], y_train[batch])
        batch_grad = g.sum(0) / len(batch)

        # the clip coefficient, re-derived and checked against the recorded one
        c = 1.0 if not clip_norm else min(1.0, clip_norm / (float(batch_grad.norm()) + CLIP_EPS))
        assert c == pytest.approx(ck_next.clip_coef, rel=1e-12)
        clips.append(c)

        # each example's share of the direction d_t = c G_t + λ₂ θ_t, and the part nobody owns
        share = torch.zeros(m_train, p, dtype=torch.float64)
        share[batch] = c * g / len(batch)
        independent_share = opt.l2 * theta_t
        opt.observe(share.sum(0) + independent_share, ck_next.lr)

        if truncate_memory:
            per_sample_buf.zero_()
        deltas = torch.zeros(m_train, p, dtype=torch.float64)
        for m in range(m_train):
            per_sample_buf[m], deltas[m] = opt.linear_step(per_sample_buf[m], share[m])
        independent_buf, independent_delta = opt.linear_step(independent_buf, independent_share)
        independent_delta = independent_delta - ck_next.lr * opt.decoupled * theta_t  # AdamW

        if not truncate_memory:  # the decomposition must rebuild the recorded update exactly
            recorded = theta_next - theta_t
            err = relative_error(deltas.sum(0) + independent_delta, recorded)
            assert err <= UPDATE_RTOL, f"update {t}: reference decomposition off by {err:.2e}"

        h = audit_direction(model, theta_t, theta_next, x_audit, y_audit, rule)
        influence += deltas @ h.T
        residual += h @ independent_delta
        ck = ck_next
    return influence.numpy(), residual.numpy(), clips


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case,rule", COMPARED, ids=[f"{c}-{r}" for c, r in COMPARED])
def test_replay_matches_naive_reference(case, rule, trained, tmp_path):
    run_dir = trained(case)
    start = time.perf_counter()
    influence, residual = replay_influence(run_dir, rule, tmp_path)
    ref_influence, ref_residual, clips = reference_audit(run_dir, rule)

    assert np.linalg.norm(ref_influence) > 1e-3  # a non-trivial audit
    if case == "adamw_clip_cosine":
        assert min(clips) < 1.0, "clipping never engaged; lower clip_grad_norm"
    if OPTIM_CASES[case].get("weight_decay"):
        assert np.abs(ref_residual).max() > 1e-6  # the residual comparison is not vacuous

    err = relative_error(influence, ref_influence)
    print(f"\n{case} {rule}: influence rel err {err:.3e}, residual max abs diff "
          f"{np.abs(residual - ref_residual).max():.3e} (|ref residual| max "
          f"{np.abs(ref_residual).max():.3e}), {time.perf_counter() - start:.2f}s")
    assert err <= INFLUENCE_RTOL
    np.testing.assert_allclose(residual, ref_residual, rtol=RESIDUAL_RTOL, atol=RESIDUAL_ATOL)


@pytest.mark.parametrize("control", ["truncated_momentum", "wrong_rule"])
def test_comparison_is_sensitive(control, trained, tmp_path):
    """Negative controls: a subtly wrong reference must NOT match replay."""
    run_dir = trained("sgd_momentum_dampening")
    influence, _ = replay_influence(run_dir, "trapezoid", tmp_path)
    if control == "truncated_momentum":  # forgets the 0.9-momentum tail of every example
        wrong, _, _ = reference_audit(run_dir, "trapezoid", truncate_memory=True)
    else:  # TracIn-like left endpoint instead of the trapezoid replay used
        wrong, _, _ = reference_audit(run_dir, "euler")
    err = relative_error(influence, wrong)
    print(f"\nnegative control {control}: rel diff {err:.3e}")
    assert err > 1e-3
