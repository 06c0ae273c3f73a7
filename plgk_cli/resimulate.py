"""θ_t and the optimizer state at every step of a run, also of a sparse one.

A run recorded with ``[checkpoint] every = K`` stores θ and the optimizer state every K-th step
(and at the end) and the update record (batch, lr, clip coefficient) of every step. The steps in
between are re-simulated from the last stored checkpoint with the optimizer decomposition that
replay uses (optimizers.Decomposition.simulate: the same coefficients as the adjoint walk and the
update check), rounding θ and the state to the training dtype after each step as training stored
them. Where a re-simulated block reaches the next stored checkpoint, the relative distance between
the two (against the block's own motion) is the drift, reported in the output.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from plgk_cli.errors import TrajectoryError
from plgk_cli.trajectory import Checkpoint, checkpoint_path

BLOCKS_CACHED = 2  # the walk's block and the audit side's segment start may lie in different blocks
# The walk reads θ_t and θ_{t+1} for update t and the segment ends for the audit side: with three
# flattened steps kept, every step is read and flattened once at --stride 1 (a segment start
# twice with a longer stride).
FLAT_CACHED = 3
PREFETCH_MIN_BYTES = 1 << 20


@dataclass(frozen=True)
class FlatStep:
    """Step t as the walk uses it: θ_t and the optimizer state after t updates as flat float64
    vectors in layout order, and the checkpoint (with the record of update t-1 -> t)."""

    checkpoint: Checkpoint
    theta: torch.Tensor
    state: dict  # torch state key -> flat float64 vector (zeros where a parameter has none yet)
    held: dict  # state key -> bool vector where only some parameters hold it (others: complete)


class TrajectoryView:
    def __init__(self, run, layout, gradients, x_train, y_train, device, compute):
        self.run, self.layout, self.gradients = run, layout, gradients
        self.x_train, self.y_train, self.device, self.compute = x_train, y_train, device, compute
        self.every = int(run.manifest.get("checkpoint_every", 1))
        self.drift: dict[int, float] = {}  # stored step -> drift of the block ending there
        self._blocks: dict[int, dict] = {}
        # The walk goes backwards: while step t is computed, step t-1 is read in the background.
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plgk-prefetch")
        # Handing a read to the thread costs about a millisecond of contention (measured on the
        # digits demo: 2.3 ms per step with prefetch against 1.3 ms without); it pays for itself
        # only where reading a step takes longer than that.
        final = checkpoint_path(run.path, run.steps[-1])
        self._prefetch = final.is_file() and final.stat().st_size >= PREFETCH_MIN_BYTES
        self._ahead: dict = {}
        self._flat: OrderedDict = OrderedDict()

    def flat(self, t: int) -> FlatStep:
        if t in self._flat:
            self._flat.move_to_end(t)
            return self._flat[t]
        ck = self.checkpoint(t)
        try:
            state = self.layout.flatten_state(ck.optim_state, self.device)
        except (ValueError, RuntimeError) as exc:
            raise TrajectoryError(f"{checkpoint_path(self.run.path, t)}: {exc}; the run's optimizer "
                                  "state is inconsistent") from None
        step = FlatStep(ck, self.layout.flatten(ck.params, device=self.device), state,
                        self.layout.state_held(ck.optim_state, self.device))
        self._flat[t] = step
        if len(self._flat) > FLAT_CACHED:
            self._flat.popitem(last=False)
        return step

    def _read(self, t: int) -> Checkpoint:
        future = self._ahead.pop(t, None)
        ck = future.result() if future is not None else self.run.checkpoint(t)
        if t > 0 and t - 1 not in self._ahead and self._prefetch:
            self._ahead = {t - 1: self._reader.submit(self.run.checkpoint, t - 1)}
        return ck

    def checkpoint(self, t: int) -> Checkpoint:
        ck = self._read(t)
        if ck.full:
            return ck
        base = t - t % self.every
        if base not in self._blocks:
            if len(self._blocks) >= BLOCKS_CACHED:
                self._blocks.pop(next(iter(self._blocks)))
            self._blocks[base] = self._simulate_block(base)
        return self._blocks[base][t]

    def _simulate_block(self, base: int) -> dict:
        run, layout = self.run, self.layout
        total = run.steps[-1]
        end = min(base + self.every, total)
        start = run.checkpoint(base)
        theta = layout.flatten(start.params, device=self.device)
        theta_start = theta
        state = layout.flatten_state(start.optim_state, self.device)
        block = {}
        for s in range(base + 1, end + 1):
            record = run.checkpoint(s)
            batch = record.batch.to(self.device)
            grad = self.gradients.mean_loss_gradient(theta.to(self.compute), self.x_train[batch],
                                                     self.y_train[batch]).to(torch.float64)
            delta, state, _ = run.decomposition.simulate(state, theta, grad,
                                                         run.update_hyper(record, self.device),
                                                         record.clip_coef)
            theta = self._stored(theta + delta)
            state = {k: self._stored(v) for k, v in state.items()}
            if record.full:  # the next stored checkpoint: how far did re-simulation drift?
                stored = layout.flatten(record.params, device=self.device)
                motion = (stored - theta_start).norm()
                self.drift[s] = float((theta - stored).norm() / motion) if motion > 0 else 0.0
            else:
                block[s] = Checkpoint(
                    step=s, params=layout.unflatten(theta.to(run.dtype)),
                    optim_state=self._per_parameter(state), optim_step=record.optim_step,
                    batch=record.batch, lr=record.lr, clip_coef=record.clip_coef, loss=record.loss,
                    hyper=record.hyper)
        return block

    def _stored(self, x: torch.Tensor) -> torch.Tensor:
        """As training stored it: rounded to the training dtype (float32 runs), kept in float64."""
        return x.to(self.run.dtype).to(torch.float64)

    def _per_parameter(self, state: dict) -> dict:
        out = {name: {} for name in self.layout.names}
        for key, flat in state.items():
            for name, tensor in self.layout.unflatten(flat.to(self.run.dtype)).items():
                out[name][key] = tensor
        return out
