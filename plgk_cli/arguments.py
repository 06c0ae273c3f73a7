"""Replay's arguments: one frozen dataclass, validated on construction, stored in the output,
and the parsers of the user-facing specs (audit set, rule, train subset)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from plgk_cli.errors import AuditSpecError
from plgk_cli.gradients import TARGETS
from plgk_cli.tasks.language_model import IGNORE, prompt_points

_BOUND = r"(-?[0-9]+)?"  # ASCII digits; a lone "-" is not a bound
SLICE_SPEC = re.compile(rf"(train|test)(?:\[{_BOUND}:{_BOUND}\])?")  # use with fullmatch
SUBSET_SPEC = re.compile(rf"(?:train)?\[{_BOUND}:{_BOUND}\]|{_BOUND}:{_BOUND}")  # use with fullmatch
RULES = ("euler", "trapezoid", "supersample:K", "adaptive[:TOL]")


@dataclass(frozen=True)
class ReplayArguments:
    ckpts: str
    audit_set: str
    out: str
    targets: tuple = ("loss",)
    rule: str = "trapezoid"
    train_subset: str | None = None
    group_by: str | None = None
    stride: int = 1
    device: str = "auto"
    chunk_size: int = 256
    memory_budget: float = 0.0  # MB for the replay's tensors; > 0 picks the chunk size from it
    overwrite: bool = False
    resume: bool = False
    commit_every: int = 0  # commit progress every K updates (0: by time only)
    commit_seconds: float = 60.0  # ... and at least this often
    kernel: bool = False  # PLGK, IPS, temporal kernel, regime metrics (geometry.py)
    kernel_stride: int = 0  # steps between kernel checkpoints; 0: one epoch
    kernel_train: bool = False  # also train x train (M x M)
    precondition: bool = False  # weigh the PLGK by the optimizer's preconditioner (eq. 29)
    modes: int = 0  # K modes (Algorithm 1); 0: none
    modes_at: tuple = ()  # reference checkpoints of the SVD modes; (): the final one
    modes_method: str = "svd"  # svd (streamed randomized SVD) or oja (online, paper A.8)
    save_modes: bool = False  # store V (P x K)
    ghost: bool = False  # ghost dot products for Linear layers (plain SGD, euler, stride 1)
    max_update_error: float | None = None  # the update check's gate; None: by the run's dtype

    def __post_init__(self):
        targets = tuple(dict.fromkeys(self.targets))  # keep order, drop repeats
        object.__setattr__(self, "targets", targets)
        if not targets:
            raise AuditSpecError("--target: give at least one of " + ", ".join(TARGETS))
        for t in targets:  # which of them the run's task offers is checked with the run
            if not (isinstance(t, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", t)):
                raise AuditSpecError(f"--target: unknown target {t!r}; expected one of {', '.join(TARGETS)}")
        parse_rule(self.rule)
        if self.group_by not in (None, "label"):
            raise AuditSpecError(f"--group-by: unknown grouping {self.group_by!r}; expected label")
        if not isinstance(self.stride, int) or self.stride < 1:
            raise AuditSpecError(f"--stride: must be a whole number >= 1, got {self.stride!r}")
        object.__setattr__(self, "modes_at", tuple(int(t) for t in self.modes_at))
        if self.kernel_stride < 0:
            raise AuditSpecError(f"--kernel-stride: must be >= 1 (0: one epoch), got {self.kernel_stride}")
        if self.modes < 0:
            raise AuditSpecError(f"--modes: must be >= 0, got {self.modes}")
        if self.modes_method not in ("svd", "oja"):
            raise AuditSpecError(f"--modes-method: expected svd or oja, got {self.modes_method!r}")
        if (self.kernel_train or self.precondition) and not (self.kernel or self.modes):
            raise AuditSpecError("--kernel-train and --precondition need --kernel or --modes")
        if (self.modes_at or self.save_modes) and not self.modes:
            raise AuditSpecError("--modes-at and --save-modes need --modes K")
        if self.modes_at and self.modes_method == "oja":
            raise AuditSpecError("--modes-at: the oja modes follow the whole run; it applies to "
                                 "--modes-method svd only")
        if self.commit_every < 0 or self.commit_seconds <= 0:
            raise AuditSpecError("--commit-every must be >= 0 and --commit-seconds > 0")
        if self.memory_budget < 0:
            raise AuditSpecError(f"--memory-budget: must be >= 0 MB, got {self.memory_budget!r}")
        if self.max_update_error is not None and not (
                isinstance(self.max_update_error, (int, float)) and self.max_update_error > 0):
            raise AuditSpecError(f"--accept-update-error: must be a number > 0, got {self.max_update_error!r}")
        if self.chunk_size < 1:
            raise AuditSpecError(f"--chunk-size: must be >= 1, got {self.chunk_size!r}")
        if self.ghost and (self.rule != "euler" or self.stride != 1):
            raise AuditSpecError(f"--ghost: needs --rule euler and --stride 1 (got --rule {self.rule} "
                                 f"--stride {self.stride}): the ghost products pair each update's "
                                 "examples with the audit gradients at the same θ")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def quadrature(self) -> QuadratureRule:
        return parse_rule(self.rule)

    @property
    def geometry(self) -> bool:
        return self.kernel or self.modes > 0

    def modes_steps(self, total: int) -> tuple:
        """Reference checkpoints of the SVD modes, validated against the run's last step."""
        if not self.modes or self.modes_method != "svd":
            return ()
        steps = self.modes_at or (total,)
        for t in steps:
            if not 0 <= t <= total:
                raise AuditSpecError(f"--modes-at: step {t} is outside the run (0..{total})")
        return steps


