"""`plgk replay`: walk the checkpoint pairs backwards and write the complete training-data audit.

For every update t -> t+1 the audit-side gradient h_n(t) is the quadrature average of ∇q_n over the
segment θ_t -> θ_{t+1} (euler, trapezoid, composite trapezoid; paper 5.1 and A.2.7). Walking the
updates from the last to the first carries one adjoint column per audited quantity,
W(s) = lr_s p_s ⊙ h(s) + μ_{s+1} W(s+1) (optimizers.StepCoefficients.adjoint), so that momentum is
exact over the whole run and each step costs one GEMM between the minibatch's per-sample gradients
and the adjoints (DESIGN.md). Each step also re-derives the recorded update from the same
coefficients (the update check, a gate: a replay whose re-derived update differs from the recorded
one stops and names the step); what no sample owns goes to the residual.

Runs whose training forward is random or couples its batch (dropout, BatchNorm: ``Run.faithful``)
replay each update's training side as the recorded forward itself (the whole minibatch, train
mode, the recorded generator states and buffers) and credit example m with the gradient of its
own loss term, weighted w_m as the task says. Buffers that training changes (BatchNorm running
statistics b_s) are held at b_s over the segment θ_s -> θ_{s+1}, and the rest of the true change,
q(θ_{s+1}, b_{s+1}) − q(θ_{s+1}, b_s), is the segment's buffer part (DESIGN.md v2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import contextlib
import dataclasses
import functools
import json
import math
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from plgk_cli import _callable_module
from plgk_cli.arguments import ReplayArguments, check_vocabulary, resolve_audit_set, resolve_train_subset
from plgk_cli.audit import AuditAccumulator, completeness
from plgk_cli.check import validate_run
from plgk_cli.data import dataset_files, to_device
from plgk_cli.distributed import (SINGLE, BoundaryAgreement, RowExchange, Shard, barrier, column_mean,
                                  current_shard, gather_tensors_to_root)
from plgk_cli.distributed import finish as finish_distributed
from plgk_cli.distributed import init as init_distributed
from plgk_cli.geometry import compute_geometry
from plgk_cli.errors import (AuditSpecError, Interrupted, NonFiniteError, OutputError, StoreError,
                             TrajectoryError, UpdateCheckError)
from plgk_cli.gradients import (GradientComputer, ParameterLayout, Workspace, ghost_batch_gradient,
                                ghost_products, target_columns)
from plgk_cli.models import trial_forward, vocabulary
from plgk_cli.outputs import (Claim, check_apart_from_inputs, claim_output, output_lock, remedy,
                              write_failure)
from plgk_cli.progress import commit as commit_progress
from plgk_cli.progress import load as load_progress
from plgk_cli.progress import previous_path, progress_path
from plgk_cli.quadrature import adaptive_quadrature, quadrature
from plgk_cli.resimulate import FlatStep, TrajectoryView
from plgk_cli.run import Run, load_run
from plgk_cli.trajectory import read_manifest
from plgk_cli.sharding import resume_from, shard_plan
from plgk_cli.signals import GRACE_SECONDS, StopOverdue, StopRequest
from plgk_cli.tasks import task_code
from plgk_cli.store import (TargetResult, check_free_space, check_writable, partial_path,
                            write_influences)
from plgk_cli.threads import apply_default as apply_default_threads
from plgk_cli.train import resolve_device
from plgk_cli.update_check import check_forward, check_sum, diagnose, relative_error, worst_parameter

# The update check's gate by training dtype: float32 updates re-derived from per-example gradients
# agree to ~1e-7 (docs/results.md), a loss that is not the task's Σ w_m ℓ_m or masks that do not
# match miss by O(1).
MAX_UPDATE_ERROR = {torch.float32: 1e-3, torch.float64: 1e-8}
WALK_BUFFERS = 5  # P x columns float64 tensors the walk keeps: W, h, v, ∇q at a boundary, a spare


@dataclass(frozen=True)
class ReplaySummary:
    path: Path
    metrics: dict  # target -> {"mre", "lc", "rmre", "attribution_gap"}; empty on ranks > 0
    max_update_error: float
    steps: int
    rank: int = 0
    max_drift: float | None = None  # sparse runs: re-simulated θ against the stored checkpoints  # under torchrun: only rank 0 wrote the output
    warnings: tuple = ()  # lines the user must read beside the metrics (modes short of what was asked)
    sharding: str = ""  # under torchrun: how the ranks split the work, and why
    walk_seconds: float = 0.0  # the backward walk over the updates (this rank's)
    exchange_seconds: float = 0.0  # --shard rows: of it, exchanging the minibatch rows (waits included)
    row_share: float = 0.0  # --shard rows: the share of the minibatches' rows whose gradients this rank computed


def _row_mapping(run: Run, subset: torch.Tensor | None, group_by: str | None):
    """(row_of, train_index, train_label, group) for full, partial and grouped audits."""
    y = run.dataset.y_train
    m = len(y)
    audited = torch.arange(m) if subset is None else subset
    row_of = torch.full((m,), -1, dtype=torch.int64)
    if group_by == "label":
        groups = torch.unique(y[audited])
        row_of[audited] = torch.searchsorted(groups, y[audited])
        return row_of, audited, y[audited], groups
    row_of[audited] = torch.arange(len(audited))
    return row_of, audited, y[audited], None


CHECK_COLUMNS = 4096  # columns of ∇L_B = Σ_m w_m g_m that one product sums (ReplayPlan.batch_gradient)


@dataclass(frozen=True)
class ReplayPlan:
    """Everything fixed for one replay, derived from its arguments and the run (no state)."""

    args: ReplayArguments
    run: Run
    layout: ParameterLayout
    gradients: GradientComputer
    device: torch.device
    compute: torch.dtype  # gradients in the training dtype; everything accumulated in float64
    x_train: torch.Tensor
    y_train: torch.Tensor
    audit_set: object  # arguments.AuditSet
    x_audit: torch.Tensor
    y_audit: torch.Tensor
    columns: int  # N*Q audited quantities
    row_of: torch.Tensor
    train_index: torch.Tensor
    train_label: torch.Tensor
    group: torch.Tensor | None
    total: int  # number of updates T
    boundaries: tuple  # checkpoints where the audit side is evaluated (stride)
    trajectory: TrajectoryView  # θ_t at every step, re-simulated between sparse checkpoints
    workspace: Workspace  # the walk's per-sample gradient buffers, reused step to step
    ghost_layers: tuple = ()  # --ghost: the Linear layers credited by ghost dot products
    faithful: bool = False  # the training side is the recorded forward itself (Run.faithful)
    buffered: bool = False  # training changed buffers: the audit side holds b_s per segment
    max_update_error: float = 1e-3  # the update check's gate
    shard: Shard = SINGLE  # this process's place under torchrun
    exchange: RowExchange | None = None  # --shard rows: ranks compute blocks of each minibatch's rows

    @property
    def n_audit(self) -> int:
        return len(self.y_audit)

    def for_audit_points(self, points: slice) -> "ReplayPlan":
        """The same plan restricted to a contiguous range of audit points (a torchrun shard)."""
        q = self.columns // self.n_audit
        return dataclasses.replace(self, x_audit=self.x_audit[points], y_audit=self.y_audit[points],
                                   columns=(points.stop - points.start) * q)

    def theta(self, t: int) -> torch.Tensor:
        """θ_t, flat float64 on the replay's device."""
        return self.trajectory.flat(t).theta

    def buffers(self, t: int) -> dict:
        """The buffers training had after t updates (empty unless it changed any)."""
        return self.run.buffers(t, self.trajectory.flat(t).checkpoint) if self.buffered else {}

    def load_buffers(self, buffers: dict) -> None:
        """Put ``buffers`` into the model's own (what eval-mode passes read)."""
        with torch.no_grad():
            for name, value in buffers.items():
                self.gradients.model.get_buffer(name).copy_(value)

    def audit_side(self, theta: torch.Tensor, out: torch.Tensor | None = None, factors: dict | None = None,
                   buffers: dict | None = None):
        """Values (N*Q) and gradients (P x N*Q, column-major) of the audited quantities at θ (in
        eval mode, with ``buffers`` where given), float64; the gradients are written into ``out``
        (P x N*Q, column-major) if given, and the ghost factors of the layers named in
        ``factors`` filled in."""
        self.load_buffers(buffers or {})
        values, grads = self.gradients.audit_gradients(theta.to(self.compute), self.x_audit, self.y_audit,
                                                       self.args.targets, self._audit_out(out), factors)
        return self._columns(values, grads, out)

    def audit_and_training_side(self, theta: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None = None):
        """audit_side(θ, out) and the loss gradients of training rows ``rows`` at the same θ (B x P,
        float64, in the workspace under "shared"), from one batched pass where they fit one chunk."""
        theta = theta.to(self.compute)
        if self.exchange is None:
            values, grads, train = self.gradients.audit_and_loss_gradients(
                theta, self.x_audit, self.y_audit, self.args.targets, self.x_train[rows], self.y_train[rows],
                self._buffer("shared", len(rows), self.compute), self._audit_out(out))
            return (*self._columns(values, grads, out), self._float64("shared", train))
        audit = []  # this rank's audit side, from the pass that computes its block of the rows

        def compute(mine, block):
            if not len(mine):  # a minibatch smaller than the world: this rank has no rows of it
                audit.extend(self.gradients.audit_gradients(theta, self.x_audit, self.y_audit, self.args.targets,
                                                            self._audit_out(out)))
                return None
            values, grads, train = self.gradients.audit_and_loss_gradients(
                theta, self.x_audit, self.y_audit, self.args.targets, self.x_train[mine], self.y_train[mine],
                block, self._audit_out(out))
            audit.extend((values, grads))
            return train

        train = self._exchanged("shared", rows, compute)
        return (*self._columns(*audit, out), train)

    def _exchanged(self, name: str, rows: torch.Tensor, compute) -> torch.Tensor:
        """--shard rows: the per-example gradients of ``rows`` (B x P, float64), this rank computing
        those of its block with ``compute(its rows, out)`` (returning them in the training dtype, or
        None for no rows) and the exchange bringing the other blocks."""
        n = len(rows)
        dtype = torch.float64 if self.exchange.carries_float64 else self.compute
        full, own = self.exchange.rows(name, n, self.layout.size, dtype, self.device)
        mine = rows[self.shard.row_slice(n)]
        self.exchange.own_rows += len(mine)
        self.exchange.all_rows += n
        room = max(len(mine), 1)  # a faithful pass with no rows of its own still credits one, dropped
        block = own[:room] if dtype == self.compute else self._buffer(name, room, self.compute)
        computed = compute(mine, block)
        if computed is not None and computed.data_ptr() != own.data_ptr():
            own[:len(computed)].copy_(computed)  # into float64 here: each rank converts its own block
        return self._float64(name, self.exchange.gather(full, own)[:n])

    def _audit_out(self, out: torch.Tensor | None) -> torch.Tensor | None:
        """Where the gradient pass writes N x Q x P: straight into ``out`` in a float64 run."""
        if out is None or self.compute != torch.float64:
            return None
        return out.T.view(self.n_audit, self.columns // self.n_audit, -1)

    def training_pass(self, t: int, theta: torch.Tensor, batch: torch.Tensor, positions: torch.Tensor):
        """The recorded training forward of update t -> t+1 replayed (faithful runs): a
        gradients.TrainingPass whose per-example gradients (of the batch positions
        ``positions``) are float64, in the workspace under "train"."""
        record = self.trajectory.flat(t + 1).checkpoint
        if self.exchange is None:
            result = self.gradients.training_pass(
                theta.to(self.compute), self.x_train[batch], self.y_train[batch], record.rng, self.buffers(t),
                positions, self._buffer("train", len(positions), self.compute))
            return dataclasses.replace(result, sample_grads=self._float64("train", result.sample_grads))
        passes = []

        def compute(mine, block):
            mine = mine if len(mine) else positions[:1]
            passes.append(self.gradients.training_pass(
                theta.to(self.compute), self.x_train[batch], self.y_train[batch], record.rng, self.buffers(t),
                mine, block[:len(mine)]))
            return passes[0].sample_grads

        grads = self._exchanged("train", positions, compute)
        return dataclasses.replace(passes[0], sample_grads=grads)

    def training_side(self, theta: torch.Tensor, rows: torch.Tensor, factors: dict | None = None) -> torch.Tensor:
        """Loss gradients of training rows at θ (B x P, float64, in the workspace under "train");
        the layers named in ``factors`` get their ghost factors there instead (zeros in g)."""
        if self.exchange is None:
            g, _ = self.gradients.loss_gradients(theta.to(self.compute), self.x_train[rows], self.y_train[rows],
                                                 self._buffer("train", len(rows), self.compute), factors)
            return self._float64("train", g)
        theta = theta.to(self.compute)  # --ghost is audit-sharded: no factors here
        return self._exchanged("train", rows, lambda mine, block: self.gradients.loss_gradients(
            theta, self.x_train[mine], self.y_train[mine], block)[0] if len(mine) else None)

    def batch_gradient(self, g: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """∇L_B = Σ_m w_m g_m of the minibatch's per-example gradients g (B x P, float64; w_m =
        1/|B| where the task has no weights): what the update check re-derives the update from.
        Summed CHECK_COLUMNS columns at a time, so that under --shard rows each rank sums a share
        of the chunks, the exchange brings the others', and every rank holds the single process's
        vector bit for bit: summed whole on one rank, it was the one step of the walk that only
        one rank did (each rank waiting for the other's check every other update)."""
        if weights is None:
            weights = torch.full((len(g),), 1.0 / len(g), dtype=torch.float64, device=g.device)
        size = self.layout.size
        chunks = -(-size // CHECK_COLUMNS)
        if self.exchange is None:
            full = own = self.workspace.get("batch_gradient", chunks, CHECK_COLUMNS, torch.float64, self.device)
            mine = range(chunks)
        else:
            full, own = self.exchange.rows("batch_gradient", chunks, CHECK_COLUMNS, torch.float64, self.device)
            mine = range(*self.shard.row_slice(chunks).indices(chunks))
        for row, chunk in enumerate(mine):
            columns = slice(chunk * CHECK_COLUMNS, min((chunk + 1) * CHECK_COLUMNS, size))
            torch.mv(g[:, columns].T, weights, out=own[row, :columns.stop - columns.start])
        if self.exchange is not None:
            full = self.exchange.gather(full, own)
        return full.reshape(-1)[:size]

    def _buffer(self, name: str, rows: int, dtype) -> torch.Tensor:
        return self.workspace.get(name, rows, self.layout.size, dtype, self.device)

    def _float64(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.float64:
            return t
        return self._buffer(name + "64", len(t), torch.float64).copy_(t)

    def _columns(self, values: torch.Tensor, grads: torch.Tensor, out: torch.Tensor | None = None):
        columns = grads.reshape(self.columns, -1).T
        if out is None:
            columns = columns.to(torch.float64)
        elif columns.data_ptr() != out.data_ptr():
            columns = out.copy_(columns)
        else:
            columns = out
        return values.reshape(-1).to(torch.float64), columns


def chunk_for_budget(args: ReplayArguments, num_params: int, columns: int,
                     gradients_per_example: int) -> int:
    """Examples per batched gradient pass: --chunk-size, or what --memory-budget leaves after the
    walk's fixed tensors (W, h, v, ∇q at a boundary and a spare for the next one: 5 x P x
    columns, float64).
    A chunk holds up to Q per-example gradients of P floats, a float64 copy and vmap's
    intermediates: about 4 x 8 bytes per gradient entry."""
    if not args.memory_budget:
        return args.chunk_size
    budget = args.memory_budget * 1e6
    fixed = WALK_BUFFERS * num_params * columns * 8
    per_example = 4 * 8 * num_params * max(gradients_per_example, 1)
    if budget < fixed + per_example:
        raise AuditSpecError(f"--memory-budget: {args.memory_budget:g} MB is too small; the adjoints "
                             f"alone need {(fixed + per_example) / 1e6:.1f} MB ({WALK_BUFFERS} x {num_params} "
                             f"parameters x {columns} audited quantities in float64)")
    return max(1, int((budget - fixed) // per_example))


def plan_replay(args: ReplayArguments) -> ReplayPlan:
    """Validate the run and the arguments and build the plan; raises before any heavy work."""
    run = load_run(args.ckpts)
    problems = validate_run(args.ckpts, run=run)
    if problems:
        problems[0].raise_(more=len(problems) - 1)
    total = run.steps[-1]
    if total == 0:
        raise TrajectoryError(f"{run.path}: only step 0 is recorded; there is no update to audit")
    data = run.dataset
    audit_set = resolve_audit_set(args.audit_set, data, run.task)
    subset = resolve_train_subset(args.train_subset, len(data.y_train))
    device = resolve_device(args.device, where="--device")
    if device.type == "cuda" and current_shard().distributed:
        device = torch.device("cuda", current_shard().local_rank)  # one GPU per torchrun process
    compute = run.dtype
    task = run.task
    offered = [t for t in args.targets if t not in task.targets]
    if offered:
        raise AuditSpecError(f"--target: unknown target {offered[0]!r} for the run's task {task.name}; "
                             f"expected one of {', '.join(task.targets)}")
    model = run.build_model().to(device=device, dtype=compute)
    _try_user_code(run, model, data, device, compute)
    check_vocabulary(audit_set, vocabulary(model), task, data.num_classes)
    layout = ParameterLayout.of(model)
    label_shape = tuple(data.y_train.shape[1:])
    per_point = target_columns(args.targets, data.num_classes, task, label_shape)
    columns = len(audit_set.y) * per_point
    chunk = chunk_for_budget(args, layout.size, columns, gradients_per_example=per_point)
    faithful = run.faithful
    gradients = GradientComputer(model, layout, data.num_classes, chunk, task=task, label_shape=label_shape)
    args.modes_steps(total)  # --modes-at outside the run: refuse now, not after the walk
    if args.ghost and faithful:
        raise AuditSpecError("--ghost: the run's training forward is random or couples its batch "
                             "(dropout, BatchNorm); ghost dot products need per-example layer hooks: "
                             "drop --ghost")
    ghost_layers = _ghost_layers(args, run, gradients)
    if args.precondition and run.hyper.name == "sgd":
        raise AuditSpecError("--precondition: the run's optimizer is sgd, whose preconditioner is the "
                             "identity; drop --precondition")
    if args.group_by == "label" and task.label_kind != "class":
        raise AuditSpecError(f"--group-by label: the run's task {task.name} has no class labels to group "
                             "by; drop --group-by")
    row_of, train_index, train_label, group = _row_mapping(run, subset, args.group_by)
    x_train, y_train = to_device(data.x_train, device, compute), to_device(data.y_train, device, compute)
    return ReplayPlan(
        args=args, run=run, layout=layout, gradients=gradients, device=device, compute=compute,
        x_train=x_train, y_train=y_train,
        audit_set=audit_set, x_audit=to_device(audit_set.x, device, compute),
        y_audit=to_device(audit_set.y, device, compute), columns=columns,
        row_of=row_of, train_index=train_index, train_label=train_label, group=group, total=total,
        boundaries=tuple(range(0, total, args.stride)) + (total,),
        trajectory=TrajectoryView(run, layout, gradients, x_train, y_train, device, compute),
        workspace=Workspace(), ghost_layers=ghost_layers, faithful=faithful,
        buffered=bool(run.changing_buffers),
        max_update_error=args.max_update_error or MAX_UPDATE_ERROR[compute])


def _try_user_code(run: Run, model: torch.nn.Module, data, device, dtype) -> None:
    """The user's model forward and py: task loss on two training rows, before any work: code that
    trained once may raise now (edited since), which is a UserCodeError naming its line here
    rather than a traceback from inside the batched gradient passes."""
    x, y = to_device(data.x_train[:2], device, dtype), to_device(data.y_train[:2], device, dtype)
    output = trial_forward(model, run.manifest["model"]["name"], x)
    with torch.no_grad(), task_code(run.task, "batch_loss"):
        run.task.batch_loss(output, y)


def _adjoint_buffer(plan: ReplayPlan) -> torch.Tensor:
    """A P x columns float64 zero tensor stored column by column: the layout of the audit-side
    gradients (one contiguous P-vector per audited quantity). The walk's elementwise operations
    combine W, h and ∇q; with one layout for all of them they stream memory (measured on LeNet-5
    with 256 columns: the adjoint update took 63 ms with W row-major, 33 ms column-major)."""
    return torch.zeros(plan.columns, plan.layout.size, dtype=torch.float64, device=plan.device).T


def _ghost_layers(args: ReplayArguments, run: Run, gradients: GradientComputer) -> tuple:
    """--ghost: the Linear layers whose credit comes from ghost dot products; refuses runs where
    the products would not be the audit (paper A.2.8: plain SGD, where each update's v_s is a
    multiple of the audit gradients at θ_s)."""
    if not args.ghost:
        return ()
    hyper = run.hyper
    if hyper.name != "sgd" or hyper.momentum:
        raise AuditSpecError(f"--ghost: the run's optimizer is {hyper.name}"
                             f"{f' with momentum {hyper.momentum:g}' if hyper.momentum else ''}; ghost "
                             "dot products apply to plain SGD without momentum: drop --ghost")
    if len(run.groups) > 1 or run.manifest["optimizer"].get("frozen"):
        raise AuditSpecError("--ghost: the run has several parameter groups or parameters that were "
                             "frozen in some updates; ghost dot products need one rate for every Linear "
                             "layer's weight and bias at every step: drop --ghost")
    layers = gradients.linear_layers()
    if not layers:
        raise AuditSpecError("--ghost: the model has no Linear layer whose per-example gradients come "
                             "from layer hooks; drop --ghost")
    return layers


class WalkState:
    """What the backward walk carries from one update to the next (float64, mutable).

    ``next_step`` is the next update t (t -> t+1) to process, walking down; -1 when done.
    ``a_boundary`` holds ∇q at the lowest boundary set up so far, ``h`` the quadrature of the
    segment starting there (``h_start``); values of q at every boundary set up are in ``values``.
    """

    def __init__(self, plan: ReplayPlan, evaluate_end: bool = True, walking: bool = True):
        """``walking``: False for a finished walk's result (``stitched``), which needs no P x
        columns adjoints (with 256 columns on LeNet-5, half a gigabyte to allocate and zero)."""
        f64 = dict(dtype=torch.float64, device=plan.device)
        adjoint = (lambda: _adjoint_buffer(plan)) if walking else (lambda: None)
        num_rows = len(plan.group) if plan.group is not None else len(plan.train_index)
        epochs = plan.run.epoch_of(plan.total - 1) + 1
        self.acc = AuditAccumulator(plan.row_of, num_rows, plan.columns, plan.total, epochs,
                                    plan.layout.layers, plan.device, bounded=plan.args.quadrature.adaptive)
        self.w = adjoint()
        self.decay_next = 0.0
        self.values = torch.zeros(len(plan.boundaries), plan.columns, **f64)
        self.next_step = plan.total - 1
        self.h_start = plan.total
        self.a_boundary = adjoint()
        self.h = adjoint()
        # q(θ_end, b_end) − q(θ_end, b_start) of each segment: what the buffers' change did
        self.buffer_part = torch.zeros(len(plan.boundaries) - 1, plan.columns, **f64)
        # Each segment's own completeness error Δθ·h − Δq (both ends of q are known), the pieces
        # its rule used, and ‖h − h_coarser‖ of the nested rules (adaptive): the quadrature record.
        self.segment_error = torch.zeros(len(plan.boundaries) - 1, plan.columns, **f64)
        self.sub_intervals = torch.zeros(len(plan.boundaries) - 1, plan.columns, **f64)
        self.gradient_error = torch.zeros(len(plan.boundaries) - 1, plan.columns, **f64)
        # adaptive: h − h_coarser of the segment being walked (dh) and its adjoint (dw, dv), which
        # carry the per-example error bound the way w and v carry the influence
        self.dh = adjoint() if plan.args.quadrature.adaptive else None
        self.dw = adjoint() if plan.args.quadrature.adaptive else None
        self.dv = torch.empty_like(self.dw) if self.dw is not None else None
        # Buffers the walk reuses rather than allocating P x columns float64 tensors each step (a
        # fresh one costs its page faults on first write): v_s, and a free one for ∇q at the
        # next boundary. Not part of the walk's state.
        self.v = torch.empty_like(self.w) if walking else None
        self.spare: torch.Tensor | None = None
        if evaluate_end:
            self.values[-1], self.a_boundary = plan.audit_side(plan.theta(plan.total), out=self.a_boundary,
                                                               buffers=plan.buffers(plan.total))
            _require_finite(plan, plan.total, self.values[-1], self.a_boundary)

    @classmethod
    def stitched(cls, plan: ReplayPlan, shards: list) -> "WalkState":
        """The finished walk of the whole audit set from the ranks' finished walks (columns are
        the last axis of every walked tensor and ranks hold contiguous audit points, in order)."""
        state = cls(plan, evaluate_end=False, walking=False)
        tensors = {key: torch.cat([t[key] for t in shards], dim=-1) for key in shards[0]}
        tensors["audit/update_error"] = torch.stack([t["audit/update_error"] for t in shards]).amax(0)
        state.restore(tensors, {"next_step": -1, "h_start": 0, "decay_next": 0.0}, adjoints=False)
        return state

    ADJOINTS = ("w", "h", "a_boundary", "dh", "dw")  # P x columns: what the walk carries, not its result

    def tensors(self, adjoints: bool = True) -> dict:
        """The walk's state (a commit), or without ``adjoints`` what its result needs (the
        ranks' finished walks, gathered: the P x N adjoints are most of the bytes)."""
        records = {"walk/values": self.values, "walk/buffer_part": self.buffer_part,
                   "walk/segment_error": self.segment_error, "walk/sub_intervals": self.sub_intervals,
                   "walk/gradient_error": self.gradient_error, **self.acc.state_tensors()}
        if not adjoints:
            return records
        # Under euler h is ∇q at the boundary itself; a commit stores each tensor on its own.
        h = self.h.clone() if self.h is self.a_boundary else self.h
        # μ of the update above the walk: a vector where parameter groups have their own
        decay = {"walk/decay_next": self.decay_next} if isinstance(self.decay_next, torch.Tensor) else {}
        bound = {} if self.dh is None else {"walk/dh": self.dh, "walk/dw": self.dw}
        return {"walk/w": self.w, "walk/h": h, "walk/a_boundary": self.a_boundary, **decay, **bound, **records}

    def scalars(self) -> dict:
        decay = None if isinstance(self.decay_next, torch.Tensor) else self.decay_next
        return {"next_step": self.next_step, "h_start": self.h_start, "decay_next": decay}

    def restore(self, tensors: dict, scalars: dict, adjoints: bool = True) -> None:
        device = self.values.device
        names = ("values", "buffer_part", "segment_error", "sub_intervals", "gradient_error")
        if adjoints:
            names += tuple(name for name in self.ADJOINTS if getattr(self, name) is not None)
        for name in names:
            saved = tensors.get(f"walk/{name}")
            if saved is None:
                raise StoreError(f"progress: walk/{name} missing (written by an older plgk); start over "
                                 "with --overwrite")
            if saved.shape != getattr(self, name).shape:
                raise StoreError(f"progress: walk/{name} has shape {tuple(saved.shape)}, expected "
                                 f"{tuple(getattr(self, name).shape)}; start over with --overwrite")
            # Into the walk's own buffers, so that the layout (and with it every rounding) is the
            # one an uninterrupted walk has.
            getattr(self, name).copy_(saved.to(device))
        self.acc.load_state_tensors(tensors)
        self.next_step, self.h_start = int(scalars["next_step"]), int(scalars["h_start"])
        if scalars["decay_next"] is None:
            self.decay_next = tensors["walk/decay_next"].to(device=device, dtype=torch.float64)
        else:
            self.decay_next = float(scalars["decay_next"])


# Arguments that do not change the result: a resume may differ in them, and the output file does
# not store them (the progress file sits beside its output, so `out` is implied).
VOLATILE_ARGUMENTS = ("out", "overwrite", "resume", "commit_every", "commit_seconds", "shard")


def _identity(args: ReplayArguments) -> dict:
    """The arguments that determine the result, as JSON would give them back."""
    return json.loads(json.dumps({k: v for k, v in args.to_dict().items()
                                  if k not in VOLATILE_ARGUMENTS}))


def replay(args: ReplayArguments, *, progress: bool = True) -> ReplaySummary:
    """Replay the run named by ``args`` and write the audit; under torchrun every rank calls this
    and audits its shard of the audit set, rank 0 writes the one output (distributed.py)."""
    shard = current_shard()
    owned = init_distributed(shard)
    out = Path(args.out)
    progress_file = progress_path(out, shard.rank if shard.distributed else None)
    _check_output(args, out, progress_file)  # fail fast, before the claim creates its lock file
    with _claim_output(out) if shard.rank == 0 else contextlib.nullcontext():  # rank 0 writes it
        _check_output(args, out, progress_file)  # again: no other replay changes it from here on
        return _replay(args, shard, out, progress_file, progress, owned)


def _replay(args: ReplayArguments, shard: Shard, out: Path, progress_file: Path, progress: bool,
            owned: bool) -> ReplaySummary:
    """replay() once its output is claimed."""
    plan = plan_replay(args)
    check_free_space(out, _estimated_bytes(plan, 3 if shard.distributed else 2))
    rank_plan, sharding = plan, ""
    if shard.distributed:
        if plan.n_audit < shard.world:
            raise AuditSpecError(f"--audit-set: {plan.n_audit} audit points for {shard.world} ranks; "
                                 "use fewer processes or more audit points")
        rank_plan, sharding = shard_plan(plan, args, shard)

    state = WalkState(rank_plan)
    chosen = resume_from(args, shard, progress_file)
    if chosen is not None:
        tensors, saved = load_progress(chosen)  # resume_from has checked its world size
        if saved.get("run_id") != plan.run.run_id:
            raise AuditSpecError(f"{progress_file}: was made for run {saved.get('run_id')!r}, not "
                                 f"{plan.run.run_id!r}; start over with --overwrite")
        if saved.get("arguments") != _identity(args):
            old, new = saved.get("arguments", {}), _identity(args)
            differ = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                               if old.get(k) != new.get(k))
            raise AuditSpecError(f"{progress_file}: was made with other arguments ({differ}); resume "
                                 "with the same arguments or start over with --overwrite")
        state.restore(tensors, saved["walk"])
    else:
        for path in (progress_file, previous_path(progress_file)):
            path.unlink(missing_ok=True)  # --overwrite: start over

    def save():
        # Under torchrun every rank commits the same step (the walk agrees on when), keeps its
        # previous commit, and waits for the others: a kill at any moment leaves one step that
        # every rank holds.
        commit_progress(progress_file, state.tensors(), {"arguments": _identity(args),
                                                         "run_id": plan.run.run_id, "world": shard.world,
                                                         "walk": state.scalars()},
                        keep_previous=shard.distributed)
        barrier(shard)

    apply_default_threads(plan.layout.size, plan.device, progress and shard.rank == 0)
    bar = tqdm(total=plan.total, initial=plan.total - 1 - state.next_step, desc="replay",
               unit="step", disable=not progress or shard.rank != 0, dynamic_ncols=True)
    walk_start = time.perf_counter()
    with StopRequest() as stop:
        try:
            _walk(rank_plan, state, bar, stop, save, progress_file)
        except StopOverdue:
            bar.close()
            kept = (f"the progress committed before it is in {progress_file}: continue with --resume"
                    if progress_file.exists() else "nothing was committed yet: run it again")
            raise Interrupted(f"replay stopped during update {state.next_step} of {plan.total} "
                              f"(no update boundary within {GRACE_SECONDS} s of the signal); {kept}") from None
    bar.close()
    exchange = rank_plan.exchange
    timing = {"walk_seconds": time.perf_counter() - walk_start,
              "exchange_seconds": exchange.seconds if exchange is not None else 0.0,
              "row_share": exchange.own_rows / max(exchange.all_rows, 1) if exchange is not None else 0.0}

    _require_finite_results(rank_plan, state)
    if shard.distributed:
        gathered = gather_tensors_to_root(shard, {k: v.cpu() for k, v in state.tensors(adjoints=False).items()})
        if shard.rank == 0:
            state = WalkState.stitched(plan, gathered)
        del gathered  # the other ranks' walks, mapped from /dev/shm: the stitched state holds them now
    geometry = None
    if shard.rank == 0 and args.geometry:
        if not shard.distributed:
            save()  # the walk is done: a fault in the kernel pass resumes here
        geometry = compute_geometry(plan, progress)
    if shard.rank == 0:
        results = _target_results(state, plan)
        write_influences(
            out, arguments=_identity(args), manifest=plan.run.manifest, rule=args.rule,
            targets=list(args.targets), train_index=plan.train_index.numpy(),
            train_label=plan.train_label.numpy(), group=None if plan.group is None else plan.group.numpy(),
            audit_index=None if plan.audit_set.index is None else plan.audit_set.index.numpy(),
            audit_split=plan.audit_set.split, audit_source=plan.audit_set.source,
            audit_label=plan.audit_set.y.numpy(), results=results,
            update_error=state.acc.update_error.cpu().numpy(),
            layers=[name for name, _ in plan.layout.layers], complete_audit=args.train_subset is None,
            geometry=geometry, drift=plan.trajectory.drift, overwrite=True)
    finish_distributed(shard, owned)  # rank 0 has written the output before any rank returns
    if exchange is not None:
        exchange.close()
    for path in (progress_file, previous_path(progress_file)):
        path.unlink(missing_ok=True)
    if shard.rank != 0:
        return ReplaySummary(out, {}, float(state.acc.update_error.max()), plan.total, shard.rank, **timing)
    metrics = {r.name: {"mre": r.mre, "lc": r.lc, "rmre": r.rmre, "attribution_gap": r.attribution_gap}
               for r in results}
    drift = max(plan.trajectory.drift.values()) if plan.trajectory.drift else None
    return ReplaySummary(out, metrics, float(state.acc.update_error.max()), plan.total, max_drift=drift,
                         warnings=tuple(geometry.warnings) if geometry is not None else (), sharding=sharding,
                         **timing)


def _claim_output(out: Path) -> Claim:
    """The claim that makes this replay the one writer of ``out`` (outputs.claim_output)."""
    try:
        return claim_output(out)
    except OSError as exc:
        raise write_failure(output_lock(out), exc, f"{remedy(exc)} and run again") from None


def _check_output(args: ReplayArguments, out: Path, progress_file: Path) -> None:
    """Refuse an --out that is, or lies inside, an input (--overwrite or not), one that would
    clobber a finished output or an interrupted replay's progress, or one that cannot be written."""
    inputs = {"--ckpts": args.ckpts,
              **{option: spec for option, spec in (("--audit-set", args.audit_set),
                                                   ("--train-subset", args.train_subset))
                 if spec is not None and os.path.exists(spec)}}  # a file, not a split or a range
    try:  # the run's data too; a manifest that cannot be read is refused soon after, by plan_replay
        inputs.update(dataset_files(read_manifest(args.ckpts)["dataset"]["spec"]))
    except TrajectoryError:
        pass
    check_apart_from_inputs({"--out": out, "progress file": progress_file, "lock file": output_lock(out),
                             "temporary file": partial_path(out)}, inputs, "replay")
    held = next((p for p in (progress_file, previous_path(progress_file)) if p.exists()), None)
    if args.resume and held is None and out.exists() and not args.overwrite:
        raise OutputError(f"{out}: already complete; nothing to resume (pass --overwrite to redo it)")
    if held is not None and not (args.resume or args.overwrite):
        raise OutputError(f"{held}: an interrupted replay left its progress here; pass "
                          "--resume to continue it or --overwrite to start over")
    check_writable(out, args.overwrite or args.resume)


def _estimated_bytes(plan: ReplayPlan, commits_held: int = 2) -> int:
    """Output (float32 influence + float64 traces) plus ``commits_held`` progress commits (float64
    state): the old commit stays until the new one is renamed over it, and a torchrun rank keeps
    the one before that too (the ranks' commits together hold every column once)."""
    rows = len(plan.group) if plan.group is not None else len(plan.train_index)
    k = len(plan.boundaries)
    epochs = plan.run.epoch_of(plan.total - 1) + 1
    output = rows * plan.columns * 4 + 3 * k * plan.columns * 8
    commit = (3 * plan.layout.size + (1 + epochs) * rows + k + plan.total) * plan.columns * 8
    if plan.args.geometry:  # audit x train Gram and IPS, train x train on request
        m = len(plan.y_train)
        output += 2 * plan.n_audit * m * 8 + (2 * m * m * 8 if plan.args.kernel_train else 0)
    return output + commits_held * commit


def _walk(plan: ReplayPlan, state: WalkState, bar, stop: StopRequest, save, progress_file: Path) -> None:
    run, args = plan.run, plan.args
    decomposition = run.decomposition
    last_commit_time, since_commit = time.monotonic(), 0
    boundary_time = last_commit_time  # of the last update boundary
    agreement = BoundaryAgreement(plan.shard)

    def request() -> tuple[bool, bool]:
        """(stop, commit) as this process sees it: a commit is due at the boundary where the
        ranks act on it (``lag`` after this one) once --commit-every updates or --commit-seconds
        have passed."""
        due = (args.commit_every and since_commit + agreement.lag >= args.commit_every) or \
            time.monotonic() - last_commit_time >= args.commit_seconds
        return stop.requested, bool(due)

    segments = list(zip(plan.boundaries, plan.boundaries[1:]))
    budget = _error_budget(plan, state, len(segments)) if args.quadrature.adaptive else None
    for index in range(len(segments) - 1, -1, -1):
        seg_start, seg_end = segments[index]
        if seg_start > state.next_step:
            continue
        shared = None  # update seg_start's per-sample gradients, from the audit side's pass at θ_start
        ghost_audit = None  # --ghost: the audit side's factors at θ_start (stride 1: set up below)
        if state.h_start != seg_start:  # set this segment up: ∇q at its start, quadrature
            theta_start, theta_end = plan.theta(seg_start), plan.theta(seg_end)
            # Shared only where the segment is its single update: a longer one resumed in the
            # middle would compute update seg_start in a separate pass, which rounds differently,
            # and a resumed replay must equal an uninterrupted one bit for bit. The whole
            # minibatch, audited or not: the update check sums all its per-example gradients.
            rows = plan.trajectory.flat(seg_start + 1).checkpoint.batch.to(plan.device) \
                if seg_end - seg_start == 1 and not (plan.ghost_layers or plan.faithful) else ()
            held = plan.buffers(seg_start)  # b_start, held over the segment
            if plan.ghost_layers:
                ghost_audit = dict.fromkeys(plan.ghost_layers)
            if len(rows):
                values, a_start, shared = plan.audit_and_training_side(theta_start, rows, state.spare)
            else:
                values, a_start = plan.audit_side(theta_start, state.spare, ghost_audit, buffers=held)
            _require_finite(plan, seg_start, values, a_start)
            state.values[index] = values
            previous_h, a_end = state.h, state.a_boundary
            free = previous_h if previous_h is not a_end else None  # the finished segment's h
            a_end_held = a_end
            if plan.buffered:  # ∇q at θ_end with b_start; the rest of the change is the buffers'
                end_values, a_end_held = plan.audit_side(theta_end, buffers=held)
                state.buffer_part[index] = state.values[index + 1] - end_values
            rule = args.quadrature
            q_change = (end_values if plan.buffered else state.values[index + 1]) - values
            audit_at = functools.partial(plan.audit_side, buffers=held)
            if rule.adaptive:
                # q is evaluated in the compute dtype: its rounding is a floor for the measured error
                mean = functools.partial(column_mean, plan.shard)  # every rank decides as one process
                noise = 16 * torch.finfo(plan.compute).eps * mean(values.abs())
                state.h, pieces = adaptive_quadrature(rule, a_start, a_end_held, theta_start, theta_end,
                                                      q_change, max(budget, noise), audit_at, out=free,
                                                      coarse_out=state.dh, mean=mean)
                state.gradient_error[index] = state.dh.norm(dim=0)
            else:
                state.h = quadrature(rule.sub_intervals, a_start, a_end_held, theta_start, theta_end,
                                     audit_at, out=free)
                pieces = rule.sub_intervals
            _require_finite(plan, seg_start, None, state.h, seg_end)
            state.segment_error[index] = (theta_end - theta_start) @ state.h - q_change
            state.sub_intervals[index] = pieces
            state.a_boundary, state.h_start = a_start, seg_start
            state.spare = a_end if a_end is not state.h else None
        for t in range(state.next_step, seg_start - 1, -1):
            _audit_update(plan, state, decomposition, t, plan.trajectory.flat(t), plan.trajectory.flat(t + 1),
                          shared if t == seg_start else None, ghost_audit)
            if t == 0 or run.epoch_of(t - 1) != run.epoch_of(t):  # t is its epoch's first step
                state.acc.close_epoch(run.epoch_of(t))
            state.next_step = t - 1
            bar.update(1)
            since_commit += 1
            # under torchrun the ranks commit and stop together: a signal or a due commit on one
            # is one on all, one boundary later (each holds the same step, so a resume finds a
            # step all of them hold)
            stopping, due = agreement.decide(request, last=t == 0)
            if stopping or (due and state.next_step >= 0):
                with stop.committing():
                    save()
                last_commit_time, since_commit = time.monotonic(), 0
                # a signal during the commit stops one process here; ranks stop at the next boundary
                stopping = stopping or (stop.requested and not plan.shard.distributed)
            if stopping:
                raise Interrupted(f"replay stopped at step {t} of {plan.total}; progress committed "
                                  f"to {progress_file}: continue with --resume")
            now = time.monotonic()
            update_seconds, boundary_time = now - boundary_time, now
            if t > 0:
                agreement.post(request)
                if stop.requested and agreement.lag:  # acted on at the end of the next update
                    stop.extend(2 * update_seconds)


def _audited_quantity(plan: ReplayPlan, column: int) -> tuple[int, str]:
    """(audit point, target) of a column of the walk's N*Q columns."""
    point, within = divmod(column, plan.columns // plan.n_audit)
    for target in plan.args.targets:
        width = plan.run.task.target_width(target, plan.gradients.num_classes, plan.gradients.label_shape)
        if within < width:
            break
        within -= width
    return point, target


FINITE_ADVICE = ("an audited quantity must be finite along the whole run (an infinite loss: a point the "
                 "model gives zero probability, or inputs that overflow): leave the point out of the audit set")


def _require_finite(plan: ReplayPlan, step: int, values: torch.Tensor | None, gradients: torch.Tensor,
                    segment_end: int | None = None) -> None:
    """NonFiniteError naming the first audited quantity that is NaN/Inf, or whose gradient is,
    at θ_step (``segment_end``: inside the segment step -> segment_end, the quadrature's h):
    its influences would be NaN, and the completeness metrics with them."""
    # A column sum is NaN or infinite wherever one of its entries is: one streaming pass over
    # the P x columns gradients (measured on LeNet-5 with 256 columns: 9 ms, against 180 ms for
    # isfinite(gradients).all(0), a third of a replay step on one thread). Only a sum that
    # overflows from finite entries needs the entrywise test.
    for entrywise in (False, True):
        finite = torch.isfinite(gradients).all(0) if entrywise else torch.isfinite(gradients.sum(0))
        if values is not None:
            finite &= torch.isfinite(values)
        if bool(finite.all()):
            return
    column = int((~finite).nonzero()[0])
    point, target = _audited_quantity(plan, column)
    if values is not None and not torch.isfinite(values[column]):
        what = f"is {float(values[column])}"
    else:
        what = "has a non-finite gradient"
    where = f"at step {step}" if segment_end is None else f"between steps {step} and {segment_end}"
    raise NonFiniteError(f"--audit-set {plan.audit_set.source}: audit point {point}'s {target} {what} {where}; "
                         + FINITE_ADVICE)


FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # the output stores influences as float32


def _require_finite_results(plan: ReplayPlan, state: WalkState) -> None:
    """The walk's sums, finite and storable: quantities of finite but huge values (inputs near the
    dtype's limit) can overflow the influences even where q and ∇q did not."""
    influence = state.acc.influence
    worst = torch.nan_to_num(influence.abs(), nan=math.inf).amax(0)
    worst = torch.maximum(worst, torch.nan_to_num(state.acc.residual.abs(), nan=math.inf))
    bad = worst > FLOAT32_MAX
    if not bool(bad.any()):
        return
    column = int(bad.nonzero()[0])
    point, target = _audited_quantity(plan, column)
    raise NonFiniteError(f"--audit-set {plan.audit_set.source}: audit point {point}'s {target}: its influences "
                         f"overflow (reach {float(worst[column]):.3g}, beyond float32's {FLOAT32_MAX:.3g} that "
                         f"the output stores; the quantity is {float(state.values[-1, column]):.3g} at the end); "
                         + FINITE_ADVICE)


def _audit_update(plan: ReplayPlan, state: WalkState, decomposition, t: int, step: FlatStep,
                  step_next: FlatStep, sample_grads: torch.Tensor | None = None,
                  ghost_audit: dict | None = None) -> None:
    """One update t -> t+1: adjoint step, per-sample credit, residual, update check.
    ``sample_grads``: the loss gradients of the whole minibatch at θ_t when already computed;
    ``ghost_audit``: the audit side's ghost factors at θ_t (--ghost)."""
    layout, device, run = plan.layout, plan.device, plan.run
    theta_t, theta_next, before, after = step.theta, step_next.theta, step.state, step_next.state
    ck_next = step_next.checkpoint
    batch = ck_next.batch.to(device)
    clip = ck_next.clip_coef
    hp = run.update_hyper(ck_next, device)
    frozen = run.frozen_coordinates(ck_next, device)  # their gradient was zeros or None, not the loss's

    coeffs = decomposition.coefficients(before, after, hp, clip)
    dv = None
    if state.dh is not None:  # the same adjoint of h − h_coarser: how far v may be off
        state.dw, dv = coeffs.adjoint(state.dw, state.decay_next, state.dh, out=state.dv)
    state.w, v = coeffs.adjoint(state.w, state.decay_next, state.h, out=state.v)
    state.decay_next = coeffs.decay

    acc = state.acc
    audited = _audited(batch, acc.row_of)
    partial = len(audited) < len(batch)  # a partial audit's batch with examples it does not credit
    weights = run.task.weights(plan.y_train[batch])  # w_m; None: the mean over the batch
    weights = None if weights is None else weights.to(device=device, dtype=torch.float64)
    positions = None  # of the audited rows in the batch, where per-row work needs them
    if plan.faithful or weights is not None or partial:
        positions = (acc.row_of[batch] >= 0).nonzero().reshape(-1)
    ghost_train = dict.fromkeys(plan.ghost_layers) if ghost_audit is not None else None
    replayed = None
    if plan.faithful:  # the recorded training forward itself, all of the batch
        replayed = plan.training_pass(t, theta_t, batch, positions)
        g = replayed.sample_grads
        check_forward(plan, t, replayed, ck_next)
    else:
        # Every example of the batch, credited or not: the update check re-derives the update
        # from their sum, so that a partial audit's check is the full audit's, bit for bit, and
        # tests the per-example gradients it credits (a batch-mean pass would reproduce
        # training's own float32 gradient instead and test none of them).
        g = sample_grads if sample_grads is not None else plan.training_side(theta_t, batch, ghost_train)
    parts = None
    if ghost_train is not None:
        ghost_train = {name: _float64_factors(f) for name, f in ghost_train.items()}
        parts = _ghost_parts(plan, coeffs, ghost_train, ghost_audit)
        if partial:
            parts = {layer: part[positions] for layer, part in parts.items()}
    # Under torchrun each update's check runs on one rank: every rank credits the same per-example
    # gradients (computed alike, or exchanged), and the stitched record takes each step's largest.
    checked = plan.shard.checks_update(t)
    rounding = None  # faithful runs: ∇L_B − Σ_m w_m g_m, what float rounding leaves to no example
    batch_grad = None
    if replayed is not None:
        batch_grad = replayed.batch_grad.to(torch.float64)
        if not partial:
            rounding = batch_grad - (g.sum(0) / len(batch) if weights is None else weights @ g)
            check_sum(plan, t, rounding, batch_grad)
    else:
        if checked or plan.exchange is not None:  # ∇L_B = Σ_m w_m g_m: the check tests the per-example
            batch_grad = plan.batch_gradient(g, weights)  # gradients (under rows each rank sums its share)
            for name, factors in (ghost_train or {}).items():  # those layers are not in g
                for kind, sl in plan.gradients.layer_parameters(name):
                    batch_grad[sl] = ghost_batch_gradient(factors, kind) / len(batch)
        if partial:  # credit only the audited rows
            g = torch.index_select(g, 0, positions, out=plan.workspace.get(
                "audited64", len(positions), layout.size, torch.float64, device))
    if frozen is not None:  # the optimizer saw no gradient there
        g = g.masked_fill(frozen, 0.0)
        if batch_grad is not None:
            batch_grad = batch_grad.masked_fill(frozen, 0.0)
        if rounding is not None:
            rounding = rounding.masked_fill(frozen, 0.0)
    scale = clip / len(batch) if weights is None else clip * weights[positions]  # c_s w_m
    acc.add_samples(audited, g, scale, v, run.epoch_of(t), parts, dv)
    acc.add_residual(coeffs.residual(theta_t, v, state.h))
    if rounding is not None:
        # A coordinate whose gradient is zero in exact arithmetic (a key bias of attention: softmax
        # ignores a shift shared by all keys) holds float rounding alone, which Adam scales up to
        # full steps; no example owns it, so it goes through the same v_s into the residual.
        acc.add_residual(clip * (rounding @ v))

    recorded_delta = theta_next - theta_t
    worst = 0.0  # another rank's check: its figure is the one the stitched record keeps
    if checked:
        delta, predicted_state, _ = decomposition.simulate(before, theta_t, batch_grad, hp, clip)
        errors = [relative_error(delta, recorded_delta, theta_next, run.dtype)]
        for key in (k for k in predicted_state if k in after):  # where the run holds the state
            held = step_next.held.get(key)
            predicted, recorded = (predicted_state[key], after[key]) if held is None else \
                (predicted_state[key][held], after[key][held])
            errors.append(relative_error(predicted, recorded, recorded, run.dtype))
        # NaN (a record that contradicts itself, e.g. a bias correction of a parameter never
        # stepped) must fail the gate, and max() would drop it behind a finite error
        worst = math.nan if any(math.isnan(e) for e in errors) else max(errors)
    acc.record_step(t, recorded_delta, state.h, worst)
    if not worst <= plan.max_update_error:
        raise UpdateCheckError(f"{run.path}: update {t} -> {t + 1} re-derived from the per-example "
                               f"gradients differs from the recorded one by {worst:.1e} (gate "
                               f"{plan.max_update_error:g}; most in {worst_parameter(plan, delta, recorded_delta, theta_next)}): "
                               f"{diagnose(plan, t)}; the audit would not describe this run "
                               "(--accept-update-error E proceeds up to E and records it)")


def _audited(batch: torch.Tensor, row_of: torch.Tensor) -> torch.Tensor:
    """The training indices of a minibatch that the audit credits (all but a partial audit's others)."""
    return batch[row_of[batch] >= 0]


def _float64_factors(factors: tuple) -> tuple:
    inputs, deltas = factors
    return inputs.to(torch.float64), [d.to(torch.float64) for d in deltas]


def _ghost_parts(plan: ReplayPlan, coeffs, train: dict, audit: dict) -> dict:
    """{layer index: g_m · v_s over that layer (B x N*Q)} for the ghost layers' trainable weights and
    biases. With plain SGD the walk's W(s) = lr_s p_s h(s) (no momentum carries later steps), so
    v_s = κ h(s) with κ = −(a_s lr_s p_s + lr_s e_s), and under euler h(s) is the audit gradient at
    θ_s, whose factors the audit side recorded."""
    kappa = -(coeffs.a * coeffs.lr * coeffs.p + coeffs.lr * coeffs.e)
    starts = [(sl.start, sl.stop, i) for i, (_, sl) in enumerate(plan.layout.layers)]
    parts: dict = {}
    for name, factors in train.items():
        products = ghost_products(factors, _float64_factors(audit[name]))
        for kind, sl in plan.gradients.layer_parameters(name):  # only the trainable ones
            layer = next(i for start, stop, i in starts if start <= sl.start < stop)
            part = kappa * products[kind].reshape(len(products[kind]), -1)
            parts[layer] = part if layer not in parts else parts[layer] + part
    return parts


def _error_budget(plan: ReplayPlan, state: WalkState, segments: int) -> float:
    """adaptive:TOL's tolerance of each segment's mean error: TOL × mean |q(θ_T) − q(θ_0)| shared
    equally, so the segments' errors cannot add up to more than TOL × the mean true change (the
    rel. MRE is certified to TOL, up to the rounding floor of q)."""
    q_start, _ = plan.audit_side(plan.theta(0), buffers=plan.buffers(0))
    return plan.args.quadrature.tolerance * column_mean(plan.shard, (state.values[-1] - q_start).abs()) / segments


def _target_results(state: WalkState, plan: ReplayPlan) -> list:
    acc, boundaries, targets = state.acc, list(plan.boundaries), plan.args.targets
    args_adaptive = plan.args.quadrature.adaptive
    n_audit, num_classes = plan.n_audit, plan.gradients.num_classes
    complete = plan.args.train_subset is None
    q = plan.columns // n_audit
    cols = lambda x: x.reshape(*x.shape[:-1], n_audit, q)  # noqa: E731 (columns -> (N, Q))
    values = state.values  # (K, N*Q): q at every boundary
    true_change = values - values[0]
    steps_done = torch.cumsum(acc.step_change, 0)
    reconstructed = torch.cat([torch.zeros_like(values[:1]), steps_done[[b - 1 for b in boundaries[1:]]]])
    attributed = acc.influence.sum(0) + acc.residual
    buffer_residual = state.buffer_part.sum(0)
    walked = steps_done[-1]  # Σ_t Δθ_t · h(t): what the audit must add up to
    if plan.buffered:  # the parameter path's audit plus what the buffers' changes did
        reconstructed[1:] += torch.cumsum(state.buffer_part, 0)
        attributed = attributed + buffer_residual
        walked = walked + buffer_residual
    net, gross = acc.net_and_gross()
    results, offset = [], 0
    for target in targets:
        width = plan.run.task.target_width(target, num_classes, plan.gradients.label_shape)
        sl = slice(offset, offset + width)
        offset += width

        def pick(x, sl=sl, width=width):
            y = cols(x)[..., sl].cpu().numpy()
            return y if width > 1 else y[..., 0]

        metrics = completeness(cols(attributed)[..., sl].reshape(-1), cols(true_change[-1])[..., sl].reshape(-1))
        gap = (cols(attributed - walked)[..., sl]).abs().max() / \
            max(float(cols(walked)[..., sl].abs().max()), 1e-300)
        results.append(TargetResult(
            name=target, influence=pick(acc.influence), residual=pick(acc.residual),
            initial=pick(values[0]), final=pick(values[-1]), trace_step=np.array(boundaries),
            buffer_residual=pick(buffer_residual) if plan.buffered else None,
            trace_true_change=pick(true_change), trace_reconstructed=pick(reconstructed),
            layer_epoch_signed=pick(acc.layer_epoch_signed), layer_epoch_abs=pick(acc.layer_epoch_abs),
            net=pick(net), gross=pick(gross), mre=metrics.mre, lc=metrics.lc, rmre=metrics.rmre,
            attribution_gap=float(gap) if complete else float("nan"),
            segment_error=pick(state.segment_error), sub_intervals=pick(state.sub_intervals).astype(np.int64),
            gradient_error=pick(state.gradient_error) if args_adaptive else None,
            error_bound=pick(acc.error_bound) if acc.error_bound is not None else None))
    return results


_callable_module(__name__, "replay")  # plgk_cli.replay(...) stays the function once this module is imported
