"""Model builders. Every builder takes ``in_shape`` (C, H, W, features, or sequence length for
token inputs) and ``num_classes`` (the output width the task needs).

Dropout and BatchNorm are allowed: replay restores the random state each training forward
started from, and credits each example with the gradient of its own loss term within its batch
(DESIGN.md v2; docs/decisions.md).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings

import torch
from torch import nn

from plgk_cli.errors import ConfigError
from plgk_cli.importing import import_object, user_code
from plgk_cli.tasks import task_code


def _flat_features(module: nn.Module, in_shape: tuple) -> int:
    with torch.no_grad():
        return int(module(torch.zeros(1, *in_shape)).flatten(1).shape[1])


def mlp(in_shape: tuple, num_classes: int, hidden: int = 64, depth: int = 2, dropout: float = 0.0) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(in_shape)
    for _ in range(depth - 1):
        layers += [nn.Linear(width, hidden), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _check_images(name: str, in_shape: tuple) -> None:
    if len(in_shape) != 3:
        raise ValueError(f"{name} takes images (B, C, H, W); the inputs have rows {tuple(in_shape)}")


def cnn(in_shape: tuple, num_classes: int, channels: int = 8, hidden: int = 32,
        batch_norm: bool = False) -> nn.Module:
    _check_images("cnn", in_shape)
    def block(c_in, c_out):
        # No convolution bias before a BatchNorm: the normalisation removes it, so its gradient
        # is float rounding alone, which Adam scales up to full-size steps that no example owns.
        norm = [nn.BatchNorm2d(c_out)] if batch_norm else []
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm), *norm, nn.ReLU(), nn.MaxPool2d(2)]

    features = nn.Sequential(*block(in_shape[0], channels), *block(channels, 2 * channels))
    width = _flat_features(features, in_shape)
    return nn.Sequential(features, nn.Flatten(), nn.Linear(width, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def lenet5(in_shape: tuple, num_classes: int) -> nn.Module:
    _check_images("lenet5", in_shape)
    # LeCun et al. 1998 shapes; padding 2 lets 28x28 (and the 8x8 digits) through both pools.
    features = nn.Sequential(
        nn.Conv2d(in_shape[0], 6, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5, padding=2 if in_shape[-1] < 16 else 0), nn.Tanh(), nn.AvgPool2d(2),
    )
    width = _flat_features(features, in_shape)
    return nn.Sequential(features, nn.Flatten(), nn.Linear(width, 120), nn.Tanh(),
                         nn.Linear(120, 84), nn.Tanh(), nn.Linear(84, num_classes))


class SelfAttention(nn.Module):
    """Multi-head self-attention from nn.Linear projections (so that every parameter has a
    per-example rule), dropout on the attention weights; ``mask`` (B, T) marks real tokens."""

    def __init__(self, width: int, heads: int, dropout: float, causal: bool = False, key_bias: bool = True):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.causal = causal
        # Without a key bias in a causal LM: softmax over the keys is invariant to it (q·b_k is the
        # same for every key), so its gradient is float rounding alone, which Adam scales up to
        # full-size steps that no example owns and that a replay with other threads re-derives
        # 1e-5 apart (the BatchNorm'd convolution's bias in cnn is the same case).
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width, bias=key_bias)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, width = h.shape

        def split(x):  # (B, T, W) -> (B, heads, T, W / heads)
            return x.view(b, t, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        scores = q @ k.transpose(-1, -2) / math.sqrt(width // self.heads)
        hidden = ~mask[:, None, None, :]
        if self.causal:  # position i attends to positions <= i
            hidden = hidden | torch.ones(t, t, dtype=torch.bool, device=h.device).triu(1)
        scores = scores.masked_fill(hidden, torch.finfo(scores.dtype).min)
        attention = self.dropout(scores.softmax(-1))
        return self.out((attention @ v).transpose(1, 2).reshape(b, t, width))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(LN(x)), then x + MLP(LN(x)) with GELU, dropout after each."""

    def __init__(self, width: int, heads: int, dropout: float, causal: bool = False):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = SelfAttention(width, heads, dropout, causal, key_bias=not causal)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = h + self.dropout(self.attention(self.norm1(h), mask))
        return h + self.dropout(self.mlp(self.norm2(h)))


