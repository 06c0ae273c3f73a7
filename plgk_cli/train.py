"""`plgk train`: train a model from a RunConfig and record its trajectory.

The loop is an ordinary PyTorch loop; plgk_cli.recorder.Recorder writes the run directory, the
same writer a user's own loop uses.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from plgk_cli import _callable_module
from plgk_cli.config import GROUP_KEYS, RunConfig, ScheduleConfig
from plgk_cli.data import load_dataset, to_device
from plgk_cli.errors import ConfigError, Interrupted, OutputError
from plgk_cli.models import (build_model, check_model, check_output, forward_of, mode_dependent,
                             vocabulary)
from plgk_cli.optimizers import Hyper, build_torch_optimizer
from plgk_cli.outputs import check_apart_from_inputs, check_can_create, check_run_not_claimed
from plgk_cli.recorder import DTYPE_NAMES, Recorder
from plgk_cli.tasks import task_code, task_for
from plgk_cli.threads import apply_default as apply_default_threads
from plgk_cli.trajectory import (MANIFEST, RECORDED_BY_TRAIN, check_new_run_dir,
                                 check_replaceable_run_dir)


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


def parameter_groups(config: RunConfig, model: torch.nn.Module) -> list[dict]:
    """torch parameter groups from [optim] and its [[optim.groups]]: each trainable parameter goes
    to the first group whose patterns match its name, the others to [optim]'s own group (first).
    Refuses (ConfigError) a group that matches no parameter."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    o = config.optim
    members: list[list] = [[] for _ in range(len(o.groups) + 1)]
    for name, p in named:
        index = next((i for i, g in enumerate(o.groups, start=1)
                      if any(fnmatch.fnmatchcase(name, pattern) for pattern in g.params)), 0)
        members[index].append(p)
    groups = [{"params": members[0]}] if members[0] else []
    for number, (group, params) in enumerate(zip(o.groups, members[1:]), start=1):
        if not params:
            example = ", ".join(repr(n) for n, _ in named[:3])
            raise ConfigError(f"[[optim.groups]] #{number} params {list(group.params)}: matches no "
                              f"trainable parameter of the model (its names are like {example}); fix "
                              "the patterns or remove the group")
        values = {k: getattr(group, k) for k in GROUP_KEYS if getattr(group, k) is not None}
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        groups.append({"params": params, **values})
    return groups


