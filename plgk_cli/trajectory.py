"""The trajectory format (v4): ``manifest.json`` plus one ``step_XXXXXXXX.safetensors`` per checkpoint.

Checkpoint t holds θ_t (``param/<name>``), the optimizer state after t updates
(``optim/<name>/<key>``) and the record of the update t-1 -> t: the minibatch indices ``batch``
(indices into the training split, stored in the narrowest of int16/int32/int64 that holds them,
read back as int64), the learning rate ``lr`` and clip coefficient ``clip_coef`` the step used,
and the minibatch ``loss``. Version 2 adds ``rng/cpu`` (and ``rng/cuda``), the random-generator
state the update's training forward started from, where that forward drew random numbers
(dropout), with ``rng/cpu_after`` (``rng/cuda_after``), where the generators stood when the update
was recorded (a resumed run continues from there), and ``buffer/<name>``, the model's buffers
after t updates that differ from step 0's ``fixed/<name>`` (BatchNorm running statistics). The
manifest names the ``task``. Version 1 runs read as classification runs without either. Version 3
adds ``hyper`` (float64, one row per parameter group, the columns of optimizers.HYPER_FIELDS: the
lr, momentum, dampening, betas, eps, alpha and weight decay that update used), the manifest's
``optimizer.groups`` (the parameters of each group), and, where some parameter did not take an
ordinary step, ``grad`` (uint8 per recorded parameter: GRAD_NONE, GRAD_LOSS or GRAD_ZERO, see
below) and ``optim_steps`` (int64 per parameter: its own step count, where they differ); runs of
versions 1 and 2 read as one group whose values are the manifest's but the recorded lr. Version
4 adds the manifest's ``checksum`` (sha256 of its content, see plgk_cli/manifest.py, which also
holds the manifest's schema); a version 4 manifest without it, or whose content does not match
it, is refused; runs of versions 1 to 3 carry none and read as before. A step file's
safetensors metadata names the run and the step so that a file
from another run or a renamed file is caught. This module is the only place that knows these names.

A sparse run (``checkpoint_every`` K > 1) has step files at the multiples of K and at the last
step only; the records of the steps in between travel in the step file that ends their block:
``record/batch`` (their minibatches, concatenated), ``record/scalars`` (one row of lr,
clip_coef, loss per step) and ``record/hyper`` (steps x groups x fields), with the metadata ``record/step``, ``record/size``,
``record/optim_step`` and ``record/epoch`` (comma-separated, one entry per step). One file per
block, not per step: a record of its own cost a file, its 4 KiB disk block and its header.

Every tensor carries a checksum in the metadata, ``crc32/<tensor name>`` (zlib.crc32 of its raw
bytes, 8 hex digits), with ``checksum`` = ``crc32`` saying the file has them; every read verifies
the tensors it loads (a mismatch is a TrajectoryError naming the file and the tensor). Files
written before carry none: they read, with one warning per run directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import sys
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from plgk_cli import manifest as manifest_schema
from plgk_cli.errors import OutputError, TrajectoryError
from plgk_cli.faults import fault_hook
from plgk_cli.outputs import RUN_LOCK, check_run_not_claimed, os_error, respect_umask
from plgk_cli.signals import stopping

FORMAT = "plgk-trajectory"
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
MANIFEST = "manifest.json"
STEP_PATTERN = re.compile(r"^step_(\d{8})\.safetensors$")
MAX_STEPS = 10 ** 8 - 1  # the most updates a run records: its step files' numbers have 8 digits
PARAM_PREFIX = "param/"
OPTIM_PREFIX = "optim/"
BATCH, LR, CLIP_COEF, LOSS = "batch", "lr", "clip_coef", "loss"
RECORD_PREFIX = "record/"
FIXED_PREFIX = "fixed/"  # step 0 only: the model's frozen parameters and buffers
RNG_PREFIX = "rng/"  # the generator states the update's training forward started from
BUFFER_PREFIX = "buffer/"  # buffers after t updates that differ from their step-0 value
HYPER, GRAD, OPTIM_STEPS = "hyper", "grad", "optim_steps"
# What each recorded parameter's .grad was when the optimizer stepped (the ``grad`` tensor):
GRAD_NONE = 0  # None: torch skipped the parameter, its value and state did not change
GRAD_LOSS = 1  # the loss's gradient (requires_grad was on)
GRAD_ZERO = 2  # zeros: frozen (requires_grad off) after zero_grad(set_to_none=False)
CHECKSUM, CHECKSUM_KIND, CRC_PREFIX = "checksum", "crc32", "crc32/"  # metadata: per-tensor checksums
# The manifest's ``recorded_by``: what wrote the run, which decides how an interrupted one is finished.
RECORDED_BY_TRAIN, RECORDED_BY_RECORDER = "plgk train", "Recorder"
# Every name a run directory's writers create (a file's temporary name and the writer's lock file,
# outputs.RUN_LOCK, included): --overwrite replaces a directory that holds these only.
RUN_FILE_PATTERN = re.compile(r"^((manifest\.json|step_\d{8}\.safetensors)(\.tmp)?|\.plgk-lock)$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"step_{step:08d}.safetensors"


@dataclass(frozen=True)
class Checkpoint:
    """θ_t, the optimizer state after t updates, and the record of the update t-1 -> t."""

    step: int
    params: dict  # name -> tensor
    optim_state: dict  # name -> {key -> tensor}
    optim_step: int  # optimizer's own step counter after t updates
    batch: torch.Tensor | None  # B_{t-1}; None at t = 0
    lr: float | None
    clip_coef: float | None
    loss: float | None
    rng: dict = dataclasses.field(default_factory=dict)  # "cpu"/"cuda" -> uint8 generator state
    buffers: dict = dataclasses.field(default_factory=dict)  # name -> tensor, those changed since step 0
    hyper: torch.Tensor | None = None  # (groups, len(HYPER_FIELDS)) float64; None before format v3
    grad: torch.Tensor | None = None  # uint8 per recorded parameter (GRAD_*); None: all GRAD_LOSS
    optim_steps: torch.Tensor | None = None  # int64 per parameter; None: all optim_step

    @property
    def full(self) -> bool:
        """False for a record-only step of a sparse run ([checkpoint] every > 1): no θ, no state."""
        return bool(self.params)


def check_new_run_dir(run_dir: Path, overwrite_flag: str = "overwrite=True", out_name: str = "out_dir") -> None:
    """Refuse a run directory that exists and is not empty: a run is never overwritten or extended
    unless asked to. The message names the caller's switch and argument (`plgk train`:
    ``--overwrite``, ``--out``), and offers the switch only where it would apply."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError(f"{run_dir}: exists and is not a directory; choose a new {out_name}")
    check_not_inside_a_run(run_dir, out_name)
    check_run_not_claimed(run_dir, out_name)
    if run_dir.is_dir() and _contents(run_dir):
        try:
            _only_a_run(run_dir)
        except OutputError:
            raise OutputError(f"{run_dir}: exists and is not empty, and is not only a plgk run; choose "
                              f"a new {out_name} or empty it") from None
        raise OutputError(f"{run_dir}: exists and is not empty; pass {overwrite_flag} to replace the run "
                          f"in it, or choose a new {out_name}")


