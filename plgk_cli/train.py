"""`plgk train`: train a model from a RunConfig and record its trajectory (trajectory.py format)."""

from __future__ import annotations

import dataclasses
import datetime
import math
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from plgk_cli import __version__
from plgk_cli.config import RunConfig, ScheduleConfig
from plgk_cli.data import load_dataset
from plgk_cli.errors import ConfigError, OutputError
from plgk_cli.gradients import ParameterLayout
from plgk_cli.models import build_model
from plgk_cli.optimizers import Hyper, build_torch_optimizer
from plgk_cli.trajectory import FORMAT, FORMAT_VERSION, write_checkpoint, write_manifest

CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_


def learning_rate(schedule: ScheduleConfig, base_lr: float, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based); warmup is linear, then the schedule."""
    if step < schedule.warmup_steps:
        return base_lr * (step + 1) / schedule.warmup_steps
    k = step - schedule.warmup_steps
    if schedule.name == "step":
        return base_lr * schedule.gamma ** (k // schedule.step_size)
    if schedule.name == "cosine":
        span = max(1, total_steps - schedule.warmup_steps)
        return 0.5 * base_lr * (1 + math.cos(math.pi * k / span))
    return base_lr


def resolve_device(name: str, where: str = "[train] device") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{where}: \"cuda\" requested but torch sees no CUDA device; "
                          "use \"auto\" or \"cpu\"")
    return torch.device(name)


def hyper_from_config(config: RunConfig) -> Hyper:
    o = config.optim
    return Hyper(name=o.name, momentum=o.momentum, dampening=o.dampening, nesterov=o.nesterov,
                 betas=tuple(o.betas), eps=o.resolved_eps(), alpha=o.alpha,
                 weight_decay=o.weight_decay, amsgrad=o.amsgrad, centered=o.centered)


def clip_gradients(params, max_norm: float) -> float:
    """Global grad-norm clipping as torch.nn.utils.clip_grad_norm_; returns the coefficient used."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = torch.clamp(max_norm / (total + CLIP_EPS), max=1.0)
    for g in grads:
        g.mul_(coef)
    return float(coef)


def optimizer_state(optimizer: torch.optim.Optimizer, named_params: dict) -> tuple[dict, int]:
    """Per-parameter state tensors (by parameter name) and the optimizer's step counter."""
    state, step = {}, 0
    for name, p in named_params.items():
        s = optimizer.state.get(p, {})
        state[name] = {k: v for k, v in s.items() if torch.is_tensor(v) and v.shape == p.shape}
        if "step" in s:
            step = int(s["step"])
    return state, step


def train(config: RunConfig, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Train and record; returns the manifest. Refuses a non-empty output directory."""
    if config.checkpoint.every != 1:
        raise ConfigError("[checkpoint] every: only 1 is supported so far (sparse checkpoints with "
                          "re-simulation are planned); set every = 1")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise OutputError(f"{out_dir}: exists and is not empty; choose a new --out or remove it")
    dtype = torch.float64 if config.train.dtype == "float64" else torch.float32
    device = resolve_device(config.train.device)
    data = load_dataset(config.data.dataset, config.data.seed, dtype)

    torch.manual_seed(config.train.seed)
    model = build_model(config.model.name, config.model.kwargs, data.in_shape, data.num_classes)
    model = model.to(device=device, dtype=dtype)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    layout = ParameterLayout.of(model)
    hyper = hyper_from_config(config)
    optimizer = build_torch_optimizer(hyper, list(named.values()), config.optim.lr)

    m = len(data.y_train)
    batch_size = min(config.train.batch_size, m)
    steps_per_epoch = math.ceil(m / batch_size)
    total_steps = steps_per_epoch * config.train.epochs
    run_id = uuid.uuid4().hex
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "run_id": run_id,
        "plgk_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_dict(),
        "dataset": {"spec": data.spec, "seed": config.data.seed, "fingerprint": data.fingerprint(),
                    "num_train": m, "num_test": len(data.y_test), "num_classes": data.num_classes,
                    "in_shape": list(data.in_shape)},
        "model": {"name": config.model.name, "kwargs": config.model.kwargs},
        "loss": "cross_entropy",
        "optimizer": dataclasses.asdict(hyper) | {"lr": config.optim.lr,
                                                  "clip_grad_norm": config.optim.clip_grad_norm},
        "schedule": dataclasses.asdict(config.schedule),
        "parameters": [{"name": n, "shape": list(s), "dtype": str(dtype).removeprefix("torch.")}
                       for n, s in zip(layout.names, layout.shapes)],
        "dtype": config.train.dtype, "device": str(device),
        "batch_size": batch_size, "epochs": config.train.epochs, "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps, "checkpoint_every": config.checkpoint.every, "complete": False,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(out_dir, manifest)
    write_checkpoint(out_dir, run_id, 0, named, {n: {} for n in named}, 0)

    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    generator = torch.Generator().manual_seed(config.train.seed)
    step = 0
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    for epoch in range(config.train.epochs):
        order = torch.randperm(m, generator=generator)
        correct, seen, loss_sum = 0, 0, 0.0
        for start in range(0, m, batch_size):
            batch = order[start:start + batch_size]
            lr = learning_rate(config.schedule, config.optim.lr, step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            logits = model(x_train[batch.to(device)])
            loss = F.cross_entropy(logits, y_train[batch.to(device)])
            loss.backward()
            clip = clip_gradients(named.values(), config.optim.clip_grad_norm) \
                if config.optim.clip_grad_norm else 1.0
            optimizer.step()
            step += 1
            state, optim_step = optimizer_state(optimizer, named)
            write_checkpoint(out_dir, run_id, step, named, state, optim_step or step, batch=batch,
                             lr=lr, clip_coef=clip, loss=loss.item(),
                             extra_metadata={"epoch": str(epoch)})
            correct += int((logits.argmax(1) == y_train[batch.to(device)]).sum())
            seen += len(batch)
            loss_sum += loss.item() * len(batch)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
    bar.close()

    with torch.no_grad():
        test_logits = model(data.x_test.to(device))
        test_acc = float((test_logits.argmax(1) == data.y_test.to(device)).float().mean()) \
            if len(data.y_test) else float("nan")
    manifest.update(complete=True, final={"train_loss": loss_sum / max(seen, 1),
                                          "train_accuracy": correct / max(seen, 1),
                                          "test_accuracy": test_acc})
    write_manifest(out_dir, manifest)
    return manifest
