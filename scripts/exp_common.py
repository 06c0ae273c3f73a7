"""Shared helpers of the paper-experiment scripts (exp_pruning, exp_adversarial, exp_modes_k,
exp_fidelity): the base run, an unrecorded retrain that follows `plgk train` exactly, PGD, and
the output folder. Not part of plgk_cli; scripts only."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from plgk_cli import trajectory
from plgk_cli.config import load_config
from plgk_cli.data import load_dataset
from plgk_cli.models import build_model
from plgk_cli.train import Schedule, build_optimizer, train

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench-results" / "experiments"


def common_args(parser, *, epochs_default=None):
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.toml"))
    parser.add_argument("--mnist", default=None, help="directory of the MNIST IDX files (replaces digits)")
    parser.add_argument("--epochs", type=int, default=epochs_default, help="override [train] epochs")
    parser.add_argument("--batch-size", type=int, default=None, help="override [train] batch_size")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT))
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test scale")
    return parser


def make_config(args, dataset: str | None = None):
    config = load_config(args.config)
    train_cfg = config.train
    epochs = args.epochs or (1 if args.quick else None)
    batch = args.batch_size or (256 if args.quick else None)
    if epochs:
        train_cfg = dataclasses.replace(train_cfg, epochs=epochs)
    if batch:
        train_cfg = dataclasses.replace(train_cfg, batch_size=batch)
    data_cfg = config.data
    spec = dataset or (f"mnist:{args.mnist}" if args.mnist else None)
    if spec is None and args.quick:
        spec = quick_dataset(Path(args.out_dir))
    if spec:
        data_cfg = dataclasses.replace(data_cfg, dataset=spec)
    return dataclasses.replace(config, train=train_cfg, data=data_cfg)


QUICK_TRAIN, QUICK_TEST = 128, 48


def quick_dataset(out: Path) -> str:
    """--quick: the first 256 training and 64 test rows of digits as an npz (smoke-test scale)."""
    path = out / "quick-digits.npz"
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        d = load_dataset("digits", 0, torch.float32)
        tmp = out / f"quick-digits.{os.getpid()}.npz"
        np.savez(tmp, x_train=d.x_train[:QUICK_TRAIN].numpy(), y_train=d.y_train[:QUICK_TRAIN].numpy(),
                 x_test=d.x_test[:QUICK_TEST].numpy(), y_test=d.y_test[:QUICK_TEST].numpy())
        os.replace(tmp, path)
    return f"npz:{path.resolve()}"


def config_tag(config) -> str:
    c = config.to_dict()
    return (f"{Path(str(c['data']['dataset'])).name.replace(':', '_')}-{c['model']['name']}-{c['optim']['name']}"
            f"-lr{c['optim']['lr']:g}-e{c['train']['epochs']}-b{c['train']['batch_size']}-s{c['train']['seed']}")


def base_run(config, out_dir: Path) -> Path:
    """Train and record the config once into OUT/runs/<tag>; later calls reuse it."""
    run = Path(out_dir) / "runs" / config_tag(config)
    if (run / trajectory.MANIFEST).is_file() and trajectory.read_manifest(run).get("complete"):
        return run
    run.parent.mkdir(parents=True, exist_ok=True)
    tmp = run.with_name(f"{run.name}.tmp{os.getpid()}")
    start = time.perf_counter()
    train(config, tmp, progress=False)
    try:
        os.replace(tmp, run)  # another script may have won the race: use its run
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[trained {run} in {time.perf_counter() - start:.1f}s]", flush=True)
    return run


def final_model(run: Path) -> torch.nn.Module:
    """θ_T of a recorded run as a torch model (float32, eval only)."""
    manifest = trajectory.read_manifest(run)
    d = manifest["dataset"]
    model = build_model(manifest["model"]["name"], manifest["model"]["kwargs"], tuple(d["in_shape"]),
                        d["num_classes"])
    ck = trajectory.read_checkpoint(run, manifest["total_steps"])
    model.load_state_dict({k: v.to(torch.float32) for k, v in ck.params.items()}, strict=True)
    return model.eval()


def load_run_data(run: Path):
    m = trajectory.read_manifest(run)
    return load_dataset(m["dataset"]["spec"], m["dataset"]["seed"], torch.float32)


def retrain(config, data, keep: np.ndarray | None = None, *, seed: int | None = None,
            total_steps: int | None = None) -> torch.nn.Module:
    """The `plgk train` loop (same seeds, init, shuffles, lr schedule) on the rows ``keep`` of the
    training split, without recording: a retrain from scratch on the pruned set.

    ``seed`` replaces [train] seed (init and shuffles). ``total_steps`` fixes the number of
    optimizer updates instead of [train] epochs: the epochs are repeated (a fresh shuffle each) and
    the last one cut where the count is reached, so a pruned set gets as many updates as the full
    one. Without it the loop is exactly `plgk train`'s (epochs x ceil(m / batch) updates)."""
    x, y = data.x_train, data.y_train
    if keep is not None:
        keep = torch.as_tensor(np.sort(keep))
        x, y = x[keep], y[keep]
    seed = config.train.seed if seed is None else seed
    torch.manual_seed(seed)
    model = build_model(config.model.name, config.model.kwargs, data.in_shape, data.num_classes)
    optimizer = build_optimizer(config, model)
    m = len(y)
    bs = min(config.train.batch_size, m)
    total = config.train.epochs * -(-m // bs) if total_steps is None else int(total_steps)
    gen = torch.Generator().manual_seed(seed)
    schedule = Schedule(config, optimizer, total)
    step = 0
    while step < total:
        for batch in torch.randperm(m, generator=gen).split(bs):
            if step == total:
                break
            schedule.before_update(step)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            if config.optim.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_grad_norm)
            optimizer.step()
            schedule.after_update()
            step += 1
    return model.eval()