def _contents(run_dir: Path) -> list:
    """What a directory holds besides a writer's lock file, which alone makes no run."""
    return sorted(p for p in run_dir.iterdir() if p.name != RUN_LOCK)


def check_not_inside_a_run(run_dir: Path, out_name: str) -> None:
    """Refuse (OutputError) a new run directory inside another run's: a run directory holds only
    its own files (what --overwrite replaces, what `plgk check` reads)."""
    for parent in Path(os.path.abspath(run_dir)).parents:
        if (parent / MANIFEST).is_file() and any(STEP_PATTERN.match(p.name) for p in parent.iterdir()):
            raise OutputError(f"{run_dir}: lies inside the run directory {parent}, which holds only its own "
                              f"files; choose an {out_name} outside it")


def is_non_empty_dir(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a directory with something in it (a lock file alone is nothing):
    after check_replaceable_run_dir, a run to replace; False for a missing or empty one, where a
    new run is simply written."""
    run_dir = Path(run_dir)
    return run_dir.is_dir() and not run_dir.is_symlink() and bool(_contents(run_dir))


# An unfinished run without a lock file (written by a plgk from before the locks) written to more
# recently than this may be training still.
LIVE_RUN_SECONDS = 60


def check_replaceable_run_dir(run_dir: Path) -> None:
    """Refuse (OutputError) to replace ``run_dir`` unless it is missing, empty, or a plgk run
    directory and nothing else (_only_a_run) that no other process is writing: its lock file
    tells (outputs.RUN_LOCK); an unfinished run without one, written by an older plgk, by the
    look of it (LIVE_RUN_SECONDS)."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink():
        raise OutputError(f"{run_dir}: is a symbolic link; --overwrite replaces only a run directory "
                          "itself: give the directory's own path or choose a new --out")
    check_not_inside_a_run(run_dir, "--out")
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise OutputError(f"{run_dir}: exists and is not a directory; choose a new --out")
    check_run_not_claimed(run_dir)
    entries = _contents(run_dir)
    if not entries:
        return
    manifest = _only_a_run(run_dir, entries)
    if (run_dir / RUN_LOCK).exists():
        return  # its writers lock it, and none holds the lock
    # An older plgk locks nothing: an unfinished run written to moments ago may be one that is
    # still training, whose next checkpoint would land in the new run.
    age = time.time() - max(p.stat().st_mtime for p in entries)
    if not manifest.get("complete") and age < LIVE_RUN_SECONDS:
        raise OutputError(f"{run_dir}: an unfinished run written to {age:.0f} s ago, which may still be "
                          "training; stop it first (or wait a minute if it was interrupted), then replace "
                          "it with --overwrite, or finish it with --resume")


def _only_a_run(run_dir: Path, entries: list | None = None) -> dict:
    """The manifest of the non-empty directory ``run_dir`` if it holds a plgk run and nothing else:
    a manifest.json of this format and only the files a run's writers create; else OutputError.
    Anything else may be someone's data, which a replace must never delete."""
    entries = sorted(run_dir.iterdir()) if entries is None else entries
    foreign = [p.name for p in entries if not RUN_FILE_PATTERN.match(p.name) or p.is_symlink()
               or not p.is_file()]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise OutputError(f"{run_dir}: holds {foreign[0]!r}{more}, which is not a file of a plgk run; "
                          "--overwrite replaces only a run directory that holds nothing else: move it "
                          "out, or choose a new --out")
    try:
        manifest = json.loads((run_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise OutputError(f"{run_dir}: has no readable {FORMAT} {MANIFEST}, so it may not be a plgk run "
                          "directory; --overwrite replaces only one: remove it yourself if it is, or "
                          "choose a new --out")
    return manifest


def staging_dir(run_dir: Path) -> Path:
    """A new, unique sibling of ``run_dir`` to write its replacement into: the same file system,
    so that replace_run_dir renames it into place."""
    run_dir = Path(os.path.abspath(run_dir))
    return run_dir.with_name(f"{run_dir.name}.plgk-new-{uuid.uuid4().hex[:8]}")


def remove_run_dir(run_dir: Path) -> None:
    """Delete a run directory file by file, only the names a run's writers create, then the empty
    directory; anything else in it stays, and so does the directory (never an rm -rf)."""
    run_dir = Path(run_dir)
    for p in run_dir.iterdir():
        if RUN_FILE_PATTERN.match(p.name) and p.is_file():
            p.unlink()
    run_dir.rmdir()


def replace_run_dir(new: Path, run_dir: Path) -> None:
    """Put the complete run ``new`` (from staging_dir) in the place of ``run_dir``, then delete the
    run it replaces. ``run_dir`` is checked again, since files may have been added to it while the
    new run trained; if it no longer qualifies, or a rename fails, the new run stays in ``new``."""
    new, shown = Path(new), Path(run_dir)
    run_dir = Path(os.path.abspath(run_dir))  # "." renames too
    try:
        check_replaceable_run_dir(run_dir)
    except OutputError as exc:
        raise OutputError(f"{exc}; the new run is kept in {new}") from None
    old = run_dir.with_name(f"{run_dir.name}.plgk-old-{uuid.uuid4().hex[:8]}")
    try:
        if not is_non_empty_dir(run_dir):
            if run_dir.is_dir():
                remove_run_dir(run_dir)  # emptied meanwhile: at most a lock file is left
            os.rename(new, run_dir)
            return
        os.rename(run_dir, old)  # two renames, not a delete: until the second, both runs are whole
        try:
            os.rename(new, run_dir)
        except BaseException:  # a failed rename or Ctrl-C between the two: the old run goes back
            os.rename(old, run_dir)
            raise
    except OSError as exc:
        raise OutputError(f"{shown}: the new run could not be put in its place ({exc}); it is kept in "
                          f"{new}") from None
    try:
        remove_run_dir(old)
    except OSError as exc:
        raise OutputError(f"{shown}: holds the new run, but the run it replaced, moved to {old}, could "
                          f"not be removed ({exc}); remove it yourself") from None


def recorded_by(manifest: dict) -> str:
    """RECORDED_BY_TRAIN or RECORDED_BY_RECORDER. Manifests from before ``recorded_by`` tell by
    their ``config``, which only `plgk train` fills in."""
    by = manifest.get("recorded_by")
    if isinstance(by, str):
        return by
    return RECORDED_BY_TRAIN if manifest.get("config") is not None else RECORDED_BY_RECORDER


def write_manifest(run_dir: Path, manifest: dict) -> None:
    """Write ``manifest`` with the checksum of its content, computed anew on every write (a
    checksum the dict carries is not reused); ``manifest`` itself is left as it is."""
    _atomic_write_text(Path(run_dir) / MANIFEST,
                       json.dumps(manifest_schema.with_checksum(manifest), indent=2, sort_keys=True))


def read_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / MANIFEST
    if not Path(run_dir).is_dir():
        raise TrajectoryError(f"{run_dir}: run directory not found; give the --out of `plgk train`")
    if not path.is_file():
        raise TrajectoryError(f"{path}: manifest missing; {run_dir} is not a plgk run directory")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TrajectoryError(f"{path}: manifest unreadable ({exc}); re-run `plgk train`") from None
    if not isinstance(manifest, dict):
        raise TrajectoryError(f"{path}: manifest is not a JSON object; restore it or re-run "
                              "`plgk train`")
    version = manifest.get("format_version")
    integer = isinstance(version, int) and not isinstance(version, bool)  # true == 1, 1.0 == 1 in Python
    if manifest.get("format") != FORMAT or not integer or version not in READABLE_VERSIONS:
        newer = manifest.get("format") == FORMAT and integer and version > FORMAT_VERSION
        raise TrajectoryError(f"{path}: format {manifest.get('format')!r} version {version!r}; "
                              f"this plgk reads {FORMAT} versions 1 to {FORMAT_VERSION}"
                              + ("; the run was written by a newer plgk: upgrade plgk" if newer
                                 else ""))
    changed = manifest_schema.checksum_problem(manifest)
    if changed is not None:
        raise TrajectoryError(f"{path}: {changed}")
    manifest_schema.check(manifest, path)  # every field plgk reads, typed and in range
    return manifest


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` by way of a temporary file: OSError (naming ``path``) where it
    cannot be written, and the temporary file removed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException as exc:
        _remove_failed(tmp, path, exc)
        raise


def _remove_failed(tmp: Path, path: Path, exc: BaseException) -> None:
    """After a failed write of ``path`` by way of ``tmp``: remove ``tmp``, and raise the OSError
    behind ``exc`` (a library's own exception type) naming ``path``; return for other errors."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass
    error = os_error(exc)
    if error is not None:
        raise OSError(error.errno, error.strerror, str(path)) from None


def _crc32(t: torch.Tensor) -> str:
    """zlib.crc32 of a (CPU) tensor's raw bytes, as 8 hex digits."""
    t = t.detach().contiguous()
    try:
        data = t.numpy()  # the tensor's own buffer, no copy
    except TypeError:  # a dtype numpy lacks (bfloat16): its bytes
        data = t.reshape(-1).view(torch.uint8).numpy()
    return f"{zlib.crc32(data):08x}"


def checksum_metadata(tensors: dict) -> dict:
    """The metadata entries that let a reader verify every tensor of a step file."""
    return {CHECKSUM: CHECKSUM_KIND, **{CRC_PREFIX + key: _crc32(t) for key, t in tensors.items()}}


_unchecked_runs: set = set()  # run directories already warned about: one warning line each


def _verify(path: Path, metadata: dict, tensors: dict) -> None:
    """Every loaded tensor against its recorded checksum; files written before checksums were
    recorded read with one warning per run directory."""
    kind = metadata.get(CHECKSUM)
    if kind is None:
        run_dir = path.parent.resolve()
        if run_dir not in _unchecked_runs:
            _unchecked_runs.add(run_dir)
            print(f"plgk: warning: {path.parent}: step files carry no checksums (written by an "
                  "older plgk); corruption cannot be detected", file=sys.stderr)
        return
    if kind != CHECKSUM_KIND:
        raise TrajectoryError(f"{path}: checksums of kind {kind!r}; this plgk verifies "
                              f"{CHECKSUM_KIND}: upgrade plgk")
    for key, t in tensors.items():
        recorded = metadata.get(CRC_PREFIX + key)
        if recorded is None:
            raise TrajectoryError(f"{path}: tensor {key} has no checksum, though the file's others "
                                  "do; the file was altered: restore it or re-run `plgk train`")
        actual = _crc32(t)
        if actual != recorded:
            raise TrajectoryError(f"{path}: tensor {key} fails its checksum (crc32 {actual}, "
                                  f"recorded {recorded}); the file is corrupt: restore it or re-run "
                                  "`plgk train`")


def _indices(batch: torch.Tensor) -> torch.Tensor:
    """Minibatch indices in the narrowest integer type that holds them."""
    batch = batch.detach().cpu()
    top = int(batch.max()) if batch.numel() else 0
    dtype = torch.int16 if top < 2 ** 15 else torch.int32 if top < 2 ** 31 else torch.int64
    return batch.to(dtype).contiguous()


def write_checkpoint(run_dir: Path, run_id: str, step: int, params: dict, optim_state: dict,
                     optim_step: int, batch: torch.Tensor | None = None, lr: float | None = None,
                     clip_coef: float | None = None, loss: float | None = None,
                     extra_metadata: dict | None = None, records: tuple = (), fixed: dict | None = None,
                     rng: dict | None = None, buffers: dict | None = None,
                     hyper: torch.Tensor | None = None, grad: torch.Tensor | None = None,
                     optim_steps: torch.Tensor | None = None) -> Path:
    """Write step file ``step``; ``records``: the records of the steps before it that have no
    file of their own (a sparse run's block), each a dict with step, batch, lr, clip_coef, loss,
    optim_step and extra_metadata; ``fixed``: (step 0) the model's state that training does not
    change, frozen parameters and buffers by state_dict name; ``rng``: the generator states the
    update's training forward started from; ``buffers``: buffers that differ from step 0's;
    ``hyper``, ``grad``, ``optim_steps``: see the module's docstring (records carry ``hyper``)."""
    tensors = {PARAM_PREFIX + name: t.detach().cpu().contiguous() for name, t in params.items()}
    tensors.update({FIXED_PREFIX + name: t.detach().cpu().contiguous() for name, t in (fixed or {}).items()})
    tensors.update({RNG_PREFIX + name: t.detach().cpu().contiguous() for name, t in (rng or {}).items()})
    tensors.update({BUFFER_PREFIX + name: t.detach().cpu().contiguous() for name, t in (buffers or {}).items()})
    for name, state in optim_state.items():
        for key, t in state.items():
            tensors[f"{OPTIM_PREFIX}{name}/{key}"] = t.detach().cpu().contiguous()
    if batch is not None:
        tensors[BATCH] = _indices(batch)
        tensors[LR] = torch.tensor([lr], dtype=torch.float64)
        tensors[CLIP_COEF] = torch.tensor([clip_coef], dtype=torch.float64)
        tensors[LOSS] = torch.tensor([loss], dtype=torch.float64)
    for key, value, dtype in ((HYPER, hyper, torch.float64), (GRAD, grad, torch.uint8),
                              (OPTIM_STEPS, optim_steps, torch.int64)):
        if value is not None:
            tensors[key] = value.detach().cpu().to(dtype).contiguous()
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "run_id": run_id,
                "step": str(step), "optim_step": str(optim_step), **(extra_metadata or {})}
    if records:
        tensors[RECORD_PREFIX + BATCH] = _indices(torch.cat([r["batch"].reshape(-1) for r in records]))
        tensors[RECORD_PREFIX + "scalars"] = torch.tensor(
            [[r["lr"], r["clip_coef"], r["loss"]] for r in records], dtype=torch.float64)
        if records[0].get("hyper") is not None:
            tensors[RECORD_PREFIX + HYPER] = torch.stack([r["hyper"] for r in records]).to(torch.float64)
        columns = {"step": [r["step"] for r in records], "size": [r["batch"].numel() for r in records],
                   "optim_step": [r["optim_step"] for r in records]}
        for key in (records[0].get("extra_metadata") or {}):
            columns[key] = [r["extra_metadata"][key] for r in records]
        metadata.update({RECORD_PREFIX + k: ",".join(map(str, v)) for k, v in columns.items()})
    metadata.update(checksum_metadata(tensors))
    path = checkpoint_path(run_dir, step)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        respect_umask(tmp)  # safetensors creates it 0600: unreadable to the user's group
        os.replace(tmp, path)  # a crash never leaves a half-written step file under its real name
    except BaseException as exc:  # a full disk: OSError naming the step file, no temporary file left
        _remove_failed(tmp, path, exc)
        raise
    fault_hook("after_checkpoint")
    return path


def _block_holder(run_dir: Path, step: int, every: int) -> Path | None:
    """The step file that carries the record of a sparse run's step without a file: the next
    multiple of ``every``, or the run's last step file in the final, shorter block."""
    candidate = checkpoint_path(run_dir, step - step % every + every)
    if candidate.is_file():
        return candidate
    later = [s for s in list_steps(run_dir) if step < s < step - step % every + every]
    return checkpoint_path(run_dir, later[-1]) if later else None


def _require_regular(path: Path) -> None:
    """Refuse a step file that is not a regular file: opening a FIFO blocks for ever, where no
    signal reaches the reader."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: the open says so
    if not stat.S_ISREG(mode):
        raise TrajectoryError(f"{path}: is not a regular file (a FIFO, a device or a directory); a step "
                              "file is one plgk wrote: restore it or re-run `plgk train`")


def _open(path: Path, keys=None) -> tuple[dict, dict]:
    """(metadata, tensors) of a step file: all tensors, or those whose names start with ``keys``,
    each verified against its checksum."""
    _require_regular(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys() if keys is None or key.startswith(keys)}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        if stopping():  # the signal landed in the reader, which wrapped it: not a damaged file
            raise KeyboardInterrupt from None
        raise TrajectoryError(f"{path}: cannot read checkpoint ({exc}); the file is truncated or "
                              "corrupt: restore it or re-run `plgk train`") from None
    _verify(Path(path), metadata, tensors)
    return metadata, tensors


def _check_run_id(path: Path, metadata: dict, run_id: str | None) -> None:
    if run_id is not None and metadata.get("run_id") != run_id:
        raise TrajectoryError(f"{path}: belongs to run {metadata.get('run_id')!r}, not {run_id!r} "
                              "named by the manifest; checkpoints of two runs are mixed: restore "
                              "this run's file or re-run `plgk train`")


def _read_block_record(run_dir: Path, step: int, every: int, run_id: str | None) -> Checkpoint:
    holder = _block_holder(run_dir, step, every)
    metadata, tensors = _open(holder, RECORD_PREFIX) if holder is not None else ({}, {})
    try:
        steps = [int(v) for v in metadata[RECORD_PREFIX + "step"].split(",")]
        index = steps.index(step)
        sizes = [int(v) for v in metadata[RECORD_PREFIX + "size"].split(",")]
        if len(sizes) != len(steps) or sum(sizes) != len(tensors[RECORD_PREFIX + BATCH]):
            raise ValueError("record sizes do not match record/batch")
        optim_step = int(metadata[RECORD_PREFIX + "optim_step"].split(",")[index])
        start = sum(sizes[:index])
        batch = tensors[RECORD_PREFIX + BATCH][start:start + sizes[index]].to(torch.int64)
        lr, clip_coef, loss = tensors[RECORD_PREFIX + "scalars"][index].tolist()
        hyper = tensors[RECORD_PREFIX + HYPER][index] if RECORD_PREFIX + HYPER in tensors else None
    except (KeyError, ValueError, IndexError):
        where = f"nor in {holder.name}, which ends its block" if holder is not None else \
            "and no later step file of its block"
        raise TrajectoryError(f"{checkpoint_path(run_dir, step)}: missing, {where}; the run has a "
                              f"gap at step {step}: restore the files or re-run `plgk train`") from None
    _check_run_id(holder, metadata, run_id)
    return Checkpoint(step=step, params={}, optim_state={}, optim_step=optim_step, batch=batch, lr=lr,
                      clip_coef=clip_coef, loss=loss, hyper=hyper)


def read_fixed(run_dir: Path, run_id: str | None = None) -> dict:
    """The frozen parameters and buffers recorded with step 0 (empty for runs without any, and for
    runs written before they were recorded)."""
    path = checkpoint_path(run_dir, 0)
    metadata, tensors = _open(path, FIXED_PREFIX)
    _check_run_id(path, metadata, run_id)
    return {key[len(FIXED_PREFIX):]: t for key, t in tensors.items()}


def read_checkpoint(run_dir: Path, step: int, run_id: str | None = None, every: int = 1) -> Checkpoint:
    """Step ``step`` of a run; ``every``: the run's checkpoint_every, whose blocks carry the
    records of the steps without a file."""
    path = checkpoint_path(run_dir, step)
    _require_regular(path)
    if not path.is_file() and every > 1 and step % every:
        return _read_block_record(Path(run_dir), step, every, run_id)
    if not path.is_file():
        raise TrajectoryError(f"{path}: checkpoint missing; the run has a gap at step {step}")
    metadata, tensors = _open(path)
    if metadata.get("step") != str(step):
        raise TrajectoryError(f"{path}: holds step {metadata.get('step')!r}, not {step}; "
                              "checkpoint files were renamed, copied or mixed: restore step "
                              f"{step}'s file or re-run `plgk train`")
    _check_run_id(path, metadata, run_id)
    params, optim_state, rng, buffers = {}, {}, {}, {}
    for key, t in tensors.items():
        if key.startswith(PARAM_PREFIX):
            params[key[len(PARAM_PREFIX):]] = t
        elif key.startswith(RNG_PREFIX):
            rng[key[len(RNG_PREFIX):]] = t
        elif key.startswith(BUFFER_PREFIX):
            buffers[key[len(BUFFER_PREFIX):]] = t
        elif key.startswith(OPTIM_PREFIX):
            name, _, state_key = key[len(OPTIM_PREFIX):].rpartition("/")
            optim_state.setdefault(name, {})[state_key] = t
    has_record = BATCH in tensors
    if step > 0 and not has_record:
        raise TrajectoryError(f"{path}: no update record (batch, lr, clip_coef); the file is "
                              "incomplete: re-run `plgk train`")
    return Checkpoint(
        step=step, params=params, optim_state=optim_state,
        optim_step=int(metadata.get("optim_step", step)),
        batch=tensors[BATCH].to(torch.int64) if has_record else None,
        lr=float(tensors[LR][0]) if has_record else None,
        clip_coef=float(tensors[CLIP_COEF][0]) if has_record else None,
        loss=float(tensors[LOSS][0]) if has_record else None,
        rng=rng, buffers=buffers, hyper=tensors.get(HYPER), grad=tensors.get(GRAD),
        optim_steps=tensors.get(OPTIM_STEPS),
    )


def checkpoint_run_id(run_dir: Path, step: int) -> str | None:
    """The run id in a checkpoint's metadata (reads the header only); None if unreadable."""
    path = checkpoint_path(run_dir, step)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("run_id")
    except (SafetensorError, OSError, ValueError, RuntimeError):
        if stopping():
            raise KeyboardInterrupt from None
        return None


def list_steps(run_dir: Path, every: int = 1) -> list[int]:
    """The recorded steps: those with a step file and, in a sparse run (``every`` > 1), the steps
    of each block whose records travel in the file that ends it (checked when they are read)."""
    files = sorted(int(m.group(1)) for p in Path(run_dir).iterdir() if (m := STEP_PATTERN.match(p.name)))
    if every <= 1:
        return files
    implied = [s for a, b in zip(files, files[1:]) if a % every == 0 and b - a <= every
               for s in range(a + 1, b)]
    return sorted(set(files) | set(implied))


def missing_block_file(run_dir: Path, step: int, every: int) -> str:
    """The message for a sparse run's missing step file ``step`` (a multiple of ``every`` or the
    last step), which held θ and the records of the steps before it in its block."""
    first = step - (step - 1) % every if step > 0 else 0
    records = f" and the update records of steps {first}-{step - 1}" if step - first > 0 else ""
    return (f"{checkpoint_path(run_dir, step)}: missing; with checkpoints every {every} steps it "
            f"holds θ_{step}{records}: restore the file or re-run `plgk train`")


def check_steps(run_dir: Path, manifest: dict) -> list[int]:
    """The recorded steps, verified contiguous from 0 (a sparse run: its files at multiples of
    `checkpoint_every` and at the end, and the steps whose records they carry)."""
    every = int(manifest.get("checkpoint_every", 1))
    steps = list_steps(run_dir, every)
    if not steps:
        raise TrajectoryError(f"{run_dir}: no step_*.safetensors checkpoints")
    if steps[0] != 0:
        raise TrajectoryError(f"{checkpoint_path(run_dir, 0)}: missing; the trajectory must start "
                              "at step 0 (θ_0)")
    for previous, current in zip(steps, steps[1:]):
        if current - previous != 1 and every > 1:
            raise TrajectoryError(missing_block_file(run_dir, previous - previous % every + every, every))
        if current - previous != 1:
            raise TrajectoryError(f"{checkpoint_path(run_dir, previous + 1)}: missing; the run has a "
                                  f"gap between steps {previous} and {current}")
    total = manifest.get("total_steps")
    if manifest.get("complete") and total is not None and steps[-1] != total:
        raise TrajectoryError(f"{run_dir}: manifest says {total} steps but the last checkpoint is "
                              f"step {steps[-1]}; checkpoints are missing at the end")
    return steps
