"""Multi-head / grouped-query attention (DeepSeek LLM 7B / 67B)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax.config import ModelConfig
from deepseek_jax.nn.attention.cache import CacheConfig, cache_update, cached_mask
from deepseek_jax.kernels.attention import ATTENTION_BLOCK, causal_attention
from deepseek_jax.nn.attention.common import HEADS, masked_softmax
from deepseek_jax.nn.attention.sparse import NSA
from deepseek_jax.nn.layers import linear, param
from deepseek_jax.nn.rope import apply_rope
from deepseek_jax.parallel.rules import constrain

__all__ = ["GQA"]


class GQA(nn.Module):
    """Multi-head / grouped-query attention with RoPE on the whole head (DeepSeek LLM 7B / 67B).

    x[b,t,d] · Wq[d,n,h] -> q; x · Wk[d,g,h], x · Wv[d,g,h] -> k, v; heads n = g * (n/g) share a kv head.
    With a ``cache``, K and V ``[b, size, g, h]`` are cached per kv head.
    """

    cfg: ModelConfig
    cache: CacheConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        c = self.cfg
        a, pd, dt, std = c.attention, jnp.dtype(c.param_dtype), x.dtype, c.init_std
        n, g, h = a.n_heads, a.kv_heads, a.head_dim
        wq = param(self, "wq", (c.d_model, n, h), ("embed", "heads", "head_dim"), std, pd, gather=False)
        wk = param(self, "wk", (c.d_model, g, h), ("embed", "kv_heads", "head_dim"), std, pd, gather=False)
        wv = param(self, "wv", (c.d_model, g, h), ("embed", "kv_heads", "head_dim"), std, pd, gather=False)
        q = apply_rope(checkpoint_name(linear(x, wq, fp8=c.fp8), "q_proj"), positions, c.rope)
        k_raw = checkpoint_name(linear(x, wk, fp8=c.fp8), "k_proj")
        k = apply_rope(k_raw, positions, c.rope)
        v = constrain(checkpoint_name(linear(x, wv, fp8=c.fp8), "v_proj"), *HEADS)
        q, k = constrain(q, *HEADS), constrain(k, *HEADS)
        b, t = x.shape[:2]
        if a.sparse is not None:  # NSA: the branches over the kv groups' keys and values
            out = NSA(c, rope_dim=h, cache=self.cache, name="nsa")(x, q, k, k_raw, v, positions, segment_ids)
        elif self.cache is None:  # training / no cache: the blocked core with its recomputing backward
            out = causal_attention(q, k, v, segment_ids, c.softmax_scale, ATTENTION_BLOCK)
        else:
            k = cache_update(self, "k", k, positions, self.cache)
            v = cache_update(self, "v", v, positions, self.cache)
            scores = jnp.einsum("btgmh,bsgh->bgmts", q.reshape(b, t, g, n // g, h), k) * c.softmax_scale
            probs = masked_softmax(scores, cached_mask(positions, self.cache.size)[:, :, None], dt)
            out = jnp.einsum("bgmts,bsgh->btgmh", probs, v).reshape(b, t, n, h)
        out = checkpoint_name(out, "attn_out")
        wo = param(self, "wo", (n, h, c.d_model), ("heads", "head_dim", "embed"), std, pd, n_in=2, gather=False)
        return linear(out, wo, n_in=2, fp8=c.fp8)
