"""`load_run(dir)`: a recorded run as Python objects (the public API over trajectory.py)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from plgk_cli.config import RunConfig, config_from_dict
from plgk_cli.data import Dataset, load_dataset
from plgk_cli.errors import DataError, TrajectoryError
from plgk_cli.gradients import ParameterLayout
from plgk_cli.models import build_model, mode_dependent
from plgk_cli.optimizers import HYPER_FIELDS, Decomposition, Hyper, UpdateHyper, decomposition_for
from plgk_cli.tasks import Task, task_for
from plgk_cli.trajectory import (GRAD_LOSS, GRAD_NONE, MANIFEST, Checkpoint, check_steps,
                                 read_checkpoint, read_fixed, read_manifest)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class Run:
    """A recorded training run. ``dataset`` holds the split tensors exactly as training saw them
    (checked against the manifest's fingerprint); ``checkpoint(t)`` reads θ_t and its record."""

    path: Path
    manifest: dict

    @cached_property
    def config(self) -> RunConfig | None:
        """The `plgk train` configuration; None for a run recorded from the user's own loop."""
        config = self.manifest["config"]
        return None if config is None else config_from_dict(config)

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest["dtype"]]

    @cached_property
    def task(self) -> Task:
        """What a training example is (runs of format version 1 are classification runs)."""
        return task_for(self.manifest.get("task", {}).get("name", "classification"))

    @cached_property
    def dataset(self) -> Dataset:
        d = self.manifest["dataset"]
        data = load_dataset(d["spec"], d["seed"], self.dtype, self.task)
        if data.fingerprint() != d["fingerprint"]:
            raise DataError(f"dataset {d['spec']}: its contents changed since run {self.run_id} was "
                            "recorded (fingerprint mismatch); restore the original data or re-train")
        # The same data, so a count or shape the manifest states otherwise was changed in it.
        found = {"num_train": len(data.y_train), "num_test": len(data.y_test),
                 "num_classes": data.num_classes, "in_shape": list(data.in_shape)}
        for key, value in found.items():
            if d[key] != value:
                raise TrajectoryError(f"{self.path / MANIFEST}: dataset.{key} is {d[key]}, but the "
                                      f"run's data {d['spec']} have {value}; restore the manifest or "
                                      "re-run `plgk train`")
        return data

    def build_model(self) -> torch.nn.Module:
        """A fresh model of the run's architecture (parameters are not θ_0: load a checkpoint)."""
        d = self.manifest["dataset"]
        model = build_model(self.manifest["model"]["name"], self.manifest["model"]["kwargs"],
                            tuple(d["in_shape"]), d["num_classes"])
        recorded = tuple(p["name"] for p in self.manifest["parameters"])
        shapes = tuple(tuple(p["shape"]) for p in self.manifest["parameters"])
        # The recorded parameters are those the optimizer held, a layer frozen at the start among
        # them; the model's others are fixed state.
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name in recorded)
        layout = ParameterLayout.of(model)
        if layout.names != recorded or layout.shapes != shapes:
            raise TrajectoryError(f"{self.path}: the model {self.manifest['model']['name']} now builds "
                                  "parameters that differ from the recorded ones; restore its code")
        fixed = self.fixed_state  # whose run step 0 belongs to is checked with the checkpoints
        if fixed:  # frozen parameters and buffers as training had them, not freshly drawn
            try:
                unexpected = model.load_state_dict(fixed, strict=False).unexpected_keys
            except RuntimeError as exc:  # a shape that changed
                unexpected = [str(exc).splitlines()[-1].strip()]
            if unexpected:
                raise TrajectoryError(f"{self.path}: the model {self.manifest['model']['name']} no longer "
                                      f"holds the recorded frozen state ({unexpected[0]}); restore its code")
        return model

    def loss_fn(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch, Σ_m w_m ℓ_m as the task defines it."""
        return self.task.batch_loss(output, y)

    @cached_property
    def fixed_state(self) -> dict:
        """Frozen parameters and buffers as step 0 recorded them."""
        return read_fixed(self.path)

    @cached_property
    def changing_buffers(self) -> tuple:
        """Buffers that training changed (BatchNorm statistics), recorded with every checkpoint."""
        names = tuple(self.manifest.get("forward", {}).get("buffers", ()))
        unknown = [name for name in names if name not in self.fixed_state]
        if unknown:  # each starts from its step-0 value
            raise TrajectoryError(f"{self.path / MANIFEST}: forward.buffers names {unknown[0]!r}, which "
                                  "step 0 does not record; restore the manifest or re-run `plgk train`")
        return names

    @cached_property
    def faithful(self) -> bool:
        """Whether the training side must be replayed as the recorded forward itself: one
        train-mode forward of the whole batch from the recorded random state and buffers (dropout,
        BatchNorm, a forward that drew random numbers), not per-example passes (DESIGN.md v2)."""
        forward = self.manifest.get("forward", {})
        return bool(forward.get("random") or forward.get("buffers") or mode_dependent(self.build_model()))

    def buffers(self, t: int, checkpoint: Checkpoint | None = None) -> dict:
        """The changing buffers after t updates (step 0's where step t recorded none)."""
        if not self.changing_buffers:
            return {}
        ck = checkpoint if checkpoint is not None else self.checkpoint(t)
        return {name: ck.buffers.get(name, self.fixed_state[name]) for name in self.changing_buffers}

    @cached_property
    def hyper(self) -> Hyper:
        o = self.manifest["optimizer"]
        fields = {k: v for k, v in o.items() if k in Hyper.__dataclass_fields__}
        fields["betas"] = tuple(fields.get("betas", (0.9, 0.999)))
        return Hyper(**fields)

    @cached_property
    def decomposition(self) -> Decomposition:
        return decomposition_for(self.hyper)

    @cached_property
    def groups(self) -> tuple:
        """The parameter names of each optimizer parameter group (one group before format v3)."""
        groups = self.manifest["optimizer"].get("groups")
        if groups is None:
            return (tuple(p["name"] for p in self.manifest["parameters"]),)
        return tuple(tuple(g["params"]) for g in groups)

    def update_hyper(self, checkpoint: Checkpoint, device=None) -> UpdateHyper:
        """The hyper-parameters of the update that ended at ``checkpoint``, per coordinate of the
        flat parameter vector (floats where every group agrees)."""
        step = float(checkpoint.optim_step)
        if checkpoint.hyper is None:  # format v1/v2: one group, only the lr was recorded
            return self.hyper.update_hyper(checkpoint.lr, step)
        layout, group_of = self._parameter_groups
        values = {}
        for column, name in enumerate(HYPER_FIELDS):
            per_group = checkpoint.hyper[:, column].to(torch.float64)
            if bool((per_group == per_group[0]).all()):
                values[name] = float(per_group[0])
            else:
                values[name] = layout.expand(per_group[group_of], device)
        if checkpoint.optim_steps is not None:
            values["step"] = layout.expand(checkpoint.optim_steps.to(torch.float64), device)
        else:
            values["step"] = step
        stepped = None
        if checkpoint.grad is not None and bool((checkpoint.grad == GRAD_NONE).any()):
            stepped = layout.expand(checkpoint.grad != GRAD_NONE, device)
        return UpdateHyper(**values, stepped=stepped)

    def frozen_coordinates(self, checkpoint: Checkpoint, device=None) -> torch.Tensor | None:
        """Where the update's gradient was not the loss's (a frozen parameter's zeros or None):
        a bool P-vector, None where every recorded parameter had the loss's gradient."""
        if checkpoint.grad is None or bool((checkpoint.grad == GRAD_LOSS).all()):
            return None
        return self._parameter_groups[0].expand(checkpoint.grad != GRAD_LOSS, device)

    @cached_property
    def _parameter_groups(self) -> tuple:
        """(the recorded parameters' layout, each parameter's group index in layout order)."""
        group_index = {name: g for g, names in enumerate(self.groups) for name in names}
        params = self.manifest["parameters"]
        layout = ParameterLayout.of_shapes([p["name"] for p in params], [p["shape"] for p in params])
        return layout, torch.tensor([group_index[p["name"]] for p in params], dtype=torch.int64)

    @cached_property
    def steps(self) -> list[int]:
        return check_steps(self.path, self.manifest)

    def checkpoint(self, t: int) -> Checkpoint:
        ck = read_checkpoint(self.path, t, self.run_id, int(self.manifest.get("checkpoint_every", 1)))
        for p in self.manifest["parameters"] if ck.full else ():
            tensor = ck.params.get(p["name"])
            if tensor is None or list(tensor.shape) != p["shape"]:
                got = None if tensor is None else list(tensor.shape)
                raise TrajectoryError(f"{self.path}/step_{t:08d}.safetensors: param/{p['name']} has "
                                      f"shape {got}, the manifest says {p['shape']}")
        return ck

    def epoch_of(self, step: int) -> int:
        """Epoch of optimizer step `step` (0-based update index)."""
        return step // self.manifest["steps_per_epoch"]


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    return Run(run_dir, read_manifest(run_dir))
