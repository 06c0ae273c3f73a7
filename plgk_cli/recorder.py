"""Record a training loop of your own as a trajectory that `plgk replay` audits.

`plgk train` records through this class too, so the format has one writer: trajectory.py owns the
file and tensor names, this module decides what goes into them.

    data = load_dataset("digits")
    torch.manual_seed(0)
    model = mymodels.small_cnn(in_shape=data.in_shape, num_classes=data.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)
    with Recorder("runs/mine", model, optimizer, model_name="mymodels:small_cnn", dataset=data,
                  batch_size=64, epochs=5) as recorder:
        for epoch in range(5):
            for batch in torch.randperm(len(data.y_train)).split(64):
                optimizer.zero_grad()
                logits = model(data.x_train[batch])
                loss = F.cross_entropy(logits, data.y_train[batch])
                loss.backward()
                recorder.clip_grad_norm(1.0)       # optional; instead of clip_grad_norm_
                optimizer.step()
                recorder.step(batch, loss, logits)  # logits optional (train accuracy)

What replay assumes, and what is checked here:
- the model is what ``model_name(in_shape=..., num_classes=..., **model_kwargs)`` builds (checked:
  same parameter names and shapes). Dropout and BatchNorm are fine: the random state each training
  forward starts from is recorded when that forward draws random numbers, and buffers that
  training changes are recorded with every checkpoint; a buffer changed between updates, outside
  the forward, is refused (replay re-creates buffers from the training forward only), and so is a
  second random or buffer-changing training forward in one update;
- the optimizer is torch's SGD, Adam, AdamW, RMSprop or Adagrad (checked; others are refused
  with the reason, REFUSED_OPTIMIZERS), with any number of parameter groups over the model's
  parameters: every trainable one, and frozen ones too if they are to be unfrozen later (checked).
  Every update records each group's lr, momentum, dampening, betas, eps, alpha and weight decay as
  they were when it began, so any scheduler may change any of them; the switches (nesterov,
  amsgrad, centered, ...) and the groups themselves may not change (checked before every step).
  foreach and fused are accepted: replay's update check holds their arithmetic to the dtype's
  tolerance. A parameter whose .grad is None in an update (frozen, unused) is skipped by torch and
  recorded as such; a frozen one holding a zeroed .grad steps on a zero gradient;
- every optimizer.step() is followed by one recorder.step() (checked);
- the loss is the task's Σ_m w_m ℓ_m over the training rows ``batch`` (``task``, default
  classification: the mean cross-entropy) and nothing else (not checkable here: `plgk replay`
  compares the recorded loss with the task's and re-derives every recorded update, and stops where
  either differs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import uuid
from pathlib import Path

import numpy as np
import torch

from plgk_cli import __version__, outputs, trajectory
from plgk_cli.data import Dataset, dataset_files, load_dataset
from plgk_cli.errors import ConfigError, DataError, NonFiniteError, OutputError, RecorderError
from plgk_cli.gradients import ParameterLayout
from plgk_cli.models import build_model
from plgk_cli.optimizers import HYPER_FIELDS, Hyper
from plgk_cli.outputs import check_apart_from_inputs, remedy, write_failure
from plgk_cli.trajectory import GRAD_LOSS, GRAD_NONE, GRAD_ZERO
from plgk_cli.tasks import Task, task_for

CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_
DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}
# Exact classes: a subclass may change the update that replay models.
OPTIMIZER_NAMES = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw",
                   torch.optim.RMSprop: "rmsprop", torch.optim.Adagrad: "adagrad"}
# Why other optimizers are refused, by class name (torch's and the common third-party ones).
_NOT_LINEAR = ("is not a linear map of the batch gradient given the recorded state, so no exact "
               "split into per-example terms exists")
_NO_DECOMPOSITION = ("is linear in the gradients given its recorded state, but plgk has no "
                     "decomposition for it yet (it would need its own rule in plgk_cli/optimizers.py)")
REFUSED_OPTIMIZERS = {
    "Lion": f"its step sign(β1 m + (1 − β1) g) {_NOT_LINEAR}",
    "Rprop": f"its step, the sign of the gradient with step sizes adapted on sign changes, {_NOT_LINEAR}",
    "Muon": f"its step, the momentum orthogonalised by Newton–Schulz iterations, {_NOT_LINEAR}",
    "LBFGS": "it line-searches with several loss evaluations per step (a closure), so its update "
             "is not one minibatch gradient's linear map",
    "SparseAdam": "it takes sparse gradients; plgk decomposes dense updates",
    "Adafactor": "its update is divided by its own root mean square per tensor, a non-linear function "
                 "of the batch gradient; an exact audit would need that per-tensor scale recorded at "
                 "every step (not implemented)",
    **{name: f"its update {_NO_DECOMPOSITION}" for name in ("Adamax", "NAdam", "RAdam", "Adadelta", "ASGD")},
}
SUPPORTED = "torch.optim.SGD, Adam, AdamW, RMSprop or Adagrad"
# Options that switch torch to an update rule the decomposition does not follow. foreach and
# fused change only the arithmetic's order: replay's update check holds them to the dtype's
# tolerance and refuses a run where they drift further.
UNSUPPORTED_FLAGS = ("maximize", "capturable", "differentiable")
# Options that must hold for every group and the whole run: replay models one family of update.
STATIC_OPTIONS = ("nesterov", "amsgrad", "centered", "decoupled_weight_decay", "maximize",
                  "capturable", "differentiable")
EVAL_CHUNK = 4096  # test examples per forward pass for the final test accuracy
# Manifest key of a run recorded with allow_nonfinite whose updates went NaN or Inf:
# {"first_step": t}, the first update t with a non-finite loss, gradient or parameter.
NONFINITE = "nonfinite"


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
            step = max(step, int(s["step"]))
    return state, step


def optimized_parameters(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """The model's parameters that the optimizer holds, by name in the model's order: what a run
    records (a layer frozen now but unfrozen later among them). Refuses (ConfigError) parameters
    the optimizer holds that are not the model's, and trainable ones it does not hold."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    named = {n: p for n, p in model.named_parameters() if id(p) in held}
    if len(named) != len(held):
        raise ConfigError("optimizer: holds tensors that are not parameters of the model; build it "
                          "from model.parameters() (or named groups of them)")
    idle = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if idle:
        raise ConfigError(f"optimizer: does not hold the trainable parameter {idle[0]!r}"
                          f"{f' (and {len(idle) - 1} more)' if len(idle) > 1 else ''}; add it to a "
                          "parameter group, or freeze it with requires_grad_(False)")
    return named


