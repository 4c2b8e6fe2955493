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

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import RMSNorm, dtype_of, linear, param
from deepseek_jax.rope import apply_rope
from deepseek_jax.sharding import constrain

__all__ = ["attention_mask", "CacheConfig", "MLA", "GQA", "make_attention"]

_HEADS = ("act_batch", "act_length", "act_heads", None)


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """Causal mask that never crosses documents: ``[b, 1, t, s]`` boolean (True = attend)."""
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None]


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """A KV cache of ``size`` positions per sequence (inference; see :mod:`deepseek_jax.generate`).

    ``kind`` (MLA only): ``"latent"`` caches the normalised latent ``c_kv`` and the rotated shared key
    ``k_pe`` (``kv_lora_rank + qk_rope_head_dim`` values per token and layer) and decodes with the
    up-projections absorbed into the query and the output; ``"naive"`` caches the expanded per-head keys
    and values. MHA/GQA always cache K and V per kv head. ``dtype``: the cache's storage dtype, or
    ``"fp8"``: E4M3 with one float32 scale per 1x128 tile of each token's entry.
    """

    size: int
    kind: str = "latent"
    dtype: str = "float32"

    def __post_init__(self):
        if self.kind not in ("latent", "naive"):
            raise ValueError(f"cache kind={self.kind!r} must be 'latent' or 'naive'")
        if self.dtype not in ("float32", "bfloat16", "float16", "fp8"):
            raise ValueError(f"cache dtype={self.dtype!r} must be float32, bfloat16, float16 or fp8")
        if self.size <= 0:
            raise ValueError(f"cache size={self.size} must be positive")


def _cache_update(module: nn.Module, name: str, new: jax.Array, positions: jax.Array, cache: CacheConfig) -> jax.Array:
    """Write ``new [b, t, ...]`` at slots ``positions[:, 0] ..`` of the cache variable ``name`` and return the
    whole cache ``[b, size, ...]`` in ``new``'s dtype. Slots are positions: row i's token at position p
    lives in slot p (positions of one call must be consecutive per row, as prefill and decode give).
    With ``dtype="fp8"`` the entry is stored as E4M3 in 1x128 tiles (one scale per token and tile)."""
    b, t = new.shape[:2]
    feat = new.shape[2:]
    start = positions[:, 0]

    def write(var, upd):
        var.value = jax.vmap(lambda c, u, s: jax.lax.dynamic_update_slice(c, u, (s,) + (0,) * (u.ndim - 1)))(
            var.value, upd.astype(var.value.dtype), start)
        return var.value

    if cache.dtype != "fp8":
        var = module.variable("cache", name, jnp.zeros, (b, cache.size) + feat, jnp.dtype(cache.dtype))
        return write(var, new).astype(new.dtype)
    from deepseek_jax import fp8

    flat = new.reshape(b, t, -1)
    k = flat.shape[-1]
    q, sc = fp8.quantize(flat, (1, 128), nonfinite="propagate")
    qv = module.variable("cache", name, jnp.zeros, (b, cache.size, k), fp8.E4M3)
    sv = module.variable("cache", name + "_scale", jnp.zeros, (b, cache.size, sc.shape[-1]), jnp.float32)
    full = fp8.dequantize(write(qv, q), write(sv, sc), (1, 128))
    return full.reshape((b, cache.size) + feat).astype(new.dtype)


def _cached_mask(positions: jax.Array, size: int) -> jax.Array:
    """``[b, 1, t, size]``: a query at position p sees slots 0..p (every one of them written by then)."""
    return (jnp.arange(size)[None, None, :] <= positions[:, :, None])[:, None]


def _softmax(scores: jax.Array, mask: jax.Array, dtype: jnp.dtype) -> jax.Array:
    scores = jnp.where(mask, scores.astype(jnp.float32), -jnp.inf)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


