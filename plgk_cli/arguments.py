"""Replay's arguments: one frozen dataclass, validated on construction, stored in the output,
and the parsers of the user-facing specs (audit set, rule, train subset)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from plgk_cli.errors import AuditSpecError
from plgk_cli.gradients import TARGETS
from plgk_cli.modes import DEFAULT_ENERGY
from plgk_cli.tasks.language_model import IGNORE, prompt_points

_BOUND = r"(-?[0-9]+)?"  # ASCII digits; a lone "-" is not a bound
SLICE_SPEC = re.compile(rf"(train|test)(?:\[{_BOUND}:{_BOUND}\])?")  # use with fullmatch
SUBSET_SPEC = re.compile(rf"(?:train)?\[{_BOUND}:{_BOUND}\]|{_BOUND}:{_BOUND}")  # use with fullmatch
RULES = ("euler", "trapezoid", "supersample:K", "adaptive[:TOL]")


SHARDINGS = ("auto", "rows", "audit")


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
    modes: int | str = 0  # K modes (Algorithm 1), or "auto[:ENERGY]" (K grown to hold ENERGY); 0: none
    modes_at: tuple = ()  # reference checkpoints of the SVD modes; (): the final one
    modes_method: str = "svd"  # svd (streamed randomized SVD) or oja (online, paper A.8)
    save_modes: bool = False  # store V (P x K)
    ghost: bool = False  # ghost dot products for Linear layers (plain SGD, euler, stride 1)
    max_update_error: float | None = None  # the update check's gate; None: by the run's dtype
    shard: str = "auto"  # under torchrun: rows | audit | auto (distributed.py); no effect on the result

    def __post_init__(self):
        # Python callers build this directly: every field is checked for its type and range here,
        # before any work, as the CLI's parser would (a str "8" must not reach a loop bound).
        for name in ("ckpts", "audit_set", "out", "train_subset"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
            elif not (isinstance(value, str) or (value is None and name == "train_subset")):
                raise AuditSpecError(f"{_flag(name)}: must be a path or spec string, got {value!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else self.targets
        if not isinstance(targets, (tuple, list)):
            raise AuditSpecError(f"--target: must be a target name or a tuple of them, got {targets!r}")
        targets = tuple(dict.fromkeys(targets))  # keep order, drop repeats
        object.__setattr__(self, "targets", targets)
        if not targets:
            raise AuditSpecError("--target: give at least one of " + ", ".join(TARGETS))
        for t in targets:  # which of them the run's task offers is checked with the run
            if not (isinstance(t, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", t)):
                raise AuditSpecError(f"--target: unknown target {t!r}; expected one of {', '.join(TARGETS)}")
        for name in FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise AuditSpecError(f"{_flag(name)}: must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.rule, str):
            raise AuditSpecError(f"--rule: must be a string such as 'trapezoid', got {self.rule!r}")
        parse_rule(self.rule)
        if self.group_by not in (None, "label"):
            raise AuditSpecError(f"--group-by: unknown grouping {self.group_by!r}; expected label")
        if self.shard not in SHARDINGS:
            raise AuditSpecError(f"--shard: expected {', '.join(SHARDINGS)}, got {self.shard!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise AuditSpecError(f"--device: expected auto, cpu or cuda, got {self.device!r}")
        for name, low, high in INTEGER_RANGES:
            _check_integer(name, getattr(self, name), low, high)
        for name, low, low_open in NUMBER_RANGES:
            _check_number(name, getattr(self, name), low, low_open)
        if not isinstance(self.modes_at, (tuple, list)):
            raise AuditSpecError(f"--modes-at: must be a tuple of steps, got {self.modes_at!r}")
        for t in self.modes_at:
            _check_integer("modes_at", t, 0, None)
        object.__setattr__(self, "modes_at", tuple(self.modes_at))
        if self.max_update_error is not None:
            _check_number("max_update_error", self.max_update_error, 0.0, True)
        object.__setattr__(self, "modes", canonical_modes(self.modes))
        if self.modes_method not in ("svd", "oja"):
            raise AuditSpecError(f"--modes-method: expected svd or oja, got {self.modes_method!r}")
        if (self.kernel_train or self.precondition) and not (self.kernel or self.modes):
            raise AuditSpecError("--kernel-train and --precondition need --kernel or --modes")
        if (self.modes_at or self.save_modes) and not self.modes:
            raise AuditSpecError("--modes-at and --save-modes need --modes K")
        if self.modes_energy is not None and self.modes_method == "oja":
            raise AuditSpecError("--modes auto: the oja modes follow a fixed K through the run; give "
                                 "--modes K with --modes-method oja")
        if self.modes_at and self.modes_method == "oja":
            raise AuditSpecError("--modes-at: the oja modes follow the whole run; it applies to "
                                 "--modes-method svd only")
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
        return self.kernel or bool(self.modes)

    @property
    def modes_energy(self) -> float | None:
        """--modes auto[:ENERGY]: the energy share the modes must hold; None for a fixed K."""
        return parse_modes(self.modes)[1]

    def modes_steps(self, total: int) -> tuple:
        """Reference checkpoints of the SVD modes, validated against the run's last step."""
        if not self.modes or self.modes_method != "svd":
            return ()
        steps = self.modes_at or (total,)
        for t in steps:
            if not 0 <= t <= total:
                raise AuditSpecError(f"--modes-at: step {t} is outside the run (0..{total})")
        return steps


