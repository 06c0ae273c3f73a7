"""Per-sample gradients from one batched forward and backward, on a flat parameter vector.

Two methods give the same numbers. ``hooks`` (the default where it applies): one forward records
each Linear / Conv2d layer's input a_m and one backward of Σ_m q_m gives each layer output's
gradient δ_m; the per-sample weight gradient is δ_m a_mᵀ (for convolutions over the unfolded
input patches), as in opacus and captum; other layers (Embedding, LayerNorm, RMSNorm, GroupNorm,
InstanceNorm, Conv1d, BatchNorm in eval mode) by their rule in plgk_cli.per_example. ``vmap``: torch.func's vmap(jacrev) over a functional
call, for any per-sample separable model; used when a trainable parameter belongs to another kind
of layer, when a layer runs more or less than once per forward (shared weights), sees the batch
other than along dimension 0 (a folded or sequence-first batch) or has its recorded input or
output changed in place, and when a first comparison of hooks with plain per-example autograd on
a few examples disagrees.

A parameter reached by several modules (tied weights: GPT-2's token embedding and its output
head share one tensor, which ``named_parameters`` lists once) gets the sum of those modules'
per-example gradients. A layer called on a batch of 1 while the batch is B (GPT-2's position
embedding looks up (1, T) position ids and broadcasts them over the batch) has its output expanded
to (B, ...) by its forward hook, so that each example's own output gradient is separate, and its
input is taken as expanded too.

Runs whose training forward is random or couples its batch (dropout, BatchNorm) replay that
forward itself (:meth:`GradientComputer.training_pass`): train mode, the random state it started
from, the buffers it saw, the whole minibatch; each example owns the gradient of its own loss term
ℓ_m within its batch (DESIGN.md v2). Those gradients come from the layers' hooks where every
layer has a rule and a first comparison on the same graph agrees, else from ``generic``: rows of
the Jacobian of the vector (ℓ_m) with respect to θ, by batched backward passes of that one graph
(``is_grads_batched``; exact for any module, e.g. nn.MultiheadAttention, but one backward per
row). Audited quantities are evaluated in eval mode.

Everything downstream works on flat vectors of all P trainable parameters in the model's
``named_parameters`` order; :class:`ParameterLayout` maps between the flat vector, the named
tensors and the layers (owning modules) used for the per-layer split of the audit.
"""

from __future__ import annotations

import math

import contextlib
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

from plgk_cli.errors import AuditSpecError
from plgk_cli.models import layer_of, output_tensor
from plgk_cli.per_example import rule_for
from plgk_cli.tasks import Task, builtin_targets, task_for

TARGETS = builtin_targets()


@dataclass(frozen=True)
class ParameterLayout:
    names: tuple
    shapes: tuple
    offsets: tuple  # start of each parameter in the flat vector; offsets[-1] == P

    @classmethod
    def of(cls, model: torch.nn.Module, names: set | None = None) -> "ParameterLayout":
        """The model's trainable parameters, or those named in ``names``, in the model's order."""
        selected = names
        names, shapes, offsets = [], [], [0]
        for name, p in model.named_parameters():
            if (p.requires_grad if selected is None else name in selected):
                names.append(name)
                shapes.append(tuple(p.shape))
                offsets.append(offsets[-1] + p.numel())
        return cls(tuple(names), tuple(shapes), tuple(offsets))

    @classmethod
    def of_shapes(cls, names, shapes) -> "ParameterLayout":
        """The layout of parameters given by name and shape, in that order (a manifest's)."""
        offsets = [0]
        for shape in shapes:
            offsets.append(offsets[-1] + math.prod(shape))
        return cls(tuple(names), tuple(tuple(s) for s in shapes), tuple(offsets))

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def expand(self, per_parameter: torch.Tensor, device=None) -> torch.Tensor:
        """A P-vector holding each parameter's entry of ``per_parameter`` on all its coordinates."""
        sizes = torch.tensor([b - a for a, b in zip(self.offsets, self.offsets[1:])], dtype=torch.int64)
        return torch.repeat_interleave(per_parameter.cpu(), sizes).to(device)

    def flatten(self, tensors: dict, dtype=torch.float64, device=None) -> torch.Tensor:
        return _concatenate([tensors[n] for n in self.names], dtype, device)

    def unflatten(self, flat: torch.Tensor) -> dict:
        return {n: flat[self.offsets[i]:self.offsets[i + 1]].view(self.shapes[i])
                for i, n in enumerate(self.names)}

    def flatten_state(self, state: dict, device=None) -> dict:
        """Optimizer state {name: {key: tensor}} as {key: flat float64 vector} in layout order. A
        parameter without a key (no state yet: never stepped, or in a group without momentum)
        holds zeros there, as torch starts the state; ``state_held`` says where it is recorded."""
        keys = set().union(*(state.get(n, {}) for n in self.names)) if self.names else set()
        return {k: _concatenate([state.get(n, {}).get(k, torch.zeros(s)) for n, s in zip(self.names, self.shapes)],
                                torch.float64, device) for k in keys}

    def state_held(self, state: dict, device=None) -> dict:
        """{key: bool P-vector where some parameter lacks the key} (complete keys are left out)."""
        keys = set().union(*(state.get(n, {}) for n in self.names)) if self.names else set()
        held = {}
        for k in keys:
            present = [k in state.get(n, {}) for n in self.names]
            if not all(present):
                held[k] = self.expand(torch.tensor(present), device)
        return held

    @property
    def layers(self) -> tuple:
        """(layer name, slice of the flat vector), in order; a layer's parameters are contiguous."""
        out: list = []
        for i, n in enumerate(self.names):
            layer = layer_of(n)
            if out and out[-1][0] == layer:
                out[-1] = (layer, slice(out[-1][1].start, self.offsets[i + 1]))
            else:
                out.append((layer, slice(self.offsets[i], self.offsets[i + 1])))
        return tuple(out)


