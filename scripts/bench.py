"""Benchmark: record a trajectory, replay it, and print one table of time, memory and fidelity.

    python scripts/bench.py                                  # the default set (fits ~10 min on 2 cores)
    python scripts/bench.py --workload digits                # one workload (repeatable)
    python scripts/bench.py --workload mnist-synthetic --steps-scale 0.1    # five epochs
    python scripts/bench.py --workload captum-sgd            # plgk euler vs captum TracInCP
    python scripts/bench.py --workload memory                # replay peak RSS over audit size and batch
    python scripts/bench.py --workload transformer           # dropout transformer: hooks vs generic, layer split
    python scripts/bench.py --workload lm                    # the LM demo (byte-level GPT), sequence-logprob
    python scripts/bench.py --device cuda --workload lm --workload mnist-synthetic --steps-scale 0.1
    python scripts/bench.py --workload digits --profile      # + cProfile of the replay phase
    python scripts/bench.py --workload quadrature --threads 1 # trapezoid vs adaptive vs supersample:64
    python scripts/bench.py --workload quadrature --quadrature-runs demo,cnn-adam   # a subset
    python scripts/bench.py --workload scale --threads 1      # 1 vs 2 torchrun processes, --shard rows / audit

Workloads:
  digits           configs/demo.toml (CNN, Adam, 10 epochs), audit test[:64], rule trapezoid.
  mnist-synthetic  LeNet-5 on a generated 28x28, 10-class set (class templates + shifts + noise),
                   M = 51,200, batch 256, Adam lr 1e-3, 256 audit points; the paper's A.5 task has
                   10,000 steps (50 epochs of 200), --steps-scale runs a fraction of them.
  captum-sgd       full-batch plain SGD (float64) on digits, a few steps: every example is in every
                   batch, so plgk's euler audit is TracIn; compared with captum's TracInCP on the
                   same checkpoints (needs `pip install .[bench]`).
  memory           replay peak RSS for audit sizes N x batch sizes on digits (+ one longer run),
                   to show growth linear in N and batch, not in M x P or T.
  transformer      configs/transformer_text.toml (2 pre-norm blocks, dropout 0.1, AdamW with clipping,
                   synthetic-text, 5 epochs), audit test[:32], rule trapezoid, two rows: "own
                   attention" (the config as it is: attention from nn.Linear projections, every
                   parameter has a per-example rule, so replay's GradientComputer, method "auto",
                   runs the recorded train-mode forward on layer hooks) and "nn.MultiheadAttention"
                   (kwargs torch_layers = true: nn.TransformerEncoderLayer blocks, the generic
                   Jacobian rows). After each row, in another child, the per-example-gradient time
                   on the run's checkpoints (10 recorded updates, their minibatches, the run's
                   dtype, the recorded dropout): the engine's training_pass as replay builds it,
                   the generic Jacobian over all of θ (method "generic", and jacobian_rows on the
                   same graph as the hooks), each layer type's hook rule, each type alone, with the
                   rules and the engine's rows checked against the Jacobian rows.
  lm               configs/lm_addition.toml as it is (the LM demo, `make demo-lm`: byte-level GPT, 2
                   pre-norm blocks of width 64, dropout 0.1, AdamW lr 3e-3 with clipping and a cosine
                   schedule, batch 32, 20 epochs = 400 steps on the 640 `addition` sums), replayed on the
                   demo's audit prompts (scripts/demo_lm.py prompts: 20 prompt + continuation points)
                   with --target sequence-logprob, rule supersample:2 (as the demo); one row like digits' (train,
                   train without recording, replay, replay/train, rel. MRE, LC, worst update error of
                   sequence-logprob). --steps-scale S runs round(20 S) epochs (at least 1); without
                   it, the whole 20.
  quadrature       the rules side by side: every configs/*.toml as it is (but QUADRATURE_SKIPPED, now
                   none) and four larger-step runs of the digits CNN (batch
                   64, 2 epochs: RMSprop lr 1e-3 momentum 0.5, Adagrad lr 1e-2, Adam lr 1e-2, SGD
                   momentum 0.9 lr 0.1), float32, each trained once and replayed on test[:64] with
                   trapezoid, adaptive (its default TOL) and supersample:64, every replay in its own
                   child (--repeat K: trapezoid and adaptive K times each, interleaved, the fastest
                   kept; supersample:64 once). Per run: replay time of each rule, adaptive/trapezoid,
                   rel. MRE and LC of each, adaptive's mean sub-intervals per segment, the influence
                   matrices' relative Frobenius distance from supersample:64, the share of entries
                   with |I_adaptive - I_ss64| <= error_bound (and with a float32 rounding allowance
                   2^-23 (|a| + |b|)), and the issue's bars (QUADRATURE_BARS) passed or missed.
                   --quadrature-runs picks runs by name (QUADRATURE_RUNS).
  scale            mnist-synthetic's run (one epoch by default) replayed by 1 process and by 2 torchrun
                   processes of one thread each, --shard rows (shared memory; gloo's all-gather) and
                   --shard audit: wall time of each launch, its walk, speedups, the influence against
                   the 1-process file, and the efficiency projected at 8 and 64 ranks (scripts/bench_scale.py).
                   --repeat K: the modes take turns K times, each keeping its fastest launch.

How it measures. Every phase (train, train without recording, replay, captum) runs in its own
child process (`python -c`); times are taken inside the child around the phase itself, so they
EXCLUDE interpreter start and imports and INCLUDE all of the phase's I/O (dataset load and
fingerprint, checkpoint writes, checkpoint reads, the HDF5 output). Peak RSS is the child's own
ru_maxrss read with os.wait4, so it includes the ~0.3 GiB of the Python+torch process itself
(comparisons.idle_rss_mib in the JSON: a child that only imports). Record overhead = time spent inside
trajectory.write_checkpoint (timed by a wrapper patched in the child) over the rest of training;
a second training run with write_checkpoint replaced by a no-op gives the un-recorded baseline.
--device cuda trains and replays every workload on the GPU (GPU MiB = torch's peak allocated memory
of the train/replay child); scripts/gpu_check.sh runs lm and mnist-synthetic that way.
Results go to --json-out (default bench-results/bench.json) and the terminal. Runs and logs live
in a temporary directory unless --workdir names one; a child that fails raises with the tail of its
log and the log's path, a copy in failed-logs/ beside --json-out when the directory is temporary.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

# Paper, Appendix A.5 (MNIST / LeNet-5, 50 epochs x 200 batches of 256, 256 audit points, Adam).
PAPER_A5 = {"steps": 10_000, "train_s": 226.5, "audit_s": 4040.0, "ratio": 4040.0 / 226.5,
            "train_mem_gib": 0.435, "audit_mem_gib": 2.915, "mle": 0.010386, "corr": 0.999998}
MNIST_STEPS_PER_EPOCH = 200
MNIST_BATCH = 256
# Measured on the 2-core CPU machine (docs/performance.md): a LeNet-5 replay step (batch 256, 256
# audit points) takes about 0.6 s on a quiet machine, so the default, one full epoch of the
# paper's run (200 steps, M = 51,200), is about 2 minutes of replay and the default set (digits,
# captum-sgd, mnist-synthetic) stays inside 10 minutes. transformer (two rows, two layer splits) is
# not in it: about 2.5 minutes with --threads 1 at load 1.5-4 on 2 cores (its generic row and
# split are most of that), 10 minutes with two threads at load 3-5 (docs/performance.md).
DEFAULT_STEPS_SCALE = 0.02
DEFAULT_WORKLOADS = ("digits", "captum-sgd", "mnist-synthetic")
ALL_WORKLOADS = ("digits", "mnist-synthetic", "captum-sgd", "memory", "transformer", "lm", "quadrature", "scale")
TIMING_NOTE = ("times exclude process start and imports, include all of the phase's I/O; "
               "peak RSS includes the Python+torch process itself")


# --------------------------------------------------------------------------------------------
# Workloads


@dataclass
class Workload:
    """One train + replay measurement: a run config (TOML-shaped dict) and the replay arguments."""

    name: str
    config: dict
    audit_set: str
    rule: str = "trapezoid"
    label: str = ""  # extra text for the table's workload column
    notes: list = field(default_factory=list)
    replay_options: dict = field(default_factory=dict)  # other ReplayArguments fields


def _toml_config(path: Path) -> dict:
    import tomllib

    return tomllib.loads(Path(path).read_text())


def _with_device(config: dict, device: str) -> dict:
    config = json.loads(json.dumps(config))
    config.setdefault("train", {})["device"] = device
    return config


def digits_workload() -> Workload:
    config = _toml_config(ROOT / "configs" / "demo.toml")
    optim, train = config["optim"], config["train"]
    return Workload("digits", config, "test[:64]", "trapezoid",
                    notes=[f"configs/demo.toml: {config['model']['name']} (P=3,658), {optim['name']} lr {optim['lr']:g}, "
                           f"batch {train['batch_size']}, {train['epochs']} epochs"])


def make_synthetic_mnist(path: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """A learnable 28x28 10-class set: per-class smooth stroke templates, random shifts of up to
    3 pixels, random contrast and Gaussian pixel noise; uint8 pixels like MNIST's IDX files."""
    rng = np.random.default_rng(seed)
    size, classes = 28, 10
    freq = np.fft.fftfreq(size)
    lowpass = np.exp(-(freq[:, None] ** 2 + freq[None, :] ** 2) / (2 * 0.06 ** 2))
    templates = []
    for _ in range(classes):
        field_ = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(size, size))) * lowpass))
        mask = np.zeros((size, size))
        mask[4:24, 4:24] = 1.0  # keep strokes in the middle like MNIST's 20x20 box
        field_ = field_ * mask
        templates.append((field_ > np.quantile(field_[4:24, 4:24], 0.8)).astype(np.float64))
    templates = np.stack(templates)

    def sample(n: int):
        y = rng.integers(0, classes, n)
        x = templates[y] * rng.uniform(0.6, 1.0, size=(n, 1, 1))
        shifts = rng.integers(-3, 4, size=(n, 2))
        for dy in range(-3, 4):
            for dx in range(-3, 4):
                rows = np.flatnonzero((shifts[:, 0] == dy) & (shifts[:, 1] == dx))
                if len(rows):
                    x[rows] = np.roll(x[rows], (dy, dx), axis=(1, 2))
        x = np.clip(x + rng.normal(0.0, 0.3, size=x.shape), 0.0, 1.0)
        return (x * 255).round().astype(np.uint8), y.astype(np.int64)

    x_train, y_train = sample(n_train)
    x_test, y_test = sample(n_test)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def mnist_plan(steps_scale: float) -> tuple[int, int, int, list]:
    """(steps, epochs, M, notes) for a fraction of the paper's 10,000 steps."""
    steps = max(1, round(PAPER_A5["steps"] * steps_scale))
    notes = [f"--steps-scale {steps_scale:g}: {steps} of the paper's {PAPER_A5['steps']:,} steps"]
    if steps >= MNIST_STEPS_PER_EPOCH:
        epochs = max(1, round(steps / MNIST_STEPS_PER_EPOCH))
        steps = epochs * MNIST_STEPS_PER_EPOCH
        m = MNIST_STEPS_PER_EPOCH * MNIST_BATCH
    else:  # train runs whole epochs: a shorter run is one epoch of a smaller training split
        epochs, m = 1, steps * MNIST_BATCH
        notes.append(f"fewer steps than one epoch: the training split is cut to M = {m:,} "
                     f"({steps} batches of {MNIST_BATCH}); per-step costs do not depend on M")
    return steps, epochs, m, notes


