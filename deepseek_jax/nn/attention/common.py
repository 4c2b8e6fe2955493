"""What every attention kind shares: the document-aware causal mask, the float32 masked softmax, and the
logical axes of per-head activations."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["HEADS", "attention_mask", "masked_softmax"]

HEADS = ("act_batch", "act_length", "act_heads", None)  # [b, t, n, h] activations: heads over tensor


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """Causal mask that never crosses documents: ``[b, 1, t, s]`` boolean (True = attend)."""
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None]


def masked_softmax(scores: jax.Array, mask: jax.Array, dtype: jnp.dtype) -> jax.Array:
    scores = jnp.where(mask, scores.astype(jnp.float32), -jnp.inf)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)