def hyper_from_optimizer(optimizer: torch.optim.Optimizer) -> Hyper:
    """The family and switches replay models, with the first group's values. Refuses
    (ConfigError) an optimizer whose update the decomposition would not reproduce."""
    cls = type(optimizer)
    name = OPTIMIZER_NAMES.get(cls)
    if name is None:
        reason = REFUSED_OPTIMIZERS.get(cls.__name__)
        where = f"{cls.__module__}.{cls.__qualname__}"
        raise ConfigError(f"optimizer: {where} is not supported" + (f": {reason}" if reason else "")
                          + f"; use {SUPPORTED}, whose updates replay models exactly")
    groups = optimizer.param_groups
    for flag in UNSUPPORTED_FLAGS:
        if any(group.get(flag) for group in groups):
            raise ConfigError(f"optimizer: {flag}=True is not supported (replay models the plain "
                              f"update); build it with {flag}=False")
    for option in STATIC_OPTIONS:
        values = [bool(group.get(option, False)) for group in groups]
        if len(set(values)) > 1:
            raise ConfigError(f"optimizer: {option} differs between parameter groups ({values}); replay "
                              "models one update rule: give every group the same value")
    group = groups[0]
    if name == "adagrad" and any(g.get("lr_decay") or g.get("initial_accumulator_value") for g in groups):
        raise ConfigError("optimizer: Adagrad's lr_decay and initial_accumulator_value must be 0 "
                          "(replay models neither)")
    if name == "adam" and group.get("decoupled_weight_decay"):
        name = "adamw"  # Adam(decoupled_weight_decay=True) is AdamW
    # Options a family lacks keep Hyper's defaults, which are the ones `plgk train` records too.
    defaults = Hyper(name)
    return Hyper(
        name=name, momentum=float(group.get("momentum", defaults.momentum)),
        dampening=float(group.get("dampening", defaults.dampening)),
        nesterov=bool(group.get("nesterov", defaults.nesterov)),
        betas=tuple(float(b) for b in group.get("betas", defaults.betas)),
        eps=float(group.get("eps", defaults.eps)), alpha=float(group.get("alpha", defaults.alpha)),
        weight_decay=float(group.get("weight_decay", defaults.weight_decay)),
        amsgrad=bool(group.get("amsgrad", defaults.amsgrad)),
        centered=bool(group.get("centered", defaults.centered)))


def group_values(optimizer: torch.optim.Optimizer, family: str) -> torch.Tensor:
    """What each parameter group holds now, one row per group in the columns of HYPER_FIELDS;
    ``family`` (hyper_from_optimizer's name) gives the values of options it lacks."""
    defaults = Hyper(family)
    rows = []
    for group in optimizer.param_groups:
        betas = group.get("betas", defaults.betas)
        values = {"lr": group["lr"], "momentum": group.get("momentum", defaults.momentum),
                  "dampening": group.get("dampening", defaults.dampening), "beta1": betas[0],
                  "beta2": betas[1], "eps": group.get("eps", defaults.eps),
                  "alpha": group.get("alpha", defaults.alpha),
                  "weight_decay": group.get("weight_decay", defaults.weight_decay)}
        rows.append([float(values[f]) for f in HYPER_FIELDS])  # float(): a tensor lr or beta too
    return torch.tensor(rows, dtype=torch.float64)


def _group_record(group: dict, names: list, values: list) -> dict:
    """A parameter group as the manifest records it: its parameters and starting values."""
    row = dict(zip(HYPER_FIELDS, values))
    row["lr"] = float(group.get("initial_lr", row["lr"]))  # a scheduler keeps the base rate there
    return {"params": names, **row}