def mnist_workload(data_dir: Path, steps_scale: float = DEFAULT_STEPS_SCALE,
                   audit_points: int = 256) -> Workload:
    steps, epochs, m, notes = mnist_plan(steps_scale)
    path = data_dir / f"mnist-synthetic-{m}.npz"
    if not path.is_file():
        make_synthetic_mnist(path, m, max(1024, audit_points))
    config = {"data": {"dataset": f"npz:{path}", "seed": 0}, "model": {"name": "lenet5"},
              "optim": {"name": "adam", "lr": 1e-3},
              "train": {"epochs": epochs, "batch_size": MNIST_BATCH, "seed": 0}}
    notes = ["LeNet-5 (P=61,706), Adam lr 1e-3 (the paper used 1.5e-5: same cost per step)"] + notes
    return Workload("mnist-synthetic", config, f"test[:{audit_points}]", "trapezoid", notes=notes)


def captum_workload(steps: int = 10, lr: float = 0.5) -> Workload:
    from plgk_cli.data import load_dataset

    m = len(load_dataset("digits", 0).y_train)
    config = {"data": {"dataset": "digits", "seed": 0}, "model": {"name": "cnn"},
              "optim": {"name": "sgd", "lr": lr},
              "train": {"epochs": steps, "batch_size": m, "seed": 0, "dtype": "float64"}}
    return Workload("captum-sgd", config, "test[:64]", "euler",
                    notes=[f"full-batch SGD lr {lr} (batch = M = {m}), {steps} steps, float64, "
                           "euler rule = TracIn"])


def transformer_workloads() -> list[Workload]:
    """configs/transformer_text.toml twice: as it is (attention from nn.Linear projections: every
    parameter has a per-example rule, so both sides of replay run on layer hooks) and with
    ``torch_layers = true`` (nn.TransformerEncoderLayer blocks: nn.MultiheadAttention has no rule,
    so the training side is the generic Jacobian rows and the audit side vmap)."""
    config = _toml_config(ROOT / "configs" / "transformer_text.toml")
    torch_config = json.loads(json.dumps(config))
    torch_config["model"].setdefault("kwargs", {})["torch_layers"] = True
    common = ("token + position embeddings, 2 pre-norm blocks (4 heads, width 32, GELU MLP), dropout 0.1, "
              "AdamW lr 1e-3 with clipping, batch 32, 5 epochs; faithful replay (the recorded train-mode forward)")
    return [Workload("transformer", config, "test[:32]", "trapezoid", label="own attention",
                     notes=[f"configs/transformer_text.toml: {common}; attention from nn.Linear projections: "
                            "per-example gradients by layer hooks on both sides"]),
            Workload("transformer", torch_config, "test[:32]", "trapezoid", label="nn.MultiheadAttention",
                     notes=[f"configs/transformer_text.toml with kwargs torch_layers = true: {common}; "
                            "nn.TransformerEncoderLayer blocks: training side by generic Jacobian rows, audit "
                            "side by vmap"])]


LM_CONFIG = ROOT / "configs" / "lm_addition.toml"
LM_TARGET = "sequence-logprob"  # the demo's audited quantity: log p(continuation | prompt)
LM_RULE = "supersample:2"  # the demo's rule (Makefile demo-lm): the trapezoid misses LC 0.9999 there


def lm_workload(data_dir: Path, steps_scale: float | None = None) -> Workload:
    """configs/lm_addition.toml, audited on the demo's prompts (scripts/demo_lm.py prompts, written
    under ``data_dir``) with target sequence-logprob; ``steps_scale``: round(epochs x S) epochs
    (at least one), None for the config's own."""
    import contextlib
    import io

    config = _toml_config(LM_CONFIG)
    epochs = int(config["train"]["epochs"])
    notes = []
    if steps_scale is not None and steps_scale != 1:
        scaled = max(1, round(epochs * steps_scale))
        notes.append(f"--steps-scale {steps_scale:g}: {scaled} of the config's {epochs} epochs")
        config["train"]["epochs"] = epochs = scaled
    prompts = Path(data_dir) / "lm-prompts.jsonl"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    import demo_lm

    seed = int(config.get("data", {}).get("seed", 0))
    with contextlib.redirect_stdout(io.StringIO()):  # it says what it wrote
        demo_lm.write_prompts(prompts, seed)
    n = sum(1 for line in prompts.read_text().splitlines() if line.strip())
    m = config["model"]
    kwargs = ", ".join(f"{k} {v}" for k, v in m.get("kwargs", {}).items())
    o = config["optim"]
    notes.insert(0, f"configs/lm_addition.toml: {m['name']} ({kwargs}), {o['name']} lr {o['lr']:g}"
                    + (f" clip {o['clip_grad_norm']:g}" if o.get("clip_grad_norm") else "")
                    + f", {config.get('schedule', {}).get('name', 'constant')} schedule, batch "
                    f"{config['train']['batch_size']}, {epochs} epochs; audit: the demo's {n} prompts "
                    f"(scripts/demo_lm.py prompts), target {LM_TARGET}")
    return Workload("lm", config, str(prompts), LM_RULE, notes=notes,
                    replay_options={"targets": [LM_TARGET]})


MEMORY_MODEL = {"name": "cnn", "kwargs": {"channels": 16, "hidden": 128}}  # P = 22,602


