"""The default CPU thread count of `plgk train` and `plgk replay` (``--threads`` not given).

Torch's own default is one thread per core it sees, whatever else runs there. Its OpenMP threads
wait for each other at the end of every operation, so on a core another process keeps busy a
thread falls behind and all of them wait: the digits demo replayed 7-9x slower with torch's two
threads than with one on a 2-core machine at load 5 (scripts/threads_bench.py). A small model's
operations are too short to gain from a second thread even on an idle machine, so plgk runs it on
one thread; a larger model gets the CPUs that the load average leaves free. That average trails
by about a minute and counts plgk's own earlier runs: a replay started right after another on an
idle 2-core machine sees load about 1 and takes one thread.

The choice is the `plgk` command's: ``--threads N`` wins, and so do ``OMP_NUM_THREADS`` and
``MKL_NUM_THREADS`` (which torch reads itself); CUDA runs and Python callers of
``plgk_cli.train`` / ``plgk_cli.replay`` keep torch's setting, whatever set it.
"""

from __future__ import annotations

import math
import os
import sys

from dataclasses import dataclass

# One thread per this many parameters. Replay with a second thread on a 2-core machine at load about
# 1 (scripts/threads_bench.py): 0.68-0.77x the time for a 301k-parameter MLP, 0.88-0.90x for the
# 100k-parameter GPT; the digits demo (3,658) gains little even idle (docs/performance.md). On a busy
# machine the second thread costs 2-9x, so the bound errs towards one thread.
PARAMETERS_PER_THREAD = 100_000

# The variables torch takes its thread count from when they are set (ATen's intraop default).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def choose_threads(cpus: int, load: float, parameters: int, host_cpus: int | None = None) -> int:
    """Torch threads for a model of ``parameters`` on ``cpus`` usable CPUs under a 1-minute load
    average ``load`` measured over ``host_cpus`` CPUs (default ``cpus``): one thread per
    PARAMETERS_PER_THREAD parameters, at most the CPUs other work leaves free, at least one."""
    cpus = max(1, cpus)
    host_cpus = max(cpus, host_cpus or cpus)
    # The load average counts the whole machine; assume it spreads evenly, so our CPUs carry their share.
    busy = max(0.0, load) * cpus / host_cpus
    free = int(cpus - busy + 0.5)
    by_size = parameters // PARAMETERS_PER_THREAD
    return max(1, min(cpus, free, by_size))


@dataclass(frozen=True)
class Machine:
    cpus: int  # CPUs this process may use: its affinity mask, capped by a cgroup CPU quota
    host_cpus: int  # CPUs the load average is measured over
    load: float  # 1-minute load average


def cgroup_cpu_limit(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """The CPUs a cgroup v2 quota allows (a container's --cpus), or None: no quota or no cgroup v2.
    The affinity mask of such a container still lists every host CPU."""
    try:
        with open(path) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def machine() -> Machine:
    host_cpus = os.cpu_count() or 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS, Windows)
        cpus = host_cpus
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, limit)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows has no load average: assume the CPUs are free
        load = 0.0
    return Machine(cpus=cpus, host_cpus=host_cpus, load=load)


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    machine: Machine
    parameters: int

    def describe(self) -> str:
        cpus = self.machine.cpus
        return (f"threads: {self.threads} ({cpus} CPU{'s' if cpus != 1 else ''}, load {self.machine.load:.1f}, "
                f"{_count(self.parameters)} parameters; --threads N to override)")


def _count(n: int) -> str:
    for scale, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def environment_variable() -> str | None:
    """The variable torch took its thread count from, if the user set one."""
    return next((name for name in THREAD_VARIABLES if os.environ.get(name, "").strip()), None)


# Set by the `plgk` command (cli.set_threads) when --threads is not given; the train or replay call
# consumes it once it knows the model. Python callers of those functions never set it.
_default_requested = False


def request_default(requested: bool = True) -> None:
    global _default_requested
    _default_requested = requested


def apply_default(parameters: int, device, progress: bool) -> ThreadChoice | None:
    """Set torch's threads for a model of ``parameters`` on ``device`` if the `plgk` command asked for
    the default and nothing else decides: returns the choice (printed unless not ``progress``), or
    None where torch is left alone."""
    global _default_requested
    requested, _default_requested = _default_requested, False
    if not requested or getattr(device, "type", device) != "cpu" or environment_variable():
        return None
    import torch

    facts = machine()
    choice = ThreadChoice(choose_threads(facts.cpus, facts.load, parameters, facts.host_cpus), facts, parameters)
    torch.set_num_threads(choice.threads)
    if progress:
        print(choice.describe(), file=sys.stderr, flush=True)
    return choice
