"""Replay time with --threads 1, --threads 2 and the default thread count, side by side, on the
machine as it is and with HOGS busy-loop processes added; prints one table of medians and ratios.

    .venv/bin/python scripts/threads_bench.py                       # demo, lm, mlp-wide; 3 repeats
    .venv/bin/python scripts/threads_bench.py --workload demo --repeat 5

Workloads (each trained once with --threads 1, then replayed):
  demo      configs/demo.toml (digits CNN, 3,658 parameters, 230 steps), audit test[:64]
  lm        configs/lm_addition.toml (byte-level GPT, 100,352 parameters) with 1 epoch instead of
            20 (20 steps), audit test[:4]
  mlp-wide  digits, an MLP of two 512-wide hidden layers (301,066 parameters), Adam, 1 epoch
            (23 steps), audit test[:32]

Each replay runs in its own child; its time is taken in the child around the `plgk replay`
command itself (after the imports, which cost every setting alike). Within a repeat the three
settings run back to back, so they see the same background load; the table gives each setting's
median over the repeats and its ratio to --threads 1 (below 1: faster). The hogs are killed on
exit, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MLP_WIDE = """[data]
dataset = "digits"

[model]
name = "mlp"
kwargs = { hidden = 512, depth = 3 }

[optim]
name = "adam"
lr = 1e-3

[train]
epochs = 1
batch_size = 64
"""

CHILD = """
import sys, time
import plgk_cli.replay, plgk_cli.train
from plgk_cli.cli import main
start = time.perf_counter()
try:
    main(sys.argv[1:], prog_name="plgk")
except SystemExit as exc:
    code = exc.code
print(f"command seconds {time.perf_counter() - start:.3f} exit {code}", file=sys.stderr)
"""

SETTINGS = (("--threads 1", ["--threads", "1"]), ("--threads 2", ["--threads", "2"]), ("default", []))


def config_text(workload: str) -> str:
    if workload == "demo":
        return (ROOT / "configs/demo.toml").read_text()
    if workload == "lm":
        return re.sub(r"(?m)^epochs = \d+", "epochs = 1", (ROOT / "configs/lm_addition.toml").read_text())
    return MLP_WIDE


AUDIT = {"demo": "test[:64]", "lm": "test[:4]", "mlp-wide": "test[:32]"}


def plgk(args: list, env: dict) -> tuple[float, str]:
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    found = re.search(r"command seconds (\S+) exit (\S+)", done.stderr)
    if done.returncode or not found or found.group(2) not in ("0", "None"):
        sys.exit(f"failed: plgk {' '.join(args)}\n{done.stderr[-2000:]}")
    return float(found.group(1)), done.stderr


def measure(workload: str, work: Path, repeat: int, env: dict) -> dict:
    run = work / workload
    if not (run / "manifest.json").is_file():
        config = work / f"{workload}.toml"
        config.write_text(config_text(workload))
        plgk(["train", "--config", str(config), "--out", str(run), "--threads", "1", "--quiet"], env)
    times = {name: [] for name, _ in SETTINGS}
    chosen = []
    loads = []
    for _ in range(repeat):
        loads.append(os.getloadavg()[0])
        for name, flags in SETTINGS:
            # not --quiet: the default prints its choice ("threads: N (...)") with the progress bar
            seconds, stderr = plgk(["replay", "--ckpts", str(run), "--audit-set", AUDIT[workload],
                                    "--out", str(work / f"{workload}.h5"), "--overwrite", *flags], env)
            times[name].append(seconds)
            line = re.search(r"threads: (\d+) \(", stderr)
            if name == "default" and line:
                chosen.append(line.group(1))
    return {"times": {k: statistics.median(v) for k, v in times.items()}, "chosen": "/".join(chosen) or "torch",
            "load": statistics.median(loads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", action="append", choices=("demo", "lm", "mlp-wide"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--hogs", type=int, default=2, help="busy-loop processes for the busy rows")
    parser.add_argument("--work", default=None, help="directory for the runs (default: a new temporary one)")
    opts = parser.parse_args()
    workloads = opts.workload or ["demo", "lm", "mlp-wide"]
    work = Path(opts.work or tempfile.mkdtemp(prefix="plgk-threads-"))
    work.mkdir(parents=True, exist_ok=True)
    # the default must decide by itself: no thread variables inherited from the caller
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    print(f"CPUs usable {len(os.sched_getaffinity(0))}, load {os.getloadavg()[0]:.1f}, runs in {work}", flush=True)

    rows = []
    for workload in workloads:
        rows.append((workload, "as is", measure(workload, work, opts.repeat, env)))
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(opts.hogs)]
        try:
            time.sleep(5)  # let the hogs reach the load average a little before the first decision
            rows.append((workload, f"+{opts.hogs} hogs", measure(workload, work, opts.repeat, env)))
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()

    header = (f"{'workload':9} {'machine':8} {'load':>5} {'threads 1 s':>11} {'threads 2 s':>11} "
              f"{'default s':>9} {'default N':>9} {'2 / 1':>6} {'default / 1':>11}")
    print(f"\nreplay command time, median of {opts.repeat} (s); ratios to --threads 1\n{header}")
    for workload, machine, r in rows:
        t = r["times"]
        one = t["--threads 1"]
        print(f"{workload:9} {machine:8} {r['load']:5.1f} {one:11.2f} {t['--threads 2']:11.2f} "
              f"{t['default']:9.2f} {r['chosen']:>9} {t['--threads 2'] / one:6.2f} {t['default'] / one:11.2f}")


if __name__ == "__main__":
    main()