class TorchBlock(nn.Module):
    """torch's own nn.TransformerEncoderLayer (nn.MultiheadAttention inside), pre-norm, GELU."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=dropout, activation="gelu",
                                                batch_first=True, norm_first=True)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # A float mask (not a bool one): the bool path turns fully masked rows into NaN.
        return self.layer(h, src_key_padding_mask=torch.zeros_like(mask, dtype=h.dtype).masked_fill(~mask, -1e4))


class TextTransformer(nn.Module):
    """A small transformer text classifier: token and position embeddings, pre-norm blocks
    (multi-head self-attention, GELU MLP, dropout), a final LayerNorm, mean pooling over the
    non-padding positions (token ``pad``) and a linear head."""

    def __init__(self, length: int, num_classes: int, vocab: int, width: int, heads: int,
                 layers: int, dropout: float, pad: int, torch_layers: bool):
        super().__init__()
        self.pad = pad
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(length, width)
        self.dropout = nn.Dropout(dropout)
        block = TorchBlock if torch_layers else TransformerBlock
        self.blocks = nn.ModuleList(block(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != self.pad
        # positions as a (B, T) lookup, batch first like every other layer's input
        where = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        h = self.dropout(self.tokens(ids) + self.positions(where))
        for block in self.blocks:
            h = block(h, mask)
        h = self.norm(h)
        weights = mask.to(h.dtype)[..., None]
        return self.head((h * weights).sum(1) / weights.sum(1).clamp_min(1))


def transformer(in_shape: tuple, num_classes: int, vocab: int = 32, width: int = 32, heads: int = 4,
                layers: int = 2, dropout: float = 0.1, pad: int = 0, torch_layers: bool = False) -> nn.Module:
    """Text classifier on int64 token ids of shape (B, in_shape[0]); ``torch_layers`` builds the
    blocks from nn.TransformerEncoderLayer (whose attention has no per-example rule: the generic
    path) instead of nn.Linear projections."""
    if len(in_shape) != 1:
        raise ValueError(f"transformer takes token sequences (B, length); the inputs have rows {in_shape}")
    return TextTransformer(in_shape[0], num_classes, vocab, width, heads, layers, dropout, pad, torch_layers)


class GPT(nn.Module):
    """A small decoder-only language model: token and position embeddings, pre-norm blocks of
    causal multi-head self-attention and a GELU MLP (dropout after the embeddings, on the attention
    weights and after each block), a final LayerNorm and a linear head to (B, T, vocab) logits.
    Sequences are right-padded, so causal attention never reaches the padding."""

    def __init__(self, length: int, vocab: int, width: int, heads: int, layers: int, dropout: float):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(length, width)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, dropout, causal=True) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.positions.num_embeddings:
            raise ValueError(f"sequences of {ids.shape[1]} tokens exceed the context of "
                             f"{self.positions.num_embeddings}")
        where = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        h = self.dropout(self.tokens(ids) + self.positions(where))
        mask = torch.ones_like(ids, dtype=torch.bool)  # causal masking alone: padding comes last
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.norm(h))


def gpt(in_shape: tuple, num_classes: int, vocab: int | None = None, width: int = 64, heads: int = 4,
        layers: int = 2, dropout: float = 0.1, context: int | None = None) -> nn.Module:
    """Causal language model on int64 token ids (B, T) with T = in_shape[0]; ``vocab`` defaults to
    the vocabulary the data needs (``num_classes``), ``context`` (the positions it can take) to T."""
    if len(in_shape) != 1:
        raise ValueError(f"gpt takes token sequences (B, length); the inputs have rows {in_shape}")
    vocab = num_classes if vocab is None else vocab
    if vocab < num_classes:
        raise ValueError(f"vocab {vocab} is smaller than the data's vocabulary ({num_classes} token ids)")
    context = in_shape[0] if context is None else context
    if context < in_shape[0]:
        raise ValueError(f"context {context} is shorter than the data's sequences ({in_shape[0]} tokens)")
    return GPT(context, vocab, width, heads, layers, dropout)


BUILTIN = {"mlp": mlp, "cnn": cnn, "lenet5": lenet5, "transformer": transformer, "gpt": gpt}


def is_user_code(builder) -> bool:
    """Whether a builder is the user's own (not plgk's: the built-in ones, plgk_cli.hf's)."""
    module = getattr(builder, "__module__", None) or ""
    return not (module == "plgk_cli" or module.startswith("plgk_cli."))