def memory_workloads(audit_sizes=(16, 64, 256), batch_sizes=(32, 64, 128),
                     long_epochs: int = 3) -> list[Workload]:
    out = []
    for batch in batch_sizes:
        config = {"data": {"dataset": "digits", "seed": 0}, "model": MEMORY_MODEL,
                  "optim": {"name": "adam", "lr": 1e-3},
                  "train": {"epochs": 1, "batch_size": batch, "seed": 0}}
        for n in audit_sizes:
            out.append(Workload("memory", config, f"test[:{n}]", "trapezoid", label=f"N={n} B={batch}"))
    n, batch = audit_sizes[len(audit_sizes) // 2], batch_sizes[len(batch_sizes) // 2]
    config = {"data": {"dataset": "digits", "seed": 0}, "model": MEMORY_MODEL,
              "optim": {"name": "adam", "lr": 1e-3},
              "train": {"epochs": long_epochs, "batch_size": batch, "seed": 0}}
    out.append(Workload("memory", config, f"test[:{n}]", "trapezoid",
                        label=f"N={n} B={batch} {long_epochs}ep"))
    return out


QUADRATURE_RULES = ("trapezoid", "adaptive", "supersample:64")  # the last is the reference
QUADRATURE_AUDIT = "test[:64]"
# The bars for adaptive (its default TOL), per run.
QUADRATURE_BARS = {"lc": 0.99999, "rmre": 2e-3, "time_ratio": 1.5, "influence_rel": 1e-3, "bound_share": 0.99}
FLOAT32_ROUNDING = 2.0 ** -23  # the rounding allowance of two float32 influences: 2^-23 (|a| + |b|)


def _cnn_run(optim: dict) -> dict:
    return {"data": {"dataset": "digits", "seed": 0}, "model": {"name": "cnn"}, "optim": optim,
            "train": {"epochs": 2, "batch_size": 64, "seed": 0}}


# {run name: (config or a configs/*.toml path, note)}; every config as it is, then larger steps.
QUADRATURE_RUNS = {
    **{path.stem: (path, f"configs/{path.name}") for path in sorted((ROOT / "configs").glob("*.toml"))},
    "cnn-rmsprop": (_cnn_run({"name": "rmsprop", "lr": 1e-3, "momentum": 0.5}),
                    "digits CNN, RMSprop lr 1e-3 momentum 0.5, batch 64, 2 epochs"),
    "cnn-adagrad": (_cnn_run({"name": "adagrad", "lr": 1e-2}), "digits CNN, Adagrad lr 1e-2, batch 64, 2 epochs"),
    "cnn-adam": (_cnn_run({"name": "adam", "lr": 1e-2}), "digits CNN, Adam lr 1e-2, batch 64, 2 epochs"),
    "cnn-sgd-momentum": (_cnn_run({"name": "sgd", "lr": 0.1, "momentum": 0.9}),
                         "digits CNN, SGD momentum 0.9 lr 0.1, batch 64, 2 epochs"),
}
# Runs left out unless named in --quadrature-runs, and why. None now: transformer_text's
# supersample:64 replay (the longest) took 116 s with --threads 1 on the 2-core CPU machine.
QUADRATURE_SKIPPED: dict = {}


def quadrature_workloads(names=None) -> list[Workload]:
    """One Workload per run (rule: the first of QUADRATURE_RULES; run_quadrature replays them all);
    ``names``: None for every run but QUADRATURE_SKIPPED, else those runs in that order."""
    if names is None:
        names = [n for n in QUADRATURE_RUNS if n not in QUADRATURE_SKIPPED]
    unknown = [n for n in names if n not in QUADRATURE_RUNS]
    if unknown:
        raise SystemExit(f"--quadrature-runs: unknown run(s) {', '.join(unknown)}; expected some of "
                         f"{', '.join(QUADRATURE_RUNS)}")
    out = []
    for name in names:
        config, note = QUADRATURE_RUNS[name]
        config = _toml_config(config) if isinstance(config, Path) else json.loads(json.dumps(config))
        config.setdefault("train", {})["dtype"] = "float32"
        out.append(Workload("quadrature", config, QUADRATURE_AUDIT, QUADRATURE_RULES[0], label=name,
                            notes=[note]))
    return out


# --------------------------------------------------------------------------------------------
# Child processes: each phase runs alone so that its peak RSS is its own.


TORCH_THREADS: int | None = None  # --threads: torch.set_num_threads in every child (None: torch's default)
# Where a failed child's log is copied so that the message naming it stays true: main sets it when
# the workdir is a temporary directory, which is deleted on the way out (None: the log stays put).
FAILED_LOGS: Path | None = None


def run_child(task: dict, workdir: Path, log_name: str = "child") -> dict:
    """Run `child_main(task)` in a fresh interpreter; returns its result plus peak RSS (MiB)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if TORCH_THREADS:
        task = dict(task, threads=TORCH_THREADS)
    key = uuid.uuid4().hex[:8]
    task_path, result_path = workdir / f"task-{key}.json", workdir / f"result-{key}.json"
    log_path = workdir / f"{log_name}-{key}.log"
    task_path.write_text(json.dumps(dict(task, result=str(result_path))))
    code = (f"import sys; sys.path.insert(0, {str(SCRIPTS)!r}); import bench; "
            f"bench.child_main({str(task_path)!r})")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT,
                                cwd=str(ROOT))
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen consistent
    process_s = time.perf_counter() - start
    if proc.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text()[-3000:]
        if FAILED_LOGS is not None:
            FAILED_LOGS.mkdir(parents=True, exist_ok=True)
            log_path = Path(shutil.copy(log_path, FAILED_LOGS / log_path.name))
        raise RuntimeError(f"{task['kind']} child failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2 ** 20
    result["peak_rss_mib"] = usage.ru_maxrss * scale
    result["process_s"] = process_s
    return result


def _preimport() -> None:
    """Import what the phases import lazily (h5py, scikit-learn's datasets, safetensors), so that
    the timed section measures the phase's work and I/O, not module loading."""
    import h5py  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (torch.func imports it on first use: 1.5-3 s)

    import plgk_cli.replay  # noqa: F401
    import plgk_cli.store  # noqa: F401
    import plgk_cli.train  # noqa: F401
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        pass


def child_main(task_path: str) -> None:
    task = json.loads(Path(task_path).read_text())
    kind = task["kind"]
    _preimport()
    if task.get("threads"):
        import torch

        torch.set_num_threads(int(task["threads"]))
    result = {"idle": _child_idle, "train": _child_train, "replay": _child_replay,
              "captum": _child_captum, "floor": _child_floor, "layersplit": _child_layersplit}[kind](task)
    Path(task["result"]).write_text(json.dumps(result))


def _cuda_reset(device: str):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True
    return False


def _cuda_peak(on_cuda: bool):
    import torch

    return torch.cuda.max_memory_allocated() / 2 ** 20 if on_cuda else None


def _child_idle(task: dict) -> dict:
    return {}  # child_main already imported what every phase imports


def _child_train(task: dict) -> dict:
    import torch

    import plgk_cli.train as train_module
    import plgk_cli.trajectory as trajectory
    from plgk_cli.config import parse_config

    config = parse_config(task["config"], source="bench")
    on_cuda = _cuda_reset(train_module.resolve_device(config.train.device).type)
    original = trajectory.write_checkpoint
    timing = {"write_s": 0.0, "writes": 0}

    def timed_write(*args, **kwargs):
        if on_cuda:  # pending kernels belong to the training step, not to the write
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            return original(*args, **kwargs) if task["record"] else None
        finally:
            timing["write_s"] += time.perf_counter() - start
            timing["writes"] += 1

    # train.py binds the name at import; patch both so that any caller is timed.
    trajectory.write_checkpoint = train_module.write_checkpoint = timed_write
    start, cpu = time.perf_counter(), time.process_time()
    manifest = train_module.train(config, task["out"], progress=False)
    train_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    return {"train_s": train_s, "cpu_s": cpu_s, "out": task["out"], **timing, "steps": manifest["total_steps"],
            "num_train": manifest["dataset"]["num_train"],
            "parameters": sum(int(np.prod(p["shape"])) for p in manifest["parameters"]),
            "final": manifest.get("final", {}), "cuda_peak_mib": _cuda_peak(on_cuda),
            "torch_threads": torch.get_num_threads()}


def _child_replay(task: dict) -> dict:
    from plgk_cli.arguments import ReplayArguments
    from plgk_cli.replay import replay
    from plgk_cli.train import resolve_device

    args = ReplayArguments(**task["arguments"])
    on_cuda = _cuda_reset(resolve_device(args.device, "--device").type)
    # Which per-example path replay's GradientComputer took (read after the run): keep the instances.
    import plgk_cli.gradients as gradients_module

    computers, init = [], gradients_module.GradientComputer.__init__

    def keep_instance(self, *a, **k):
        init(self, *a, **k)
        computers.append(self)

    gradients_module.GradientComputer.__init__ = keep_instance
    profiler = None
    if task.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start, cpu = time.perf_counter(), time.process_time()
    summary = replay(args, progress=False)
    replay_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    gradients_module.GradientComputer.__init__ = init
    out = {"replay_s": replay_s, "cpu_s": cpu_s, "steps": summary.steps, "metrics": summary.metrics,
           "max_update_error": summary.max_update_error, "cuda_peak_mib": _cuda_peak(on_cuda),
           "engine": [{"method": c.method, "training_hooks": getattr(c, "_training_hooks", None)}
                      for c in computers]}
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        profiler.dump_stats(task["profile"])
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        out["profile_top"] = text.getvalue()
    # After the timed section, with the code version that wrote the file: what the parent needs.
    from plgk_cli.store import InfluenceFile

    with InfluenceFile(args.out) as f:
        out["num_audit"] = len(f.audit_label)
        if task.get("scores"):
            np.save(task["scores"], f.influence("loss").astype(np.float64))
    return out


def _child_captum(task: dict) -> dict:
    """captum's TracInCP on the run's checkpoints θ_0..θ_{T-1}; saves its (N, M) scores."""
    import torch
    from captum.influence import TracInCP
    from torch.utils.data import TensorDataset

    from plgk_cli.arguments import resolve_audit_set
    from plgk_cli.run import load_run

    start, cpu = time.perf_counter(), time.process_time()
    run = load_run(task["run"])
    data = run.dataset
    model = run.build_model().to(dtype=run.dtype)
    steps = run.steps[:-1]  # θ_t for each update t -> t+1
    paths = [str(run.path / f"step_{t:08d}.safetensors") for t in steps]
    by_path = dict(zip(paths, steps))

    def load_checkpoint(model_, path):
        t = by_path[path]
        model_.load_state_dict(run.checkpoint(t).params, strict=True)
        return run.checkpoint(t + 1).lr  # the learning rate of the update θ_t -> θ_{t+1}

    audit = resolve_audit_set(task["audit_set"], data)
    # A summed loss + captum's per-sample trick: the per-example gradient of the (unreduced) loss.
    tracin = TracInCP(model, TensorDataset(data.x_train, data.y_train), paths,
                      checkpoints_load_func=load_checkpoint,
                      loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"),
                      batch_size=task.get("batch_size", 512), sample_wise_grads_per_batch=True)
    scores = tracin.influence((audit.x, audit.y))  # (N audit, M train), positive = proponent
    captum_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    np.save(task["scores"], scores.detach().cpu().numpy().astype(np.float64))
    return {"captum_s": captum_s, "cpu_s": cpu_s, "checkpoints": len(paths)}


def _child_floor(task: dict) -> dict:
    """The least work of any exact TracIn on these checkpoints: at each θ_t one forward and
    backward of every training and audit example (batched, no per-example gradients), with the
    checkpoint reads. plgk and captum both do at least this much."""
    import torch
    import torch.nn.functional as F

    from plgk_cli.arguments import resolve_audit_set
    from plgk_cli.run import load_run

    start, cpu = time.perf_counter(), time.process_time()
    run = load_run(task["run"])
    data = run.dataset
    model = run.build_model().to(dtype=run.dtype)
    audit = resolve_audit_set(task["audit_set"], data)
    x = torch.cat([data.x_train, audit.x]).to(run.dtype)
    y = torch.cat([data.y_train, audit.y])
    batch = task.get("batch_size", 512)
    for t in run.steps[:-1]:
        model.load_state_dict(run.checkpoint(t).params, strict=True)
        for begin in range(0, len(y), batch):
            model.zero_grad()
            F.cross_entropy(model(x[begin:begin + batch]), y[begin:begin + batch], reduction="sum").backward()
    return {"floor_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}


def _child_layersplit(task: dict) -> dict:
    start = time.perf_counter()
    out = layer_split(task["run"], task.get("steps", LAYER_SPLIT_STEPS),
                      task.get("repeats", LAYER_SPLIT_REPEATS))
    return dict(out, split_s=time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# Per-example-gradient time split by layer type (the transformer workload)

LAYER_SPLIT_STEPS = 10  # recorded updates measured
LAYER_SPLIT_REPEATS = 3  # each measurement per step: the fastest of this many


def _layer_groups(model, layout, probe) -> dict:
    """{layer type: {"path", "modules", "params"}} over the trainable parameters, in layout order.
    A parameter inside a MultiheadAttention is that type's (generic path: its projections are not
    module calls); one whose owning module has a per_example rule is that rule's kind (hook path)
    if ``probe`` (a forward under hooks -> {module: (calls, rows in, rows out, batch)}) shows the
    module ran once on the batch along dimension 0; every other parameter goes to a generic group
    named after its module type and why."""
    from torch import nn

    from plgk_cli.models import layer_of
    from plgk_cli.per_example import rule_for

    modules = dict(model.named_modules())
    candidates = {}
    for name in layout.names:
        owner = layer_of(name) if "." in name else ""
        parts = owner.split(".") if owner else []
        attention = next((".".join(parts[:i]) for i in range(len(parts) + 1)
                          if isinstance(modules[".".join(parts[:i])], nn.MultiheadAttention)), None)
        module = modules[owner]
        rule = rule_for(module) if attention is None else None
        candidates[name] = (owner, attention, rule)
    calls = probe({owner for owner, attention, rule in candidates.values() if rule is not None})
    groups: dict = {}
    for name, (owner, attention, rule) in candidates.items():
        if attention is not None:
            kind, path, module_name = "MultiheadAttention", "generic", attention
        elif rule is not None:
            n, rows_in, rows_out, batch = calls.get(owner, (0, 0, 0, 0))
            if n == 1 and rows_in == rows_out == batch:
                kind, path = rule.kind, "hooks"
            else:
                why = ("not called as a module" if n == 0 else f"called {n}x" if n != 1
                       else "batch not on dim 0")
                kind, path = f"{rule.kind} ({why})", "generic"
            module_name = owner
        else:
            kind, path, module_name = type(modules[owner]).__name__, "generic", owner
        g = groups.setdefault(kind, {"path": path, "modules": [], "params": []})
        if module_name not in g["modules"]:
            g["modules"].append(module_name)
        g["params"].append(name)
    return groups


def layer_split(run_dir: str, steps: int = LAYER_SPLIT_STEPS, repeats: int = LAYER_SPLIT_REPEATS) -> dict:
    """Time per-example loss-term gradients of recorded minibatches (the training forward in
    train mode from the recorded generator state, the run's dtype) on the run's checkpoints.

    - the engine as replay builds it (``GradientComputer(model, layout, num_classes, chunk,
      task=task)``, method "auto"): ``training_pass`` once verified (hooks where every layer has
      a rule, else the generic Jacobian rows), and a fresh engine's first call (with the one-time
      hooks-vs-Jacobian check);
    - the generic path over all of θ: ``GradientComputer(method="generic").training_pass``;
    - one graph (one train-mode forward, all of θ one leaf, hooks on the rule layers): one
      backward of Σ ℓ_m to the hooked outputs and each layer type's rule (the engine's
      ``_layer_gradients``), beside ``jacobian_rows`` over all of θ on that same graph;
    - each layer type alone (only its parameters require grad: hook rule, or the generic
      Jacobian restricted to its parameters), and for a model with both kinds the mixed path;
    and checks every hook rule and the engine's rows against the Jacobian rows."""
    import re
    import warnings

    import torch
    from torch.func import functional_call

    from plgk_cli.arguments import ReplayArguments
    from plgk_cli.gradients import GradientComputer, ParameterLayout, jacobian_rows, restored_rng
    from plgk_cli.gradients import _layer_gradients  # the engine's per-layer rule dispatch
    from plgk_cli.per_example import rule_for
    from plgk_cli.run import load_run

    run = load_run(run_dir)
    data, task, dtype = run.dataset, run.task, run.dtype
    model = run.build_model().to(dtype=dtype)
    modules = dict(model.named_modules())
    layout = ParameterLayout.of(model)
    shapes = dict(zip(layout.names, layout.shapes))
    offsets = {n: (layout.offsets[i], layout.offsets[i + 1]) for i, n in enumerate(layout.names)}
    chunk = ReplayArguments.__dataclass_fields__["chunk_size"].default  # replay's default --chunk-size

    def engine_as_replay():  # plgk_cli.replay.plan_replay's construction
        return GradientComputer(model, layout, data.num_classes, chunk, task=task)

    engine = engine_as_replay()
    generic_engine = GradientComputer(model, layout, data.num_classes, chunk, method="generic", task=task)
    updates = sorted({int(t) for t in np.linspace(0, run.steps[-1] - 1, min(steps, run.steps[-1])).round()})

    def minibatch(t):
        record = run.checkpoint(t + 1)
        theta = layout.flatten(run.checkpoint(t).params, dtype=dtype)
        return theta, data.x_train[record.batch], data.y_train[record.batch], record.rng, run.buffers(t)

    def state(theta, grad_params, buffers):
        """Parameters for functional_call; those in ``grad_params`` are views of one leaf."""
        flat = theta.detach()
        params = {n: flat[a:b].view(shapes[n]) for n, (a, b) in offsets.items()}
        leaf = None
        if grad_params:
            leaf = torch.cat([params[n].reshape(-1) for n in grad_params]).requires_grad_(True)
            start = 0
            for n in grad_params:
                size = int(np.prod(shapes[n]))
                params[n] = leaf[start:start + size].view(shapes[n])
                start += size
        return {**params, **{n: b.clone() for n, b in buffers.items()}}, leaf

    def forward(params, x, rng, hooked=()):
        """Output of the recorded train-mode forward; (input, output) of the hooked modules."""
        captured = {}

        def hook(name):
            def record(module, inputs, output):
                captured.setdefault(name, []).append((inputs[0].detach(), output))
            return record

        handles = [modules[n].register_forward_hook(hook(n)) for n in hooked]
        model.train()
        try:
            with restored_rng(rng, torch.device("cpu")):
                output = functional_call(model, params, (x,))
        finally:
            for h in handles:
                h.remove()
        return output, captured

    # Which rule-carrying modules really run once per forward on the batch (the probe).
    theta0, x0, y0, rng0, buffers0 = minibatch(updates[0])

    def probe(names):
        params, _ = state(theta0, list(layout.names), buffers0)
        _, captured = forward(params, x0, rng0, sorted(names))
        return {n: (len(c), c[0][0].shape[0], c[0][1].shape[0], len(x0)) for n, c in captured.items()}

    groups = _layer_groups(model, layout, probe)
    hook_names = [n for g in groups.values() if g["path"] == "hooks" for n in g["params"]]
    generic_names = [n for g in groups.values() if g["path"] == "generic" for n in g["params"]]
    hook_modules = [m for g in groups.values() if g["path"] == "hooks" for m in g["modules"]]

    def rule_gradients(module_names, captured, deltas, engine_rules=False):
        """{parameter name: (B, *shape)} from each module's recorded input and output gradient
        (per_example's rule, or with ``engine_rules`` the engine's _layer_gradients)."""
        out = {}
        for m, delta in zip(module_names, deltas):
            module, a = modules[m], captured[m][0][0]
            grads = _layer_gradients(module, a, delta) if engine_rules else rule_for(module).gradients(module, a, delta)
            out.update({(f"{m}.{k}" if m else k): v for k, v in grads.items()})
        return out

    keys = ["shared_fwd", "shared_bwd", "engine", "engine_first", "engine_generic", "graph_fwd", "graph_bwd",
            "graph_rules", "graph_jac", "mixed"]
    timings = {k: [] for k in keys}
    per_group = {k: {"fwd": [], "bwd": [], "per_example": [], "rule": []} for k in groups}
    diffs = {k: 0.0 for k in groups}
    checks = dict.fromkeys(["engine", "engine_first", "engine_generic", "mixed"], 0.0)
    first_verdicts = set()
    B = None
    messages = set()

    def clock():
        return time.perf_counter()

    def rel(a, b):  # max over examples of ‖a_m − b_m‖ / ‖b_m‖
        a, b = a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double()
        return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)).max())

    def cat(grads, names):  # one layer type's per-example gradients, (B, its parameters)
        return torch.cat([grads[n].reshape(len(grads[n]), -1) for n in names], 1)

    def cat_jac(jac, names):
        return torch.cat([jac[:, slice(*offsets[n])] for n in names], 1)

    tensor_worst = [0.0, None, 0.0]  # the largest per-tensor difference: (max rel diff, name, max |J_m|)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step_index, t in enumerate([updates[0]] + updates):  # the first is a warm-up, untimed
            warm = step_index == 0
            theta, x, y, rng, buffers = minibatch(t)
            B = len(y)
            rows = torch.arange(B)
            best = {}

            def keep(key, seconds):
                best[key] = min(best.get(key, float("inf")), seconds)

            if warm:
                # Have the batched backward (is_grads_batched: torch's legacy vmap) name each
                # operation it has no batching rule for and so runs one example at a time; called
                # here directly, since jacobian_rows silences those warnings.
                torch._C._debug_only_display_vmap_fallback_warnings(True)
                flat = theta.detach().clone().requires_grad_(True)
                output, _ = forward({**layout.unflatten(flat), **{n: b.clone() for n, b in buffers.items()}}, x, rng)
                terms = task.loss_terms(output, y)
                torch.autograd.grad(terms, flat, grad_outputs=torch.eye(B, dtype=terms.dtype),
                                    is_grads_batched=True, allow_unused=True)
                torch._C._debug_only_display_vmap_fallback_warnings(False)
                del output, terms

            for _ in range(1 if warm else repeats):
                # Shared: one forward and one backward of the batch loss to all of θ (a training step).
                params, leaf = state(theta, list(layout.names), buffers)
                s = clock()
                output, _ = forward(params, x, rng)
                keep("shared_fwd", clock() - s)
                s = clock()
                torch.autograd.grad(task.batch_loss(output, y), leaf)
                keep("shared_bwd", clock() - s)
                del output
                # The engine as replay builds it, verified (its first call was the warm-up) ...
                engine_out = torch.empty(B, layout.size, dtype=dtype)
                s = clock()
                engine.training_pass(theta, x, y, rng, buffers, rows, engine_out)
                keep("engine", clock() - s)
                # ... a fresh one's first call (hooks, then the one-time check against the Jacobian rows) ...
                fresh, first_out = engine_as_replay(), torch.empty(B, layout.size, dtype=dtype)
                s = clock()
                fresh.training_pass(theta, x, y, rng, buffers, rows, first_out)
                keep("engine_first", clock() - s)
                first_verdicts.add(fresh._training_hooks)
                # ... and the generic path over all of θ, whole (forward, jacobian_rows, batch gradient).
                generic_out = torch.empty(B, layout.size, dtype=dtype)
                s = clock()
                generic_engine.training_pass(theta, x, y, rng, buffers, rows, generic_out)
                keep("engine_generic", clock() - s)
                # One graph: one forward, all of θ one leaf, hooks on the rule layers' modules;
                # the hooks' backward and rules, then jacobian_rows over all of θ on the same graph.
                flat = theta.detach().clone().requires_grad_(True)
                params = {**layout.unflatten(flat), **{n: b.clone() for n, b in buffers.items()}}
                s = clock()
                output, captured = forward(params, x, rng, hook_modules)
                terms = task.loss_terms(output, y)
                keep("graph_fwd", clock() - s)
                graph_rules = {}
                if hook_modules:
                    s = clock()
                    deltas = torch.autograd.grad(terms.sum(), [captured[m][0][1] for m in hook_modules],
                                                 retain_graph=True)
                    keep("graph_bwd", clock() - s)
                    total = 0.0
                    for kind, g in groups.items():
                        if g["path"] != "hooks":
                            continue
                        s = clock()
                        got = rule_gradients(g["modules"], captured, [deltas[hook_modules.index(m)]
                                                                      for m in g["modules"]], engine_rules=True)
                        seconds = clock() - s
                        keep((kind, "rule"), seconds)
                        total += seconds
                        graph_rules.update(got)
                    keep("graph_rules", total)
                else:
                    keep("graph_bwd", 0.0)
                    keep("graph_rules", 0.0)
                jac = torch.empty(B, layout.size, dtype=dtype)
                s = clock()
                jacobian_rows(terms, flat, rows, chunk, jac)
                keep("graph_jac", clock() - s)
                for kind, g in groups.items():
                    if g["path"] == "hooks":
                        diffs[kind] = max(diffs[kind], rel(cat(graph_rules, g["params"]), cat_jac(jac, g["params"])))
                for n in hook_names:  # and each parameter tensor alone (the largest of these is reported)
                    worst = rel(graph_rules[n], jac[:, slice(*offsets[n])])
                    if worst > tensor_worst[0]:
                        tensor_worst[:] = [worst, n, float(jac[:, slice(*offsets[n])].norm(dim=1).max())]
                for key, got in (("engine", engine_out), ("engine_first", first_out),
                                 ("engine_generic", generic_out)):
                    checks[key] = max(checks[key], rel(got, jac))
                del terms, output, captured
                # Each layer type alone.
                for kind, g in groups.items():
                    params, leaf = state(theta, g["params"], buffers)
                    hooked = g["modules"] if g["path"] == "hooks" else ()
                    s = clock()
                    output, captured = forward(params, x, rng, hooked)
                    terms = task.loss_terms(output, y)
                    keep((kind, "fwd"), clock() - s)
                    if g["path"] == "hooks":
                        s = clock()
                        deltas = torch.autograd.grad(terms.sum(), [captured[m][0][1] for m in hooked])
                        keep((kind, "bwd"), clock() - s)
                        s = clock()
                        grads = rule_gradients(hooked, captured, deltas)
                        keep((kind, "per_example"), clock() - s)
                        ours = {n: grads[n] for n in g["params"]}
                    else:
                        out = torch.empty(B, leaf.numel(), dtype=dtype)
                        keep((kind, "bwd"), 0.0)
                        s = clock()
                        jacobian_rows(terms, leaf, rows, chunk, out)
                        keep((kind, "per_example"), clock() - s)
                        ours, start = {}, 0
                        for n in g["params"]:
                            size = int(np.prod(shapes[n]))
                            ours[n], start = out[:, start:start + size], start + size
                    diffs[kind] = max(diffs[kind], rel(cat(ours, g["params"]), cat_jac(jac, g["params"])))
                    del terms, output, captured
                if not (generic_names and hook_names):
                    continue
                # Mixed (a model with both kinds): one forward; jacobian_rows over the generic
                # types' parameters, then one backward of Σ ℓ_m to the hooked outputs and their rules.
                params, leaf_generic = state(theta, generic_names, buffers)
                hooked_leaf = torch.cat([params[n].reshape(-1) for n in hook_names]).requires_grad_(True)
                start = 0
                for n in hook_names:  # their parameters require grad too (not reached by jacobian_rows)
                    size = int(np.prod(shapes[n]))
                    params[n] = hooked_leaf[start:start + size].view(shapes[n])
                    start += size
                mixed = torch.empty(B, layout.size, dtype=dtype)
                s = clock()
                output, captured = forward(params, x, rng, hook_modules)
                terms = task.loss_terms(output, y)
                generic_rows = torch.empty(B, leaf_generic.numel(), dtype=dtype)
                jacobian_rows(terms, leaf_generic, rows, chunk, generic_rows)
                start = 0
                for n in generic_names:
                    size = int(np.prod(shapes[n]))
                    mixed[:, slice(*offsets[n])] = generic_rows[:, start:start + size]
                    start += size
                deltas = torch.autograd.grad(terms.sum(), [captured[m][0][1] for m in hook_modules])
                grads = rule_gradients(hook_modules, captured, deltas)
                for n in hook_names:
                    mixed[:, slice(*offsets[n])] = grads[n].reshape(B, -1)
                keep("mixed", clock() - s)
                checks["mixed"] = max(checks["mixed"], rel(mixed, jac))
            if warm:
                messages |= {str(w.message) for w in caught}
                continue
            for key, seconds in best.items():
                if isinstance(key, tuple):
                    per_group[key[0]][key[1]].append(seconds)
                else:
                    timings[key].append(seconds)

    ms = lambda values: 1000 * float(np.mean(values)) if values else None  # noqa: E731
    table = []
    for kind, g in groups.items():
        fwd, bwd, pex, rule = (ms(per_group[kind][k]) for k in ("fwd", "bwd", "per_example", "rule"))
        table.append({"type": kind, "path": g["path"], "modules": len(g["modules"]),
                      "module_names": g["modules"],
                      "params": sum(int(np.prod(shapes[n])) for n in g["params"]),
                      "rule_ms": rule, "fwd_ms": fwd, "bwd_ms": bwd, "per_example_ms": pex,
                      "alone_ms": fwd + bwd + pex, "max_rel_diff": diffs[kind], "parameter_names": g["params"]})
    total_alone = sum(r["alone_ms"] for r in table)
    for r in table:
        r["share"] = r["alone_ms"] / total_alone
    fallbacks = sorted({m.group(1) for text in messages
                        for m in [re.search(r"batching rule for ([\w:.]+?)\.? You are using", text)] if m})
    other = sorted({text.splitlines()[0][:200] for text in messages if "batching rule for" not in text})
    out = {f"{k}_ms": ms(v) for k, v in timings.items()}
    shared = out["shared_fwd_ms"] + out["shared_bwd_ms"]
    hooks_training = engine._training_hooks
    return {"attention": "nn.MultiheadAttention" if _uses_torch_layers(model) else "nn.Linear projections",
            "updates": updates, "batch": B, "dtype": str(dtype).replace("torch.", ""), "repeats": repeats,
            "parameters": layout.size, "chunk": chunk, "types": table, "sum_alone_ms": total_alone,
            **out, "shared_ms": shared,
            "engine_method": engine.method, "engine_training_hooks": hooks_training,
            "engine_first_training_hooks": sorted(first_verdicts, key=str),
            "engine_training_path": "hooks" if hooks_training else "generic",
            "engine_vs_jacobian_rel_diff": checks["engine"],
            "engine_first_vs_jacobian_rel_diff": checks["engine_first"],
            "engine_generic_vs_jacobian_rel_diff": checks["engine_generic"],
            "mixed_vs_jacobian_rel_diff": checks["mixed"] if generic_names and hook_names else None,
            "hook_modules": len(hook_modules),
            "worst_tensor": {"name": tensor_worst[1], "max_rel_diff": tensor_worst[0], "max_row_norm": tensor_worst[2]},
            "vmap_fallbacks": fallbacks, "warnings": other, "torch_threads": torch.get_num_threads()}


def _uses_torch_layers(model) -> bool:
    from torch import nn

    return any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


# --------------------------------------------------------------------------------------------
# Measurements


def best_of(repeat: int, make_task, workdir: Path, log_name: str, time_key: str) -> dict:
    """Run a child `repeat` times; the result of the fastest run (the least disturbed by other
    load on the machine), with the largest peak RSS and every time seen (`all_times`)."""
    results = [run_child(make_task(i), workdir / "logs", log_name) for i in range(max(1, repeat))]
    best = min(results, key=lambda r: r[time_key])
    return dict(best, peak_rss_mib=max(r["peak_rss_mib"] for r in results),
                all_times=[r[time_key] for r in results], runs=len(results))


def train_phase(config: dict, workdir: Path, name: str, *, baseline: bool = True, repeat: int = 1) -> dict:
    """Recorded training in a child (and, with baseline, an un-recorded one); the train fields."""
    tag = f"{name}-{uuid.uuid4().hex[:6]}"
    run_dir = workdir / "runs" / tag

    def recorded(i):
        return {"kind": "train", "config": config, "out": str(run_dir) + (f"-r{i}" if i else ""),
                "record": True}

    train = best_of(repeat, recorded, workdir, "train", "train_s")
    run_dir = Path(train["out"])
    out = {"run_dir": str(run_dir), "steps": train["steps"], "num_train": train["num_train"],
           "parameters": train["parameters"], "batch_size": config["train"].get("batch_size"),
           "train_s": train["train_s"], "train_cpu_s": train["cpu_s"], "write_s": train["write_s"],
           "checkpoint_writes": train["writes"],
           "record_overhead": train["write_s"] / max(train["train_s"] - train["write_s"], 1e-12),
           "train_peak_rss_mib": train["peak_rss_mib"], "train_cuda_peak_mib": train["cuda_peak_mib"],
           "train_process_s": train["process_s"], "train_final": train["final"],
           "train_ms_per_step": 1000 * train["train_s"] / train["steps"],
           "train_all_s": train["all_times"],
           "torch_threads": train["torch_threads"],
           "run_dir_mib": sum(p.stat().st_size for p in run_dir.iterdir()) / 2 ** 20}
    if baseline:
        plain = best_of(repeat, lambda i: {"kind": "train", "config": config, "record": False,
                                           "out": f"{run_dir}-norec{i}"}, workdir, "train-norec", "train_s")
        out.update(train_unrecorded_s=plain["train_s"], train_unrecorded_cpu_s=plain["cpu_s"],
                   train_unrecorded_peak_rss_mib=plain["peak_rss_mib"])
    return out


def run_workload(w: Workload, workdir: Path, *, device: str = "cpu", baseline: bool = True,
                 profile: bool = False, keep_scores: bool = False, train_cache: dict | None = None,
                 repeat: int = 1) -> dict:
    """Train (recorded, and optionally un-recorded), then replay; one result row. Rows whose
    config is already in `train_cache` reuse that run (the memory grid replays one run per batch)."""
    load_before = os.getloadavg()[0]
    config = _with_device(w.config, device)
    key = json.dumps(config, sort_keys=True)
    if train_cache is not None and key in train_cache:
        trained = train_cache[key]
    else:
        trained = train_phase(config, workdir, w.name, baseline=baseline, repeat=repeat)
        if train_cache is not None:
            train_cache[key] = trained
    run_dir = Path(trained["run_dir"])
    out = run_dir.parent / f"{run_dir.name}-{uuid.uuid4().hex[:4]}.h5"
    arguments = {"ckpts": str(run_dir), "audit_set": w.audit_set, "out": str(out), "rule": w.rule,
                 "device": device, "overwrite": True, **w.replay_options}
    task = {"kind": "replay", "arguments": arguments}
    if profile:
        task["profile"] = str(out.with_suffix(".prof"))
    if keep_scores:
        task["scores"] = str(out.with_suffix(".npy"))
    rep = best_of(repeat, lambda i: task, workdir, "replay", "replay_s")
    target = (w.replay_options.get("targets") or ["loss"])[0]  # the row's figures: the first target's
    metrics = rep["metrics"][target]
    row = {"workload": w.name, "label": w.label, "rule": w.rule, "audit_set": w.audit_set, "target": target,
           "_replay_arguments": arguments,
           "device": device, "notes": list(w.notes), **trained, "num_audit": rep["num_audit"],
           "replay_s": rep["replay_s"], "replay_ratio": rep["replay_s"] / trained["train_s"],
           "replay_cpu_s": rep["cpu_s"], "replay_cpu_ratio": rep["cpu_s"] / max(trained["train_cpu_s"], 1e-12),
           "replay_ms_per_step": 1000 * rep["replay_s"] / rep["steps"],
           "replay_peak_rss_mib": rep["peak_rss_mib"], "replay_cuda_peak_mib": rep["cuda_peak_mib"],
           "replay_process_s": rep["process_s"], "replay_all_s": rep["all_times"], "repeat": rep["runs"], "mre": metrics["mre"], "rmre": metrics["rmre"],
           "lc": metrics["lc"], "max_update_error": rep["max_update_error"], "influences": str(out),
           "replay_engine": rep.get("engine"),
           "load_average": [load_before, os.getloadavg()[0]]}
    if keep_scores:
        row["_influence"] = np.load(task["scores"])
    if profile:
        row["profile"] = task["profile"]
        row["profile_top"] = rep["profile_top"]
    return row


def captum_comparison(row: dict, workdir: Path, batch_size: int = 512, repeat: int = 1) -> dict:
    """captum TracInCP on the row's run; relative error against plgk's euler influences."""
    scores_path = workdir / f"captum-{uuid.uuid4().hex[:6]}.npy"
    cap = best_of(repeat, lambda i: {"kind": "captum", "run": row["run_dir"], "audit_set": row["audit_set"],
                                     "scores": str(scores_path), "batch_size": batch_size},
                  workdir, "captum", "captum_s")
    scores = np.load(scores_path)  # (N, M), positive = proponent, Σ_t lr_t g_n·g_m
    ours = row["_influence"]  # (M, N), negative = pushed the loss down
    m = ours.shape[0]
    expected = -scores.T / m  # full batch: K = -lr_t / |B| = -lr_t / M
    rel = float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))
    floor = best_of(repeat, lambda i: {"kind": "floor", "run": row["run_dir"], "audit_set": row["audit_set"],
                                       "batch_size": batch_size}, workdir, "floor", "floor_s")
    ghost_scores = workdir / f"ghost-{uuid.uuid4().hex[:6]}.npy"
    ghost_arguments = dict(row["_replay_arguments"], ghost=True, out=str(ghost_scores.with_suffix(".h5")))
    ghost = best_of(repeat, lambda i: {"kind": "replay", "arguments": ghost_arguments, "scores": str(ghost_scores)},
                    workdir, "replay-ghost", "replay_s")
    ghost_rel = float(np.linalg.norm(np.load(ghost_scores) - expected) / np.linalg.norm(expected))
    return {"captum_s": cap["captum_s"], "captum_cpu_s": cap["cpu_s"], "captum_peak_rss_mib": cap["peak_rss_mib"],
            "floor_s": floor["floor_s"], "ghost_replay_s": ghost["replay_s"], "ghost_relative_error": ghost_rel,
            "ghost_speed_ratio": cap["captum_s"] / ghost["replay_s"],
            "captum_checkpoints": cap["checkpoints"], "relative_error": rel,
            "speed_ratio": cap["captum_s"] / row["replay_s"], "captum_all_s": cap["all_times"],
            "convention": "plgk influence[m, n] = -captum_scores[n, m] / M"}


