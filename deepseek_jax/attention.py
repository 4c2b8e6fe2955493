"""Attention: Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 §2.1.1) and MHA/GQA (DeepSeek LLM).

Dimension letters: b batch, t query positions, s key positions, d model, n heads, g kv heads,
h head dim, c kv latent (``kv_lora_rank``), q q latent (``q_lora_rank``), r rope dim, p nope dim,
v value dim.

MLA (training / prefill form, "naive": keys and values are expanded from the latent)::

    cq = RMSNorm(x Wq_a)                       x[b,t,d] · Wq_a[d,q]            (or q = x Wq without q-LoRA)
    q  = cq Wq_b -> [q_nope | q_rope]          [b,t,q] · Wq_b[q,n,p+r]
    [c_kv | k_rope] = x Wkv_a                  [b,t,d] · Wkv_a[d,c+r]
    [k_nope | v]    = RMSNorm(c_kv) Wkv_b      [b,t,c] · Wkv_b[c,n,p+v]
    score = scale * (q_nope·k_nope + RoPE(q_rope)·RoPE(k_rope))   one RoPE key shared by all heads
    out   = softmax(score + mask) v Wo         [b,t,n,v] · Wo[n,v,d]

The softmax runs in float32. ``scale`` includes YaRN's ``m**2`` (``ModelConfig.softmax_scale``).

Sharding (scaling-book notation): heads are split over ``tensor`` and the batch over
``(data, fsdp, expert)``: ``q[B_batch, T, N_tensor, H]``, the latent ``c[B_batch, S, C]`` is replicated
over ``tensor`` (it is small: that is MLA's point), ``Wkv_b[C, N_tensor, P+V]``, and
``o[B_batch, T, N_tensor, V] · Wo[N_tensor, V, D] -> y[B_batch, T, D]{U_tensor}`` is all-reduced.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import RMSNorm, dtype_of, linear, param
from deepseek_jax.rope import apply_rope
from deepseek_jax.sharding import constrain

__all__ = ["attention_mask", "MLA", "GQA", "make_attention"]

_HEADS = ("act_batch", "act_length", "act_heads", None)


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """Causal mask that never crosses documents: ``[b, 1, t, s]`` boolean (True = attend)."""
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None]


def _softmax(scores: jax.Array, mask: jax.Array, dtype: jnp.dtype) -> jax.Array:
    scores = jnp.where(mask, scores.astype(jnp.float32), -jnp.inf)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


class MLA(nn.Module):
    """Multi-head Latent Attention. Returns ``[b, t, d]``."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        c = self.cfg
        a, pd, dt, std = c.attention, dtype_of(c.param_dtype), x.dtype, c.init_std
        n, p, r, vd, kc = a.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
        if a.q_lora_rank:
            wq_a = param(self, "wq_a", (c.d_model, a.q_lora_rank), ("embed", "q_lora"), std, pd)
            wq_b = param(self, "wq_b", (a.q_lora_rank, n, p + r), ("q_lora", "heads", "qk_head"), std, pd)
            cq = RMSNorm(a.q_lora_rank, c.rms_norm_eps, pd, name="q_norm")(checkpoint_name(linear(c, x, wq_a), "c_q"))
            q = linear(c, cq, wq_b)
        else:
            wq = param(self, "wq", (c.d_model, n, p + r), ("embed", "heads", "qk_head"), std, pd)
            q = linear(c, x, wq)
        q = constrain(q, *_HEADS)
        q_nope, q_rope = q[..., :p], apply_rope(q[..., p:], positions, c.rope)

        wkv_a = param(self, "wkv_a", (c.d_model, kc + r), ("embed", "kv_lora"), std, pd)
        kv = checkpoint_name(linear(c, x, wkv_a), "c_kv")  # latent + rope key: kept by the 'deepseek' remat policy
        c_kv = RMSNorm(kc, c.rms_norm_eps, pd, name="kv_norm")(kv[..., :kc])
        k_rope = apply_rope(kv[..., kc:], positions, c.rope)  # [b, s, r], shared by all heads
        wkv_b = param(self, "wkv_b", (kc, n, p + vd), ("kv_lora", "heads", "qk_head"), std, pd)
        kvb = constrain(linear(c, c_kv, wkv_b), *_HEADS)
        k_nope, v = kvb[..., :p], kvb[..., p:]

        scores = jnp.einsum("btnp,bsnp->bnts", q_nope, k_nope) + jnp.einsum("btnr,bsr->bnts", q_rope, k_rope)
        probs = _softmax(scores * c.softmax_scale, attention_mask(segment_ids), dt)
        out = checkpoint_name(constrain(jnp.einsum("bnts,bsnv->btnv", probs, v), *_HEADS), "attn_out")
        wo = param(self, "wo", (n, vd, c.d_model), ("heads", "head_dim", "embed"), std, pd, n_in=2)
        return linear(c, out, wo, n_in=2)


class GQA(nn.Module):
    """Multi-head / grouped-query attention with RoPE on the whole head (DeepSeek LLM 7B / 67B).

    x[b,t,d] · Wq[d,n,h] -> q; x · Wk[d,g,h], x · Wv[d,g,h] -> k, v; heads n = g * (n/g) share a kv head.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        c = self.cfg
        a, pd, dt, std = c.attention, dtype_of(c.param_dtype), x.dtype, c.init_std
        n, g, h = a.n_heads, a.kv_heads, a.head_dim
        wq = param(self, "wq", (c.d_model, n, h), ("embed", "heads", "head_dim"), std, pd)
        wk = param(self, "wk", (c.d_model, g, h), ("embed", "kv_heads", "head_dim"), std, pd)
        wv = param(self, "wv", (c.d_model, g, h), ("embed", "kv_heads", "head_dim"), std, pd)
        q = apply_rope(checkpoint_name(linear(c, x, wq), "q_proj"), positions, c.rope)
        k = apply_rope(checkpoint_name(linear(c, x, wk), "k_proj"), positions, c.rope)
        v = constrain(checkpoint_name(linear(c, x, wv), "v_proj"), *_HEADS)
        q, k = constrain(q, *_HEADS), constrain(k, *_HEADS)
        b, t = x.shape[:2]
        q = q.reshape(b, t, g, n // g, h)
        scores = jnp.einsum("btgmh,bsgh->bgmts", q, k) * c.softmax_scale
        probs = _softmax(scores, attention_mask(segment_ids)[:, :, None], dt)
        out = checkpoint_name(jnp.einsum("bgmts,bsgh->btgmh", probs, v).reshape(b, t, n, h), "attn_out")
        wo = param(self, "wo", (n, h, c.d_model), ("heads", "head_dim", "embed"), std, pd, n_in=2)
        return linear(c, out, wo, n_in=2)


def make_attention(cfg: ModelConfig, name: str) -> nn.Module:
    return (MLA if cfg.attention.kind == "mla" else GQA)(cfg, name=name)
