"""How the ranks of a torchrun replay split it (the plan each rank walks, and the line that says
so) and where a resumed one starts: the decisions before the walk. The collectives and the row
exchanges themselves are distributed.py's; the walk is replay.py's."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from plgk_cli.arguments import ReplayArguments
from plgk_cli.distributed import Shard, all_gather_object, max_over_ranks, newest_common, row_exchange
from plgk_cli.errors import AuditSpecError, StoreError
from plgk_cli.progress import peek as peek_progress
from plgk_cli.progress import previous_path

if TYPE_CHECKING:
    from plgk_cli.replay import ReplayPlan


def resume_from(args: ReplayArguments, shard: Shard, progress_file: Path) -> Path | None:
    """The progress file that --resume continues from, None to start afresh. Under torchrun the
    ranks agree on the newest step that each of them holds (its last commit or the one before)."""
    if not args.resume:
        return None
    if not shard.distributed:
        return progress_file if progress_file.exists() else None
    held, worlds = {}, set()
    for path in (previous_path(progress_file), progress_file):  # the newer wins a tie
        state = peek_progress(path) if path.exists() else None
        if state is not None and isinstance(state.get("walk", {}).get("next_step"), int):
            held[state["walk"]["next_step"]] = path
            worlds.add(state.get("world", 1))
    everyone = all_gather_object(shard, (sorted(held), sorted(worlds)))
    if not any(steps for steps, _ in everyone):
        return None
    made_by = sorted({w for _, ws in everyone for w in ws} - {shard.world})
    if made_by:  # a rank that holds nothing (more ranks than before) must hear it too
        raise AuditSpecError(f"{progress_file}: the progress was made by a replay of {made_by[0]} process(es), "
                             f"this one has {shard.world}; resume with as many, or start over with --overwrite")
    step = newest_common([steps for steps, _ in everyone])
    if step is None:
        ranks = ", ".join(f"rank {r}: {steps or 'none'}" for r, (steps, _) in enumerate(everyone))
        raise StoreError(f"{progress_file}: the ranks' progress files hold no step in common ({ranks}); "
                         "start over with --overwrite")
    if held[step] != progress_file:
        # the newer commit this rank holds is of a step not every rank reached: drop it, or the
        # next commit would move it to .previous in place of the step the ranks share
        os.replace(held[step], progress_file)
    return progress_file


PROBE_ROWS = 32  # training rows whose per-example gradients --shard auto times against their exchange


def shard_plan(plan: ReplayPlan, args: ReplayArguments, shard: Shard) -> tuple[ReplayPlan, str]:
    """This rank's plan under torchrun (its audit points; with --shard rows, its block of every
    minibatch's rows too) and a line saying how the ranks split the work."""
    rank_plan = dataclasses.replace(plan.for_audit_points(shard.audit_slice(plan.n_audit)), shard=shard)
    where = f"over {shard.world} ranks"
    if args.shard == "audit":
        return rank_plan, f"sharded by audit points {where} (--shard audit)"
    if plan.ghost_layers:
        if args.shard == "rows":
            raise AuditSpecError("--shard rows: --ghost credits its layers from ghost factors, which the "
                                 "ranks do not exchange; use --shard audit (or auto)")
        return rank_plan, f"sharded by audit points {where} (--shard auto: --ghost needs every row's factors)"
    rows_plan = dataclasses.replace(rank_plan, exchange=row_exchange(shard, plan.device))
    if args.shard == "rows":
        return rows_plan, f"sharded by training rows and audit points {where} (--shard rows)"
    k, *timings = _probe_rows(rows_plan)
    compute, exchange = max_over_ranks(shard, *timings)
    figures = (f"a per-example gradient took {compute / k * 1e3:.3g} ms, exchanging it "
               f"{exchange / k * 1e3:.3g} ms ({k}-row probe)")
    # rows spares each rank (1 - 1/R) of a minibatch's gradients and exchanges 1/R of it (per rank)
    if compute * (shard.world - 1) > exchange:
        return rows_plan, f"sharded by training rows and audit points {where} (--shard auto: {figures})"
    rows_plan.exchange.close()
    return rank_plan, f"sharded by audit points {where} (--shard auto: {figures})"


def _probe_rows(plan: ReplayPlan) -> tuple[int, float, float]:
    """(k, seconds for the per-example gradients of k training rows beyond those of one row,
    seconds to exchange k rows from every rank), each time the second of two timings (the first
    warms up); k = PROBE_ROWS, or the last minibatch's rows where it has fewer."""
    batch = plan.trajectory.flat(plan.total).checkpoint.batch.to(plan.device)
    k = min(len(batch), PROBE_ROWS)
    alone = dataclasses.replace(plan, exchange=None)
    t = plan.total - 1
    theta = plan.theta(t)

    def gradients(n: int) -> float:
        start = time.perf_counter()
        if plan.faithful:
            alone.training_pass(t, theta, batch, torch.arange(n, device=plan.device))
        else:
            alone.training_side(theta, batch[:n])
        return time.perf_counter() - start

    compute = 0.0
    for _ in range(2):
        one, many = gradients(1), gradients(k)
        compute = max(many - one, 0.0) * k / max(k - 1, 1) if k > 1 else many
    exchange = 0.0
    for _ in range(2):
        full, own = plan.exchange.rows("probe", k * plan.shard.world, plan.layout.size, plan.compute, plan.device)
        start = time.perf_counter()
        plan.exchange.gather(full, own)
        exchange = time.perf_counter() - start
    return k, compute, exchange