ADAPTIVE_TOLERANCE = 3e-3  # adaptive's default: mean |segment error| <= TOL x mean |Δq| of the segment
ADAPTIVE_MAX_SUBINTERVALS = 64  # the cap of adaptive's refinement per segment (6 halvings)


@dataclass(frozen=True)
class QuadratureRule:
    """How h, the audit gradient averaged over a segment, is formed: the composite trapezoid on
    ``sub_intervals`` pieces (0: euler, the left endpoint), or, with ``tolerance``, adaptively:
    halved from the trapezoid until the segment's measured completeness error is within
    ``tolerance`` of its scale, up to ``sub_intervals`` pieces."""

    sub_intervals: int
    tolerance: float | None = None

    @property
    def adaptive(self) -> bool:
        return self.tolerance is not None


def parse_rule(rule: str) -> QuadratureRule:
    """euler | trapezoid | supersample:K | adaptive[:TOL]."""
    if rule == "euler":
        return QuadratureRule(0)
    if rule == "trapezoid":
        return QuadratureRule(1)
    m = re.fullmatch(r"supersample:(\d+)", rule)
    if m and int(m.group(1)) >= 1:
        return QuadratureRule(int(m.group(1)))
    m = re.fullmatch(r"adaptive(?::(.+))?", rule)
    if m:
        try:
            tolerance = ADAPTIVE_TOLERANCE if m.group(1) is None else float(m.group(1))
        except ValueError:
            tolerance = math.nan
        if not 0 < tolerance < 1:  # NaN too
            raise AuditSpecError(f"--rule: {rule!r}: the tolerance of adaptive:TOL must be a number in (0, 1), "
                                 f"e.g. adaptive:1e-3")
        return QuadratureRule(ADAPTIVE_MAX_SUBINTERVALS, tolerance)
    raise AuditSpecError(f"--rule: unknown rule {rule!r}; expected euler, trapezoid, supersample:K "
                         "with K >= 1 or adaptive[:TOL]")


@dataclass(frozen=True)
class AuditSet:
    x: torch.Tensor
    y: torch.Tensor
    source: str  # the spec, e.g. "test[0:64]" or the npz path
    split: str | None  # "train"/"test" when the points are rows of a split
    index: torch.Tensor | None  # their indices in that split


def _is_file(path: Path, spec: str, flag: str) -> bool:
    """Path.is_file that turns an OS refusal (e.g. a name too long) into the flag's error."""
    try:
        return path.is_file()
    except OSError as exc:
        raise AuditSpecError(f"{flag}: {spec!r}: {exc.strerror or exc}") from None


