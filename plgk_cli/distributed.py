"""Scale-out under torchrun: how ranks split a replay, and the few collectives they need.

Every rank owns a contiguous shard of the audit points (its adjoints are P x N_r, its influence
columns M x N_r), so the walked tensors of different ranks never interact and the stitched result
equals the single-process one; rank 0 gathers the finished walks and writes the one output file.
What differs between the two ``--shard`` modes is the training side of each update:

* ``audit``: every rank computes the per-example gradients of the whole minibatch itself.
* ``rows``: each rank computes those of its block of the minibatch's rows, and the blocks are
  exchanged (``RowExchange``), so that the per-example gradient work is divided too. Each rank
  then credits the whole minibatch against its own audit columns: the exchange moves B x P
  gradients (in the training dtype) per update, where owning rows of the influence matrix would
  move the adjoints' P x N float64 instead.

The walk's state is laid out the same in both modes (a rank's columns), so a resume may switch
modes. Ranks agree on whether to commit progress and whether to stop (``BoundaryAgreement``), so
their commits are always of the same step; each keeps its previous commit until the next one is
written everywhere, and a resume starts from the newest step every rank holds. Each update's
check runs on one rank (``Shard.checks_update``); under rows every rank sums its share of the
check's Σ_m w_m g_m first (``ReplayPlan.batch_gradient``). Rank 0 gathers the finished walks, through
shared memory where the ranks share a machine (``gather_tensors_to_root``).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch

from plgk_cli.errors import Interrupted, OutputError


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int
    local_rank: int = 0  # the process's index on its machine: its GPU under torchrun
    local_world: int = 1  # processes on this machine

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def one_machine(self) -> bool:
        return self.local_world == self.world

    def audit_slice(self, n: int) -> slice:
        """Contiguous audit points of this rank; sizes differ by at most one."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def checks_update(self, t: int) -> bool:
        """Whether this rank runs update t's check (the ranks take turns: one check an update)."""
        return t % self.world == self.rank

    def block_rows(self, n: int) -> int:
        """Rows of each rank's block of an n-row minibatch (the last blocks may hold fewer)."""
        return max(1, math.ceil(n / self.world))

    def row_slice(self, n: int) -> slice:
        """This rank's block of positions 0..n-1: rank r holds [r b, (r+1) b) cut at n, so that
        the blocks laid end to end are the minibatch in order."""
        b = self.block_rows(n)
        return slice(min(self.rank * b, n), min((self.rank + 1) * b, n))


SINGLE = Shard(0, 1)


def current_shard() -> Shard:
    """The rank and world size torchrun set in the environment (1 process without torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Shard(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")),
                 int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def init(shard: Shard) -> bool:
    """Join the process group; True if this call created it (and so ``finish`` ends it)."""
    if shard.distributed and not torch.distributed.is_initialized():
        # gloo: the collectives carry CPU tensors (GPU runs stage through host memory)
        torch.distributed.init_process_group("gloo")
        return True
    return False


def finish(shard: Shard, owned: bool = True) -> None:
    if shard.distributed and torch.distributed.is_initialized():
        barrier(shard)
        if owned:
            torch.distributed.destroy_process_group()


@contextlib.contextmanager
def _peers(shard: Shard):
    """A collective that fails because another rank is gone (killed, or stopped by an error of
    its own) interrupts this one too: what every rank committed stays for --resume."""
    try:
        yield
    except RuntimeError as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise Interrupted(f"replay rank {shard.rank}: another rank stopped ({first[:200]}); the "
                          "progress every rank committed is kept: continue with --resume") from None


def gather_to_root(shard: Shard, payload):
    """Every rank's payload (picklable, CPU tensors) as a list on rank 0; None elsewhere."""
    if not shard.distributed:
        return [payload]
    gathered = [None] * shard.world if shard.rank == 0 else None
    with _peers(shard):
        torch.distributed.gather_object(payload, gathered, dst=0)
    return gathered