def run_quadrature(w: Workload, workdir: Path, *, device: str = "cpu", rules=QUADRATURE_RULES,
                   repeat: int = 1) -> dict:
    """Train w.config once (recorded), replay it with each of ``rules`` (the last is the reference),
    every replay in its own child; with ``repeat`` > 1 the other rules run that many times each,
    interleaved (so that load on the machine falls on them alike), the fastest kept. One row."""
    from plgk_cli.store import InfluenceFile

    load_before = os.getloadavg()[0]
    config = _with_device(w.config, device)
    trained = train_phase(config, workdir, f"{w.name}-{w.label}", baseline=False)
    run_dir = Path(trained["run_dir"])
    tasks, times = {}, {rule: [] for rule in rules}
    for rule in rules:
        out = run_dir.parent / f"{run_dir.name}-{rule.replace(':', '')}.h5"
        tasks[rule] = {"kind": "replay", "arguments": {"ckpts": str(run_dir), "audit_set": w.audit_set,
                                                       "out": str(out), "rule": rule, "device": device,
                                                       "overwrite": True, **w.replay_options}}
    best: dict = {}
    rounds = [rules[:-1]] * (max(1, repeat) - 1) + [rules]  # the reference once, last
    for group in rounds:
        for rule in group:
            result = run_child(tasks[rule], workdir / "logs", f"replay-{rule.replace(':', '')}")
            times[rule].append(result["replay_s"])
            if rule not in best or result["replay_s"] < best[rule]["replay_s"]:
                best[rule] = dict(result, peak_rss_mib=max(result["peak_rss_mib"],
                                                           best.get(rule, {}).get("peak_rss_mib", 0.0)))
    per_rule, influence, bound, sub_intervals = {}, {}, None, None
    for rule in rules:
        with InfluenceFile(tasks[rule]["arguments"]["out"]) as f:
            influence[rule] = f.influence("loss").astype(np.float64)
            metrics = f.metrics("loss")
            if rule.startswith("adaptive"):
                bound = f.error_bound("loss")
                sub_intervals = f.quadrature("loss")["sub_intervals"]
        r = best[rule]
        per_rule[rule] = {"replay_s": r["replay_s"], "cpu_s": r["cpu_s"], "all_s": times[rule],
                          "peak_rss_mib": r["peak_rss_mib"], "mre": metrics["mre"], "rmre": metrics["rmre"],
                          "lc": metrics["lc"], "max_update_error": r["max_update_error"]}
    reference = rules[-1]
    ref = influence[reference]
    ref_norm = float(np.linalg.norm(ref))
    for rule in rules[:-1]:
        per_rule[rule]["rel_frobenius"] = float(np.linalg.norm(influence[rule] - ref)) / ref_norm
    adaptive = next((rule for rule in rules if rule.startswith("adaptive")), None)
    row = {"workload": w.name, "label": w.label, "rules": per_rule, "reference": reference,
           "audit_set": w.audit_set, "device": device, "notes": list(w.notes), **trained,
           "num_audit": int(ref.shape[1]) if ref.ndim > 1 else 1, "load_average": [load_before, os.getloadavg()[0]]}
    if adaptive is not None:
        a, diff = per_rule[adaptive], np.abs(influence[adaptive] - ref)
        bound = np.asarray(bound, dtype=np.float64)
        rounding = FLOAT32_ROUNDING * (np.abs(influence[adaptive]) + np.abs(ref))
        row.update(adaptive_rule=adaptive, sub_intervals_mean=float(np.mean(sub_intervals)),
                   sub_intervals_max=int(np.max(sub_intervals)), segments=int(len(sub_intervals)),
                   bound_share=float(np.mean(diff <= bound)),
                   bound_share_rounding=float(np.mean(diff <= bound + rounding)),
                   bound_median_ratio=float(np.median(bound[diff > 0] / diff[diff > 0])) if (diff > 0).any() else None)
        if rules[0] != adaptive:
            row["time_ratio"] = a["replay_s"] / per_rule[rules[0]]["replay_s"]
        bars = QUADRATURE_BARS
        row["bars"] = {"lc": a["lc"] >= bars["lc"], "rmre": a["rmre"] <= bars["rmre"],
                       "time": row.get("time_ratio", 0.0) <= bars["time_ratio"],
                       "influence": a["rel_frobenius"] <= bars["influence_rel"],
                       "bound": row["bound_share"] >= bars["bound_share"]}
    return row