FLAGS = ("overwrite", "resume", "kernel", "kernel_train", "precondition", "save_modes", "ghost")
MAX_SUB_INTERVALS = 4096  # supersample:K beyond this costs hours per update for no measurable gain
# (field, smallest, largest or None): the integer options' ranges
INTEGER_RANGES = (("stride", 1, None), ("chunk_size", 1, 1 << 24), ("commit_every", 0, None),
                  ("kernel_stride", 0, None))
MAX_MODES = 100_000
# (field, bound, bound excluded): the real-valued options, all finite
NUMBER_RANGES = (("memory_budget", 0.0, False), ("commit_seconds", 0.0, True))
_OPTION = {"max_update_error": "--accept-update-error", "targets": "--target"}


def _flag(name: str) -> str:
    return _OPTION.get(name, "--" + name.replace("_", "-"))


def _check_integer(name: str, value, low: int, high: int | None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (
        high is None or value <= high)
    if not ok:
        within = f">= {low}" if high is None else f"in {low}..{high}"
        raise AuditSpecError(f"{_flag(name)}: must be a whole number {within}, got {value!r}")


def _check_number(name: str, value, bound: float, excluded: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        value > bound if excluded else value >= bound)
    if not ok:
        raise AuditSpecError(f"{_flag(name)}: must be a finite number {'>' if excluded else '>='} {bound:g}, "
                             f"got {value!r}")


def parse_modes(modes) -> tuple[int, float | None]:
    """--modes: K (an int, or its ASCII digits as the command line gives them; 0: none) -> (K, None);
    "auto[:ENERGY]" -> (0, ENERGY), ENERGY in (0, 1), 0.99 by default (paper Table 3's K@99%)."""
    if isinstance(modes, str) and re.fullmatch(r"[0-9]{1,7}", modes):
        modes = int(modes)
    if isinstance(modes, int) and not isinstance(modes, bool) and 0 <= modes <= MAX_MODES:
        return modes, None
    m = re.fullmatch(r"auto(?::([0-9.eE+-]{1,32}))?", modes) if isinstance(modes, str) else None
    if m:
        try:
            energy = DEFAULT_ENERGY if m.group(1) is None else float(m.group(1))
        except ValueError:
            energy = math.nan
        if 0 < energy < 1:  # NaN fails too
            return 0, energy
    shown = repr(modes) if len(repr(modes)) <= 60 else repr(modes)[:57] + "..."
    raise AuditSpecError(f"--modes: expected a whole number K in 0..{MAX_MODES} or auto[:ENERGY] with ENERGY "
                         f"in (0, 1) (e.g. auto:0.95), got {shown}")


def canonical_modes(modes) -> int | str:
    """The one spelling of a --modes value (auto -> "auto:0.99"), as stored with the results; the
    energy's repr, so that what is stored is what was used."""
    k, energy = parse_modes(modes)
    return k if energy is None else f"auto:{energy!r}"


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
    m = re.fullmatch(r"supersample:([0-9]+)", rule)
    if m and len(m.group(1)) <= 6 and 1 <= int(m.group(1)) <= MAX_SUB_INTERVALS:
        return QuadratureRule(int(m.group(1)))
    if m:
        raise AuditSpecError(f"--rule: {rule!r}: K of supersample:K must be in 1..{MAX_SUB_INTERVALS}")
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
                         f"with K in 1..{MAX_SUB_INTERVALS} or adaptive[:TOL]")


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
            given = x.shape  # _as_images may add a channel axis: the message names the file's shape
            x = x if np.issubdtype(x.dtype, np.integer) and dataset.x_train.dtype == torch.int64 else _as_images(x)
    except AuditSpecError:
        raise
    except Exception as exc:
        raise AuditSpecError(f"--audit-set: {spec}: cannot read ({exc})") from None
    y_shape = tuple(dataset.y_train.shape[1:])
    if x.shape[1:] != tuple(dataset.in_shape) or len(x) != len(y) or y.shape[1:] != y_shape or len(y) == 0:
        raise AuditSpecError(f"--audit-set: {spec}: x has shape {given} and y {y.shape}; expected "
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
    x = torch.as_tensor(x, dtype=dataset.x_train.dtype)
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):  # NaN, Inf, or beyond the dtype
        row = int((~torch.isfinite(x.reshape(len(x), -1))).any(1).nonzero()[0])
        raise AuditSpecError(f"--audit-set: {spec}: point {row} of x is not finite in {dataset.x_train.dtype} "
                             "(NaN, Inf, or too large for the run's dtype); audit points must be finite")
    return AuditSet(x, labels, str(path), None, None)


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
    if len(idx) == 0:
        raise AuditSpecError(f"--train-subset: {spec}: holds no indices")
    outside = idx[(idx < 0) | (idx >= num_train)]
    if len(outside):
        raise AuditSpecError(f"--train-subset: {spec}: index {int(outside[0])} is outside 0..{num_train - 1}")
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