def gather_tensors_to_root(shard: Shard, tensors: dict) -> list | None:
    """Every rank's ``tensors`` (a dict of CPU tensors) as a list on rank 0, None elsewhere.

    Ranks on one machine hand them over through /dev/shm: each other rank saves its dict there
    and rank 0 maps the files (torch.load(mmap=True)), so nothing crosses a socket. gather_object
    pickles the tensors through the process group instead: on LeNet-5 with 128 columns a rank, 2.5 s
    for the 105 MB of a walk of M = 51,200 rows on a 2-core machine, and 0.26 s against 0.04 s
    through shared memory at M = 12,800. That is the path between machines, and the fallback
    where /dev/shm has no room."""
    if not shard.distributed:
        return [tensors]
    shared = through_shared_memory(shard)
    path = None
    try:
        if shared and shard.rank != 0:
            path = save_to_shared_memory(tensors, f"walk-rank{shard.rank}")
        paths = all_gather_object(shard, path)
        if not shared or any(p is None for p in paths[1:]):
            return gather_to_root(shard, tensors)
        gathered = None
        if shard.rank == 0:
            gathered = [tensors] + [torch.load(p, mmap=True, weights_only=True) for p in paths[1:]]
        barrier(shard)  # rank 0 has mapped every file: their names can go
        return gathered
    finally:
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)


def through_shared_memory(shard: Shard) -> bool:
    """Whether the ranks hand each other tensors through /dev/shm: all of them on this machine,
    unless PLGK_ROW_EXCHANGE=gloo asks for the process group's paths (those between machines:
    the tests' way to them)."""
    return shard.one_machine and os.environ.get("PLGK_ROW_EXCHANGE") != "gloo"


def _shared_directory() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def save_to_shared_memory(tensors: dict, name: str) -> str | None:
    """torch.save ``tensors`` to a new file in /dev/shm; its path, or None (and no file) where
    there is no room."""
    path = os.path.join(_shared_directory(), f"plgk-{name}-{uuid.uuid4().hex}")
    try:
        torch.save(tensors, path)
    except BaseException as exc:  # a signal too: no half-written file stays in /dev/shm
        with contextlib.suppress(OSError):
            os.unlink(path)
        if isinstance(exc, (OSError, RuntimeError)):  # torch.save reports ENOSPC as a RuntimeError
            return None
        raise
    return path


def all_gather_object(shard: Shard, payload) -> list:
    if not shard.distributed:
        return [payload]
    gathered = [None] * shard.world
    with _peers(shard):
        torch.distributed.all_gather_object(gathered, payload)
    return gathered


def max_over_ranks(shard: Shard, *values: float) -> tuple:
    """Each value's largest over the ranks (one small all-reduce)."""
    if not shard.distributed:
        return tuple(values)
    t = torch.tensor(values, dtype=torch.float64)
    with _peers(shard):
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return tuple(t.tolist())


def any_rank(shard: Shard, *flags: bool) -> tuple:
    """Each flag, true if it is true on any rank."""
    return tuple(value > 0 for value in max_over_ranks(shard, *(float(bool(f)) for f in flags)))