def idle_rss(workdir: Path) -> float:
    return run_child({"kind": "idle"}, workdir / "logs", "idle")["peak_rss_mib"]


def memory_fit(rows: list) -> dict:
    """Least-squares replay peak RSS ~ a + b·N + c·B over the N x B grid (1-epoch rows)."""
    grid = [r for r in rows if r["workload"] == "memory" and "ep" not in r["label"]]
    if len(grid) < 3:
        return {}
    a = np.array([[1.0, r["num_audit"], r["batch_size"]] for r in grid])
    rss = np.array([r["replay_peak_rss_mib"] for r in grid])
    coef, *_ = np.linalg.lstsq(a, rss, rcond=None)
    fitted = a @ coef
    ss_res, ss_tot = float(((rss - fitted) ** 2).sum()), float(((rss - rss.mean()) ** 2).sum())
    p = grid[0]["parameters"]
    return {"intercept_mib": coef[0], "mib_per_audit_point": coef[1], "mib_per_batch_example": coef[2],
            "r2": 1 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
            "float64_copies_of_P_per_audit_point": coef[1] * 2 ** 20 / (8 * p),
            "m_times_p_float64_mib": grid[0]["num_train"] * p * 8 / 2 ** 20, "parameters": p}


# --------------------------------------------------------------------------------------------
# Output

