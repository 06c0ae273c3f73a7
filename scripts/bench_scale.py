"""bench.py --workload scale: one run's replay by 1 process and by 2 torchrun processes (one torch
thread each), with --shard rows (shared memory, and gloo's all-gather, the path between machines)
and --shard audit.

The run is mnist-synthetic (bench.mnist_workload: LeNet-5, P = 61,706, Adam, batches of 256;
--steps-scale 0.02, the default, is one epoch of 200 updates, M = 51,200), audited on test[:256]
with the trapezoid. Every replay is one launch, timed from the launch to the moment the last rank
returns from replay (the output written): the interpreter and imports, torchrun's rendezvous,
loading the run, the walk, the gather and the output file, as a user waits for it. Inside, each rank calls plgk_cli.replay.replay (what
`plgk replay` calls) and reports its walk's seconds and, with rows, the seconds its exchange took
(the waits for the slower rank included). The 2-process runs then time gloo's all-gather of a
rank's block of a minibatch (B/2 x P float32) on their own, the communication a rows replay
across machines needs per update.

From those it projects 8 and 64 ranks: for rows, T_R = (T_1 - S)/R + S on one machine (shared
memory) and + C_R across machines, with S = 2 T_2 - T_1 the per-update work that rows does not
divide (reading θ_t, the optimizer's coefficients, the waits) and C_R = 2 C_2 (R - 1)/R the
all-gather (each rank receives (R - 1)/R of the minibatch); for audit,
T_R = (T_1 - A)/R + A with A = 2 T_2 - T_1 the training side every rank repeats. Efficiency is
T_1 / (R T_R). It assumes the per-rank bandwidth measured here (loopback TCP) and work that
divides evenly; the audit set must hold at least R points (256 here: 4 a rank at 64).

    python scripts/bench.py --workload scale --threads 1 [--repeat K]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
MODES = (("1 process", 1, "audit", ""), ("rows", 2, "rows", ""), ("rows, gloo all-gather", 2, "rows", "gloo"),
         ("audit", 2, "audit", ""))
PROJECTED_RANKS = (8, 64)


def run_scale(workload, workdir: Path, train_phase, echo=print, repeat: int = 1) -> dict:
    """Train ``workload`` (a bench.Workload) once with ``train_phase`` (bench's: a child process;
    it returns the run's directory, steps and training seconds) and replay it in every mode;
    with ``repeat`` > 1 the modes take turns that many times and each keeps its fastest launch
    (the least disturbed by other load: one machine's drift over the minutes falls on every mode)."""
    train = train_phase(workload)
    run = Path(train["run_dir"])
    results, walls = {}, {label: [] for label, *_ in MODES}
    for round_ in range(max(1, repeat)):
        for label, procs, shard, exchange in MODES:
            echo(f"... scale: {label} ({procs} x 1 thread){f', round {round_ + 1}' if repeat > 1 else ''}",
                 flush=True)
            launch = _launch(run, workload.audit_set, workdir / f"scale-{shard}{exchange}-{procs}.h5",
                             procs, shard, exchange)
            walls[label].append(launch["wall_s"])
            if label not in results or launch["wall_s"] < results[label]["wall_s"]:
                results[label] = launch
    for label, r in results.items():
        r["all_wall_s"] = walls[label]
    return {"workload": "scale", "label": "mnist-synthetic", "steps": train["steps"],
            "train_s": train["train_s"], "num_audit": results["1 process"]["num_audit"], "repeat": max(1, repeat),
            "modes": results, **_figures(results)}


def _launch(run: Path, audit_set: str, out: Path, procs: int, shard: str, exchange: str) -> dict:
    task = {"ckpts": str(run), "audit_set": audit_set, "out": str(out), "shard": shard,
            "result": str(out.with_suffix(".rank{rank}.json"))}
    task_path = out.with_suffix(".task.json")
    task_path.write_text(json.dumps(task))
    launcher = [sys.executable] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PLGK_ROW_EXCHANGE": exchange}
    start = time.time()  # the ranks stamp their end with the same clock
    done = subprocess.run(launcher + [str(SCRIPT), "--child", str(task_path)], capture_output=True, text=True,
                          env=env, cwd=str(ROOT))
    if done.returncode != 0:
        raise RuntimeError(f"scale replay ({procs} x {shard}) failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    ranks = [json.loads(Path(task["result"].format(rank=r)).read_text()) for r in range(procs)]
    # from the launch to the last rank's return from replay (the output written), not counting
    # what the child measures after it (the all-gather on its own)
    wall = max(r["replay_end"] for r in ranks) - start
    return {"wall_s": wall, "walk_s": max(r["walk_s"] for r in ranks),
            "exchange_s": max(r["exchange_s"] for r in ranks), "allgather_s": ranks[0].get("allgather_s"),
            "num_audit": ranks[0]["num_audit"], "batch": ranks[0]["batch"], "steps": ranks[0]["steps"], "out": str(out),
            "sharding": ranks[0]["sharding"]}


def _figures(results: dict) -> dict:
    import numpy as np

    from plgk_cli.store import InfluenceFile

    one = results["1 process"]
    with InfluenceFile(one["out"]) as f:
        reference = f.array("loss", "influence")
    for label, r in results.items():
        r["speedup_wall"] = one["wall_s"] / r["wall_s"]
        r["speedup_walk"] = one["walk_s"] / r["walk_s"]
        r["efficiency_wall"] = r["speedup_wall"] / (1 if label == "1 process" else 2)
        with InfluenceFile(r["out"]) as f:
            r["max_influence_difference"] = float(np.abs(f.array("loss", "influence") - reference).max()
                                                  / np.abs(reference).max())
    # per update, seconds
    t1, rows, audit = (results[k]["walk_s"] / one["steps"] for k in ("1 process", "rows", "audit"))
    allgather = results["rows, gloo all-gather"]["allgather_s"]
    undivided, repeated = max(2 * rows - t1, 0.0), max(2 * audit - t1, 0.0)
    projected = {}
    for ranks in PROJECTED_RANKS:
        t_shared = (t1 - undivided) / ranks + undivided  # one machine: the blocks in shared memory
        t_rows = t_shared + 2 * allgather * (ranks - 1) / ranks
        t_audit = (t1 - repeated) / ranks + repeated
        projected[str(ranks)] = {"rows_shared_efficiency": t1 / (ranks * t_shared),
                                 "rows_efficiency": t1 / (ranks * t_rows), "audit_efficiency": t1 / (ranks * t_audit)}
    return {"projected": projected,
            "per_update_ms": {"one": 1e3 * t1, "rows": 1e3 * rows, "audit": 1e3 * audit, "allgather": 1e3 * allgather,
                              "rows_undivided": 1e3 * undivided, "audit_repeated": 1e3 * repeated}}


def format_scale_table(row: dict) -> str:
    best = f"; the fastest of {row['repeat']} launches per mode, taken in turns" if row.get("repeat", 1) > 1 else ""
    lines = [f"scale: {row['label']}, {row['steps']} updates, {row['num_audit']} audit points "
             f"(train {row['train_s']:.1f} s{best})",
             "| replay | processes | wall s | walk s | speedup (wall) | speedup (walk) | efficiency | exchange s "
             "| max |Δ influence| / max |influence| |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, r in row["modes"].items():
        procs = 1 if label == "1 process" else 2
        lines.append(f"| {label} | {procs} | {r['wall_s']:.1f} | {r['walk_s']:.1f} | {r['speedup_wall']:.2f}x | "
                     f"{r['speedup_walk']:.2f}x | {r['efficiency_wall']:.2f} | {r['exchange_s']:.1f} | "
                     f"{r['max_influence_difference']:.1e} |")
    if row.get("repeat", 1) > 1:
        lines.append("wall s of every launch: " + "; ".join(
            f"{label} " + ", ".join(f"{w:.1f}" for w in r["all_wall_s"]) for label, r in row["modes"].items()))
    ms = row["per_update_ms"]
    lines.append(f"per update: {ms['one']:.0f} ms (1 process), {ms['rows']:.0f} ms (rows; {ms['rows_undivided']:.0f} "
                 f"ms of it not divided), {ms['audit']:.0f} ms (audit; {ms['audit_repeated']:.0f} ms repeated on "
                 f"every rank); gloo all-gather of a rank's block: {ms['allgather']:.0f} ms")
    for ranks, p in row["projected"].items():
        lines.append(f"projected at {ranks} ranks: efficiency rows {p['rows_shared_efficiency']:.2f} on one "
                     f"machine (shared memory), {p['rows_efficiency']:.2f} across machines (all-gather at "
                     f"this bandwidth); audit {p['audit_efficiency']:.2f}")
    return "\n".join(lines)


def _child(task_path: str) -> None:
    """One rank (or the one process): the replay, then (2 ranks) the all-gather on its own."""
    import torch

    from plgk_cli.arguments import ReplayArguments
    from plgk_cli.replay import replay
    from plgk_cli.run import load_run

    torch.set_num_threads(1)
    task = json.loads(Path(task_path).read_text())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # opened here, so that replay leaves it open for the all-gather after it
        torch.distributed.init_process_group("gloo")
    summary = replay(ReplayArguments(ckpts=task["ckpts"], audit_set=task["audit_set"], out=task["out"],
                                     device="cpu", overwrite=True, shard=task["shard"]), progress=False)
    replay_end = time.time()
    run = load_run(task["ckpts"])
    batch = int(run.manifest["batch_size"])
    result = {"replay_end": replay_end, "walk_s": summary.walk_seconds, "exchange_s": summary.exchange_seconds, "steps": summary.steps,
              "sharding": summary.sharding, "batch": batch,
              "num_audit": int(task["audit_set"].split(":")[-1].rstrip("]"))}
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        result["allgather_s"] = _allgather_seconds(batch, sum(p.numel() for p in run.build_model().parameters()))
        torch.distributed.destroy_process_group()
    Path(task["result"].format(rank=rank)).write_text(json.dumps(result))


def _allgather_seconds(batch: int, params: int, repeats: int = 5) -> float:
    """The fastest of ``repeats`` gloo all-gathers of this rank's block of a minibatch (float32)."""
    import torch

    world = int(os.environ["WORLD_SIZE"])
    block = -(-batch // world)
    own = torch.randn(block, params)
    blocks = [torch.empty_like(own) for _ in range(world)]
    best = float("inf")
    for _ in range(repeats):
        torch.distributed.barrier()
        start = time.perf_counter()
        torch.distributed.all_gather(blocks, own)
        best = min(best, time.perf_counter() - start)
    return best


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.path.insert(0, str(ROOT))
        _child(sys.argv[2])
    else:
        raise SystemExit(__doc__)
