"""Attention cores: pure array functions of queries, keys and values (no module, no mesh).

:func:`causal_attention` is the training / prefill core, blocked over the query length with a recomputing
custom VJP (FlashAttention's backward, Dao 2022, §3.1 and Alg. 4, written as whole-block einsums)::

    for each query block i (rows [i B, (i+1) B)), against the key prefix [0, (i+1) B):
        s    = scale * q_i k^T                      [b, n, B, L]    L = (i + 1) B
        p    = softmax(s + mask)                    causal, never across documents
        o_i  = p v                                  lse_i = log sum exp(s + mask) kept for the backward
    backward, per block, from (q, k, v, o, lse) only:
        p  = exp(s + mask - lse_i)                  recomputed, never stored
        dv += p^T do_i ;  dp = do_i v^T ;  ds = p (dp - rowsum(do_i o_i)) scale
        dq_i = ds k ;  dk += ds^T q_i

Blocks above the diagonal are skipped (a query block reads only the key prefix up to its own end): with
``t / B = m`` blocks the score work is ``m (m + 1) / 2`` blocks instead of ``m^2``, and the ``[b, n, t, s]``
probabilities are never kept between the passes. Numerically it is the plain masked softmax (tested
against it, values and gradients).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deepseek_jax.kernels.backend import cotangent_like

__all__ = ["ATTENTION_BLOCK", "causal_attention", "attention_block"]

ATTENTION_BLOCK = 64  # query rows per block; core fwd+bwd at t=256 on XLA:CPU: 68/42/54/58 ms for 32/64/128/256


def attention_block(t: int, block: int) -> int:
    """The query block used for length ``t``: ``block`` when it divides ``t`` and is smaller, else ``t``
    (one block: the plain masked softmax)."""
    return block if 0 < block < t and t % block == 0 else t


def _block_scores(q_i, k, seg_i, seg, start, scale):
    """Float32 scores of one query block ``[b, B, g, m, h]`` against a key prefix ``[b, L, g, h]``, and
    its mask: ``[b, g, m, B, L]`` and ``[b, 1, 1, B, L]``."""
    s = jnp.einsum("btgmh,bsgh->bgmts", q_i, k, preferred_element_type=jnp.float32) * scale
    qpos = start + jnp.arange(q_i.shape[1])
    causal = qpos[:, None] >= jnp.arange(k.shape[1])[None, :]
    mask = causal[None] & (seg_i[:, :, None] == seg[:, None, :])
    return s, mask[:, None, None]


def _grouped(q, k):
    """``q [b, t, n, h]`` as ``[b, t, g, n/g, h]`` for ``g = k.shape[2]`` kv heads."""
    b, t, n, h = q.shape
    g = k.shape[2]
    if n % g:
        raise ValueError(f"{n} query heads do not divide into {g} key/value heads")
    return q.reshape(b, t, g, n // g, h)


def _forward(q, k, v, segment_ids, scale, block):
    b, t, n, _ = q.shape
    step = attention_block(t, block)
    q = _grouped(q, k)
    outs, lses = [], []
    for start in range(0, t, step):
        end = start + step
        s, mask = _block_scores(q[:, start:end], k[:, :end], segment_ids[:, start:end], segment_ids[:, :end],
                                start, scale)
        s = jnp.where(mask, s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        e = jnp.exp(s - m)
        total = jnp.sum(e, axis=-1, keepdims=True)
        probs = (e / total).astype(v.dtype)
        outs.append(jnp.einsum("bgmts,bsgv->btgmv", probs, v[:, :end]))
        lses.append((m + jnp.log(total))[..., 0])  # [b, g, m, B]
    return jnp.concatenate(outs, 1).reshape(b, t, n, v.shape[-1]), jnp.concatenate(lses, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, scale: float,
                     block: int = ATTENTION_BLOCK) -> jax.Array:
    """Causal, document-aware attention ``softmax(scale q k^T + mask) v``: ``q [b, t, n, h]``, ``k [b, t, g, h]``,
    ``v [b, t, g, v]`` (``g`` key/value heads, each shared by ``n / g`` consecutive query heads: GQA; ``g = n``
    for MHA and MLA), ``segment_ids [b, t]`` (queries attend to earlier keys of the same segment) ->
    ``[b, t, n, v]`` in ``v``'s dtype. The softmax runs in float32; ``block`` is the query block
    (:func:`attention_block`). Gradients recompute the probabilities block by block (module docstring)."""
    return _forward(q, k, v, segment_ids, scale, block)[0]


def _fwd(q, k, v, segment_ids, scale, block):
    out, lse = _forward(q, k, v, segment_ids, scale, block)
    return out, (q, k, v, segment_ids, out, lse)


def _bwd(scale, block, res, do):
    q, k, v, segment_ids, out, lse = res
    b, t, n, h = q.shape
    step = attention_block(t, block)
    q, do, out = _grouped(q, k), _grouped(do, k), _grouped(out, k)
    delta = jnp.einsum("btgmv,btgmv->bgmt", do.astype(jnp.float32), out.astype(jnp.float32))
    dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for start in range(0, t, step):
        end = start + step
        s, mask = _block_scores(q[:, start:end], k[:, :end], segment_ids[:, start:end], segment_ids[:, :end],
                                start, scale)
        p = jnp.where(mask, jnp.exp(s - lse[..., start:end, None]), 0.0)
        do_i = do[:, start:end]
        dv = dv.at[:, :end].add(jnp.einsum("bgmts,btgmv->bsgv", p.astype(do.dtype), do_i,
                                           preferred_element_type=jnp.float32))
        dp = jnp.einsum("btgmv,bsgv->bgmts", do_i, v[:, :end], preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[..., start:end, None]) * scale).astype(q.dtype)
        dq.append(jnp.einsum("bgmts,bsgh->btgmh", ds, k[:, :end], preferred_element_type=jnp.float32))
        dk = dk.at[:, :end].add(jnp.einsum("bgmts,btgmh->bsgh", ds, q[:, start:end],
                                           preferred_element_type=jnp.float32))
    dq = jnp.concatenate(dq, 1).reshape(b, t, n, h)
    return (cotangent_like(dq, q).astype(q.dtype), cotangent_like(dk, k).astype(k.dtype), cotangent_like(dv, v).astype(v.dtype),
            None)  # segment ids: no cotangent


causal_attention.defvjp(_fwd, _bwd)