COLUMNS = [  # (header, key, format)
    ("workload", "name", "{}"), ("rule", "rule", "{}"), ("T", "steps", "{}"), ("M", "num_train", "{}"),
    ("N", "num_audit", "{}"), ("P", "parameters", "{}"), ("train s", "train_s", "{:.2f}"),
    ("norec s", "train_unrecorded_s", "{:.2f}"),
    ("rec.ovh", "record_overhead", "{:.1%}"), ("replay s", "replay_s", "{:.2f}"),
    ("rep/trn", "replay_ratio", "{:.2f}x"), ("cpu r/t", "replay_cpu_ratio", "{:.2f}x"),
    ("ms/step", "replay_ms_per_step", "{:.1f}"),
    ("RSS trn", "train_peak_rss_mib", "{:.0f}M"), ("RSS rep", "replay_peak_rss_mib", "{:.0f}M"),
    ("GPU MiB", "gpu", "{}"), ("MRE", "mre", "{:.2e}"), ("rMRE", "rmre", "{:.2e}"), ("LC", "lc", "{:.6f}"),
    ("upd.err", "max_update_error", "{:.1e}"),
]


def format_table(rows: list) -> str:
    cells = []
    for r in rows:
        view = dict(r, name=f"{r['workload']} {r.get('label') or ''}".strip())
        gpu = [v for v in (r.get("train_cuda_peak_mib"), r.get("replay_cuda_peak_mib")) if v is not None]
        view["gpu"] = "/".join(f"{v:.0f}" for v in gpu) if gpu else "-"
        cells.append([fmt.format(view[key]) if view.get(key) is not None else "-"
                      for _, key, fmt in COLUMNS])
    headers = [h for h, _, _ in COLUMNS]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = lambda items: "  ".join(s.ljust(w) if i == 0 else s.rjust(w)  # noqa: E731
                                   for i, (s, w) in enumerate(zip(items, widths)))
    return "\n".join([line(headers)] + [line(c) for c in cells])


def _short_rule(rule: str) -> str:
    return {"trapezoid": "trap", "supersample:64": "ss64"}.get(rule, rule.replace("supersample:", "ss")
                                                                   .replace("adaptive", "adapt"))


def format_quadrature_table(rows: list) -> str:
    """The quadrature rows: one line per run, the rules side by side."""
    rows = [r for r in rows if r["workload"] == "quadrature"]
    if not rows:
        return ""
    rules = list(rows[0]["rules"])
    short = [_short_rule(rule) for rule in rules]
    adaptive = rows[0].get("adaptive_rule")
    headers = ["run", "T", "P"] + [f"{s} s" for s in short] + [f"{_short_rule(adaptive)}/{short[0]}"]
    headers += [f"rmre {s}" for s in short] + [f"LC {s}" for s in short] + ["sub-int"]
    headers += [f"dF {s}" for s in short[:-1]] + ["bound", "bound+rnd", "bars"]
    cells = []
    for r in rows:
        per = r["rules"]
        bars = r.get("bars") or {}
        missed = [k for k, ok in bars.items() if not ok]
        c = [r["label"], str(r["steps"]), str(r["parameters"])]
        c += [f"{per[rule]['replay_s']:.2f}" for rule in rules]
        c += [f"{r['time_ratio']:.2f}x" if r.get("time_ratio") is not None else "-"]
        c += [f"{per[rule]['rmre']:.2e}" for rule in rules] + [f"{per[rule]['lc']:.6f}" for rule in rules]
        c += [f"{r['sub_intervals_mean']:.2f}" if r.get("sub_intervals_mean") is not None else "-"]
        c += [f"{per[rule]['rel_frobenius']:.2e}" for rule in rules[:-1]]
        c += [f"{r['bound_share']:.2%}" if r.get("bound_share") is not None else "-",
              f"{r['bound_share_rounding']:.2%}" if r.get("bound_share_rounding") is not None else "-",
              ("pass" if not missed else "miss:" + ",".join(missed)) if bars else "-"]
        cells.append(c)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = lambda items: "  ".join(s.ljust(w) if i == 0 else s.rjust(w)  # noqa: E731
                                   for i, (s, w) in enumerate(zip(items, widths)))
    b = QUADRATURE_BARS
    ref = _short_rule(rows[0]["reference"])
    out = [f"quadrature: {rows[0]['audit_set']}, float32, {rows[0]['device']}; replay s = wall time of each rule's "
           f"replay in its own child; {_short_rule(adaptive)}/{short[0]} = their ratio; rmre = rel. "
           f"MRE, LC of each rule; sub-int = {adaptive}'s mean sub-intervals per segment; dF = relative Frobenius "
           f"distance of the influence matrix from {ref}; bound = share of (example, audit point) entries with "
           f"|I_adapt - I_{ref}| <= error_bound, bound+rnd = with + 2^-23 (|a| + |b|); bars ({adaptive}): LC >= "
           f"{b['lc']}, rmre <= {b['rmre']:g}, time <= {b['time_ratio']}x {short[0]}, dF <= {b['influence_rel']:g}, "
           f"bound >= {b['bound_share']:.0%}", "", line(headers)] + [line(c) for c in cells]
    for r in rows:
        text = f"  {r['label']}: " + "; ".join(r["notes"])
        times = "; ".join(f"{_short_rule(rule)} " + "/".join(f"{t:.2f}" for t in v["all_s"])
                          for rule, v in r["rules"].items() if len(v["all_s"]) > 1)
        if times:
            text += f"; replay times seen (s): {times}"
        text += f"; train {r['train_s']:.2f} s; max update error {max(v['max_update_error'] for v in r['rules'].values()):.1e}"
        if r.get("load_average"):
            text += f"; 1-min load average {r['load_average'][0]:.1f} -> {r['load_average'][1]:.1f}"
        out.append(text)
    left_out = [f"{name} ({why})" for name, why in QUADRATURE_SKIPPED.items()
                if name not in {r["label"] for r in rows}]
    if left_out:
        out.append("  not run (name it in --quadrature-runs to run it): " + "; ".join(left_out))
    return "\n".join(out)