class GhostError(AuditSpecError):
    """--ghost cannot form ghost dot products for this model (a one-line error, exit 13)."""


def ghost_products(train: tuple, audit: tuple) -> dict:
    """{"weight": [b, n, q], "bias": [b, n, q]}: g_b · ∇q_{n,q} over one Linear layer's weight and
    over its bias, without either per-example gradient (paper A.2.8, the ghost dot product): a
    Linear layer's per-example gradient is δ aᵀ for the weight and δ for the bias, so over the
    weight g_b · g'_n = (a_b · a'_n)(δ_b · δ'_n) and over the bias δ_b · δ'_n.
    ``train`` = (inputs B x I, [output gradients B x O]); ``audit`` = (inputs N x I, Q x [N x O])."""
    (a, (d,)), (a_audit, d_audit) = train, audit
    bias = torch.stack([d @ dq.T for dq in d_audit], dim=2)
    return {"weight": (a @ a_audit.T)[:, :, None] * bias, "bias": bias}


def ghost_batch_gradient(train: tuple, kind: str) -> torch.Tensor:
    """Σ_b of one Linear layer's per-example weight (δ_b a_bᵀ) or bias (δ_b) gradients, flat."""
    a, (d,) = train
    return (d.T @ a).reshape(-1) if kind == "weight" else d.sum(0)


class Workspace:
    """Output tensors reused from one step to the next. A fresh large tensor is paid for again in
    page faults on its first write: filling 1438 x 3658 float64 per-sample gradients took 25 ms
    into a new tensor and 8 ms into a reused one. Whoever asks owns the tensor until its next
    request under the same name."""

    def __init__(self):
        self._tensors: dict = {}

    def get(self, name: str, rows: int, width: int, dtype, device) -> torch.Tensor:
        """A rows x width tensor (uninitialised), a view of the largest one asked for so far."""
        t = self._tensors.get(name)
        if t is None or t.shape[0] < rows or t.shape[1] != width or t.dtype != dtype or t.device != device:
            t = torch.empty(max(rows, 0 if t is None else t.shape[0]), width, dtype=dtype, device=device)
            self._tensors[name] = t
        return t[:rows]


def _concatenate(tensors: list, dtype, device) -> torch.Tensor:
    """One flat vector; converted once after the concatenation where the tensors share a dtype
    (per-tensor conversions of many small tensors dominate reading a small model's checkpoint)."""
    flat = [t.reshape(-1) for t in tensors]
    if len({t.dtype for t in flat}) > 1:
        flat = [t.to(dtype) for t in flat]
    return torch.cat(flat).to(dtype=dtype, device=device)