def builder_of(name: str):
    """The builder ``[model] name`` names: a built-in one or ``package.module:function``."""
    if name in BUILTIN:
        return BUILTIN[name]
    try:
        builder = import_object(name, f"[model] name {name}")
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"[model] name: cannot import {name!r} ({exc}); give "
                          "package.module:function importable from the working directory") from None
    if not callable(builder):
        raise ConfigError(f"[model] name: {name} is a {type(builder).__name__}, not a function; give "
                          "package.module:function, called as function(in_shape=..., num_classes=..., **kwargs)")
    return builder


def _check_call(builder, name: str, kwargs: dict) -> None:
    """Refuse kwargs the user's builder does not take before calling it: that is the config's
    fault, not an error in the user's code."""
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):  # no signature to check (a C function): the call will say
        return
    try:
        signature.bind(in_shape=(), num_classes=0, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"[model] kwargs: {name} rejected {kwargs!r} ({exc}); a custom builder is called "
                          "as function(in_shape=..., num_classes=..., **kwargs)") from None


def build_model(name: str, kwargs: dict, in_shape: tuple, num_classes: int) -> nn.Module:
    """The model ``[model] name`` builds for inputs of ``in_shape`` and ``num_classes`` outputs.
    A user's builder that raises is a UserCodeError naming its file and line."""
    builder = builder_of(name)
    given = sorted({"in_shape", "num_classes"} & set(kwargs))
    if given:
        raise ConfigError(f"[model] kwargs: {', '.join(given)} come from the data; remove them from kwargs")
    if is_user_code(builder):
        _check_call(builder, name, kwargs)
        with user_code(f"[model] name: {name} raised"):
            model = builder(in_shape=tuple(in_shape), num_classes=num_classes, **kwargs)
    else:
        try:
            with warnings.catch_warnings():  # torch's "initializing zero-element tensors": refused below
                warnings.simplefilter("ignore", UserWarning)
                model = builder(in_shape=tuple(in_shape), num_classes=num_classes, **kwargs)
        except (TypeError, ValueError, RuntimeError) as exc:  # unknown or out-of-range kwargs
            raise ConfigError(f"[model] kwargs: {name} rejected {kwargs!r} ({exc})") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"[model] name: {name} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def forward_of(name: str):
    """A context for the forward of the model ``name`` builds: the user's own model raising there
    is a UserCodeError; plgk's models get no such boundary (their failing is plgk's bug)."""
    builder = builder_of(name)
    return user_code(f"[model] name: the forward of {name} raised") if is_user_code(builder) \
        else contextlib.nullcontext()


def trial_forward(model: nn.Module, name: str, x: torch.Tensor):
    """The output of the model ``name`` builds on ``x`` (a few training inputs), in eval mode,
    without gradients, on a forked random state, so that training or replay then runs as if this
    had not; the user's own model raising is a UserCodeError (forward_of)."""
    was_training = model.training
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), forward_of(name):
            model.eval()
            return model(x)
    finally:
        model.train(was_training)


