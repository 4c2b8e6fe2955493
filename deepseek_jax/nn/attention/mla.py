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
from deepseek_jax.nn import tree
from deepseek_jax.nn.attention.cache import CacheConfig, cache_update, cached_mask
from deepseek_jax.kernels.attention import ATTENTION_BLOCK, causal_attention
from deepseek_jax.nn.attention.common import HEADS, in_query_chunks, masked_softmax
from deepseek_jax.kernels.dsa import indexer_kl, topk_indices, topk_mask, visible
from deepseek_jax.nn.attention.sparse import NSA, Indexer
from deepseek_jax.nn.layers import RMSNorm, linear, param
from deepseek_jax.nn.rope import apply_rope
from deepseek_jax.parallel.rules import constrain

__all__ = ["MLA", "absorbed_weights"]


def absorbed_weights(params: dict, qk_nope_head_dim: int) -> dict:
    """The ``"decode"`` collection for a per-layer (unstacked) ``params`` tree: for every MLA ``wkv_b
    [c, n, p+v]``, ``w_uk [n, p, c]`` and ``w_uv [n, c, v]`` at the same path, heads leading, so the absorbed
    products run as batched matmuls on the weights where they lie (read from ``Wkv_b`` directly, XLA:CPU
    copies a transposed ``W_UK`` and ``W_UV`` out of it at every decode step). Stacked layers are skipped, and
    so are weights kept in FP8 (the module dequantises those with their block scales)."""
    out = {}
    for k, v in params.items():
        if k == "wkv_b" and getattr(v, "ndim", 0) == 3 and jnp.dtype(v.dtype).itemsize > 1:
            out["w_uk"] = jnp.transpose(v[..., :qk_nope_head_dim], (1, 2, 0))
            out["w_uv"] = jnp.transpose(v[..., qk_nope_head_dim:], (1, 0, 2))
        elif isinstance(v, dict) and (sub := absorbed_weights(v, qk_nope_head_dim)):
            out[k] = sub
    return out


