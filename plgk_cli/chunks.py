"""Training rows as the streamed accumulators (kernel.py, modes.py) receive them: positions 0..M-1
of the examples analysed, in chunks of (rows, g (C, P)) float gradients, never all M x P at once;
and the small linear-algebra conventions they share."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

F64 = torch.float64
Rows = torch.Tensor | slice | range
ChunkSource = Callable[[], Iterable[tuple]]  # () -> iterable of (rows, g (C, P)); re-callable


def device_of(device) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def row_positions(rows: Rows, device: torch.device) -> torch.Tensor:
    """Row positions as a 1-D int64 tensor on `device`."""
    if isinstance(rows, slice):
        if rows.stop is None:
            raise ValueError("rows: a slice needs an explicit stop")
        rows = range(rows.start or 0, rows.stop, rows.step or 1)
    if isinstance(rows, range):
        return torch.arange(rows.start, rows.stop, rows.step, device=device)
    rows = torch.as_tensor(rows, device=device)
    if rows.dim() != 1 or rows.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"rows: need a 1-D integer tensor, got {rows.dtype} of shape {tuple(rows.shape)}")
    return rows.to(torch.int64)


def gradient_matrix(g: torch.Tensor, name: str, columns: int | None = None) -> torch.Tensor:
    if g.dim() != 2:
        raise ValueError(f"{name}: need a 2-D (rows, P) tensor, got shape {tuple(g.shape)}")
    if columns is not None and g.shape[1] != columns:
        raise ValueError(f"{name}: {g.shape[1]} columns, expected {columns}")
    return g


def row_chunks(gradients_of: Callable[[torch.Tensor], torch.Tensor], num_rows: int,
               chunk_size: int, device=None) -> ChunkSource:
    """A re-callable chunk source over rows 0..num_rows-1 from a function rows -> (C, P) gradients."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")

    def chunks():
        for start in range(0, num_rows, chunk_size):
            rows = torch.arange(start, min(start + chunk_size, num_rows), device=device_of(device))
            yield rows, gradients_of(rows)
    return chunks


def sign_fix(columns: torch.Tensor) -> torch.Tensor:
    """±1 per column so that each column's largest-magnitude entry is positive (a fixed convention
    for the sign freedom of singular/eigen vectors; sklearn's svd_flip does the same)."""
    pick = columns.abs().argmax(0)
    signs = torch.sign(columns[pick, torch.arange(columns.shape[1], device=columns.device)])
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def orthonormal(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x, mode="reduced").Q
