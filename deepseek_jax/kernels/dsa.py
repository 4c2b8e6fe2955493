"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2-Exp) as pure array functions (``long-context.md`` §2).

A lightning indexer scores every (query, earlier key) pair cheaply, the main attention reads only the ``k``
best keys of each query, and the indexer learns from the main attention's distribution:

* :func:`indexer_scores`: ``I[t, s] = sum_j w[t, j] ReLU(q_I[t, j] . k_I[s])``, ``H_I`` indexer heads sharing
  one key per token (the weights ``w`` already carry the ``H_I^-1/2 d_I^-1/2`` scale).
* :func:`topk_mask`: per query the ``k`` highest-scoring visible keys (causal, same document), ties to the
  lower index; ``min(k, visible)`` of them.
* :func:`indexer_kl`: the warm-up / sparse-stage loss, ``KL(p_t || softmax(I_t))`` averaged over the queries,
  with ``p_t`` the main attention's probabilities summed over heads and L1-normalised (both over the keys of
  ``mask``: every visible key in the dense warm-up, the selected ones in the sparse stage). The target is
  constant (``stop_gradient``): the KL trains the indexer only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["indexer_scores", "visible", "topk_indices", "topk_mask", "indexer_kl"]


def indexer_scores(q: jax.Array, k: jax.Array, w: jax.Array) -> jax.Array:
    """``q [b, t, H, d]``, ``k [b, s, d]``, ``w [b, t, H]`` -> ``I [b, t, s]`` (float32 at least)."""
    f = jnp.promote_types(q.dtype, jnp.float32)
    dots = jnp.einsum("bthd,bsd->bths", q, k).astype(f)
    return jnp.einsum("bths,bth->bts", jax.nn.relu(dots), w.astype(f))


def visible(segment_ids: jax.Array) -> jax.Array:
    """``[b, t, t]``: key ``s`` is visible to query ``t`` when ``s <= t`` in the same document."""
    t = segment_ids.shape[1]
    return jnp.tril(jnp.ones((t, t), bool))[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])


def topk_indices(scores: jax.Array, ok: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The ``k`` visible keys of highest score per query as indices ``[b, t, k]`` (ties to the lower index: a
    stable sort) and whether each is a visible key (``False`` where fewer than ``k`` are)."""
    key = jnp.where(ok, jax.lax.stop_gradient(scores), -jnp.inf)
    order = jnp.argsort(-key, axis=-1, stable=True)[..., :k].astype(jnp.int32)
    return order, jnp.take_along_axis(ok, order, axis=-1)


def topk_mask(scores: jax.Array, ok: jax.Array, k: int) -> jax.Array:
    """``scores [b, t, s]``, ``ok [b, t, s]`` (visible keys) -> ``[b, t, s]`` bool: the ``min(k, visible)``
    visible keys of highest score per query (:func:`topk_indices`)."""
    if k >= scores.shape[-1]:
        return ok
    order, _ = topk_indices(scores, ok, k)
    chosen = jnp.zeros(scores.shape, bool)
    chosen = jnp.put_along_axis(chosen, order, True, axis=-1, inplace=False)
    return chosen & ok


def indexer_kl(probs: jax.Array, scores: jax.Array, mask: jax.Array, query_ok: jax.Array | None = None) -> jax.Array:
    """Mean over queries of ``KL(p_t || softmax(I_t))`` restricted to ``mask``.

    Args:
      probs: ``[b, n, t, s]`` the main attention's probabilities (any normalisation: summed over heads and
        L1-normalised over ``mask`` here, then held constant).
      scores: ``[b, t, s]`` the indexer's scores. mask: ``[b, t, s]`` the keys both distributions live on.
      query_ok: ``[b, t]`` the queries that count (default all).
    """
    p = jnp.where(mask, jax.lax.stop_gradient(probs.astype(jnp.promote_types(probs.dtype, jnp.float32))).sum(1), 0.0)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    logq = jax.nn.log_softmax(jnp.where(mask, scores, -1e30), axis=-1)
    kl = jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - logq), 0.0).sum(-1)  # [b, t]
    ok = mask.any(-1) if query_ok is None else query_ok & mask.any(-1)
    return jnp.where(ok, kl, 0.0).sum() / jnp.maximum(ok.sum(), 1)
