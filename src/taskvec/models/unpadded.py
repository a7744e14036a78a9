"""A BERT encoder forward pass that skips padding: every per-token operation runs on the real tokens only.

Why: text batches are padded to their longest text, and on the text suite's training batches only 23-41 %
of the tokens are real for four of the seven tasks (76 % for drug reviews). A BERT layer is ~80 % matrix
products over tokens, so computing them on padding wastes most of a training step. Here the embeddings,
the query/key/value projections, the attention output, the MLP and every LayerNorm run on the packed
``(T, hidden)`` real tokens; only the attention itself is scattered back to the padded ``(B, heads, L, d)``
layout, with padded keys masked as in ``transformers``. Real tokens get the same values as in
``BertModel.forward`` (padding never reaches a real token: it is masked as a key and pooled with weight 0),
so outputs and gradients agree to float rounding.

It calls the model's own submodules, so ``torch.func.functional_call`` (the composer) swaps parameters in
as usual. It needs data-dependent shapes, so callers fall back to the stock forward under ``vmap`` and for
forward-mode derivatives (``eager`` attention): see :class:`taskvec.models.hf.HFTextEncoder`. Code whose
forward hooks need batch-first activations runs inside :func:`batch_first_activations`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["batch_first_activations", "supports_unpadded", "unpadded_allowed", "unpadded_mean_pool"]

_BATCH_FIRST: ContextVar[bool] = ContextVar("taskvec_batch_first_activations", default=False)


@contextmanager
def batch_first_activations() -> Iterator[None]:
    """Within this block encoders run the stock padded forward, so every submodule sees ``(B, L, ...)``
    activations (per-sample forward hooks need the batch index of each row)."""
    token = _BATCH_FIRST.set(True)
    try:
        yield
    finally:
        _BATCH_FIRST.reset(token)


def unpadded_allowed() -> bool:
    """False inside :func:`batch_first_activations`."""
    return not _BATCH_FIRST.get()


def supports_unpadded(model: Any) -> bool:
    """True for an encoder-only BERT with absolute positions and SDPA attention (what this module mirrors)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "bert":
        return False
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return False
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return False
    if getattr(config, "chunk_size_feed_forward", 0):
        return False
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    embeddings = getattr(model, "embeddings", None)
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    return embeddings is not None and layers is not None and all(
        hasattr(layer, "attention") and hasattr(layer, "intermediate") and hasattr(layer, "output")
        for layer in layers
    )


def unpadded_mean_pool(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Masked mean of BERT's last hidden states, ``(B, hidden)``, computed on the real tokens only.

    Equals ``(h * m).sum(1) / m.sum(1)`` of ``model(input_ids, attention_mask)[0]`` (``h``) for a 0/1
    ``attention_mask`` ``m`` of shape ``(B, L)``; positions are column indices, as ``BertModel`` uses.
    """
    batch, length = input_ids.shape
    keep = attention_mask.reshape(-1).nonzero().squeeze(1)  # (T,) flat indices of the real tokens
    embeddings = model.embeddings
    ids = input_ids.reshape(-1)[keep]
    positions = keep % length
    hidden = embeddings.word_embeddings(ids) + embeddings.token_type_embeddings(torch.zeros_like(ids))
    hidden = hidden + embeddings.position_embeddings(positions)
    hidden = embeddings.dropout(embeddings.LayerNorm(hidden))

    key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): padded keys masked
    for layer in model.encoder.layer:
        attention = layer.attention.self
        heads = (batch, length, attention.num_attention_heads, attention.attention_head_size)
        context = F.scaled_dot_product_attention(
            _to_heads(attention.query(hidden), keep, heads), _to_heads(attention.key(hidden), keep, heads),
            _to_heads(attention.value(hidden), keep, heads),
            attn_mask=key_mask, dropout_p=attention.dropout.p if attention.training else 0.0,
            scale=getattr(attention, "scaling", attention.attention_head_size ** -0.5),
        )
        context = context.transpose(1, 2).reshape(batch * length, -1)[keep]
        attended = layer.attention.output(context, hidden)
        hidden = layer.output(layer.intermediate(attended), attended)

    rows = keep // length
    counts = attention_mask.sum(1, keepdim=True).to(hidden.dtype).clamp(min=1e-9)
    return hidden.new_zeros(batch, hidden.shape[-1]).index_add(0, rows, hidden) / counts


def _to_heads(projected: Tensor, keep: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    """Packed ``(T, heads * d)`` -> padded ``(B, heads, L, d)``, zeros at the padding."""
    batch, length, heads, head_size = shape
    padded = projected.new_zeros(batch * length, projected.shape[-1]).index_copy(0, keep, projected)
    return padded.view(batch, length, heads, head_size).transpose(1, 2)