def format_notes(rows: list, comparisons: dict) -> str:
    out = [f"[{TIMING_NOTE}; RSS trn/rep = peak RSS of the train/replay process; norec s = the same training "
           "with checkpoint writes a no-op; rec.ovh = checkpoint-write time / rest of training; rep/trn = "
           "wall-time ratio, cpu r/t = the same in process CPU time, which other load on the machine disturbs "
           "less; MRE, rMRE (relative MRE), LC of the row's target (loss unless noted), upd.err = the worst "
           "update error of the replay's update check]"]
    for r in rows:
        if r["workload"] in ("memory", "quadrature"):  # quadrature: format_quadrature_table
            continue
        base = r.get("train_unrecorded_s")
        line = f"{r['workload']}: " + "; ".join(r["notes"])
        line += f"; train {r['train_ms_per_step']:.1f} ms/step, checkpoints {r['run_dir_mib']:.1f} MiB"
        if base is not None:
            line += f"; train without recording {base:.2f} s"
        line += f"; max update error {r['max_update_error']:.1e}"
        for e in r.get("replay_engine") or ():
            line += f"; replay's GradientComputer: {e['method']}"
            if e["training_hooks"] is not None:  # a faithful run's training_pass
                line += (" (audit side), training side "
                         + ("hooks (verified)" if e["training_hooks"] else "generic Jacobian rows"))
        if r.get("repeat", 1) > 1:
            line += (f"; fastest of {r['repeat']} runs (train " + "/".join(f"{t:.1f}" for t in r["train_all_s"])
                     + " s, replay " + "/".join(f"{t:.1f}" for t in r["replay_all_s"]) + " s)")
        if r.get("load_average"):
            line += f"; 1-min load average {r['load_average'][0]:.1f} -> {r['load_average'][1]:.1f}"
        out.append(line)
    cap = comparisons.get("captum")
    if cap:
        if "error" in cap:
            out.append(f"captum-sgd: captum TracInCP not run ({cap['error']})")
        else:
            out.append(f"captum-sgd: captum TracInCP {cap['captum_s']:.2f} s (peak RSS "
                       f"{cap['captum_peak_rss_mib']:.0f}M) vs plgk euler replay {cap['plgk_replay_s']:.2f} s "
                       f"-> captum/plgk time {cap['speed_ratio']:.2f}x; relative error of the influence "
                       f"matrices {cap['relative_error']:.2e} ({cap['convention']})")
            out.append(f"captum-sgd: plgk replay --ghost (ghost dot products for the Linear layers) "
                       f"{cap['ghost_replay_s']:.2f} s -> captum/plgk-ghost time {cap['ghost_speed_ratio']:.2f}x; "
                       f"relative error {cap['ghost_relative_error']:.2e}")
            out.append(f"captum-sgd: one plain forward + backward of every training and audit example at "
                       f"every checkpoint (no per-example gradients) takes {cap['floor_s']:.2f} s: the least "
                       f"any exact TracIn computes; captum takes {cap['captum_s'] / cap['floor_s']:.2f}x "
                       f"that, plgk {cap['plgk_replay_s'] / cap['floor_s']:.2f}x")
    paper = comparisons.get("paper_a5")
    if paper:
        out.append(f"mnist-synthetic vs paper A.5 (MNIST/LeNet-5, {PAPER_A5['steps']:,} steps, their hardware): "
                   f"paper train {PAPER_A5['train_s']} s, audit {PAPER_A5['audit_s']:.0f} s, ratio "
                   f"{PAPER_A5['ratio']:.1f}x, {1000 * PAPER_A5['train_s'] / PAPER_A5['steps']:.1f} / "
                   f"{1000 * PAPER_A5['audit_s'] / PAPER_A5['steps']:.0f} ms/step | ours ({paper['steps']} steps, "
                   f"{paper['where']}): ratio {paper['ratio']:.1f}x, {paper['train_ms_per_step']:.1f} / "
                   f"{paper['replay_ms_per_step']:.0f} ms/step; extrapolated to {PAPER_A5['steps']:,} steps: "
                   f"train {paper['train_s_extrapolated']:.0f} s, replay {paper['replay_s_extrapolated']:.0f} s")
    mem = comparisons.get("memory")
    if mem:
        out.append(f"memory: replay peak RSS ~ {mem['intercept_mib']:.0f} MiB + {mem['mib_per_audit_point']:.3f} "
                   f"MiB x N + {mem['mib_per_batch_example']:.3f} MiB x batch (R^2 {mem['r2']:.3f}); per audit "
                   f"point = {mem['float64_copies_of_P_per_audit_point']:.1f} float64 vectors of P="
                   f"{mem['parameters']:,}; M x P in float64 would be {mem['m_times_p_float64_mib']:.0f} MiB")
        longer = comparisons.get("memory_steps")
        if longer:
            out.append(f"memory: same N and batch, {longer['steps_short']} vs {longer['steps_long']} steps: "
                       f"{longer['rss_short']:.0f} vs {longer['rss_long']:.0f} MiB (T does not enter)")
    for r in rows:
        if r.get("layer_split"):
            out.append(format_layer_split(r["layer_split"], r.get("label") or ""))
    if comparisons.get("idle_rss_mib"):
        out.append(f"an idle Python+torch+plgk process peaks at {comparisons['idle_rss_mib']:.0f} MiB RSS")
    return "\n".join(out)


