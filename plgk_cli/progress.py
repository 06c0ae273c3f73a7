"""Replay progress files (``OUT.progress``): committed units of a long replay, for --resume.

A commit holds everything the backward walk carries (adjoints, accumulators, the step reached)
as safetensors, with the replay's arguments, the run id and a sha256 over all tensor bytes in its
metadata. It is written to a temporary name, flushed to disk and renamed, so a kill at any moment
leaves either the previous commit or the new one, never a mix; the checksum catches the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from plgk_cli.errors import StoreError
from plgk_cli.faults import fault_hook

FORMAT = "plgk-replay-progress"
VERSION = "1"


def progress_path(out: Path, rank: int | None = None) -> Path:
    """OUT.progress, or OUT.progress.rankR for each rank of a torchrun replay."""
    suffix = ".progress" if rank is None else f".progress.rank{rank}"
    return Path(out).with_name(Path(out).name + suffix)


def _checksum(tensors: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(key.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).numpy().tobytes())
    return h.hexdigest()


def commit(path: Path, tensors: dict, metadata: dict) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"format": FORMAT, "version": VERSION, "checksum": _checksum(tensors),
            "state": json.dumps(metadata, sort_keys=True)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fault_hook("after_commit")


def load(path: Path) -> tuple[dict, dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise StoreError(f"{path}: unreadable progress file ({exc}); start over with --overwrite") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise StoreError(f"{path}: not a plgk replay progress file of version {VERSION}; "
                         "start over with --overwrite")
    if _checksum(tensors) != meta.get("checksum"):
        raise StoreError(f"{path}: checksum mismatch, the progress file is damaged; start over "
                         "with --overwrite")
    return tensors, json.loads(meta["state"])