def target_columns(targets: tuple, num_classes: int, task: Task | None = None, label_shape: tuple = ()) -> int:
    """Audited quantities per audit point: one per target, one per class for ``logits`` (the
    task says how wide each target is; ``num_classes`` is the model's output width,
    ``label_shape`` the shape of one example's targets)."""
    task = task or task_for("classification")
    return sum(task.target_width(t, num_classes, tuple(label_shape)) for t in targets)


@dataclass(frozen=True)
class TrainingPass:
    """The recorded training forward of one update, replayed: per-example loss-term gradients of
    the rows asked for, the batch gradient ∇L_B the optimizer saw, the batch loss and the buffers
    as the forward left them."""

    sample_grads: torch.Tensor  # rows x P
    batch_grad: torch.Tensor  # P, by autograd of L_B on the same graph: what the optimizer saw
    loss: float
    buffers: dict


@contextlib.contextmanager
def restored_rng(states: dict, device: torch.device):
    """A context in which torch's generators start from the recorded ``states`` ("cpu", "cuda")
    and are put back as they were afterwards."""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        if "cpu" in states:
            torch.set_rng_state(states["cpu"])
        if "cuda" in states and cuda:
            torch.cuda.set_rng_state(states["cuda"], device)
        yield


def jacobian_rows(values: torch.Tensor, theta: torch.Tensor, rows: torch.Tensor, chunk: int,
                  out: torch.Tensor) -> torch.Tensor:
    """out[i] = ∂ values[rows[i]] / ∂θ from the graph that computed ``values`` (1-D), by batched
    backward passes of ``chunk`` one-hot rows; a loop of single backwards where an operation has
    no batched backward."""
    for start in range(0, len(rows), chunk):
        picked = rows[start:start + chunk]
        onehot = torch.zeros(len(picked), len(values), dtype=values.dtype, device=values.device)
        onehot[torch.arange(len(picked)), picked] = 1
        try:
            with warnings.catch_warnings():  # torch says where its batched backward loops per row
                warnings.filterwarnings("ignore", message="There is a performance drop")
                (g,) = torch.autograd.grad(values, theta, grad_outputs=onehot, is_grads_batched=True,
                                           retain_graph=True, allow_unused=True)
        except RuntimeError:
            g = torch.stack([_row_gradient(values[int(r)], theta) for r in picked])
        out[start:start + len(picked)] = 0 if g is None else g
    return out


