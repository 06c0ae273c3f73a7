"""Per-example gradients of nn.Embedding: δ rows scattered into the rows of the looked-up ids."""

from __future__ import annotations

from torch import nn

from plgk_cli.per_example import LayerRule, register


def _embedding(module: nn.Embedding, ids, delta) -> dict:
    # y[t] = W[ids[t]]: ∂q_m/∂W[v] = Σ_{t: ids_m[t] = v} δ_m[t] (repeated ids add up);
    # the padding_idx row gets no gradient, as in torch. sparse=True gives the same values.
    batch, width = ids.shape[0], module.embedding_dim
    index = ids.reshape(batch, -1, 1).expand(-1, -1, width)
    weight = delta.new_zeros(batch, module.num_embeddings, width)
    weight.scatter_add_(1, index, delta.reshape(batch, -1, width))
    if module.padding_idx is not None:
        weight[:, module.padding_idx] = 0
    return {"weight": weight}


def _separable(module: nn.Embedding) -> bool:
    # max_norm renormalises the looked-up weight rows in place during the forward (the gradient
    # is then not that of a plain lookup); scale_grad_by_freq divides by id counts over the whole
    # batch, which couples the examples
    return module.max_norm is None and not module.scale_grad_by_freq


register(nn.Embedding, LayerRule("Embedding", _embedding), _separable)
