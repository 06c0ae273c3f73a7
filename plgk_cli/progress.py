"""Replay progress files (``OUT.progress``): committed units of a long replay, for --resume.

A commit holds everything the backward walk carries (adjoints, accumulators, the step reached)
as safetensors, with the replay's arguments, the run id and the walk's scalars (``state``, JSON)
in its metadata, and a sha256 over that metadata and all tensor bytes (version 2; version 1's
covered the tensors only, so a damaged header resumed from a wrong step). It is written to a
temporary name, flushed to disk and renamed, so a kill at any moment leaves either the previous
commit or the new one, never a mix; the checksum catches the rest. A commit that cannot be
written (a full disk) leaves the previous one in place.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from plgk_cli.errors import StoreError
from plgk_cli.faults import fault_hook
from plgk_cli.signals import stopping
from plgk_cli.outputs import respect_umask, write_failure

FORMAT = "plgk-replay-progress"
VERSION = "2"
CHECKSUM = "checksum"


def progress_path(out: Path, rank: int | None = None) -> Path:
    """OUT.progress, or OUT.progress.rankR for each rank of a torchrun replay."""
    suffix = ".progress" if rank is None else f".progress.rank{rank}"
    return Path(out).with_name(Path(out).name + suffix)


def previous_path(path: Path) -> Path:
    """Where a torchrun rank keeps its previous commit until every rank has written the next one."""
    return Path(path).with_name(Path(path).name + ".previous")


def _checksum(metadata: dict, tensors: dict) -> str:
    """sha256 over every metadata entry but the checksum (format, version, state) and every
    tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != CHECKSUM},
                                  sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(key.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).numpy().tobytes())
    return h.hexdigest()


def _os_error(exc: SafetensorError) -> OSError:
    """The OSError behind a failed safetensors write, which names it in its message only
    ("... No space left on device (os error 28)")."""
    code = re.search(r"os error (\d+)", str(exc))
    number = int(code.group(1)) if code else errno.EIO
    return OSError(number, os.strerror(number))


def commit(path: Path, tensors: dict, metadata: dict, keep_previous: bool = False) -> None:
    """Replace the progress file ``path`` by this commit; one that cannot be written is an
    OutputError, the previous commit staying in place and no temporary file left.
    ``keep_previous``: the commit it replaces moves to previous_path(path) (a torchrun rank's:
    a resume may need the step that a rank killed mid-commit still holds)."""
    fault_hook("before_commit")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"format": FORMAT, "version": VERSION, "state": json.dumps(metadata, sort_keys=True)}
    meta[CHECKSUM] = _checksum(meta, tensors)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        respect_umask(tmp)  # safetensors creates it 0600
        if keep_previous and path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the write's own failure is the one to report
        kept = "the last commit is kept" if path.exists() else "nothing was committed yet"
        raise write_failure(path, exc if isinstance(exc, OSError) else _os_error(exc),
                            f"{kept}: free space (or fix the permissions), then run the replay again "
                            "with --resume") from None
    fault_hook("after_commit")


def peek(path: Path) -> dict | None:
    """The state a progress file holds, from its header alone; None if it cannot be read (load
    says why, should it be the one chosen)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["state"])
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError):
        if stopping():
            raise KeyboardInterrupt from None
        return None


def load(path: Path) -> tuple[dict, dict]:
    if path.exists() and not path.is_file():  # a FIFO would block the open for ever
        raise StoreError(f"{path}: is not a regular file; start over with --overwrite")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        if stopping():  # the signal landed in the reader, which wrapped it: not a damaged file
            raise KeyboardInterrupt from None
        raise StoreError(f"{path}: unreadable progress file ({exc}); start over with --overwrite") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise StoreError(f"{path}: not a plgk replay progress file of version {VERSION}; "
                         "start over with --overwrite")
    if _checksum(meta, tensors) != meta.get(CHECKSUM):
        raise StoreError(f"{path}: checksum mismatch, the progress file is damaged; start over "
                         "with --overwrite")
    try:
        state = json.loads(meta["state"])
    except (KeyError, ValueError):  # a file whose checksum matches was written so: not by plgk
        raise StoreError(f"{path}: holds no readable replay state; start over with --overwrite") from None
    return tensors, state
