"""Causal language modelling: token sequences, next-token cross-entropy with padding masked.

An example is one sequence of T token ids x (int64, right-padded) with its next-token targets y
(int64, (T,)): y[t] is the token that follows position t, or IGNORE (-100, Hugging Face's
``ignore_index``) where position t predicts nothing (the last position, padding). The model maps
(B, T) ids to (B, T, V) logits, or to an object with ``.logits`` (a ``transformers`` causal LM).

The batch loss is Hugging Face's: the token-weighted mean over the batch,
L_B = Σ_{m,t} ℓ_{m,t} / N_B with N_B the targets in the batch (DESIGN.md v2, "Tasks"). It is written
as Σ_m w_m ℓ_m with ℓ_m = the sequence's mean token loss and w_m = n_m / N_B (n_m: its targets), the
same product w_m ∇ℓ_m as DESIGN's ℓ_m = Σ_t ℓ_{m,t}, w_m = 1 / N_B, so that the audited ``loss`` of
a sequence is its mean token loss and is also the training term ℓ_m the engine differentiates.

Audited quantities: ``loss`` (the mean token loss over the sequence's targets), ``sequence-logprob``
(Σ_t log p(y_t | x_≤t) over the targets: for an audit point built from a prompt and a continuation
the log-probability of the continuation given the prompt) and ``token-losses`` (the T per-position
losses, 0 where a position has no target).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from plgk_cli.models import output_tensor
from plgk_cli.tasks import HELPFUL_DOWN, HELPFUL_UP, Task

IGNORE = -100  # a position without a target (torch's and Hugging Face's ignore_index)
MAX_TOKEN_ID = 2 ** 24  # an embedding row each: larger ids are a data error, not a vocabulary
BYTE_VOCAB = 256  # the built-in tokenizer: one token per UTF-8 byte
BOS = ord("\n")  # every encoded sequence starts with a newline, so its first byte is predicted


def encode(text: str) -> list[int]:
    """The built-in byte-level tokenizer: BOS, then the UTF-8 bytes of ``text``."""
    return [BOS, *text.encode("utf-8")]


def decode(ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < BYTE_VOCAB).decode("utf-8", errors="replace")


def next_token_targets(ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """y[t] = ids[t + 1] where both positions are real tokens, else IGNORE."""
    ids = np.asarray(ids, dtype=np.int64)
    real = np.ones(ids.shape, dtype=bool) if mask is None else np.asarray(mask).astype(bool)
    y = np.full(ids.shape, IGNORE, dtype=np.int64)
    keep = real[:, :-1] & real[:, 1:]
    y[:, :-1] = np.where(keep, ids[:, 1:], IGNORE)
    return y


def pad_sequences(sequences: list, length: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, length) ids right-padded with 0 and the mask of real tokens; too long is an error."""
    longest = max((len(s) for s in sequences), default=0)
    if longest > length:
        row = next(i for i, s in enumerate(sequences) if len(s) == longest)
        raise ValueError(f"{where}: sequence {row} has {longest} tokens, longer than the context of "
                         f"{length}; shorten it or train with a longer context")
    ids = np.zeros((len(sequences), length), dtype=np.int64)
    mask = np.zeros((len(sequences), length), dtype=bool)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = True
    return ids, mask


def check_right_padded(mask: np.ndarray, where: str) -> None:
    """Padding only after the real tokens: a causal model then never attends to it, so the ids
    alone (no attention mask) give every real position the output it would have unpadded."""
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"{where} has shape {mask.shape}; a mask is (N, T)")
    later_real = np.flip(np.logical_or.accumulate(np.flip(mask, 1), 1), 1)
    bad = np.nonzero((~mask & later_real).any(1))[0]
    if len(bad):
        raise ValueError(f"{where}: row {bad[0]} has padding before real tokens; plgk takes right-padded "
                         "sequences (real tokens first, then padding)")