class BoundaryAgreement:
    """Whether any rank asks the walk to stop, or to commit, at an update boundary: ranks stop and
    commit together, so that a resume finds a step every one of them holds.

    One process decides on its own request at once. Under torchrun each rank posts its request in
    a non-blocking all-reduce at one boundary and the ranks act on it at the next (``lag`` = 1), so
    that no boundary waits for the slowest rank; the row exchange is then the walk's one wait an
    update. The last boundary agrees at once."""

    def __init__(self, shard: Shard):
        self.shard = shard
        self.lag = 1 if shard.distributed else 0
        self._posted = None  # (the all-reduce in flight, its tensor)

    def decide(self, request, last: bool = False) -> tuple[bool, bool]:
        """(stop, commit) to act on now; ``request()`` gives this rank's (stop, commit) wish."""
        if not self.shard.distributed:
            stop, commit = request()
            return bool(stop), bool(commit)
        agreed = (False, False)
        if self._posted is not None:
            work, flags = self._posted
            self._posted = None
            with _peers(self.shard):
                work.wait()
            agreed = tuple(value > 0 for value in flags.tolist())
        if last:
            now = any_rank(self.shard, *request())
            agreed = tuple(a or n for a, n in zip(agreed, now))
        return agreed

    def post(self, request) -> None:
        """Under torchrun, this rank's (stop, commit) wish (``request()``) for the next boundary."""
        if self.shard.distributed:
            flags = torch.tensor([float(bool(f)) for f in request()], dtype=torch.float64)
            with _peers(self.shard):
                work = torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, async_op=True)
            self._posted = (work, flags)


def column_mean(shard: Shard, x: torch.Tensor) -> float:
    """The mean of x's entries over every rank's columns (each rank holds its own x): what the
    adaptive rule's decisions are taken on, so that every rank refines the same segments as one
    process would (up to the last bit of the sum, which only a tie with the tolerance could see)."""
    if not shard.distributed:
        return float(x.mean())
    t = torch.tensor([float(x.sum()), float(x.numel())], dtype=torch.float64)
    with _peers(shard):
        torch.distributed.all_reduce(t)
    return float(t[0] / t[1])


def barrier(shard: Shard) -> None:
    if shard.distributed:
        with _peers(shard):
            torch.distributed.barrier()


def newest_common(steps_per_rank: list) -> int | None:
    """The walk's next step that every rank holds a commit of, the newest one (the walk goes
    down, so the smallest); None if the ranks hold none in common."""
    common = set(steps_per_rank[0]) if steps_per_rank else set()
    for steps in steps_per_rank[1:]:
        common &= set(steps)
    return min(common) if common else None