class MLA(nn.Module):
    """Multi-head Latent Attention. Returns ``[b, t, d]``.

    With a ``cache`` (inference) the new tokens' entries are written to the ``"cache"`` collection and
    attention runs over every cached slot up to each query's position. ``kind="latent"`` is the
    absorbed path (DeepSeek-V2 §2.1.4, "low-rank key-value joint compression")::

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
        a, pd, dt, std = c.attention, jnp.dtype(c.param_dtype), x.dtype, c.init_std
        n, p, r, vd, kc = a.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
        if a.q_lora_rank:
            wq_a = param(self, "wq_a", (c.d_model, a.q_lora_rank), ("embed", "q_lora"), std, pd, gather=False)
            wq_b = param(self, "wq_b", (a.q_lora_rank, n, p + r), ("q_latent", "heads", "qk_head"), std, pd, gather=False)
            cq = RMSNorm(a.q_lora_rank, c.rms_norm_eps, pd, name="q_norm")(checkpoint_name(linear(x, wq_a, fp8=c.fp8), "c_q"))
            q = linear(cq, wq_b, fp8=c.fp8)
        else:
            wq = param(self, "wq", (c.d_model, n, p + r), ("embed", "heads", "qk_head"), std, pd, gather=False)
            q = linear(x, wq, fp8=c.fp8)
        q = constrain(q, *HEADS)
        q_nope, q_rope = q[..., :p], apply_rope(q[..., p:], positions, c.rope)

        wkv_a = param(self, "wkv_a", (c.d_model, kc + r), ("embed", "kv_lora"), std, pd, gather=False)
        kv = checkpoint_name(linear(x, wkv_a, fp8=c.fp8), "c_kv")  # latent + rope key: kept by the 'deepseek' remat policy
        c_kv = RMSNorm(kc, c.rms_norm_eps, pd, name="kv_norm")(kv[..., :kc])
        k_rope = apply_rope(kv[..., kc:], positions, c.rope)  # [b, s, r], shared by all heads
        wkv_b = param(self, "wkv_b", (kc, n, p + vd), ("kv_latent", "heads", "kv_head"), std, pd, gather=False)
        wo = param(self, "wo", (n, vd, c.d_model), ("heads", "v_head", "embed"), std, pd, n_in=2, gather=False)
        keep = None  # DSA: the keys each query reads, [b, t, s] (None: every visible key)
        if a.sparse is not None and a.sparse.kind == "dsa":
            index_scores, keep = self._dsa_keep(x, cq, positions, segment_ids)
        elif a.sparse is not None:  # NSA over the latent, in the absorbed (one-group) form
            out = self._sparse(x, q_nope, q_rope, c_kv, kv[..., kc:], k_rope, wkv_b.gathered(), positions, segment_ids)
            return linear(checkpoint_name(out, "attn_out"), wo, n_in=2, fp8=c.fp8)
        if self.cache is not None and self.cache.kind == "latent":
            out = self._absorbed(q_nope, q_rope, c_kv, k_rope, wkv_b.gathered(), positions, keep)
            return linear(out, wo, n_in=2, fp8=c.fp8)
        kvb = constrain(linear(c_kv, wkv_b, fp8=c.fp8), *HEADS)
        k_nope, v = kvb[..., :p], kvb[..., p:]
        # per-head keys [k_nope | k_rope]: the rope key is shared by all heads
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], k_nope.shape[:3] + (r,))], -1)
        q = constrain(jnp.concatenate([q_nope, q_rope.astype(q_nope.dtype)], -1), *HEADS)
        if keep is not None and self.cache is None and self.is_mutable_collection(tree.INTERMEDIATES):
            self._sow_indexer_kl(q, k, index_scores, keep)
        if self.cache is None and (keep is None or a.sparse.topk >= x.shape[1]):
            # training / no cache: the blocked core with its recomputing backward (DSA with k >= t: the same)
            out = causal_attention(q, constrain(k, *HEADS), v, segment_ids, c.softmax_scale, ATTENTION_BLOCK)
        else:  # the expanded per-head keys and values (cached: every slot), masked
            if self.cache is not None:
                k = cache_update(self, "k", k, positions, self.cache)
                v = cache_update(self, "v", v, positions, self.cache)
                mask = cached_mask(positions, self.cache.size) & (True if keep is None else keep[:, None])
            else:
                mask = keep[:, None]
            scores = jnp.einsum("btnh,bsnh->bnts", q, k)
            probs = masked_softmax(scores * c.softmax_scale, mask, dt)
            out = jnp.einsum("bnts,bsnv->btnv", probs, v)
        out = checkpoint_name(constrain(out, *HEADS), "attn_out")
        return linear(out, wo, n_in=2, fp8=c.fp8)

    def _absorbed(self, q_nope, q_rope, c_kv, k_rope, wkv_b, positions, keep=None):
        """Attention against the latent cache ``[c_kv | k_rope]`` with ``W_UK``/``W_UV`` absorbed: ``[b, t, n, v]``.
        ``keep``: DSA's mask over the slots ``[b, t, S]``, or its top-k slots ``(indices, valid)`` ``[b, t, k]``."""
        c = self.cfg
        p, kc = c.attention.qk_nope_head_dim, c.attention.kv_lora_rank
        latent = cache_update(self, "kv", jnp.concatenate([c_kv, k_rope], -1), positions, self.cache)  # [b, S, c+r]
        dt = q_nope.dtype
        if self.has_variable(tree.DECODE, "w_uk"):  # laid out once for decoding (see absorbed_weights)
            w_uk, w_uv = (self.get_variable(tree.DECODE, k).astype(dt) for k in ("w_uk", "w_uv"))
        else:
            w = wkv_b.astype(dt)
            w_uk, w_uv = jnp.transpose(w[..., :p], (1, 2, 0)), jnp.transpose(w[..., p:], (1, 0, 2))
        q_lat = jnp.einsum("btnp,npc->btnc", q_nope, w_uk)
        q_cat = jnp.concatenate([q_lat, q_rope.astype(q_lat.dtype)], -1)
        if isinstance(keep, tuple):  # DSA: only the top-k slots' latent rows [b, t, k, c+r] are read
            def topk_rows(q, idx, valid):
                rows = jax.vmap(lambda lat, i: lat[i])(latent, idx)
                probs = masked_softmax(jnp.einsum("btkl,btnl->bntk", rows, q) * c.softmax_scale, valid[:, None], dt)
                return jnp.einsum("bntk,btkl->btnl", probs, rows)[..., :kc]
            o_lat = in_query_chunks(topk_rows, c.attention.sparse.chunk, q_cat, *keep)  # long prefills in chunks
            return constrain(jnp.einsum("btnc,ncv->btnv", o_lat, w_uv), *HEADS)
        # one product with the whole cache row [c_kv | k_rope] (slicing the cache would copy it every step)
        scores = jnp.einsum("bsl,btnl->bnts", latent, q_cat)
        mask = cached_mask(positions, self.cache.size) & (True if keep is None else keep[:, None])
        probs = masked_softmax(scores * c.softmax_scale, mask, q_nope.dtype)
        o_lat = jnp.einsum("bnts,bsl->btnl", probs, latent)[..., :kc]
        return constrain(jnp.einsum("btnc,ncv->btnv", o_lat, w_uv), *HEADS)

    def _sparse(self, x, q_nope, q_rope, c_kv, k_rope_raw, k_rope, wkv_b, positions, segment_ids):
        """NSA in the absorbed form: every head's query ``[q_nope W_UK ; q_rope]`` against the one latent key
        ``[c_kv ; k_rope]``, the latent ``c_kv`` as the value, then ``W_UV``: ``[b, t, n, v]``."""
        c = self.cfg
        p, r = c.attention.qk_nope_head_dim, c.attention.qk_rope_head_dim
        w = wkv_b.astype(q_nope.dtype)
        q_lat = jnp.einsum("btnp,cnp->btnc", q_nope, w[..., :p])
        q = constrain(jnp.concatenate([q_lat, q_rope.astype(q_lat.dtype)], -1), *HEADS)
        key = jnp.concatenate([c_kv, k_rope.astype(c_kv.dtype)], -1)[:, :, None]  # [b, t, 1, c + r]
        key_raw = jnp.concatenate([c_kv, k_rope_raw.astype(c_kv.dtype)], -1)[:, :, None]
        o_lat = NSA(c, rope_dim=r, shared_value=True, cache=self.cache, name="nsa")(
            x, q, key, key_raw, c_kv[:, :, None], positions, segment_ids)
        return constrain(jnp.einsum("btnc,cnv->btnv", o_lat, w[..., p:]), *HEADS)

    def _dsa_keep(self, x, cq, positions, segment_ids):
        """DSA: the indexer's scores of every key ``[b, t, s]`` (its inputs detached: the language-model loss
        never reaches it, its KL never reaches the model) and the ``topk`` visible keys each query keeps."""
        c = self.cfg
        scores = Indexer(c, self.cache, name="indexer")(jax.lax.stop_gradient(x), jax.lax.stop_gradient(cq), positions)
        ok = visible(segment_ids) if self.cache is None else cached_mask(positions, self.cache.size)[:, 0]
        k = c.attention.sparse.topk
        if self.cache is not None and self.cache.kind == "latent" and k < self.cache.size:
            return scores, topk_indices(scores, ok, k)  # decoding gathers the k latent rows it reads
        return scores, topk_mask(scores, ok, k)

    def _sow_indexer_kl(self, q, k, scores, keep):
        """``intermediates/indexer_kl``: the indexer's KL against the head-summed attention over the kept keys
        (the trainer adds ``train.dsa_kl_weight`` times their sum to the loss)."""
        logits = jnp.einsum("btnh,bsnh->bnts", q, k).astype(jnp.float32) * self.cfg.softmax_scale
        self.sow(tree.INTERMEDIATES, tree.INDEXER_KL, indexer_kl(masked_softmax(logits, keep[:, None], jnp.float32),
                                                              scores, keep))
