"""An explicit float64 reference audit of a recorded language-model run (task ``language-model``).

Written from the trajectory alone (θ_t, the minibatch, lr, clip coefficient and the random state
each update's training forward started from) and from the task's definition as DESIGN.md v2 and
plgk_cli/tasks/language_model.py state it; it shares no code with plgk_cli.optimizers,
.gradients, .replay, .audit or the task class:

- the next-token loss by hand: token losses -log softmax(logits)[y] where y != -100, the sequence
  term ℓ_m = its mean token loss, the weight w_m = n_m / N_B (n_m its targets, N_B the batch's),
  the batch loss Σ_{m,t} ℓ_{m,t} / N_B (Hugging Face's token-weighted mean);
- per-example gradients of ℓ_m: ONE batched forward of the minibatch in train mode from the
  recorded generator state (the dropout masks of training), then one autograd backward per
  example through that same graph;
- the clip coefficient min(1, C / (‖∇L_B‖ + 1e-6)) by hand, checked against the recorded one;
- AdamW's update linearised by hand (tests/test_replay_reference.ReferenceAdam, decoupled decay):
  the second moments (the preconditioner) advanced on the full direction c ∇L_B, the first
  moment linear in it;
- audit gradients at θ in eval mode by plain autograd, one audit point and one quantity at a time;
- the influence two ways that must agree: forward in time, with one copy of Adam's exp_avg per
  training example fed only by its own share c w_m g_m, and backward in time, with one adjoint per
  audited quantity walked through the exp_avg recursion (W_s = a_s ⊙ h_s + β1 W_{s+1}).

``weighting="uniform"`` (w_m = 1/|B|) and ``dropout=False`` (per-example gradients from an
eval-mode forward, i.e. ignoring the recorded dropout masks) are the deliberately wrong variants
of the negative controls; whatever the shares, the part of c ∇L_B they do not cover goes to the
residual, so the update is still rebuilt exactly and only the per-example split is wrong.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_replay_reference import ReferenceAdam
from torch.func import functional_call

from plgk_cli.run import load_run

IGNORE = -100
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: c = min(1, C / (||G|| + 1e-6))
UPDATE_RTOL = 1e-10  # the reference's decomposition against the recorded float64 update
LOSS_RTOL = 1e-12  # the replayed training forward's loss against the recorded one (same dropout)


def token_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, T) -log p(y_t | x_<=t), 0 where y_t = IGNORE."""
    logp = torch.log_softmax(logits, dim=-1)
    has = y != IGNORE
    picked = logp.gather(-1, torch.where(has, y, 0)[..., None])[..., 0]
    return torch.where(has, -picked, torch.zeros_like(picked))


def quantities(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, 2 + T): loss (mean token loss), sequence-logprob (Σ log p), token-losses (T)."""
    tok = token_losses(logits, y)
    n = (y != IGNORE).sum(1).clamp_min(1).to(tok.dtype)
    return torch.cat([(tok.sum(1) / n)[:, None], -tok.sum(1, keepdim=True), tok], 1)


def quadrature_points(rule: str) -> list[tuple[float, float]]:
    if rule == "euler":
        return [(0.0, 1.0)]
    if rule == "trapezoid":
        return [(0.0, 0.5), (1.0, 0.5)]
    raise ValueError(rule)


class FlatGPT:
    """The run's model as a function of one flat float64 parameter vector (model order)."""

    def __init__(self, run):
        self.module = run.build_model().to(torch.float64)
        self.names = [n for n, _ in self.module.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in self.module.named_parameters()]
        self.size = sum(math.prod(s) for s in self.shapes)

    def flatten(self, params: dict) -> torch.Tensor:
        return torch.cat([params[n].detach().to(torch.float64).reshape(-1) for n in self.names])

    def unflatten(self, theta: torch.Tensor) -> dict:
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = math.prod(shape)
            out[name] = theta[offset:offset + size].view(shape)
            offset += size
        return out

    def __call__(self, theta: torch.Tensor, x: torch.Tensor, train: bool) -> torch.Tensor:
        self.module.train(train)
        return functional_call(self.module, self.unflatten(theta), (x,))