def steps_of(config, m: int) -> int:
    """Optimizer updates of `plgk train` on m training rows: epochs x ceil(m / batch)."""
    return config.train.epochs * -(-m // min(config.train.batch_size, m))


def mean_sd_se(values) -> dict:
    """mean, sample sd (ddof 1) and standard error of the mean of a list of per-seed numbers."""
    a = np.asarray(values, dtype=np.float64)
    sd = float(a.std(ddof=1)) if len(a) > 1 else float("nan")
    return {"mean": float(a.mean()), "sd": sd, "se": sd / np.sqrt(len(a)), "n": len(a), "all": a.tolist()}


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return float((model(x).argmax(1) == y).float().mean()) if len(y) else float("nan")


def pgd(model, x, y, eps: float, step: float, iters: int, seed: int = 0, random_start: bool = True):
    """L∞ PGD (Madry et al.) maximizing the cross-entropy at the true labels; pixels kept in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    x0 = x.detach()
    xa = x0 + (torch.rand(x0.shape, generator=gen) * 2 - 1) * eps if random_start else x0.clone()
    xa = xa.clamp(0, 1)
    for _ in range(iters):
        xa.requires_grad_(True)
        loss = F.cross_entropy(model(xa), y)
        (grad,) = torch.autograd.grad(loss, xa)
        xa = xa.detach() + step * grad.sign()
        xa = torch.min(torch.max(xa, x0 - eps), x0 + eps).clamp(0, 1)
    return xa.detach()


def random_sign_perturbation(x, eps: float, seed: int = 0):
    """The same L∞ budget in a random direction: every pixel moved by ±eps, clipped to [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, x.shape, generator=gen).to(x.dtype) * 2 - 1
    return (x + eps * sign).clamp(0, 1)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children (resource.getrusage):
    unlike wall time, not inflated while the process is paused (SIGSTOP) or shares its cores."""
    import resource
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Stopwatch:
    """Wall and CPU seconds per named phase; timing the same name again adds to it.

        clock = Stopwatch()
        with clock("replay"):
            ...
        clock.rows  # {"replay": {"wall_s": ..., "cpu_s": ...}}
    """

    def __init__(self):
        self.rows: dict = {}

    def __call__(self, name: str):
        import contextlib

        @contextlib.contextmanager
        def span():
            w0, c0 = time.perf_counter(), cpu_seconds()
            try:
                yield
            finally:
                row = self.rows.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
                row["wall_s"] += time.perf_counter() - w0
                row["cpu_s"] += cpu_seconds() - c0
        return span()


def out_dir(args) -> Path:
    d = Path(args.out_dir)
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float))
    print(f"[wrote {path}]")


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    shown = str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else sys.argv[0]
    return "python " + " ".join([shown] + sys.argv[1:])