class Schedule:
    """[schedule] over an optimizer's groups: ``before_update(step)`` sets each group's lr for
    update ``step`` (0-based) from its own base lr, or, for onecycle and cyclic, torch's OneCycleLR
    or CyclicLR (each group's lr its max_lr) sets lr and momentum / β1 and ``after_update()``
    advances it. ``done`` updates already made (a resumed run) are stepped over."""

    def __init__(self, config: RunConfig, optimizer: torch.optim.Optimizer, total_steps: int, done: int = 0):
        self.config, self.optimizer, self.total_steps = config.schedule, optimizer, total_steps
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.scheduler = self._torch_scheduler()
        if self.scheduler is not None:
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(done):
                    self.scheduler.step()

    def _torch_scheduler(self):
        sch, optimizer = self.config, self.optimizer
        cycle = dict(cycle_momentum=sch.cycle_momentum, base_momentum=sch.base_momentum,
                     max_momentum=sch.max_momentum)
        if sch.name == "onecycle":
            return torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=self.base_lrs, total_steps=self.total_steps, pct_start=sch.pct_start,
                div_factor=sch.div_factor, final_div_factor=sch.final_div_factor, **cycle)
        if sch.name == "cyclic":
            return torch.optim.lr_scheduler.CyclicLR(
                optimizer, base_lr=[lr / sch.div_factor for lr in self.base_lrs], max_lr=self.base_lrs,
                step_size_up=sch.step_size, **cycle)
        return None

    def before_update(self, step: int) -> None:
        if self.scheduler is None:
            for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = learning_rate(self.config, base_lr, step, self.total_steps)

    def after_update(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()


def build_optimizer(config: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The torch optimizer of [optim] and its [[optim.groups]] over the model's parameters."""
    return build_torch_optimizer(hyper_from_config(config), parameter_groups(config, model), config.optim.lr)


def check_hyper_range(optimizer: torch.optim.Optimizer, dtype: torch.dtype) -> None:
    """Refuse (ConfigError) an optimizer value beyond the parameters' dtype (lr = 1e300 in
    float32), which torch cannot apply to them (it raises in the middle of the first update)."""
    limit = torch.finfo(dtype).max
    for group in optimizer.param_groups:
        for key, value in group.items():
            values = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and math.isfinite(v) and abs(v) > limit for v in values):
                raise ConfigError(f"[optim] {key} = {value}: beyond the range of {DTYPE_NAMES[dtype]} ([train] "
                                  "dtype), so torch cannot apply it to the parameters; lower it or train in "
                                  "float64")


def hyper_from_config(config: RunConfig) -> Hyper:
    o = config.optim
    return Hyper(name=o.name, momentum=o.momentum, dampening=o.dampening, nesterov=o.nesterov,
                 betas=tuple(o.betas), eps=o.resolved_eps(), alpha=o.alpha,
                 weight_decay=o.weight_decay, amsgrad=o.amsgrad, centered=o.centered)


def check_out_dir(out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
                  inputs: dict | None = None) -> None:
    """--out as --resume and --overwrite want it, checked before anything is loaded: new or empty;
    with ``resume`` an interrupted run; with ``overwrite`` also a run directory to replace, which
    holds none of ``inputs`` (option -> path: the --config file, the dataset file). Another
    process writing the run is refused, and so is a folder that cannot be written. Creates nothing:
    the Recorder claims the run directory (outputs.claim_run_dir) and checks it again."""
    if resume and overwrite:
        raise ConfigError("--overwrite and --resume: give one; --resume continues the interrupted "
                          "run in --out, --overwrite replaces it with a new run")
    if overwrite:  # the only mode that deletes what --out holds
        check_apart_from_inputs({"--out": out_dir}, inputs or {}, "plgk train")
        check_replaceable_run_dir(out_dir)
    elif not resume:
        check_new_run_dir(out_dir, overwrite_flag="--overwrite", out_name="--out")
    elif not (Path(out_dir) / MANIFEST).is_file():
        raise OutputError(f"{out_dir}: no run to resume (no manifest.json); train without --resume")
    else:
        check_run_not_claimed(out_dir)
    check_can_create(out_dir)


def train(config: RunConfig, out_dir: str | Path, *, progress: bool = True, resume: bool = False,
          overwrite: bool = False, allow_nonfinite: bool = False) -> dict:
    """Train and record; returns the manifest. Refuses a non-empty output directory unless
    ``resume``, which continues an interrupted run from its last checkpoint (bit-identical on CPU),
    or ``overwrite``, which replaces the run there once the new one is complete (check_out_dir).
    A step whose loss, gradients or updated parameters are not finite stops the run
    (NonFiniteError) unless ``allow_nonfinite``, which records it and marks the manifest."""
    check_out_dir(out_dir, resume=resume, overwrite=overwrite)  # before the data are loaded: fail fast
    dtype = torch.float64 if config.train.dtype == "float64" else torch.float32
    device = resolve_device(config.train.device)
    task = task_for(config.task.name)
    data = load_dataset(config.data.dataset, config.data.seed, dtype, task)

    torch.manual_seed(config.train.seed)
    model = build_model(config.model.name, config.model.kwargs, data.in_shape, data.num_classes)
    rows = vocabulary(model)
    if task.label_kind == "tokens" and rows is not None and rows < data.num_classes:
        raise ConfigError(f"[model] {config.model.name}: its input embedding has {rows} rows, fewer than the "
                          f"data's vocabulary ({data.num_classes} token ids in {config.data.dataset}); give the "
                          "model a vocabulary that large (gpt: vocab, a transformers config: vocab_size)")
    if config.checkpoint.every > 1 and mode_dependent(model):
        raise ConfigError(f"[checkpoint] every = {config.checkpoint.every}: the model has dropout or "
                          f"BatchNorm ({mode_dependent(model)[0]!r}), which sparse runs do not re-simulate "
                          "yet; use every = 1")
    model = model.to(device=device, dtype=dtype).train()
    # before the run directory is started: a model plgk cannot train or record is refused now
    check_model(model, config.model.name, to_device(data.x_train[:2], device, dtype), task, data.num_classes,
                to_device(data.y_train[:2], device, dtype))
    optimizer = build_optimizer(config, model)
    check_hyper_range(optimizer, dtype)
    m = len(data.y_train)
    batch_size = min(config.train.batch_size, m)
    recorder = Recorder(out_dir, model, optimizer, model_name=config.model.name,
                        model_kwargs=config.model.kwargs, dataset=data, data_seed=config.data.seed,
                        batch_size=batch_size, epochs=config.train.epochs, config=config.to_dict(),
                        schedule=dataclasses.asdict(config.schedule), resume=resume,
                        checkpoint_every=config.checkpoint.every, task=task, overwrite=overwrite,
                        recorded_by=RECORDED_BY_TRAIN, allow_nonfinite=allow_nonfinite)
    replacing = recorder.replaces is not None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # what replay counts
    apply_default_threads(trainable, device, progress)
    try:
        _train_loop(config, recorder, model, optimizer, data, task, device, dtype, progress)
    except KeyboardInterrupt:
        if not replacing:
            raise  # the run directory keeps the steps so far, for --resume
        raise Interrupted(f"{out_dir}: interrupted; the new run was deleted and {out_dir} still holds "
                          "the run it was to replace") from None
    return recorder.manifest


def _train_loop(config: RunConfig, recorder: Recorder, model, optimizer, data, task, device, dtype,
                progress: bool) -> None:
    """The updates not yet recorded, each recorded; inside the Recorder's with block from the
    start, so that a failure anywhere ends the run as an interrupted one (or, when it was to
    replace another run, deletes it)."""
    m = len(data.y_train)
    batch_size = min(config.train.batch_size, m)
    with recorder:
        total_steps = recorder.manifest["total_steps"]
        x_train, y_train = to_device(data.x_train, device, dtype), to_device(data.y_train, device, dtype)
        generator = torch.Generator().manual_seed(config.train.seed)
        bar = tqdm(total=total_steps, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
        done = recorder.step_count  # > 0 when resuming: those updates are recorded already
        bar.update(done)
        schedule = Schedule(config, optimizer, total_steps, done)
        forward = forward_of(config.model.name)  # the user's model raising: one line naming its code
        task_loss = task_code(task, "batch_loss")  # and a py: task's loss
        step = 0
        for _ in range(config.train.epochs):
            # every epoch's order is drawn even when resuming, so the generator stays in step
            for batch in torch.randperm(m, generator=generator).split(batch_size):
                step += 1
                if step <= done:
                    continue
                # set before the update; the recorder takes each group's values from the optimizer
                schedule.before_update(recorder.step_count)
                optimizer.zero_grad(set_to_none=True)
                rows = batch.to(device)
                with forward:
                    output = model(x_train[rows])
                logits = check_output(output, config.model.name, len(rows), task, data.num_classes)
                with task_loss:
                    loss = task.batch_loss(output, y_train[rows])
                loss.backward()
                if config.optim.clip_grad_norm:
                    recorder.clip_grad_norm(config.optim.clip_grad_norm)
                optimizer.step()
                schedule.after_update()
                recorder.step(batch, loss, logits)
                bar.update(1)
                running = recorder.epoch_metrics()
                accuracy = running["train_accuracy"]
                bar.set_postfix(epoch=running["epoch"] + 1, loss=f"{running['train_loss']:.4f}",
                                **({} if accuracy is None else {"acc": f"{accuracy:.3f}"}))
    bar.close()


_callable_module(__name__, "train")  # plgk_cli.train(...) stays the function once this module is imported
