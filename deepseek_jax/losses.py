"""Losses that stay sharded: the vocabulary-parallel softmax cross-entropy.

With the head split over ``tensor`` (``logits[B_batch, T, V_tensor]``), ``log-sum-exp`` reduces over the
local vocabulary slice and all-reduces one number per token; the label's logit is picked with a
comparison against a vocabulary iota (local to each slice) and summed the same way. The full
``[b, t, v]`` logits are never gathered on one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.sharding import constrain

__all__ = ["cross_entropy"]


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Mean token negative log-likelihood and the token count.

    ``logits [b, t, v]`` (any float dtype; computed in float32), ``labels [b, t]`` int, ``mask [b, t]``
    (1 = counts; default all). Returns ``(loss, n_tokens)``.
    """
    logits = constrain(logits.astype(jnp.float32), "act_batch", "act_length", "act_vocab")
    lse = jax.nn.logsumexp(logits, axis=-1)
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    label_logit = jnp.sum(jnp.where(vocab == labels[..., None], logits, 0.0), axis=-1)
    nll = lse - label_logit
    mask = jnp.ones_like(nll) if mask is None else mask.astype(jnp.float32)
    n = mask.sum()
    return jnp.sum(nll * mask) / jnp.maximum(n, 1.0), n