def format_layer_split(split: dict, label: str = "") -> str:
    """The per-example-gradient time split by layer type (a transformer row's ``layer_split``)."""
    title = f"transformer {label}".strip()
    if "error" in split:
        return f"{title} layer split: not measured: " + split["error"].splitlines()[0]
    header = ("layer type", "path", "modules", "params", "rule ms", "fwd ms", "bwd ms", "per-ex ms", "alone ms",
              "share", "max rel diff")
    opt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    cells = [[r["type"], r["path"], str(r["modules"]), f"{r['params']:,}", opt(r.get("rule_ms")), f"{r['fwd_ms']:.2f}",
              f"{r['bwd_ms']:.2f}" if r["path"] == "hooks" else "-", f"{r['per_example_ms']:.2f}",
              f"{r['alone_ms']:.2f}", f"{r['share']:.1%}", f"{r['max_rel_diff']:.1e}"] for r in split["types"]]
    cells.append(["sum of the types", "", "", f"{sum(r['params'] for r in split['types']):,}",
                  opt(split["graph_rules_ms"]) if split["hook_modules"] else "-", "", "", "",
                  f"{split['sum_alone_ms']:.2f}", "100.0%", ""])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    line = lambda items: "  ".join(s.ljust(w) if i < 2 else s.rjust(w)  # noqa: E731
                                   for i, (s, w) in enumerate(zip(items, widths)))
    shared, engine, first, generic = (split[k] for k in ("shared_ms", "engine_ms", "engine_first_ms",
                                                         "engine_generic_ms"))
    hooks_path = split["engine_training_hooks"]
    out = [f"{title}: per-example loss-term gradients ({split['attention']}, P = {split['parameters']:,}), "
           f"{len(split['updates'])} recorded updates (steps {', '.join(map(str, split['updates']))}), minibatches "
           f"of {split['batch']}, {split['dtype']}, train mode with the recorded dropout; each figure the mean over "
           f"the updates of the fastest of {split['repeats']} per update, all measured side by side in one process "
           f"({split['torch_threads']} torch threads). Read the ratios.",
           f"  shared forward + backward of the batch loss to all of theta (what a training step computes): "
           f"{split['shared_fwd_ms']:.2f} + {split['shared_bwd_ms']:.2f} = {shared:.2f} ms",
           f"  engine = GradientComputer(model, layout, num_classes, {split['chunk']}, task=task) as replay builds it "
           f"(method 'auto': {split['engine_method']} on the audit side); training_pass takes the "
           + ("layer hooks (first call's check against jacobian_rows agreed)" if hooks_path
              else "generic Jacobian rows (no rule for every layer)" if hooks_path is False else "?")
           + f": {engine:.2f} ms = {engine / shared:.1f}x the shared forward + backward; a fresh engine's first call "
           f"{first:.2f} ms ({first / shared:.1f}x)" + (" (hooks + the one-time check)" if hooks_path else ""),
           f"  generic over all of theta, GradientComputer(method='generic').training_pass (forward, jacobian_rows, "
           f"batch gradient): {generic:.2f} ms = {generic / shared:.1f}x the shared forward + backward; "
           f"generic / engine {generic / engine:.2f}x",
           f"  one graph (one train-mode forward, all of theta one leaf, hooks on the {split['hook_modules']} rule "
           f"modules) {split['graph_fwd_ms']:.2f} ms: hooks = one backward of sum_m l_m to their outputs "
           f"{split['graph_bwd_ms']:.2f} ms + the rules {split['graph_rules_ms']:.2f} ms; generic = jacobian_rows "
           f"over all {split['parameters']:,} parameters {split['graph_jac_ms']:.2f} ms",
           "  per type: rule ms = its modules' rules (the engine's _layer_gradients) on that graph's output gradients; "
           "alone: fwd = a forward with only its parameters requiring grad (hooks on its modules), bwd = one backward "
           "of sum_m l_m to its modules' outputs, per-ex = per_example's rule (hooks) or jacobian_rows restricted to "
           "its parameters (generic), alone = their sum, share = alone / sum; max rel diff = max over examples of "
           "|g_m - J_m| / |J_m| over the type's parameters, against jacobian_rows over all of theta",
           "", line(header)] + [line(c) for c in cells] + [""]
    checks = (f"  max rel diff to jacobian_rows: engine {split['engine_vs_jacobian_rel_diff']:.1e}, its first call "
              f"{split['engine_first_vs_jacobian_rel_diff']:.1e}, method 'generic' "
              f"{split['engine_generic_vs_jacobian_rel_diff']:.1e}")
    if split.get("mixed_ms") is not None:
        hooked = [r["type"] for r in split["types"] if r["path"] == "hooks"]
        generic_types = [r["type"] for r in split["types"] if r["path"] == "generic"]
        out.append(f"  mixed (one forward; jacobian_rows over {' + '.join(generic_types)} only, one backward to the "
                   f"{'/'.join(hooked)} outputs and their rules): {split['mixed_ms']:.2f} ms = "
                   f"{split['mixed_ms'] / shared:.1f}x the shared forward + backward, engine / mixed "
                   f"{engine / split['mixed_ms']:.2f}x")
        checks += f", mixed {split['mixed_vs_jacobian_rel_diff']:.1e}"
    worst = split.get("worst_tensor") or {}
    if worst.get("name") and worst["max_rel_diff"] > 1e-3:
        checks += (f"; per parameter tensor the largest is {worst['name']} ({worst['max_rel_diff']:.1e}), whose "
                   f"Jacobian rows are rounding (largest |J_m| {worst['max_row_norm']:.1e})")
    out.append(checks)
    ratios = "; ".join(f"{r['type']} {r['alone_ms'] / shared:.2f}x" for r in split["types"])
    out.append(f"  each type alone / shared forward + backward: {ratios}")
    if split.get("vmap_fallbacks"):
        out.append("  the batched backward (is_grads_batched, torch's legacy vmap) has no batching rule for "
                   f"{', '.join(split['vmap_fallbacks'])}: it runs those one example at a time")
    for text in split.get("warnings", []):
        out.append(f"  warning: {text}")
    return "\n".join(out)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items() if not k.startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def run_bench(workloads: list, workdir: Path, *, device: str = "cpu", steps_scale: float | None =
              None, baseline: bool = True, profile: bool = False,
              captum_steps: int = 10, repeat: int = 1, quadrature_runs=None, echo=print) -> dict:
    rows, comparisons = [], {"idle_rss_mib": idle_rss(workdir)}
    train_cache: dict = {}
    for name in workloads:
        if name == "digits":
            todo = [digits_workload()]
        elif name == "mnist-synthetic":
            todo = [mnist_workload(workdir / "data", DEFAULT_STEPS_SCALE if steps_scale is None else steps_scale)]
        elif name == "captum-sgd":
            todo = [captum_workload(captum_steps)]
        elif name == "memory":
            todo = memory_workloads()
        elif name == "transformer":
            todo = transformer_workloads()
        elif name == "lm":
            todo = [lm_workload(workdir / "data", steps_scale)]
        elif name == "scale":
            import bench_scale

            w = mnist_workload(workdir / "data", DEFAULT_STEPS_SCALE if steps_scale is None else steps_scale)
            rows.append(bench_scale.run_scale(w, workdir, lambda w: train_phase(
                _with_device(w.config, "cpu"), workdir, w.name, baseline=False), echo=echo, repeat=repeat))
            continue
        elif name == "quadrature":
            for w in quadrature_workloads(quadrature_runs):
                echo(f"... {w.name} {w.label}: {', '.join(QUADRATURE_RULES)}", flush=True)
                rows.append(run_quadrature(w, workdir, device=device, repeat=repeat))
            continue
        else:
            raise SystemExit(f"unknown workload {name!r}; expected one of {', '.join(ALL_WORKLOADS)}")
        for w in todo:
            echo(f"... {w.name} {w.label}".rstrip(), flush=True)
            row = run_workload(w, workdir, device=device, baseline=baseline and name != "memory",
                               profile=profile, keep_scores=name == "captum-sgd",
                               train_cache=train_cache, repeat=1 if name == "memory" else repeat)
            rows.append(row)
            if name == "captum-sgd":
                comparisons["captum"] = _captum_or_reason(row, workdir, repeat)
            if name == "transformer":
                echo(f"... {w.name} {w.label}: per-example-gradient time by layer type", flush=True)
                row["layer_split"] = _layer_split_or_reason(row, workdir)
            if name == "mnist-synthetic":
                comparisons["paper_a5"] = {
                    "steps": row["steps"], "ratio": row["replay_ratio"],
                    "where": f"{device}, {row['torch_threads']} torch threads",
                    "train_ms_per_step": row["train_ms_per_step"],
                    "replay_ms_per_step": row["replay_ms_per_step"],
                    "train_s_extrapolated": row["train_ms_per_step"] * PAPER_A5["steps"] / 1000,
                    "replay_s_extrapolated": row["replay_ms_per_step"] * PAPER_A5["steps"] / 1000,
                    "paper": PAPER_A5}
        if name == "memory":
            comparisons["memory"] = memory_fit(rows)
            mem = [r for r in rows if r["workload"] == "memory"]
            longer = [r for r in mem if "ep" in r["label"]]
            if longer:
                same = [r for r in mem if r["num_audit"] == longer[0]["num_audit"]
                        and r["batch_size"] == longer[0]["batch_size"] and r is not longer[0]]
                if same:
                    comparisons["memory_steps"] = {
                        "steps_short": same[0]["steps"], "steps_long": longer[0]["steps"],
                        "rss_short": same[0]["replay_peak_rss_mib"], "rss_long": longer[0]["replay_peak_rss_mib"]}
    return {"rows": rows, "comparisons": comparisons}


def _layer_split_or_reason(row: dict, workdir: Path) -> dict:
    try:
        return run_child({"kind": "layersplit", "run": row["run_dir"]}, workdir / "logs", "layersplit")
    except RuntimeError as exc:  # the row's own measurements stand; say why the split is missing
        return {"error": str(exc)}


def _captum_or_reason(row: dict, workdir: Path, repeat: int = 1) -> dict:
    try:
        import importlib.util

        if importlib.util.find_spec("captum") is None:
            return {"error": "captum is not installed: pip install '.[bench]'"}
        out = captum_comparison(row, workdir, repeat=repeat)
        out["plgk_replay_s"] = row["replay_s"]
        return out
    except RuntimeError as exc:
        return {"error": str(exc).splitlines()[0]}


def environment(device: str) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)) if hasattr(
               os, "sched_getaffinity") else None, "device": device, "timing": TIMING_NOTE,
           "torch_threads": TORCH_THREADS or torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    try:  # the code measured: commit, and whether the working tree differed from it
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
        env["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--", "plgk_cli"], cwd=ROOT,
                                               capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        env["cpu_model"] = next(line.split(":", 1)[1].strip() for line in
                                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return env


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", action="append", choices=ALL_WORKLOADS + ("all",),
                        help=f"repeatable; default: {' '.join(DEFAULT_WORKLOADS)}; all = every workload")
    parser.add_argument("--steps-scale", type=float, default=None,
                        help="mnist-synthetic: fraction of the paper's 10,000 steps "
                             f"(default {DEFAULT_STEPS_SCALE:g} = {round(DEFAULT_STEPS_SCALE * 10000)} steps; "
                             "0.02 = one epoch of 200); lm: that fraction of the config's epochs, "
                             "rounded, at least one (default: all of them)")
    parser.add_argument("--captum-steps", type=int, default=10, help="captum-sgd: full-batch SGD steps")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each timed phase K times and keep the fastest (for a machine shared "
                             "with other load; the memory grid always runs once)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every phase (default: torch's, = cores). On a machine "
                             "shared with other busy processes, 2 threads on 2 cores can make small "
                             "models' steps 10-30x slower (threads wait on each other); 1 is robust")
    parser.add_argument("--quadrature-runs", default=None,
                        help="quadrature: comma-separated run names (default: all but "
                             f"{', '.join(QUADRATURE_SKIPPED)}); one of {', '.join(QUADRATURE_RUNS)}")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the second, un-recorded training run")
    parser.add_argument("--profile", action="store_true", help="cProfile the replay phase (top 25 printed)")
    parser.add_argument("--json-out", default=str(ROOT / "bench-results" / "bench.json"))
    parser.add_argument("--workdir", default=None, help="keep runs and logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    global TORCH_THREADS, FAILED_LOGS
    TORCH_THREADS = args.threads
    if not args.workdir:
        FAILED_LOGS = Path(args.json_out).parent / "failed-logs"
    if args.steps_scale is not None and not 0 < args.steps_scale <= 1:
        parser.error("--steps-scale must be in (0, 1]")
    workloads = args.workload or list(DEFAULT_WORKLOADS)
    if "all" in workloads:
        workloads = list(ALL_WORKLOADS)
    workloads = list(dict.fromkeys(workloads))
    quadrature_runs = None
    if args.quadrature_runs:
        quadrature_runs = [n.strip() for n in args.quadrature_runs.split(",") if n.strip()]
        unknown = [n for n in quadrature_runs if n not in QUADRATURE_RUNS]
        if unknown:
            parser.error(f"--quadrature-runs: unknown run(s) {', '.join(unknown)}; expected some of "
                         f"{', '.join(QUADRATURE_RUNS)}")
    command = " ".join([Path(sys.executable).name, "scripts/bench.py", *(argv if argv is not None else sys.argv[1:])])
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env_at_start = environment(args.device)
    with tempfile.TemporaryDirectory(prefix="plgk-bench-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        result = run_bench(workloads, workdir, device=args.device, steps_scale=args.steps_scale,
                           baseline=not args.no_baseline, profile=args.profile,
                           captum_steps=args.captum_steps, repeat=args.repeat,
                           quadrature_runs=quadrature_runs)
        rows = result["rows"]
        print()
        plain = [r for r in rows if r["workload"] not in ("quadrature", "scale")]
        if plain:
            print(format_table(plain))
        print(format_notes([r for r in rows if r["workload"] != "scale"], result["comparisons"]))
        if any(r["workload"] == "quadrature" for r in rows):
            print()
            print(format_quadrature_table(rows))
        for r in rows:
            if r["workload"] == "scale":
                import bench_scale

                print()
                print(bench_scale.format_scale_table(r))
        if args.profile:
            for r in rows:
                print(f"\n--- replay profile: {r['workload']} {r.get('label') or ''} (top 25 by own time) ---")
                print(r["profile_top"])
    env = environment(args.device)
    if env.get("git_commit") != env_at_start.get("git_commit"):
        env["git_commit_at_start"] = env_at_start.get("git_commit")  # the code changed during the run
    doc = {"command": command, "started": started, "environment": env,
           "workloads": workloads, "rows": rows, "comparisons": result["comparisons"], "paper_a5": PAPER_A5}
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(doc), indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