class MLA(nn.Module):
    """Multi-head Latent Attention. Returns ``[b, t, d]``.

    With a ``cache`` (inference) the new tokens' entries are written to the ``"cache"`` collection and
    attention runs over every cached slot up to each query's position. ``kind="latent"`` is the
    absorbed path (V2 §2.1.4, ``../shared/docs`` §2.4)::

        q_lat[b,t,n,c] = q_nope[b,t,n,p] · W_UK[c,n,p]                 (W_UK = Wkv_b[..., :p])
        score = scale * (q_lat · c_kv[b,s,c] + q_rope · k_rope[b,s,r])  against the latent cache
        o[b,t,n,v] = (softmax(score) · c_kv[b,s,c]) · W_UV[c,n,v]       (W_UV = Wkv_b[..., p:])

    equal to the naive path in real arithmetic; the per-head keys and values are never formed.
    """

    cfg: ModelConfig
    cache: CacheConfig | None = None

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
        wo = param(self, "wo", (n, vd, c.d_model), ("heads", "head_dim", "embed"), std, pd, n_in=2)
        if self.cache is not None and self.cache.kind == "latent":
            out = self._absorbed(q_nope, q_rope, c_kv, k_rope, wkv_b, positions)
            return linear(c, out, wo, n_in=2)
        kvb = constrain(linear(c, c_kv, wkv_b), *_HEADS)
        k_nope, v = kvb[..., :p], kvb[..., p:]
        if self.cache is not None:  # naive cache: the expanded per-head keys (rope part shared) and values
            k = _cache_update(self, "k", jnp.concatenate(
                [k_nope, jnp.broadcast_to(k_rope[:, :, None], k_nope.shape[:3] + (r,))], -1), positions, self.cache)
            v = _cache_update(self, "v", v, positions, self.cache)
            k_nope, k_rope_h = k[..., :p], k[..., p:]
            scores = (jnp.einsum("btnp,bsnp->bnts", q_nope, k_nope)
                      + jnp.einsum("btnr,bsnr->bnts", q_rope, k_rope_h))
            mask = _cached_mask(positions, self.cache.size)
        else:
            scores = jnp.einsum("btnp,bsnp->bnts", q_nope, k_nope) + jnp.einsum("btnr,bsr->bnts", q_rope, k_rope)
            mask = attention_mask(segment_ids)
        probs = _softmax(scores * c.softmax_scale, mask, dt)
        out = checkpoint_name(constrain(jnp.einsum("bnts,bsnv->btnv", probs, v), *_HEADS), "attn_out")
        return linear(c, out, wo, n_in=2)

    def _absorbed(self, q_nope, q_rope, c_kv, k_rope, wkv_b, positions):
        """Attention against the latent cache ``[c_kv | k_rope]`` with ``W_UK``/``W_UV`` absorbed: ``[b, t, n, v]``."""
        c = self.cfg
        p, kc = c.attention.qk_nope_head_dim, c.attention.kv_lora_rank
        latent = _cache_update(self, "kv", jnp.concatenate([c_kv, k_rope], -1), positions, self.cache)
        ckv, kpe = latent[..., :kc], latent[..., kc:]  # [b, S, c], [b, S, r]
        w = wkv_b.astype(q_nope.dtype)
        q_lat = jnp.einsum("btnp,cnp->btnc", q_nope, w[..., :p])
        scores = jnp.einsum("btnc,bsc->bnts", q_lat, ckv) + jnp.einsum("btnr,bsr->bnts", q_rope, kpe)
        probs = _softmax(scores * c.softmax_scale, _cached_mask(positions, self.cache.size), q_nope.dtype)
        o_lat = jnp.einsum("bnts,bsc->btnc", probs, ckv)
        return constrain(jnp.einsum("btnc,cnv->btnv", o_lat, w[..., p:]), *_HEADS)


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
        if self.cache is not None:
            k = _cache_update(self, "k", k, positions, self.cache)
            v = _cache_update(self, "v", v, positions, self.cache)
            mask = _cached_mask(positions, self.cache.size)
        else:
            mask = attention_mask(segment_ids)
        q = q.reshape(b, t, g, n // g, h)
        scores = jnp.einsum("btgmh,bsgh->bgmts", q, k) * c.softmax_scale
        probs = _softmax(scores, mask[:, :, None], dt)
        out = checkpoint_name(jnp.einsum("bgmts,bsgh->btgmh", probs, v).reshape(b, t, n, h), "attn_out")
        wo = param(self, "wo", (n, h, c.d_model), ("heads", "head_dim", "embed"), std, pd, n_in=2)
        return linear(c, out, wo, n_in=2)


def make_attention(cfg: ModelConfig, name: str, cache: CacheConfig | None = None) -> nn.Module:
    return (MLA if cfg.attention.kind == "mla" else GQA)(cfg, cache, name=name)