def _slice(spec: str, split: str, start: str | None, stop: str | None, length: int,
           flag: str) -> range:
    lo = int(start) if start else 0
    hi = int(stop) if stop else length
    if lo < 0:
        lo += length
    if hi < 0:
        hi += length
    if not (0 <= lo <= length and 0 <= hi <= length):
        raise AuditSpecError(f"{flag}: {spec!r} is out of range: the {split} split has {length} "
                             f"examples (valid indices 0..{length - 1})")
    if hi <= lo:
        raise AuditSpecError(f"{flag}: {spec!r} selects no examples; give START < STOP")
    return range(lo, hi)


def resolve_audit_set(spec: str, dataset, task=None) -> AuditSet:
    """The audit points: a slice of a split, or an .npz of points (targets checked by ``task``,
    default classification)."""
    m = SLICE_SPEC.fullmatch(spec)
    if m:
        split, start, stop = m.group(1), m.group(2), m.group(3)
        x, y = dataset.split(split)
        rows = _slice(spec, split, start, stop, len(y), "--audit-set")
        index = torch.arange(rows.start, rows.stop)
        return AuditSet(x[index], y[index], spec, split, index)
    path = Path(spec)
    if path.suffix == ".jsonl":
        return _prompt_audit_set(path, spec, dataset, task)
    if path.suffix != ".npz":
        raise AuditSpecError(f"--audit-set: {spec!r} is neither SPLIT[START:STOP] (split train or "
                             "test), a PATH.npz with arrays x and y nor (language models) a PATH.jsonl "
                             "of prompts")
    if not _is_file(path, spec, "--audit-set"):
        raise AuditSpecError(f"--audit-set: {spec}: file not found")
    import zipfile

    if not zipfile.is_zipfile(path):  # else numpy falls back to pickle and blames allow_pickle
        raise AuditSpecError(f"--audit-set: {spec}: not an .npz archive; write it with "
                             "numpy.savez(path, x=..., y=...)")
    from plgk_cli.data import _as_images

    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise AuditSpecError(f"--audit-set: {spec}: needs arrays x and y, has {', '.join(f.files)}")
            x, y = f["x"], np.asarray(f["y"])
            x = x if np.issubdtype(x.dtype, np.integer) and dataset.x_train.dtype == torch.int64 else _as_images(x)
    except AuditSpecError:
        raise
    except Exception as exc:
        raise AuditSpecError(f"--audit-set: {spec}: cannot read ({exc})") from None
    y_shape = tuple(dataset.y_train.shape[1:])
    if x.shape[1:] != tuple(dataset.in_shape) or len(x) != len(y) or y.shape[1:] != y_shape or len(y) == 0:
        raise AuditSpecError(f"--audit-set: {spec}: x has shape {x.shape} and y {y.shape}; expected "
                             f"x (N, {', '.join(map(str, dataset.in_shape))}) and y "
                             f"{(('N',) + y_shape)} with N >= 1".replace("'", ""))
    if task is None or task.label_kind == "class":
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= dataset.num_classes:
            raise AuditSpecError(f"--audit-set: {spec}: labels must be integers in 0..{dataset.num_classes - 1}")
        labels = torch.as_tensor(y, dtype=torch.int64)
    else:
        try:
            labels = task.check_labels(y, "y").to(dataset.y_train.dtype)
        except ValueError as exc:
            raise AuditSpecError(f"--audit-set: {spec}: {exc}") from None
    return AuditSet(torch.as_tensor(x, dtype=dataset.x_train.dtype), labels, str(path), None, None)


