"""What every attention kind shares: the document-aware causal mask, the float32 masked softmax, and the
logical axes of per-head activations."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["HEADS", "attention_mask", "masked_softmax", "in_query_chunks"]

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


def in_query_chunks(fn, chunk: int, *xs: jax.Array) -> jax.Array:
    """``fn(*xs)`` for arrays ``[b, t, ...]`` computed ``chunk`` queries (axis 1) at a time with ``lax.map`` when
    ``t > chunk``: a long prefill through a sparse decode path gathers per query (NSA's blocks, DSA's top-k latent
    rows), ``[b, t, k, D]`` at once would not fit. Padded queries repeat the last one and are dropped."""
    t = xs[0].shape[1]
    if t <= chunk:
        return fn(*xs)
    n = -(-t // chunk)

    def split(x):
        x = jnp.concatenate([x, jnp.repeat(x[:, -1:], n * chunk - t, 1)], 1)
        return x.reshape((x.shape[0], n, chunk) + x.shape[2:]).swapaxes(0, 1)
    out = jax.lax.map(lambda a: fn(*a), tuple(split(x) for x in xs))
    return out.swapaxes(0, 1).reshape((out.shape[1], n * chunk) + out.shape[3:])[:, :t]