def check_model(model: nn.Module, name: str, x: torch.Tensor, task, width: int, y: torch.Tensor) -> None:
    """Before a run is started: the model has trainable parameters, its output on ``x`` (a few
    training inputs) meets the task's contract (check_output) and the task's loss takes it with
    their targets ``y``. The forward runs in eval mode without gradients on a forked random
    state, so that training starts as if it had not run."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"[model] name: {name} built a model with no trainable parameters; there is "
                          "nothing to train: give it parameters (or leave some with requires_grad=True)")
    empty = next((n for n, p in model.named_parameters() if p.requires_grad and p.numel() == 0), None)
    if empty is not None:  # a layer of width 0 (hidden = 0): nothing flows through it
        raise ConfigError(f"[model] name: {name} built parameter {empty} with no elements (shape "
                          f"{tuple(model.get_parameter(empty).shape)}); give every layer a width >= 1 "
                          "([model] kwargs)")
    try:
        output = trial_forward(model, name, x)
    except (TypeError, ValueError, RuntimeError, IndexError) as exc:  # plgk's model, the data's inputs
        raise ConfigError(f"[model] name: {name} cannot take the inputs of the data (rows "
                          f"{tuple(x.shape[1:])}, {x.dtype}): {type(exc).__name__}: {exc}") from None
    check_output(output, name, len(x), task, width)
    with torch.no_grad(), task_code(task, "batch_loss"):
        task.batch_loss(output, y)


def check_output(output, name: str, rows: int, task, width: int) -> torch.Tensor:
    """The model's output on a batch of ``rows`` examples as a tensor (output_tensor), refused
    (ConfigError) unless it is one, with a row per example, in the shape the task needs for an
    output ``width`` (classes, target values, vocabulary)."""
    logits = output_tensor(output)
    if not isinstance(logits, torch.Tensor):
        raise ConfigError(f"[model] name: {name} returned a {type(output).__name__} from forward; the model "
                          f"must return a tensor of shape {task.output_shape} (or a Hugging Face output "
                          "with .logits)")
    if logits.dim() == 0 or len(logits) != rows:
        raise ConfigError(f"[model] name: {name} returned {tuple(logits.shape)} for a batch of {rows}; the "
                          "output must have one row per example (batch first)")
    if not logits.is_floating_point():
        raise ConfigError(f"[model] name: {name} returned a tensor of {logits.dtype} from forward; a loss "
                          "needs floating-point outputs (return logits, not class indices)")
    problem = task.output_problem(logits, width)
    if problem:
        raise ConfigError(f"[model] name: {name} {problem}")
    return logits


def mode_dependent(model: nn.Module) -> list:
    """Names of the submodules whose forward differs between train and eval mode (dropout with
    p > 0, batch normalisation): their runs are replayed with the training forward's own random
    state and batch, and audited in eval mode."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            found.append(name)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) or (
                isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats):
            found.append(name)
        elif isinstance(module, nn.MultiheadAttention) and module.dropout > 0:
            found.append(name)
    return found


def vocabulary(model: torch.nn.Module) -> int | None:
    """The model's input vocabulary: its input embedding's rows (the first nn.Embedding)."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else next(
        (m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    return None if embedding is None else int(embedding.num_embeddings)


def output_tensor(output) -> torch.Tensor:
    """A model's output as a tensor: itself, or the ``.logits`` of a model-output object (a
    transformers CausalLMOutput, which indexes by field, not by row)."""
    logits = getattr(output, "logits", None)
    return logits if not isinstance(output, torch.Tensor) and isinstance(logits, torch.Tensor) else output


def layer_of(parameter_name: str) -> str:
    """The layer a parameter belongs to: its owning module's name (``0.weight`` -> ``0``)."""
    return parameter_name.rsplit(".", 1)[0] if "." in parameter_name else parameter_name