class LMReference:
    """The reference audit of one recorded run; ``audit(rule)`` gives influence and residual."""

    def __init__(self, run_dir, audit_rows: int, *, weighting: str = "tokens", dropout: bool = True):
        self.run = run = load_run(run_dir)
        self.faithful_variant = weighting == "tokens" and dropout
        self.model = model = FlatGPT(run)
        data = run.dataset
        x_train, y_train = data.x_train, data.y_train
        self.x_audit, self.y_audit = data.x_test[:audit_rows], data.y_test[:audit_rows]
        self.m_train, self.n_audit = len(y_train), audit_rows
        o = run.manifest["optimizer"]
        assert o["name"] == "adamw", "this reference linearises AdamW only"
        clip_norm = o["clip_grad_norm"]
        opt = ReferenceAdam(betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"],
                            amsgrad=o["amsgrad"], decoupled=True)
        self.beta1 = opt.b1
        p, m = model.size, self.m_train

        self.thetas = []
        self.steps = []  # per update: what both walks need
        self.clips, self.losses, self.rounding, self.dropout_effect = [], [], [], []
        ck = run.checkpoint(0)
        self.thetas.append(model.flatten(ck.params))
        for t in run.steps[:-1]:
            ck_next = run.checkpoint(t + 1)  # the record of update t -> t+1
            theta_t, theta_next = model.flatten(ck.params), model.flatten(ck_next.params)
            self.thetas.append(theta_next)
            batch = ck_next.batch
            x, y = x_train[batch], y_train[batch]
            assert "cpu" in ck_next.rng, "the training forward drew no random numbers (no dropout?)"

            # the training forward of update t, replayed: train mode, the recorded generator state
            leaf = theta_t.clone().requires_grad_(True)
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(ck_next.rng["cpu"])
                logits = model(leaf, x, train=True)
            tok = token_losses(logits, y)
            counts = (y != IGNORE).sum(1)
            n_batch = int(counts.sum())
            batch_loss = tok.sum() / n_batch
            (grad,) = torch.autograd.grad(batch_loss, leaf, retain_graph=True)
            self.losses.append((float(batch_loss.detach()), ck_next.loss))

            # per-example gradients of ℓ_m: one backward each, through the same graph, unless the
            # control asks for an eval-mode forward (no dropout masks)
            if dropout:
                terms = tok.sum(1) / counts.to(tok.dtype)
            else:
                leaf_eval = theta_t.clone().requires_grad_(True)
                with torch.no_grad():
                    self.dropout_effect.append(float((model(theta_t, x, train=False) - logits).abs().max()))
                terms = token_losses(model(leaf_eval, x, train=False), y).sum(1) / counts.to(tok.dtype)
                leaf = leaf_eval
            g = torch.stack([torch.autograd.grad(terms[i], leaf, retain_graph=True)[0]
                             for i in range(len(batch))])
            if weighting == "tokens":
                w = counts.to(torch.float64) / n_batch
            elif weighting == "uniform":
                w = torch.full((len(batch),), 1.0 / len(batch), dtype=torch.float64)
            else:
                raise ValueError(weighting)

            c = 1.0 if not clip_norm else min(1.0, clip_norm / (float(grad.norm()) + CLIP_EPS))
            assert c == pytest.approx(ck_next.clip_coef, rel=1e-12), (c, ck_next.clip_coef)
            self.clips.append(c)

            share = torch.zeros(m, p, dtype=torch.float64)
            share[batch] = c * w[:, None] * g  # c_s w_m g_{m,s}
            direction = c * grad  # d_s: what AdamW's rule saw (no coupled L2 term)
            unowned = direction - share.sum(0)  # float rounding (or the controls' mistake)
            self.rounding.append(float(unowned.norm() / direction.norm()))
            opt.observe(direction, ck_next.lr)
            self.steps.append({
                "theta": theta_t, "delta": theta_next - theta_t, "share": share, "unowned": unowned,
                "lr": ck_next.lr, "decoupled": -ck_next.lr * opt.decoupled * theta_t,
                "a": -(opt.lr / (1 - opt.b1 ** opt.step)) / opt.denom})  # Δθ = a ⊙ exp_avg + decoupled
            ck = ck_next

        # audit side: values and gradients of every quantity at every θ_t, eval mode
        self.values, self.grads = [], []
        for theta in self.thetas:
            values, grads = self.audit_gradients(theta)
            self.values.append(values)
            self.grads.append(grads)

    def audit_gradients(self, theta: torch.Tensor):
        """(N, Q) values and (N, Q, P) gradients, one audit point and one quantity at a time."""
        q = 2 + self.y_audit.shape[1]
        values = torch.zeros(self.n_audit, q, dtype=torch.float64)
        grads = torch.zeros(self.n_audit, q, self.model.size, dtype=torch.float64)
        for n in range(self.n_audit):
            leaf = theta.clone().requires_grad_(True)
            out = quantities(self.model(leaf, self.x_audit[n:n + 1], train=False), self.y_audit[n:n + 1])[0]
            values[n] = out.detach()
            for j in range(q):
                if out[j].requires_grad:  # a token without a target is the constant 0
                    grads[n, j] = torch.autograd.grad(out[j], leaf, retain_graph=True)[0]
        return values, grads

    def h(self, t: int, rule: str) -> torch.Tensor:
        """(N, Q, P): the rule's average of the audit gradients over θ_t -> θ_{t+1}."""
        return sum(weight * self.grads[t + int(s)] for s, weight in quadrature_points(rule))

    def audit(self, rule: str) -> dict:
        """influence (M, N, Q), residual (N, Q), the same by the adjoint walk, Σ_t Δθ_t·h_t,
        each segment's Δθ_t·h_t − Δq_t, and the worst relative update error of the decomposition."""
        m, p = self.m_train, self.model.size
        b1 = self.beta1
        hs = [self.h(t, rule) for t in range(len(self.steps))]

        # forward in time: one exp_avg copy per training example, one for the unowned part
        buf = torch.zeros(m, p, dtype=torch.float64)
        buf_unowned = torch.zeros(p, dtype=torch.float64)
        influence = torch.zeros(m, self.n_audit, hs[0].shape[1], dtype=torch.float64)
        residual = torch.zeros(self.n_audit, hs[0].shape[1], dtype=torch.float64)
        walked = torch.zeros_like(residual)
        segment_error, update_error = [], 0.0
        for t, (s, h) in enumerate(zip(self.steps, hs)):
            buf = b1 * buf + (1 - b1) * s["share"]
            buf_unowned = b1 * buf_unowned + (1 - b1) * s["unowned"]
            deltas = s["a"] * buf  # (M, P): each example's share of Δθ_t
            independent = s["a"] * buf_unowned + s["decoupled"]
            err = float((deltas.sum(0) + independent - s["delta"]).norm() / s["delta"].norm())
            update_error = max(update_error, err)
            influence += torch.einsum("mp,nqp->mnq", deltas, h)
            residual += torch.einsum("p,nqp->nq", independent, h)
            step_change = torch.einsum("p,nqp->nq", s["delta"], h)
            walked += step_change
            segment_error.append(step_change - (self.values[t + 1] - self.values[t]))

        # backward in time: adjoint W_s = a_s ⊙ h_s + β1 W_{s+1}; example m gets (1−β1) d_{m,s}·W_s
        adj_influence = torch.zeros_like(influence)
        adj_residual = torch.zeros_like(residual)
        w = torch.zeros_like(hs[0])
        for s, h in zip(reversed(self.steps), reversed(hs)):
            w = s["a"] * h + b1 * w
            adj_influence += (1 - b1) * torch.einsum("mp,nqp->mnq", s["share"], w)
            adj_residual += (1 - b1) * torch.einsum("p,nqp->nq", s["unowned"], w) + \
                torch.einsum("p,nqp->nq", s["decoupled"], h)
        return {"influence": influence.numpy(), "residual": residual.numpy(),
                    "adjoint_influence": adj_influence.numpy(), "adjoint_residual": adj_residual.numpy(),
                    "walked": walked.numpy(), "segment_error": torch.stack(segment_error).numpy(),
                    "true_change": (self.values[-1] - self.values[0]).numpy(),
                    "initial": self.values[0].numpy(), "final": self.values[-1].numpy(),
                    "update_error": update_error}


def split_targets(array: np.ndarray, length: int) -> dict:
    """(..., Q) columns -> {target: (...) or (..., T)} in replay's target names."""
    assert array.shape[-1] == 2 + length
    return {"loss": array[..., 0], "sequence-logprob": array[..., 1], "token-losses": array[..., 2:]}
