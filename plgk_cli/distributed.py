"""Scale-out under torchrun: the audit set's points are split into contiguous shards, one per rank.

Each rank walks the whole trajectory for its audit points only (its adjoints are P x N_r), so
the influence columns of different ranks never interact and the stitched result equals the
single-process one. Training-side per-sample gradients are recomputed on every rank: sharding by
audit points pays off when the audit set is large against the batch, which is the case that does
not fit on one machine (memory P x N for the adjoints). Rank 0 gathers the states at the end and
writes the one output file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int
    local_rank: int = 0  # the process's index on its machine: its GPU under torchrun

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def audit_slice(self, n: int) -> slice:
        """Contiguous audit points of this rank; sizes differ by at most one."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))


def current_shard() -> Shard:
    """The rank and world size torchrun set in the environment (1 process without torchrun)."""
    return Shard(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                 int(os.environ.get("LOCAL_RANK", "0")))


def init(shard: Shard) -> None:
    if shard.distributed and not torch.distributed.is_initialized():
        # gloo: only small CPU objects cross ranks (the finished walks, once), on CPU and GPU runs
        torch.distributed.init_process_group("gloo")


def gather_to_root(shard: Shard, payload):
    """Every rank's payload (picklable, CPU tensors) as a list on rank 0; None elsewhere."""
    if not shard.distributed:
        return [payload]
    gathered = [None] * shard.world if shard.rank == 0 else None
    torch.distributed.gather_object(payload, gathered, dst=0)
    return gathered


def finish(shard: Shard) -> None:
    if shard.distributed and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