class Recorder:
    """Writes the run directory of one training run: the manifest and checkpoint 0 now, one
    checkpoint per ``step()`` (with ``checkpoint_every`` K > 1: one per K steps, carrying the
    records of its block), the completed manifest at ``finish()`` (or the end of a ``with``
    block; an exception leaves ``complete: false``: replay refuses the run until a Recorder with
    ``resume=True`` finishes it).

    ``overwrite=True`` replaces the run already in ``out_dir`` (refused, OutputError, unless the
    directory holds a plgk run and nothing else): the new run is written into a sibling directory
    (``out_dir`` names it until then) and renamed into place by ``finish()``, so the old run stays
    whole until the new one is; an exception in the ``with`` block (or in ``finish()``) deletes the
    new run instead, and there is nothing to resume. Where ``out_dir`` was missing or empty there
    is nothing to replace: the run is written there and an interrupted one stays resumable.
    ``recorded_by`` goes into the manifest (`plgk train` passes ``"plgk train"``): it decides what
    `plgk check` advises for an interrupted run.

    ``dataset`` is a spec that load_dataset reads (``npz:PATH``, ``py:package.module:function``,
    ``digits``, ...) or the Dataset it returned, unchanged: replay reloads the data from its spec
    and refuses them if their fingerprint differs. ``batch_size`` and ``epochs`` plan the run
    (``steps_per_epoch`` defaults to ceil(num_train / batch_size); pass it when the loop drops
    the last partial batch); ``finish()`` records the number of updates actually made.
    ``config`` and ``schedule`` are what `plgk train` knows about its run (null otherwise).

    ``step()`` refuses (NonFiniteError) an update whose loss, gradients or updated parameters hold
    NaN or Inf, before recording it: the run stays the unfinished run of the updates before it.
    ``allow_nonfinite=True`` records it anyway and marks the manifest (NONFINITE).
    """

    def __init__(self, out_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 *, model_name: str, dataset: str | Dataset, batch_size: int, epochs: int,
                 model_kwargs: dict | None = None, data_seed: int = 0,
                 steps_per_epoch: int | None = None, config: dict | None = None,
                 schedule: dict | None = None, resume: bool = False, checkpoint_every: int = 1,
                 task: str | Task = "classification", overwrite: bool = False,
                 recorded_by: str = trajectory.RECORDED_BY_RECORDER, allow_nonfinite: bool = False):
        out_dir = Path(out_dir)
        self.allow_nonfinite = bool(allow_nonfinite)
        task = task_for(task) if isinstance(task, str) else task
        if not isinstance(task, Task):
            raise ConfigError(f"Recorder: task must be a task name or a plgk_cli.tasks.Task, got "
                              f"{type(task).__name__}")
        if resume and overwrite:
            raise ConfigError("Recorder: resume=True continues the run in out_dir, overwrite=True "
                              "replaces it; pass one of them")
        # the words of the caller's switches: plgk train's options or the Recorder's arguments
        self._out_name = "--out" if recorded_by == trajectory.RECORDED_BY_TRAIN else "out_dir"
        self._overwrite_flag = "--overwrite" if recorded_by == trajectory.RECORDED_BY_TRAIN else "overwrite=True"
        if overwrite:  # fail fast; checked again once the directory is claimed (_claim_out_dir)
            trajectory.check_replaceable_run_dir(out_dir)
        elif not resume:
            trajectory.check_new_run_dir(out_dir, overwrite_flag=self._overwrite_flag, out_name=self._out_name)
        for arg, value in (("batch_size", batch_size), ("epochs", epochs), ("steps_per_epoch", steps_per_epoch),
                           ("checkpoint_every", checkpoint_every)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"Recorder: {arg} must be an integer >= 1, got {value!r}")
        hyper = hyper_from_optimizer(optimizer)
        named = optimized_parameters(optimizer, model)
        dtypes = {p.dtype for p in named.values()}
        if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPE_NAMES:
            raise ConfigError(f"model: trainable parameters of dtype {sorted(map(str, dtypes))}; plgk "
                              "records models whose parameters are all float32 or all float64")
        devices = {p.device for p in named.values()}
        if len(devices) != 1:
            raise ConfigError(f"model: parameters on several devices {sorted(map(str, devices))}; put "
                              "the model on one device")
        dtype, device = next(iter(dtypes)), next(iter(devices))
        if not resume and any(int(s.get("step", 0)) > 0 for s in optimizer.state.values()):
            raise RecorderError("optimizer: has already taken steps; create the Recorder before the "
                                "first optimizer.step(), so that the trajectory starts at θ_0")

        data = load_dataset(dataset, data_seed, dtype, task) if isinstance(dataset, str) else dataset
        if not isinstance(data, Dataset):
            raise ConfigError(f"Recorder: dataset must be a spec such as 'npz:PATH' or a Dataset from "
                              f"plgk_cli.data.load_dataset, got {type(dataset).__name__}")
        if data.x_train.is_floating_point() and data.x_train.dtype != dtype:
            raise DataError(f"dataset {data.spec}: x_train is {data.x_train.dtype} but the model is "
                            f"{dtype}; load it with load_dataset(spec, seed, {dtype})")

        model_kwargs = dict(model_kwargs or {})
        try:
            json.dumps(model_kwargs)
        except (TypeError, ValueError):
            raise ConfigError(f"model_kwargs: {model_kwargs!r} must be JSON values (numbers, strings, "
                              "lists, dicts): the manifest stores them for replay") from None
        layout = ParameterLayout.of(model, set(named))
        # Replay rebuilds the model from its name: check now that it builds these parameters.
        # fork_rng: building draws initial weights, which must not shift the user's random stream.
        with torch.random.fork_rng(devices=[]):
            rebuilt_model = build_model(model_name, model_kwargs, data.in_shape, data.num_classes)
        rebuilt = ParameterLayout.of(rebuilt_model, set(named))
        if (rebuilt.names, rebuilt.shapes) != (layout.names, layout.shapes):
            raise ConfigError(f"model: {model_name}(**{model_kwargs}) builds parameters "
                              f"{_describe(rebuilt)}, the model being trained has {_describe(layout)}; "
                              "replay rebuilds the model from model_name, so they must match")

        m = len(data.y_train)
        batch_size = min(batch_size, m)
        steps_per_epoch = steps_per_epoch or math.ceil(m / batch_size)
        if steps_per_epoch * epochs > trajectory.MAX_STEPS:
            raise ConfigError(f"{'[train] epochs' if recorded_by == trajectory.RECORDED_BY_TRAIN else 'epochs'} = "
                              f"{epochs}: {steps_per_epoch * epochs} updates ({steps_per_epoch} per epoch), more "
                              f"than a run records (at most {trajectory.MAX_STEPS}: step files are numbered "
                              "with 8 digits); train fewer epochs or larger batches")
        names_of = {id(p): n for n, p in named.items()}
        values = group_values(optimizer, hyper.name).tolist()
        groups = [_group_record(g, [names_of[id(p)] for p in g["params"]], row)
                  for g, row in zip(optimizer.param_groups, values)]
        self.out_dir, self.model, self.optimizer, self.dataset, self.hyper = (
            out_dir, model, optimizer, data, hyper)
        # the run directory finish() puts this run in place of (overwrite=True onto a run), once
        # out_dir is claimed (_claim_out_dir)
        self.replaces: Path | None = None
        self.task = task
        self.steps_per_epoch = steps_per_epoch
        self.run_id = uuid.uuid4().hex
        self.step_count = 0  # updates recorded so far: the last checkpoint is step_count
        self.manifest = {
            "format": trajectory.FORMAT, "format_version": trajectory.FORMAT_VERSION,
            "run_id": self.run_id, "plgk_version": __version__, "recorded_by": recorded_by,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": config,
            "dataset": {"spec": data.spec, "seed": data_seed, "fingerprint": data.fingerprint(),
                        "num_train": m, "num_test": len(data.y_test), "num_classes": data.num_classes,
                        "in_shape": list(data.in_shape)},
            "model": {"name": model_name, "kwargs": model_kwargs},
            "task": {"name": task.name},
            "loss": {"classification": "cross_entropy", "regression": "mse"}.get(task.name, task.name),
            # the first group's base rate (a scheduler keeps it as initial_lr) for a quick look;
            # clip_grad_norm is filled in when used; what each update used is in its step file
            "optimizer": dataclasses.asdict(hyper) | {"lr": groups[0]["lr"], "clip_grad_norm": None,
                                                      "groups": groups},
            "schedule": schedule,
            "parameters": [{"name": n, "shape": list(s), "dtype": DTYPE_NAMES[dtype]}
                           for n, s in zip(layout.names, layout.shapes)],
            "dtype": DTYPE_NAMES[dtype], "device": str(device),
            "batch_size": batch_size, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
            "total_steps": steps_per_epoch * epochs, "checkpoint_every": checkpoint_every, "complete": False,
        }
        self._named = named
        self._device = device
        # [checkpoint] every = K: θ and the optimizer state every K-th step (and the last), the
        # update record (batch, lr, clip coefficient, loss) of every step; replay re-simulates.
        self.checkpoint_every = checkpoint_every
        self._last_record: dict | None = None
        self._block_records: list = []  # records of this block's steps, written with its last step
        self._max_norms: list[float] = []
        self._clip_coef = 1.0  # product of this update's clip coefficients
        self._lr_used: float | None = None
        self._hyper_used: torch.Tensor | None = None  # group_values() as the update began
        self._grad_kinds: list | None = None  # GRAD_* of each recorded parameter in that update
        self._param_steps = [0] * len(named)  # updates each parameter took part in
        self._frozen: set = set()  # parameters that in some update had no loss gradient
        self._unrecorded = False  # an optimizer.step() ran that no checkpoint holds yet
        self._finished = False
        self._epoch, self._loss_sum, self._seen, self._correct = 0, 0.0, 0, 0
        # The training forward of the update being made: the generator states it started from
        # (kept where it drew random numbers), how many ran, and the buffers' versions after it.
        self._rng_before: dict | None = None
        self._rng_used: dict | None = None
        self._forwards = 0
        self._buffer_versions: dict | None = None
        self._buffers = {n: b for n, b in model.named_buffers()
                         if n in model.state_dict(keep_vars=True)}  # persistent ones
        self._buffers_at_0 = {n: b.detach().clone() for n, b in self._buffers.items()}
        self._random_forward, self._changed = False, set()  # over the run, for the manifest

        self._claims: list = []  # outputs.Claim of out_dir, and of the staging directory beside it
        self._started = False  # this Recorder has begun writing a run
        self._resumable = resume  # the run directory holds a run that resume=True continues
        try:
            replaces = self._claim_out_dir(out_dir, resume=resume, overwrite=overwrite)
            if resume:
                self._reopen()
            else:
                if replaces is not None:  # the old run stays whole until finish(): write beside it
                    self.replaces, self.out_dir = replaces, trajectory.staging_dir(out_dir)
                    out_dir = self.out_dir
                    self._claims.append(self._claim(out_dir))
                # Frozen parameters and buffers: replay rebuilds the model from its code, which would
                # draw them anew. A tensor reached under two names (tied weights) is stored once.
                fixed, seen = {}, {id(p) for p in named.values()}
                for key, value in model.state_dict(keep_vars=True).items():
                    if id(value) not in seen:
                        seen.add(id(value))
                        fixed[key] = value
                self._started = True
                self._save_manifest()
                # Looked up on the module at each call (not imported by name) so that scripts/bench.py
                # can time or skip the writes by patching trajectory.write_checkpoint.
                with self._writing(trajectory.checkpoint_path(out_dir, 0)):
                    trajectory.write_checkpoint(out_dir, self.run_id, 0, named, {n: {} for n in named}, 0,
                                                fixed=fixed)
        except BaseException:
            # in this order: discarding a replacement points out_dir back at the run it replaces
            self._remove_unstarted_run()
            self._discard_replacement()
            self._release()
            raise
        self._resumable = self.replaces is None
        if self._resumable:  # an interrupted run keeps its lock file: it was written by a plgk that locks
            self._claims[-1].keep = True
        self._hooks = [optimizer.register_step_pre_hook(self._before_step),
                       optimizer.register_step_post_hook(self._after_step),
                       model.register_forward_pre_hook(self._before_forward),
                       model.register_forward_hook(self._after_forward)]

    # ------------------------------------------------------------------ the loop's calls

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the gradients' global 2-norm to ``max_norm`` as torch.nn.utils.clip_grad_norm_
        does and remember the coefficient for the update being made. Call it between
        loss.backward() and optimizer.step(). Returns the coefficient (1.0: no clipping)."""
        if self._unrecorded:
            raise RecorderError("clip_grad_norm() after optimizer.step(): call recorder.step() "
                                "first; clip between loss.backward() and optimizer.step()")
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not (
                math.isfinite(max_norm) and max_norm > 0):
            raise ConfigError(f"clip_grad_norm: max_norm must be a finite number > 0, got {max_norm!r}")
        if all(p.grad is None for p in self._named.values()):
            raise RecorderError("clip_grad_norm(): the model has no gradients; call it after "
                                "loss.backward()")
        coef = clip_gradients(self._named.values(), float(max_norm))
        self._clip_coef *= coef  # clipping twice scales by both coefficients
        if float(max_norm) not in self._max_norms:
            self._max_norms.append(float(max_norm))
            norms = self._max_norms
            self.manifest["optimizer"]["clip_grad_norm"] = norms[0] if len(norms) == 1 else list(norms)
            self._save_manifest()
        return coef

    def step(self, batch, loss, logits: torch.Tensor | None = None) -> int:
        """Record the update optimizer.step() just made: ``batch`` the indices into the training
        split of its minibatch, in the order used (tensor, array or list of ints), ``loss`` its
        mean loss at the parameters before the update (tensor or float), ``logits`` optionally
        the model's outputs on the batch, for the train accuracy in the manifest.
        Returns t, the number of the update recorded (θ_t after t updates; in a sparse run its
        record waits for the step file that ends its block)."""
        if self._finished:
            raise RecorderError("step() after finish(): the run is closed; start a new Recorder")
        if not self._unrecorded:
            raise RecorderError("step(): no optimizer.step() ran since the last recorded update; "
                                "call recorder.step() right after optimizer.step()")
        indices = self._batch_indices(batch)
        loss_value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        t = self.step_count + 1
        epoch = (t - 1) // self.steps_per_epoch
        problem = self._nonfinite(loss_value)
        if problem is not None:
            if not self.allow_nonfinite:  # not recorded: the run stays the steps before it
                where = (f"the run so far is in {self.out_dir}" if self.replaces is None else
                         f"the new run was deleted and {self.replaces} still holds the run it was to replace")
                switch = ("--allow-nonfinite" if self.manifest["recorded_by"] == trajectory.RECORDED_BY_TRAIN
                          else "allow_nonfinite=True to the Recorder")
                raise NonFiniteError(f"step {t} (epoch {epoch + 1}): {problem}; the run diverged (lower the "
                                     f"learning rate or check the data); {where}; pass {switch} to record "
                                     "it anyway")
            if NONFINITE not in self.manifest:
                self.manifest[NONFINITE] = {"first_step": t}
                self._save_manifest()
        buffers = self._changed_buffers()
        if self._forwards > 1 and (self._rng_used or buffers):
            raise RecorderError(f"step(): update {t} ran {self._forwards} training forwards of a model "
                                "with dropout or changing buffers; replay reproduces one training "
                                "forward per update: forward the whole batch once")
        if self.checkpoint_every > 1 and (self._rng_used or buffers):
            raise RecorderError("checkpoint_every > 1 ([checkpoint] every): the model draws random "
                                "numbers or changes buffers in its forward (dropout, BatchNorm), which "
                                "sparse runs do not re-simulate yet; record every step")
        rng = {}
        if self._rng_used:  # and where the generators stand now, for a resume to continue from
            rng = {**self._rng_used, **{f"{k}_after": v for k, v in self._generator_states().items()}}
        kinds = self._grad_kinds
        if self.checkpoint_every > 1 and any(k != GRAD_LOSS for k in kinds):
            name = list(self._named)[next(i for i, k in enumerate(kinds) if k != GRAD_LOSS)]
            raise RecorderError(f"checkpoint_every > 1 ([checkpoint] every): parameter {name!r} took no "
                                f"ordinary step in update {t} (frozen, or its .grad was None), which "
                                "sparse runs do not re-simulate yet; record every step")
        self._param_steps = [n + (k != GRAD_NONE) for n, k in zip(self._param_steps, kinds)]
        frozen = {name for name, k in zip(self._named, kinds) if k != GRAD_LOSS}
        if not frozen <= self._frozen:  # named in the manifest as it happens, as clip norms are
            self._frozen |= frozen
            self.manifest["optimizer"]["frozen"] = sorted(self._frozen)
            self._save_manifest()
        steps = self._param_steps
        self._last_record = dict(step=t, batch=indices, lr=self._lr_used, clip_coef=self._clip_coef,
                                 loss=loss_value, extra_metadata={"epoch": str(epoch)},
                                 rng=rng, buffers=buffers, hyper=self._hyper_used,
                                 grad=None if all(k == GRAD_LOSS for k in kinds) else torch.tensor(kinds),
                                 optim_steps=None if len(set(steps)) <= 1 else torch.tensor(steps))
        self._random_forward |= bool(self._rng_used)
        self._changed |= set(buffers)
        self._write(full=t % self.checkpoint_every == 0)
        self.step_count, self._unrecorded, self._clip_coef = t, False, 1.0
        self._rng_before, self._rng_used, self._forwards = None, None, 0
        if epoch != self._epoch:
            self._epoch, self._loss_sum, self._seen, self._correct = epoch, 0.0, 0, 0
        self._loss_sum += loss_value * len(indices)
        self._seen += len(indices)
        if logits is None or self._correct is None:
            self._correct = None  # the accuracy of this epoch is unknown
        else:
            correct = self.task.correct(logits, self.dataset.y_train[indices])
            self._correct = None if correct is None else self._correct + correct
        return t

    def _nonfinite(self, loss_value: float) -> str | None:
        """What of the update just made is NaN or Inf, in words (the loss, else the first
        gradient, else the first parameter after the update, else the first optimizer state
        tensor), or None. The optimizer leaves each
        .grad in place, so the gradients it used are still there to check. Every tensor's flag
        is read in one host sync."""
        if not math.isfinite(loss_value):
            return f"the training loss is {loss_value}"
        grads = [(name, p.grad) for name, p in self._named.items() if p.grad is not None]
        tensors = [("a gradient of {} is {}", name, g) for name, g in grads] + \
            [("parameter {} is {} after the update", name, p) for name, p in self._named.items()] + \
            [(f"the optimizer's {key} of {{}} is {{}} after the update", name, value)  # Adam's v: grad² overflows
             for name, p in self._named.items()
             for key, value in self.optimizer.state.get(p, {}).items()
             if isinstance(value, torch.Tensor) and value.is_floating_point()]
        flags = torch.stack([tensor.isfinite().all() for _, _, tensor in tensors])
        if bool(flags.all()):
            return None
        form, name, tensor = tensors[int((~flags).nonzero()[0])]
        return form.format(name, "nan" if bool(tensor.isnan().any()) else "inf")

    def finish(self) -> dict:
        """Mark the run complete: the number of updates made, the final metrics (train loss and
        accuracy over the last epoch's minibatches, each before its update; test accuracy at θ_T).
        Returns the manifest."""
        if self._finished:
            return self.manifest
        if self._unrecorded:
            raise RecorderError("finish(): the last optimizer.step() was not recorded; call "
                                "recorder.step() after it")
        if self.step_count == 0:
            raise RecorderError("finish(): no update was recorded; call recorder.step() after each "
                                "optimizer.step()")
        self._remove_hooks()
        if self.step_count % self.checkpoint_every:  # replay needs θ_T itself
            self._write(full=True)
        last_epoch = self.epoch_metrics()
        test_loss, test_accuracy = self._test_metrics()
        final = {"train_loss": last_epoch["train_loss"], "train_accuracy": last_epoch["train_accuracy"],
                 "test_loss": test_loss, "test_accuracy": test_accuracy}
        self.manifest.update(total_steps=self.step_count,
                             epochs=math.ceil(self.step_count / self.steps_per_epoch),
                             complete=True, final=final,
                             forward={"random": self._random_forward, "buffers": sorted(self._changed)})
        self._save_manifest()
        self._finished = True
        if self.replaces is not None:
            try:
                trajectory.replace_run_dir(self.out_dir, self.replaces)
            except OutputError:  # it says where the new run is kept: not to be discarded then
                self.replaces = None
                raise
            self._claims[-1].moved(self.replaces / outputs.RUN_LOCK)  # the staging directory's
            self.out_dir, self.replaces = self.replaces, None
        self._release(keep=False)  # a complete run needs no marker
        return self.manifest

    def epoch_metrics(self) -> dict:
        """The current epoch so far: 0-based ``epoch``, mean ``train_loss`` and ``train_accuracy``
        over its recorded minibatches (accuracy None unless every step() had logits)."""
        seen = max(self._seen, 1)
        return {"epoch": self._epoch, "train_loss": self._loss_sum / seen,
                "train_accuracy": None if self._correct is None else self._correct / seen}

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                self.finish()
            except BaseException:  # Ctrl-C or an error while finishing: the old run stays the run
                self._remove_hooks()
                self._discard_replacement()
                self._release()
                raise
        else:  # interrupted: the manifest stays complete = false, the steps so far stay valid
            self._remove_hooks()
            self._discard_replacement()
            self._release()
        return False

    def _discard_replacement(self) -> None:
        """An unfinished run that was to replace another (overwrite=True): delete it, so that the
        old run is all that remains, as if this one had not started."""
        if self.replaces is None:
            return
        try:
            trajectory.remove_run_dir(self.out_dir)
        except OSError:
            pass  # files the run did not write are left, and the directory with them
        self.out_dir, self.replaces = self.replaces, None

    # ------------------------------------------------------------------ the run directory

    def _claim_out_dir(self, out_dir: Path, *, resume: bool, overwrite: bool) -> Path | None:
        """Claim ``out_dir`` for this writer before anything in it is written, and check it again
        under the claim: another writer may have come and gone since the checks that failed fast.
        Returns the run this one is to replace (absolute: the loop may change the working directory
        before finish() swaps the runs), or None."""
        # the run an --overwrite replaces gets no lock file: it stays as it is, even after a SIGKILL
        self._claims.append(self._claim(out_dir, mark=not (overwrite and trajectory.is_non_empty_dir(out_dir))))
        if overwrite:
            trajectory.check_replaceable_run_dir(out_dir)
            check_apart_from_inputs({"out_dir": out_dir}, dataset_files(self.dataset.spec), "run")
        elif not resume:
            trajectory.check_new_run_dir(out_dir, overwrite_flag=self._overwrite_flag, out_name=self._out_name)
        return Path(os.path.abspath(out_dir)) if overwrite and trajectory.is_non_empty_dir(out_dir) else None

    def _claim(self, run_dir: Path, mark: bool = True) -> outputs.Claim:
        try:
            return outputs.claim_run_dir(run_dir, self._out_name, mark=mark)
        except OSError as exc:
            raise write_failure(Path(exc.filename or run_dir), exc,
                                f"{remedy(exc)}, or choose another {self._out_name}") from None

    def _release(self, keep: bool | None = None) -> None:
        for claim in reversed(self._claims):
            claim.release(keep)
        self._claims = []

    def _remove_unstarted_run(self) -> None:
        """A new run whose first files could not all be written (a full disk): remove them, so
        that the directory is as it was; there is no run to resume."""
        if not self._started or self._resumable or self.replaces is not None:
            return
        for path in (self.out_dir / trajectory.MANIFEST, trajectory.checkpoint_path(self.out_dir, 0)):
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass

    @contextlib.contextmanager
    def _writing(self, path: Path):
        """A failed write of ``path`` (a full disk, a permission) as one OutputError that says how
        to go on: the run's files stay as they were before this write."""
        try:
            yield
        except OSError as exc:
            raise write_failure(path, exc, self._how_to_go_on(exc)) from None

    def _how_to_go_on(self, exc: OSError) -> str:
        fix = remedy(exc)
        if self.replaces is not None:
            return f"{fix} and run again; the run in {self.replaces} is unchanged"
        if not self._resumable:
            return f"{fix} and run again"
        if self.manifest["recorded_by"] == trajectory.RECORDED_BY_TRAIN:
            return f"{fix}, then continue with `plgk train --resume`"
        return f"{fix}, then continue the run with Recorder(..., resume=True)"

    def _save_manifest(self) -> None:
        with self._writing(self.out_dir / trajectory.MANIFEST):
            trajectory.write_manifest(self.out_dir, self.manifest)

    # ------------------------------------------------------------------ internals

    def _write(self, full: bool) -> None:
        """Checkpoint of the last recorded update (θ_t, the optimizer state and its record, with
        the records of its block's earlier steps), or, in a sparse run, keep its record for the
        file that ends the block. A crash loses nothing needed: resume restarts at the last full
        checkpoint and redoes the block."""
        record = self._last_record
        state, optim_step = optimizer_state(self.optimizer, self._named)
        if not full:
            self._block_records.append({**record, "optim_step": optim_step or record["step"]})
            return
        with self._writing(trajectory.checkpoint_path(self.out_dir, record["step"])):
            trajectory.write_checkpoint(
                self.out_dir, self.run_id, record["step"], self._named, state, optim_step or record["step"],
                batch=record["batch"], lr=record["lr"], clip_coef=record["clip_coef"], loss=record["loss"],
                extra_metadata=record["extra_metadata"], rng=record["rng"], buffers=record["buffers"],
                hyper=record["hyper"], grad=record["grad"], optim_steps=record["optim_steps"],
                records=tuple(r for r in self._block_records if r["step"] != record["step"]))
        self._block_records = []

    def _reopen(self) -> None:
        """Continue an interrupted run: the model and optimizer take θ_t and the optimizer state
        of its last checkpoint t (every checkpoint is written atomically, so the last one present
        is whole), so that the next update is the one the interrupted run would have made."""
        old = trajectory.read_manifest(self.out_dir)
        if old.get("complete"):
            raise RecorderError(f"{self.out_dir}: the run is complete; nothing to resume")
        # clip norms are filled in as clipping happens: take the interrupted run's
        recorded_clip = old.get("optimizer", {}).get("clip_grad_norm")
        self.manifest["optimizer"]["clip_grad_norm"] = recorded_clip
        self._frozen = set(old.get("optimizer", {}).get("frozen", []))
        if self._frozen:
            self.manifest["optimizer"]["frozen"] = sorted(self._frozen)
        self._max_norms = [] if recorded_clip is None else (
            list(recorded_clip) if isinstance(recorded_clip, list) else [recorded_clip])
        # what may differ from the interrupted run's manifest: a run of format v1-3 resumes as v4
        volatile = ("run_id", "created", "plgk_version", "format_version") + (
            () if "recorded_by" in old else ("recorded_by",))
        mine = json.loads(json.dumps({k: v for k, v in self.manifest.items() if k not in volatile}))
        differs = sorted(k for k in mine if old.get(k) != mine[k])
        if differs:
            raise RecorderError(f"{self.out_dir}: was recorded with other settings ({', '.join(differs)} "
                                "differ); resume with the same config")
        steps = trajectory.list_steps(self.out_dir, self.checkpoint_every)
        last = 0
        while last + 1 in steps:  # the contiguous prefix; anything after a gap is not trusted
            last += 1
        if not steps or steps[0] != 0:
            raise RecorderError(f"{self.out_dir}: no step 0 checkpoint; start a new run")
        last -= last % self.checkpoint_every  # the last full checkpoint: later records are redone
        ck = trajectory.read_checkpoint(self.out_dir, last, old["run_id"])
        with torch.no_grad():
            for name, p in self._named.items():
                p.copy_(ck.params[name])
        self._param_steps = [ck.optim_step] * len(self._named) if ck.optim_steps is None else \
            [int(n) for n in ck.optim_steps]
        for (name, p), steps in zip(self._named.items(), self._param_steps):
            recorded = ck.optim_state.get(name, {})  # none stored where the optimizer keeps none (plain SGD)
            state = {k: v.to(device=p.device, dtype=p.dtype).clone() for k, v in recorded.items()}
            if state and self.hyper.name != "sgd":  # torch keeps the step count as a float32 scalar tensor
                state["step"] = torch.tensor(float(steps), dtype=torch.float32)
            if state:  # a parameter never stepped has no state yet
                self.optimizer.state[p] = state
        with torch.no_grad():  # buffers as they were at step `last`
            for name, b in self._buffers.items():
                b.copy_(ck.buffers.get(name, self._buffers_at_0[name]))
        # The generators where the interrupted run left them after update `last`, so that the next
        # training forward draws the dropout masks an uninterrupted run would have drawn.
        if "cpu_after" in ck.rng:
            torch.set_rng_state(ck.rng["cpu_after"])
        if "cuda_after" in ck.rng and self._device.type == "cuda":
            torch.cuda.set_rng_state(ck.rng["cuda_after"], self._device)
        self.run_id = old["run_id"]
        self.manifest = {**self.manifest, "run_id": old["run_id"], "created": old["created"],
                         **({NONFINITE: old[NONFINITE]} if NONFINITE in old else {})}
        self.step_count = last
        self._epoch = (last - 1) // self.steps_per_epoch if last else 0
        self._save_manifest()

    def _before_step(self, optimizer, args, kwargs) -> None:
        """Runs inside optimizer.step(), before the update: refuse an update the record could not
        describe, and take the lr it is about to use (a scheduler changes it after the step)."""
        if self._unrecorded:
            raise RecorderError("optimizer.step() twice without recorder.step() in between; call "
                                "recorder.step() after every optimizer.step()")
        hyper = hyper_from_optimizer(optimizer)
        if len(optimizer.param_groups) != len(self.manifest["optimizer"]["groups"]) or \
                optimized_parameters(optimizer, self.model) != self._named:
            raise RecorderError("optimizer: its parameter groups changed during the run "
                                "(add_param_group); replay needs the groups the run started with: "
                                "give the optimizer every group from the start")
        switches = [f.name for f in dataclasses.fields(Hyper) if isinstance(getattr(hyper, f.name), (bool, str))]
        changed = [f"{k} {getattr(self.hyper, k)!r} -> {getattr(hyper, k)!r}" for k in switches
                   if getattr(hyper, k) != getattr(self.hyper, k)]
        if changed:
            raise RecorderError(f"optimizer: {', '.join(changed)} changed during the run; replay models "
                                "one update rule (the values, lr, momentum, betas, eps and weight decay, "
                                "may change)")
        self._hyper_used = group_values(optimizer, hyper.name)
        self._lr_used = float(self._hyper_used[0, HYPER_FIELDS.index("lr")])
        self._grad_kinds = [self._grad_kind(name, p) for name, p in self._named.items()]

    @staticmethod
    def _grad_kind(name: str, p: torch.Tensor) -> int:
        """GRAD_*: what the optimizer is about to see as the parameter's gradient."""
        if p.grad is None:
            return GRAD_NONE
        if p.grad.is_sparse:
            raise RecorderError(f"parameter {name!r} has a sparse gradient (Embedding(sparse=True)); plgk "
                                "decomposes dense updates: build the layer with sparse=False")
        if p.requires_grad:
            return GRAD_LOSS
        if bool((p.grad != 0).any()):
            raise RecorderError(f"parameter {name!r} is frozen (requires_grad=False) but holds a non-zero "
                                ".grad from before, which the update would use; clear it with "
                                "optimizer.zero_grad() before the step")
        return GRAD_ZERO

    def _after_step(self, optimizer, args, kwargs) -> None:
        self._unrecorded = True

    def _training_forward(self) -> bool:
        return self.model.training and torch.is_grad_enabled() and not self._unrecorded

    def _generator_states(self) -> dict:
        states = {"cpu": torch.get_rng_state()}
        if self._device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self._device)
        return states

    def _before_forward(self, module, args) -> None:
        if not self._training_forward():
            return
        if self._buffer_versions is not None:
            for name, b in self._buffers.items():
                if b._version != self._buffer_versions[name]:
                    raise RecorderError(f"buffer {name!r} changed between updates, outside the model's "
                                        "forward; replay re-creates buffers from the training forward "
                                        "only: change it inside forward() or make it a parameter")
        self._forwards += 1
        if self._forwards == 1:
            self._rng_before = self._generator_states()

    def _after_forward(self, module, args, output) -> None:
        if not self._training_forward():
            return
        self._buffer_versions = {name: b._version for name, b in self._buffers.items()}
        if self._forwards == 1:
            after = self._generator_states()
            if any(not torch.equal(after[k], v) for k, v in self._rng_before.items()):
                self._rng_used = self._rng_before  # the forward drew random numbers (dropout)

    def _changed_buffers(self) -> dict:
        """The persistent buffers whose value differs from step 0's (recorded with the step)."""
        return {name: b.detach().clone() for name, b in self._buffers.items()
                if b.shape != self._buffers_at_0[name].shape or not torch.equal(b, self._buffers_at_0[name])}

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _batch_indices(self, batch) -> torch.Tensor:
        m = len(self.dataset.y_train)
        indices = batch.detach().cpu() if isinstance(batch, torch.Tensor) else torch.as_tensor(np.asarray(batch))
        if indices.dim() != 1 or indices.numel() == 0 or indices.dtype == torch.bool or \
                indices.is_floating_point() or indices.is_complex():
            raise RecorderError(f"step(): batch must be a non-empty 1-D sequence of integer indices "
                                f"into the training split; got {indices.dtype} {tuple(indices.shape)}")
        if int(indices.min()) < 0 or int(indices.max()) >= m:
            raise RecorderError(f"step(): batch holds indices outside the training split "
                                f"(0..{m - 1}): min {int(indices.min())}, max {int(indices.max())}")
        # A copy: a sparse run keeps the record until its block's file is written, and a loop may
        # reuse its index buffer in place (numpy's shuffle of one permutation each epoch).
        return indices.to(torch.int64, copy=True)

    def _test_metrics(self) -> tuple[float, float]:
        """Mean loss term and accuracy (NaN where the task has none) on the test split at θ_T."""
        x, y = self.dataset.x_test, self.dataset.y_test
        if not len(y):
            return float("nan"), float("nan")
        loss, correct = 0.0, 0
        was_training = self.model.training
        self.model.eval()  # dropout off, BatchNorm on its running statistics (and left unchanged)
        try:
            with torch.no_grad():
                for start in range(0, len(y), EVAL_CHUNK):
                    rows = slice(start, start + EVAL_CHUNK)
                    output = self.model(x[rows].to(self._device))
                    loss += float(self.task.loss_terms(output, y[rows].to(self._device)).sum())
                    c = self.task.correct(output, y[rows])
                    correct = None if c is None or correct is None else correct + c
        finally:
            self.model.train(was_training)
        return loss / len(y), float("nan") if correct is None else correct / len(y)


def _describe(layout: ParameterLayout) -> str:
    return "[" + ", ".join(f"{n} {list(s)}" for n, s in zip(layout.names, layout.shapes)) + "]"