class RowExchange:
    """--shard rows: the minibatch's per-example gradients, each rank computing its block.

    ``rows(name, n, width, dtype, device)`` gives the (world x block) x width tensor of an n-row
    minibatch and this rank's block of it to fill; ``gather`` makes every rank's block visible in
    every rank's tensor, whose first n rows are then the minibatch in order. ``seconds`` and
    ``bytes`` add up the exchanges (the bench reads them); ``own_rows`` and ``all_rows`` count the
    rows this rank computed and the rows exchanged (the tests read them)."""

    carries_float64 = False  # True: the blocks travel in float64, each rank converting its own

    def __init__(self, shard: Shard):
        self.shard = shard
        self.seconds = 0.0
        self.bytes = 0
        self.own_rows = 0
        self.all_rows = 0

    def rows(self, name: str, n: int, width: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def gather(self, full: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass


class GlooExchange(RowExchange):
    """All-gather over the process group: works across machines and devices (GPU tensors are
    staged through host memory)."""

    def __init__(self, shard: Shard):
        super().__init__(shard)
        self._buffers: dict = {}

    def rows(self, name, n, width, dtype, device):
        b = self.shard.block_rows(n)
        key = (name, width, dtype, device)
        full = self._buffers.get(key)
        if full is None or full.shape[0] < self.shard.world * b:
            full = torch.empty(self.shard.world * b, width, dtype=dtype, device=device)
            self._buffers[key] = full
        full = full[:self.shard.world * b]
        return full, full[self.shard.rank * b:(self.shard.rank + 1) * b]

    def gather(self, full, own):
        start = time.perf_counter()
        host = full if full.device.type == "cpu" else full.cpu()
        blocks = list(host.split(len(own)))
        sent = own.cpu() if own.device.type != "cpu" else own.clone()  # not an alias of its slot
        with _peers(self.shard):
            torch.distributed.all_gather(blocks, sent)
        if host is not full:
            full.copy_(host)
        self.seconds += time.perf_counter() - start
        self.bytes += host.numel() * host.element_size()
        return full


class SharedMemoryExchange(RowExchange):
    """Every rank on one machine, on the CPU: the blocks are written straight into one shared-memory
    tensor (a file in /dev/shm that all ranks map, removed once mapped), and a barrier makes them
    visible; nothing is copied. Each name has two tensors that alternate from one exchange of
    it to the next: a rank that has passed exchange k's barrier writes exchange k+1's block into
    the other tensor, never into the one a slower rank may still read exchange k from (as with
    the workspace, a name's rows are read until that name's next exchange, no longer).

    On a 2-core CPU with LeNet-5 (B = 256, P = 61,706, float32) gloo's all-gather of a rank's
    block took 101 ms per update, and a replay through it 1.23x the time of one through shared
    memory (docs/performance.md#scale-out). Float64 blocks cost no exchange here and spare each
    rank converting the whole minibatch. A rank killed while the file has its name (between
    creating and mapping it) leaves it in /dev/shm: plgk-rows-*."""

    carries_float64 = True

    def __init__(self, shard: Shard):
        super().__init__(shard)
        self._token = all_gather_object(shard, uuid.uuid4().hex)[0]  # rank 0's: one name for all
        self._maps: dict = {}
        self._turns: dict = {}  # name -> the tensor of two that its next exchange writes

    def rows(self, name, n, width, dtype, device):
        b = self.shard.block_rows(n)
        turn = self._turns.get(name, 0)
        self._turns[name] = turn ^ 1
        key = (name, turn, width, dtype)
        shared = self._maps.get(key)
        if shared is None or shared.shape[0] < self.shard.world * b:
            # every rank asks for the same rows in the same order, so all of them grow it together
            shared = self._map(key, self.shard.world * b, width, dtype)
        shared = shared[:self.shard.world * b]
        return shared, shared[self.shard.rank * b:(self.shard.rank + 1) * b]

    def _map(self, key, rows: int, width: int, dtype) -> torch.Tensor:
        directory = _shared_directory()
        path = os.path.join(directory, f"plgk-rows-{self._token}-{'-'.join(map(str, key[:2]))}-{rows}")
        size = rows * width * torch.empty((), dtype=dtype).element_size()
        problem = None
        if self.shard.rank == 0:
            try:
                with open(path, "wb") as f:
                    # allocated now: a full tmpfs fails here with ENOSPC, not with SIGBUS at a write
                    os.posix_fallocate(f.fileno(), 0, size)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                problem = (f"--shard rows: no room for {size / 2**20:.0f} MiB of shared memory in {directory} "
                           f"({exc.strerror}); make room there, or use --shard audit (or PLGK_ROW_EXCHANGE=gloo)")
        problem = all_gather_object(self.shard, problem)[0]
        if problem is not None:
            raise OutputError(problem)
        try:
            array = np.memmap(path, dtype=np.uint8, mode="r+", shape=(size,))
            barrier(self.shard)
        finally:
            if self.shard.rank == 0:
                # every rank has mapped it (or one has failed): the mappings stay, the name goes
                with contextlib.suppress(OSError):
                    os.unlink(path)
        tensor = torch.from_numpy(array).view(dtype).view(rows, width)
        self._maps[key] = tensor
        return tensor

    def gather(self, full, own):
        start = time.perf_counter()
        barrier(self.shard)  # every block is written
        self.seconds += time.perf_counter() - start
        self.bytes += full.numel() * full.element_size() // self.shard.world
        return full

    def close(self) -> None:
        self._maps.clear()


def row_exchange(shard: Shard, device: torch.device) -> RowExchange:
    """Shared memory where every rank is on this machine and computes on the CPU, the process
    group's all-gather otherwise (PLGK_ROW_EXCHANGE=gloo forces it: the tests' path to it)."""
    if device.type == "cpu" and through_shared_memory(shard):
        return SharedMemoryExchange(shard)
    return GlooExchange(shard)