def _prompt_audit_set(path: Path, spec: str, dataset, task) -> AuditSet:
    """A JSON-lines file of {"prompt", "continuation"}: audited on the continuation's tokens."""
    if task is None or task.label_kind != "tokens":
        raise AuditSpecError(f"--audit-set: {spec}: prompts (.jsonl) are audit points of language-model "
                             f"runs; this run's task is {getattr(task, 'name', 'classification')}")
    if not (dataset.spec == "addition" or dataset.spec.startswith("text:")):
        raise AuditSpecError(f"--audit-set: {spec}: prompts are encoded with plgk's byte-level tokenizer, "
                             f"which the run's data ({dataset.spec}) was not: give the audit points as an "
                             "npz of token ids x and targets y from your own tokenizer")
    if not _is_file(path, spec, "--audit-set"):
        raise AuditSpecError(f"--audit-set: {spec}: file not found")
    try:
        x, y = prompt_points(path, dataset.in_shape[0])
    except UnicodeDecodeError as exc:
        raise AuditSpecError(f"--audit-set: {spec}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        raise AuditSpecError(f"--audit-set: {exc}") from None
    return AuditSet(torch.as_tensor(x), torch.as_tensor(y), str(path), None, None)


def check_vocabulary(audit_set: AuditSet, vocabulary: int | None, task=None, output_width: int | None = None) -> None:
    """Token ids of the audit points must be rows of the model's input embedding; a language
    model's audit points need a target, each one a token of its output."""
    tokens = task is not None and task.label_kind == "tokens"
    if tokens:
        y = audit_set.y
        empty = (y == IGNORE).all(1).nonzero()
        if len(empty):
            raise AuditSpecError(f"--audit-set: {audit_set.source}: point {int(empty[0])} has no target token "
                                 "(every y is -100): there is nothing to audit; give it a continuation")
        bad = (y != IGNORE) & ((y < 0) | (y >= output_width)) if output_width is not None else None
        if bad is not None and bad.any():
            row = int(bad.any(1).nonzero()[0])
            raise AuditSpecError(f"--audit-set: {audit_set.source}: point {row} has target token "
                                 f"{int(y[row][bad[row]][0])}, outside the model's output 0..{output_width - 1}")
    if vocabulary is None or audit_set.x.is_floating_point() or not audit_set.x.numel():
        return
    outside = (audit_set.x >= vocabulary) | (audit_set.x < 0)
    if outside.any():
        row = int(outside.any(1).nonzero()[0])
        raise AuditSpecError(f"--audit-set: {audit_set.source}: point {row} holds token id "
                             f"{int(audit_set.x[row][outside[row]][0])}, outside the model's vocabulary "
                             f"0..{vocabulary - 1}; give tokens the model knows")


def resolve_train_subset(spec: str | None, num_train: int) -> torch.Tensor | None:
    """Indices of the training examples to audit (partial audit, paper A.1.3); None = all."""
    if spec is None:
        return None
    m = SUBSET_SPEC.fullmatch(spec)
    if m:
        start, stop = (m.group(1), m.group(2)) if spec.endswith("]") else (m.group(3), m.group(4))
        rows = _slice(spec, "train", start, stop, num_train, "--train-subset")
        return torch.arange(rows.start, rows.stop)
    path = Path(spec)
    if not _is_file(path, spec, "--train-subset"):
        raise AuditSpecError(f"--train-subset: {spec!r} is neither START:STOP nor a file of indices")
    try:
        idx = np.load(path) if path.suffix == ".npy" else _read_indices(path, spec, num_train)
    except AuditSpecError:
        raise
    except Exception as exc:
        raise AuditSpecError(f"--train-subset: {spec}: cannot read indices ({exc})") from None
    idx = np.asarray(idx)
    if not np.issubdtype(idx.dtype, np.integer):  # no silent truncation of 1.5, no crash on text
        raise AuditSpecError(f"--train-subset: {spec}: holds {idx.dtype} values; save integer "
                             "indices (e.g. numpy.save(path, numpy.array([0, 5, 7])))")
    idx = np.unique(idx.astype(np.int64))
    if len(idx) == 0 or idx.min() < 0 or idx.max() >= num_train:
        raise AuditSpecError(f"--train-subset: {spec}: indices must be in 0..{num_train - 1}")
    return torch.as_tensor(idx)


def _read_indices(path: Path, spec: str, num_train: int) -> np.ndarray:
    """A text file of whitespace/newline-separated integers, '#' starting a comment (what
    numpy.loadtxt read before; its integer parser returns garbage or crashes on some non-ASCII
    text in numpy 2.4)."""
    tokens = [t for line in path.read_text(encoding="utf-8").splitlines()
              for t in line.split("#", 1)[0].split()]
    for t in tokens:
        if not re.fullmatch(r"[+-]?[0-9]+", t):
            raise AuditSpecError(f"--train-subset: {spec}: {t!r} is not an integer index")
        if not 0 <= int(t) < num_train:
            raise AuditSpecError(f"--train-subset: {spec}: index {int(t)} is outside "
                                 f"0..{num_train - 1}")
    return np.array([int(t) for t in tokens], dtype=np.int64)
