"""Per-example gradients of Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's
attention and MLP projections): despite the name a linear layer with the weight stored (in, out),
y = a W + b at every position of a (B, T, in) input, so ∂q_m/∂W = Σ_t a_t δ_tᵀ (in x out) and
∂q_m/∂b = Σ_t δ_t.

plgk does not depend on transformers, and importing it costs about a second, which every `plgk`
command would pay. So the rule is registered when ``transformers.pytorch_utils`` is imported, by
whoever imports it first (a model's code, plgk_cli.hf): at once if it already is, otherwise by a
one-shot import hook that registers right after that module has run. Without transformers the
hook never fires and nothing changes.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

import torch

from plgk_cli.per_example import LayerRule, batch_sum, register

MODULE = "transformers.pytorch_utils"


def _conv1d(module, a, delta) -> dict | None:
    if a.dim() < 2:  # an unbatched call: no batch dimension to split
        return None
    delta = delta.to(a.dtype)
    # weight (in, out): the transpose of nn.Linear's δ aᵀ
    grads = {"weight": torch.einsum("b...i,b...o->bio", a, delta)}
    if getattr(module, "bias", None) is not None:
        grads["bias"] = batch_sum(delta, 1)
    return grads


def _register(module) -> None:
    conv1d = getattr(module, "Conv1D", None)
    if isinstance(conv1d, type):
        register(conv1d, LayerRule("Conv1D", _conv1d))


class _Loader(importlib.abc.Loader):
    """The real loader of transformers.pytorch_utils, then the registration."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register(module)

    def __getattr__(self, name):  # get_data, get_filename, ...: the real loader's
        return getattr(self._loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        sys.meta_path.remove(self)  # one shot; and the real finders answer from here on
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if MODULE in sys.modules:
    _register(sys.modules[MODULE])
else:
    sys.meta_path.insert(0, _AfterImport())