def _row_gradient(value: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(value, theta, retain_graph=True, allow_unused=True)
    return torch.zeros_like(theta) if g is None else g


# Relative distance between hooks and per-example autograd on the probe examples above which hooks
# are dropped: both compute the same sums in the same dtype (float32 differs in the last bits),
# while a layer whose batch is not along dimension 0 gives O(1) differences.
HOOKS_AGREEMENT = 1e-3


def _hookable(module: nn.Module) -> bool:
    """Layers whose per-sample gradient is an outer product of recorded input and output gradient."""
    if type(module) is nn.Linear:
        return True
    return (type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def _sample_weight_gradient(module: nn.Module, a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-sample ∂q_m/∂W (B x *W.shape) from the layer's input a and output gradient δ."""
    if isinstance(module, nn.Linear):
        return torch.einsum("b...o,b...i->boi", delta, a)
    patches = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=module.padding,
                       stride=module.stride)  # B x (C·kh·kw) x L
    g = torch.bmm(delta.flatten(2), patches.transpose(1, 2))  # B x O x (C·kh·kw)
    return g.view(len(a), *module.weight.shape)


def _sample_bias_gradient(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return delta.reshape(len(delta), -1, delta.shape[-1]).sum(1)
    return delta.flatten(2).sum(2)


def _layer_gradients(module: nn.Module, a: torch.Tensor, delta: torch.Tensor) -> dict | None:
    """{weight|bias|...: per-example gradients (B x ...)} of one hooked layer from its input a and
    output gradient δ; None where its rule is not exact in the module's current mode."""
    if _hookable(module):
        out = {"weight": _sample_weight_gradient(module, a, delta)}
        if module.bias is not None:
            out["bias"] = _sample_bias_gradient(module, delta)
        return out
    return rule_for(module).gradients(module, a, delta)


class _LayerRecorder:
    """Forward hooks that keep each hooked layer's input and output for one forward pass.

    ``batch``: the forward's batch size B. A layer whose input and output both have batch 1 when
    B > 1 (a lookup of (1, T) position ids broadcast over the batch afterwards) gets its output
    expanded to B rows, returned in its place: the expanded output adds to the batch exactly as the
    broadcast did, and its gradient is each example's own δ_m, as for any other layer. Its input is
    recorded expanded too (example m looked up the same ids). ``expanded`` names those layers."""

    def __init__(self, modules: dict, batch: int | None = None):
        self.modules = modules  # module name -> module
        self.batch = batch
        self.inputs: dict = {}
        self.outputs: dict = {}
        self.calls: dict = {}
        self.versions: dict = {}
        self.expanded: set = set()

    def __enter__(self):
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in self.modules.items()]
        return self

    def _hook(self, name):
        def hook(module, inputs, output):
            self.calls[name] = self.calls.get(name, 0) + 1
            a = inputs[0].detach()
            replaced = None
            if self.batch is not None and self.batch > 1 and isinstance(output, torch.Tensor) and \
                    a.dim() > 0 and output.dim() > 0 and a.shape[0] == 1 == output.shape[0]:
                a = a.expand(self.batch, *a.shape[1:])
                output = replaced = output.expand(self.batch, *output.shape[1:])
                self.expanded.add(name)
            self.inputs[name] = a
            self.outputs[name] = output
            self.versions[name] = self._version(name)
            return replaced  # None keeps the module's own output
        return hook

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def per_sample(self, batch: int) -> bool:
        """Each layer ran once, on the batch along dimension 0 (``batch`` rows in and out), and
        nothing recorded was modified in place afterwards: what the outer products assume."""
        return all(self.calls.get(name) == 1 and self.versions[name] == self._version(name)
                   and self.inputs[name].shape[0] == batch == self.outputs[name].shape[0]
                   for name in self.modules)

    def _version(self, name):
        return self.inputs[name]._version, self.outputs[name]._version


def _rows(output, rows):
    """Rows of a batched model output (a tensor or a transformers model-output object)."""
    return output_tensor(output)[rows]


def _put(out: torch.Tensor, sl: slice, g: torch.Tensor | None, written: set,
         loss_out: torch.Tensor | None = None, loss_g: torch.Tensor | None = None) -> None:
    """out[:, sl] = g (zeros for None) where this pass has not filled ``sl`` yet, else out[:, sl] += g:
    a tied parameter's per-example gradient is the sum over the modules that use it. ``loss_out``
    takes ``loss_g`` (the x_loss rows riding along) the same way."""
    first = sl.start not in written
    written.add(sl.start)
    for target, value in ((out, g), (loss_out, loss_g)):
        if target is None:
            continue
        if first:
            target[:, sl] = 0 if value is None else value
        elif value is not None:
            target[:, sl] += value


class GradientComputer:
    """Loss and audit-target values and per-sample gradients of one model at a flat θ.

    ``method``: "hooks", "vmap", "generic" (Jacobian rows of one forward), or "auto" (hooks when
    every trainable parameter belongs to a layer with a rule, see the module docstring; vmap
    otherwise).
    ``num_classes`` is the model's output width, ``label_shape`` the shape of one example's
    targets; ``task`` (default classification) says what the loss terms and audited quantities are.
    """

    def __init__(self, model: torch.nn.Module, layout: ParameterLayout, num_classes: int,
                 chunk_size: int = 256, method: str = "auto", task: Task | None = None,
                 label_shape: tuple = ()):
        self.model = model
        self.layout = layout
        self.num_classes = num_classes
        self.label_shape = tuple(label_shape)
        self.chunk_size = chunk_size
        self.task = task or task_for("classification")
        self._training_hooks = None  # training_pass: hooks verified (True), refused (False), unknown
        if method not in ("auto", "hooks", "vmap", "generic"):
            raise ValueError(f"unknown per-sample gradient method {method!r}")
        if method == "generic":
            self.method, self._hooked, self._hooks_checked = "generic", None, True
            return
        self._hooked = None if method == "vmap" else self._hooked_layers()
        if method == "hooks" and self._hooked is None:
            raise ValueError("per-sample gradients by hooks need every trainable parameter in a "
                             "Linear or Conv2d layer (groups 1, zero padding) or a layer with a rule in "
                             "plgk_cli.per_example")
        self.method = "vmap" if self._hooked is None else "hooks"
        self._hooks_checked = False

    def _hooked_layers(self) -> dict | None:
        """{layer name: [(weight|bias, slice of the flat vector)]}, or None where hooks do not apply.
        A module that reaches a parameter listed under another module's name (tied weights) is
        hooked too, with that parameter's slice: its per-example gradient adds to the owner's."""
        modules = dict(self.model.named_modules(remove_duplicate=False))
        names = set(self.layout.names)
        slices = {n: slice(self.layout.offsets[i], self.layout.offsets[i + 1])
                  for i, n in enumerate(self.layout.names)}
        listed = {id(p): n for n, p in self.model.named_parameters() if n in names}
        hooked: dict = {}
        for i, name in enumerate(self.layout.names):
            owner, _, kind = name.rpartition(".")
            hooked.setdefault(owner, []).append((kind, slices[name]))
        for owner, module in modules.items():  # a trainable parameter reached under another name
            for kind, p in module.named_parameters(recurse=False, remove_duplicate=False):
                full = f"{owner}.{kind}" if owner else kind
                if full in names:
                    continue
                if id(p) not in listed:  # not in the layout: hooks cannot split it if it trains
                    if p.requires_grad:
                        return None
                    continue
                entry = (kind, slices[listed[id(p)]])
                if entry not in hooked.setdefault(owner, []):
                    hooked[owner].append(entry)
        for owner, entries in hooked.items():
            module = modules[owner]
            if not ((_hookable(module) and all(k in ("weight", "bias") for k, _ in entries))
                    or rule_for(module) is not None):
                return None
        return hooked

    def _tied(self, name: str) -> bool:
        """Whether another hooked layer writes one of this layer's parameter slices too."""
        mine = {sl.start for _, sl in self._hooked[name]}
        return any(sl.start in mine for other, entries in self._hooked.items() if other != name
                   for _, sl in entries)

    def _hooked_pass(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, targets: tuple,
                     out: torch.Tensor, x_loss: torch.Tensor | None = None,
                     loss_out: torch.Tensor | None = None, factors: dict | None = None,
                     skip_factored: bool = False) -> torch.Tensor | None:
        """Per-sample gradients by hooks, written into ``out`` (B x Q x P) and, for the rows
        (x_loss, y_loss), their loss gradients into ``loss_out``, all from one forward; returns
        the values (B x Q), or None if the forward did not run each hooked layer exactly once on
        the batch along dimension 0 or changed a recorded tensor in place.

        ``factors``: {Linear layer name: None} to fill with (inputs B x I, [output gradients
        B x O for each of the Q columns]) of the x rows, the layer's factors for ghost dot
        products; ``skip_factored``: leave those layers' per-sample gradients out (zeros)."""
        modules = {name: self.model.get_submodule(name) for name in self._hooked}
        params = self.layout.unflatten(theta.detach().requires_grad_(True))
        n = len(x)
        inputs = x if x_loss is None else torch.cat([x, x_loss[0]])
        with _LayerRecorder(modules, len(inputs)) as recorder:
            try:
                logits = functional_call(self.model, params, (inputs,))
            except RuntimeError:
                if not recorder.expanded:
                    raise
                return None  # the expanded output did not fit where the batch-1 one went: not hooks
        if not recorder.per_sample(len(inputs)):
            return None
        values = self.task.audited(_rows(logits, slice(0, n)), y, targets)
        names = list(modules)
        outputs = [recorder.outputs[name] for name in names]
        width = values.shape[1]
        for q in range(width):
            # The samples are independent, so ∂(Σ_m q_m)/∂output_m is sample m's own δ_m; the
            # x_loss rows ride along in the first backward with their own loss.
            total = values[:, q].sum()
            rows = n
            if q == 0 and x_loss is not None:
                total = total + self.task.loss_terms(_rows(logits, slice(n, None)), x_loss[1]).sum()
                rows = len(inputs)
            deltas = torch.autograd.grad(total, outputs, retain_graph=q + 1 < width, allow_unused=True)
            written: set = set()  # slices filled in this backward: a tied parameter's next module adds
            for name, delta in zip(names, deltas):
                module = modules[name]
                if factors is not None and name in factors:
                    self._record_factors(factors, name, module, recorder.inputs[name][:n], delta, n)
                    if skip_factored:
                        for _, sl in self._hooked[name]:
                            _put(out[:, q], sl, None, written)
                        continue
                if delta is None:  # the layer does not reach this quantity
                    for _, sl in self._hooked[name]:
                        _put(out[:, q], sl, None, written, loss_out if rows > n else None)
                    continue
                layer = _layer_gradients(module, recorder.inputs[name][:rows], delta[:rows])
                if layer is None:  # a rule that is not exact in this mode (BatchNorm in train mode)
                    return None
                for kind, sl in self._hooked[name]:
                    g = layer[kind].reshape(rows, -1)
                    _put(out[:, q], sl, g[:n], written, loss_out if rows > n else None, g[n:])
        return values.detach()

    def _check_hooks(self, theta, x, y, targets: tuple) -> None:
        """Once, before hooks are used: compare them with plain autograd, one example at a time,
        on the first few examples. The shape checks of each pass miss a layout that puts another
        axis of the batch's size first (a sequence-first layer with as many steps as examples);
        this catches it. (Not vmap: its first call costs about a second of tracing.)"""
        if self._hooks_checked or self.method != "hooks":
            return
        self._hooks_checked = True
        rows = slice(0, min(3, len(x)))
        width = self.target_columns(targets)
        probe = torch.empty(len(x[rows]), width, self.layout.size, dtype=theta.dtype, device=theta.device)
        if self._hooked_pass(theta, x[rows], y[rows], targets, probe) is None:
            self._hooks_failed()  # a layer that does not see these few examples along dimension 0
            return
        expected = torch.stack([self._example_gradients(theta, x[i:i + 1], y[i:i + 1], targets)
                                for i in range(len(probe))])
        if (probe - expected).norm() > HOOKS_AGREEMENT * max(float(expected.norm()), 1e-30):
            self._hooks_failed()

    def _example_gradients(self, theta, x, y, targets: tuple) -> torch.Tensor:
        """Q x P gradients of one example's audited quantities by plain autograd."""
        theta = theta.detach().requires_grad_(True)
        values = self.task.audited(functional_call(self.model, self.layout.unflatten(theta), (x,)), y, targets)[0]
        rows = []
        for value in values:
            (g,) = torch.autograd.grad(value, theta, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(theta) if g is None else g)
        return torch.stack(rows)

    @staticmethod
    def _record_factors(factors: dict, name: str, module: nn.Module, inputs: torch.Tensor, delta,
                        n: int) -> None:
        if inputs.dim() != 2:
            raise GhostError(f"--ghost: layer {name!r} sees inputs of shape {tuple(inputs.shape)}; ghost "
                             "dot products need (batch, features) inputs: drop --ghost")
        if factors[name] is None:
            factors[name] = (inputs, [])
        factors[name][1].append(delta[:n] if delta is not None else torch.zeros(
            n, module.out_features, dtype=inputs.dtype, device=inputs.device))

    def _batched(self, theta, x, y, targets: tuple, out: torch.Tensor | None = None,
                 factors: dict | None = None, skip_factored: bool = False):
        """Values (B x Q) and per-sample gradients (B x Q x P) in eval mode (dropout off,
        BatchNorm on its buffers: how audited quantities are defined)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self._batched_pass(theta, x, y, targets, out, factors, skip_factored)
        finally:
            self.model.train(was_training)

    def _batched_pass(self, theta, x, y, targets: tuple, out: torch.Tensor | None = None,
                      factors: dict | None = None, skip_factored: bool = False):
        """Values (B x Q) and per-sample gradients (B x Q x P), chunked into one preallocated
        output (for a large batch, concatenating chunks costs as much as computing them);
        ``factors`` and ``skip_factored`` as in _hooked_pass, over all chunks."""
        self._check_hooks(theta, x, y, targets)
        width = self.target_columns(targets)
        values = torch.empty(len(x), width, dtype=theta.dtype, device=theta.device)
        grads = out if out is not None else \
            torch.empty(len(x), width, self.layout.size, dtype=theta.dtype, device=theta.device)
        chunks = []
        for start in range(0, len(x), self.chunk_size):
            rows = slice(start, start + self.chunk_size)
            chunk = None if factors is None else dict.fromkeys(factors)
            if self.method == "generic":
                values[rows] = self._generic_pass(theta, x[rows], y[rows], targets, grads[rows])
                continue
            chunk_values = self._hooked_pass(theta, x[rows], y[rows], targets, grads[rows],
                                             factors=chunk, skip_factored=skip_factored) \
                if self.method == "hooks" else None
            if chunk_values is None:
                self._hooks_failed()
                if factors is not None:
                    raise GhostError("--ghost: this model's per-example gradients cannot come from "
                                     "layer hooks (a layer runs twice, sees a folded batch or is "
                                     "changed in place), which ghost dot products need: drop --ghost")
                chunk_values, chunk_grads = self._vmap_pass(theta, x[rows], y[rows], targets)
                grads[rows] = chunk_grads
            values[rows] = chunk_values
            chunks.append(chunk)
        for name in factors or ():
            factors[name] = (torch.cat([c[name][0] for c in chunks]),
                             [torch.cat([c[name][1][q] for c in chunks]) for q in range(width)])
        return values, grads

    def _hooks_failed(self) -> None:
        self.method = "vmap"  # shared, folded-batch or in-place-modified layers: hooks would be wrong

    def _logits(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _rows(functional_call(self.model, self.layout.unflatten(theta), (x.unsqueeze(0),)), 0)

    def _sample_targets(self, theta, x, y, targets: tuple):
        out = self.task.audited(self._logits(theta, x)[None], y[None], targets)[0]
        return out, out.detach()

    def _generic_pass(self, theta, x, y, targets: tuple, out: torch.Tensor) -> torch.Tensor:
        """Values (B x Q) and, into ``out`` (B x Q x P), their gradients as Jacobian rows of one
        batched forward (the model in whatever mode the caller set)."""
        theta = theta.detach().requires_grad_(True)
        values = self.task.audited(functional_call(self.model, self.layout.unflatten(theta), (x,)), y, targets)
        flat = values.reshape(-1)
        jacobian_rows(flat, theta, torch.arange(len(flat), device=flat.device), self.chunk_size,
                      out.view(len(flat), -1))
        return values.detach()

    def training_pass(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, rng: dict,
                      buffers: dict, rows: torch.Tensor, out: torch.Tensor) -> TrainingPass:
        """The recorded training forward of one update, replayed: the whole minibatch (x, y) in
        train mode from the generator states ``rng`` with the buffers ``buffers`` (copies: the
        forward updates running statistics in place). Per-example loss-term gradients of the
        batch positions ``rows`` go into ``out`` (rows x P)."""
        theta = theta.detach().requires_grad_(True)
        state = {**self.layout.unflatten(theta), **{n: b.clone() for n, b in buffers.items()}}
        # no layer hooks once they were refused for this model (BatchNorm in train mode)
        layers = () if self._training_hooks is False else self._hooked or ()
        modules = {name: self.model.get_submodule(name) for name in layers}
        was_training = self.model.training
        self.model.train()
        try:
            try:
                with restored_rng(rng, theta.device), _LayerRecorder(modules, len(x)) as recorder:
                    output = functional_call(self.model, state, (x,))
            except RuntimeError:
                if not recorder.expanded:
                    raise
                # an expanded batch-1 output did not fit downstream: the forward again, unhooked
                self._training_hooks = False
                state = {**self.layout.unflatten(theta), **{n: b.clone() for n, b in buffers.items()}}
                with restored_rng(rng, theta.device), _LayerRecorder({}) as recorder:
                    output = functional_call(self.model, state, (x,))
            terms = self.task.loss_terms(output, y)
            hooked = self._training_hooks is not False and self._training_hooks_pass(recorder, terms, rows, out)
            if hooked and self._training_hooks is None:
                # Once: the hooks against the Jacobian rows of the same graph. They assume that
                # example m's loss reaches only its own rows of each layer's output, which a
                # layer coupling the batch (BatchNorm, a batch mean) breaks.
                generic = jacobian_rows(terms, theta, rows, self.chunk_size, torch.empty_like(out))
                self._training_hooks = bool(
                    (generic - out).norm() <= HOOKS_AGREEMENT * max(float(generic.norm()), 1e-30))
                hooked = self._training_hooks
                if not hooked:
                    out.copy_(generic)
            elif not hooked:
                self._training_hooks = False
                jacobian_rows(terms, theta, rows, self.chunk_size, out)
        finally:
            self.model.train(was_training)
        batch_loss = self.task.batch_loss(output, y)
        (batch_grad,) = torch.autograd.grad(batch_loss, theta)
        return TrainingPass(out, batch_grad, float(batch_loss.detach()), {n: state[n].detach() for n in buffers})

    def _training_hooks_pass(self, recorder, terms: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> bool:
        """Per-example loss-term gradients of the batch positions ``rows`` by the layers' rules,
        from the recorded training forward; False where hooks do not apply."""
        if self._hooked is None or not recorder.per_sample(len(terms)):
            return False
        names = list(self._hooked)
        deltas = torch.autograd.grad(terms.sum(), [recorder.outputs[n] for n in names], retain_graph=True,
                                     allow_unused=True)
        written: set = set()  # a tied parameter's second module adds to its first
        for name, delta in zip(names, deltas):
            if delta is None:
                for _, sl in self._hooked[name]:
                    _put(out, sl, None, written)
                continue
            layer = _layer_gradients(self.model.get_submodule(name), recorder.inputs[name], delta)
            if layer is None:
                return False
            for kind, sl in self._hooked[name]:
                _put(out, sl, layer[kind].reshape(len(terms), -1)[rows], written)
        return True

    def _vmap_pass(self, theta, x, y, targets: tuple):
        fn = vmap(jacrev(lambda th, xi, yi: self._sample_targets(th, xi, yi, targets), has_aux=True),
                  in_dims=(None, 0, 0))
        with warnings.catch_warnings():  # torch says where vmap loops per example
            warnings.filterwarnings("ignore", message="There is a performance drop")
            g, v = fn(theta, x, y)
        return v, g

    def loss_gradients(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                       out: torch.Tensor | None = None, factors: dict | None = None):
        """Per-sample loss gradients (B x P) and losses (B) at θ; written into ``out`` if given.
        ``factors`` ({Linear layer name: None}): fill in those layers' ghost factors (inputs,
        [output gradients]) and leave their per-sample gradients out (zeros)."""
        losses, grads = self._batched(theta, x, y, ("loss",), None if out is None else out[:, None],
                                      factors, skip_factored=True)
        return grads[:, 0], losses[:, 0]

    def linear_layers(self) -> tuple:
        """The hooked Linear layers (ghost dot products apply to them), in layout order."""
        if self._hooked is None:
            return ()
        # not a layer whose weight is tied to another's: its ghost factors would miss the other's share
        return tuple(name for name in self._hooked if type(self.model.get_submodule(name)) is nn.Linear
                     and not self._tied(name))

    def layer_parameters(self, name: str) -> list:
        """[(weight|bias, slice of the flat vector)] of a hooked layer."""
        return self._hooked[name]

    def mean_loss_gradient(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        """Gradient of the batch loss (P), as the optimizer saw it, without per-sample work."""
        theta = theta.detach().requires_grad_(True)
        logits = functional_call(self.model, self.layout.unflatten(theta), (x,))
        (g,) = torch.autograd.grad(self.task.batch_loss(logits, y), theta)
        return g

    def target_columns(self, targets: tuple) -> int:
        return target_columns(targets, self.num_classes, self.task, self.label_shape)

    def audit_gradients(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, targets: tuple,
                        out: torch.Tensor | None = None, factors: dict | None = None):
        """Values (N x Q) and gradients (N x Q x P) of the audited quantities at θ, the gradients
        written into ``out`` if given. Q stacks the targets in order; ``logits`` contributes one
        column per class. ``factors``: also fill in those Linear layers' ghost factors.
        """
        return self._batched(theta, x, y, targets, out, factors)

    def audit_and_loss_gradients(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                                 targets: tuple, x_loss: torch.Tensor, y_loss: torch.Tensor,
                                 loss_out: torch.Tensor | None = None, out: torch.Tensor | None = None):
        """audit_gradients(θ, x, y, targets) and loss_gradients(θ, x_loss, y_loss, loss_out)[0]
        together: from one forward and backward when both fit one chunk (the audit side and the
        training side of an update that share θ)."""
        self._check_hooks(theta, x, y, targets)
        if self.method == "hooks" and len(x) + len(x_loss) <= self.chunk_size:
            kwargs = dict(dtype=theta.dtype, device=theta.device)
            grads = out if out is not None else \
                torch.empty(len(x), self.target_columns(targets), self.layout.size, **kwargs)
            loss_grads = loss_out if loss_out is not None else torch.empty(len(x_loss), self.layout.size, **kwargs)
            values = self._hooked_pass(theta, x, y, targets, grads, (x_loss, y_loss), loss_grads)
            if values is not None:
                return values, grads, loss_grads
            self._hooks_failed()
        values, grads = self.audit_gradients(theta, x, y, targets, out)
        return values, grads, self.loss_gradients(theta, x_loss, y_loss, loss_out)[0]
