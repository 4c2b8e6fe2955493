"""Samplers: temperature / top-k / top-p log-probabilities, sampling, and the speculative-sampling rule."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["processed_logprobs", "sample", "speculative_accept", "check_sampler"]


def check_sampler(temperature: float, top_k: int | None, top_p: float | None, vocab_size: int) -> None:
    """``ValueError`` naming the argument for a sampler setting that is not finite or out of range."""
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature} must be a finite number >= 0 (0 = greedy)")
    if top_k is not None and not (isinstance(top_k, int) and 0 < top_k <= vocab_size):
        raise ValueError(f"top_k={top_k} must be an integer in 1..vocab_size={vocab_size}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p} must be in (0, 1]")


def processed_logprobs(logits: jax.Array, temperature: float, top_k: int | None = None,
                       top_p: float | None = None) -> jax.Array:
    """Log-probabilities ``[..., v]`` of the sampling distribution: ``softmax(logits / temperature)``
    restricted to the ``top_k`` most likely tokens and then to the smallest set whose probability reaches
    ``top_p`` (the nucleus), renormalised; excluded tokens get ``-inf``."""
    x = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(x, top_k)[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if top_p is not None:
        order = jnp.argsort(-x, axis=-1)
        sorted_p = jax.nn.softmax(jnp.take_along_axis(x, order, axis=-1), axis=-1)
        before = jnp.cumsum(sorted_p, axis=-1) - sorted_p  # mass of strictly more likely tokens
        keep = jnp.take_along_axis(before < top_p, jnp.argsort(order, axis=-1), axis=-1)
        x = jnp.where(keep, x, -jnp.inf)
    return jax.nn.log_softmax(x, axis=-1)


def sample(logits: jax.Array, key: jax.Array, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None) -> jax.Array:
    """Next tokens ``[...]`` int32 from ``logits [..., v]``: argmax when ``temperature == 0``."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, processed_logprobs(logits, temperature, top_k, top_p)).astype(jnp.int32)


def speculative_accept(p_logp: jax.Array, q_logp: jax.Array, draft: jax.Array, key: jax.Array):
    """The speculative-sampling rule for one drafted token per row.

    ``p_logp``, ``q_logp [b, v]``: the target (main model) and draft log-probabilities at the drafted
    position; ``draft [b]`` sampled from ``q``. Returns ``(accept [b] bool, fallback [b])``: accept with
    probability ``min(1, p(d) / q(d))``; otherwise the caller emits ``fallback``, a sample of
    ``max(p - q, 0)`` renormalised. The emitted token is then distributed exactly as ``p``.
    """
    k1, k2 = jax.random.split(key)
    p, q = jnp.exp(p_logp), jnp.exp(q_logp)
    pd = jnp.take_along_axis(p, draft[:, None], axis=-1)[:, 0]
    qd = jnp.take_along_axis(q, draft[:, None], axis=-1)[:, 0]
    accept = jax.random.uniform(k1, draft.shape) * qd < pd
    resid = jnp.maximum(p - q, 0.0)
    resid = jnp.where(resid.sum(-1, keepdims=True) > 0, resid, p)
    fallback = jax.random.categorical(k2, jnp.log(resid)).astype(jnp.int32)
    return accept, fallback