def text_corpus(path: Path, length: int | None = None, test_fraction: float = 0.1, seed: int = 0):
    """A text file, one training sequence per non-empty line (each encoded as BOS + bytes +
    newline); every 1/test_fraction-th line (in a seeded order) is held out as the test split.
    ``length``: the context (default: the longest line's)."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) < 2:
        raise ValueError(f"{path} has {len(lines)} non-empty lines; give one sequence per line, at least 2")
    sequences = [encode(line + "\n") for line in lines]
    ids, mask = pad_sequences(sequences, length or max(map(len, sequences)), str(path))
    order = np.random.default_rng(seed).permutation(len(lines))
    n_test = max(1, int(round(test_fraction * len(lines))))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    y = next_token_targets(ids, mask)
    return ids[train], y[train], ids[test], y[test]


def token_arrays(arrays: dict, where: str):
    """ids_train, ids_test and optional mask_train, mask_test (1 = real token) of an .npz."""
    out = []
    for split in ("train", "test"):
        ids = np.asarray(arrays[f"ids_{split}"])
        if not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 2:
            raise ValueError(f"{where}: ids_{split} is {ids.dtype} {ids.shape}; token ids are integers (N, T)")
        if ids.size and ids.min() < 0:
            raise ValueError(f"{where}: ids_{split} holds negative token ids")
        if ids.size and ids.max() >= MAX_TOKEN_ID:
            raise ValueError(f"{where}: ids_{split} holds token id {int(ids.max())}; ids index an embedding "
                             f"and must be below {MAX_TOKEN_ID} (2^24)")
        mask = arrays.get(f"mask_{split}")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != ids.shape:
                raise ValueError(f"{where}: mask_{split} has shape {mask.shape}, ids_{split} {ids.shape}")
            if not np.isin(mask, (0, 1)).all():
                raise ValueError(f"{where}: mask_{split} holds values other than 0 and 1 (1 = a real token)")
            check_right_padded(mask, f"{where}: mask_{split}")
        y = next_token_targets(ids, mask)
        if not (y != IGNORE).any():
            raise ValueError(f"{where}: ids_{split} has no token that follows another ({ids.shape[0]} rows of "
                             f"{ids.shape[1]} real tokens at most): there is nothing to predict")
        out += [ids.astype(np.int64), y]
    return tuple(out)


class LanguageModel(Task):
    name = "language-model"
    targets = ("loss", "sequence-logprob", "token-losses")
    label_kind = "tokens"
    helpful_directions = {"loss": HELPFUL_DOWN, "sequence-logprob": HELPFUL_UP, "token-losses": HELPFUL_DOWN}
    output_shape = "(batch, length, vocabulary)"

    def output_problem(self, output, width):
        if output.dim() != 3:
            return f"returned shape {tuple(output.shape)}; a language model needs {self.output_shape}"
        if output.shape[-1] < width:
            return (f"returned {output.shape[-1]} logits per position for a vocabulary of {width} token ids; "
                    f"its output layer needs num_classes ({width}) columns")
        return None

    def check_labels(self, y, where: str) -> torch.Tensor:
        y = np.asarray(y)
        if not np.issubdtype(y.dtype, np.integer) or y.ndim != 2:
            raise ValueError(f"{where} is {y.dtype} {y.shape}; next-token targets are integers (N, T)")
        if y.size and ((y < 0) & (y != IGNORE)).any():
            raise ValueError(f"{where} holds negative targets other than {IGNORE} (no target)")
        return torch.as_tensor(y, dtype=torch.int64)

    def output_width(self, y_train, y_test):
        """The vocabulary the targets need: the largest target id + 1."""
        return int(max(int(y_train.max()), int(y_test.max()) if y_test.numel() else 0, 0)) + 1

    @staticmethod
    def logits(output) -> torch.Tensor:
        return output_tensor(output)

    def token_losses(self, output, y) -> torch.Tensor:
        """(B, T) cross-entropy of every position, 0 where it has no target."""
        logits = self.logits(output)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE,
                               reduction="none").view(y.shape)

    def loss_terms(self, output, y):
        counts = (y != IGNORE).sum(1)
        return self.token_losses(output, y).sum(1) / counts.clamp_min(1).to(self.logits(output).dtype)

    def weights(self, y):
        counts = (y != IGNORE).sum(1)
        return counts.to(torch.float64) / counts.sum().clamp_min(1)

    def batch_loss(self, output, y):
        # Hugging Face's sum over the batch's targets / their number, in that order of operations
        logits = self.logits(output)
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE,
                                reduction="sum")
        return total / (y != IGNORE).sum().clamp_min(1)

    def target_width(self, target, output_width, label_shape=()):
        return label_shape[-1] if target == "token-losses" else 1

    def audited(self, output, y, targets):
        losses = self.token_losses(output, y)
        columns = []
        for t in targets:
            if t == "loss":
                columns.append(self.loss_terms(output, y)[:, None])
            elif t == "sequence-logprob":
                columns.append(-losses.sum(1, keepdim=True))
            elif t == "token-losses":
                columns.append(losses)
        return torch.cat(columns, 1)


def prompt_points(path: Path, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Audit points from a JSON-lines file of {"prompt": ..., "continuation": ...}: ids = BOS +
    prompt + continuation (byte-level), targets on the continuation's tokens only."""
    sequences, starts = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not (isinstance(record, dict) and isinstance(record.get("prompt"), str)
                and isinstance(record.get("continuation"), str) and record["continuation"]):
            raise ValueError(f'{path}:{number}: expected {{"prompt": "...", "continuation": "..."}} with a '
                             "non-empty continuation")
        try:
            prompt = encode(record["prompt"])
            sequences.append(prompt + list(record["continuation"].encode("utf-8")))
        except UnicodeEncodeError as exc:
            raise ValueError(f"{path}:{number}: {exc.object[exc.start:exc.end]!r} cannot be written as UTF-8 "
                             f"(a lone surrogate); give text") from None
        if len(sequences[-1]) > length:
            raise ValueError(f"{path}:{number}: BOS, prompt and continuation are {len(sequences[-1])} tokens, "
                             f"longer than the context of {length}; shorten it or train with a longer context")
        starts.append(len(prompt))
    if not sequences:
        raise ValueError(f"{path}: no prompts; write one JSON object per line")
    ids, mask = pad_sequences(sequences, length, str(path))
    y = next_token_targets(ids, mask)
    for row, start in enumerate(starts):
        y[row, :start - 1] = IGNORE  # only the continuation's tokens are audited
    return ids, y
