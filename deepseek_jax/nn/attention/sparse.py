"""Sparse attention inside an attention layer. NSA: its parameters (the compression MLP phi with its intra-block
position encoding, the gate projection) around :func:`deepseek_jax.kernels.nsa.nsa_attention`; DSA: the
lightning indexer whose top-k mask MLA applies (:class:`Indexer`).

GQA calls it with its per-group keys and values; MLA with its absorbed form, where every head attends to the
one latent key ``[c_kv ; k_rope]`` and reads the latent ``c_kv`` as its value (one group, ``long-context.md``
§3). The compressed key is pooled from the keys *before* RoPE and its rotary part is rotated at the position
of its block's first token (the document-relative position under packing), so a query at ``t`` sees the
block at relative distance ``t - i d``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.kernels.dsa import indexer_scores
from deepseek_jax.kernels.nsa import (block_tokens, compress_mean, compress_mlp, compressed_blocks, new_blocks,
                                     nsa_attention, nsa_decode)
from deepseek_jax.nn import tree
from deepseek_jax.nn.attention.cache import CacheConfig, cache_update
from deepseek_jax.nn.attention.common import in_query_chunks
from deepseek_jax.nn.layers import param
from deepseek_jax.nn.rope import apply_rope

__all__ = ["NSA", "Indexer"]


class NSA(nn.Module):
    """NSA's three gated branches for one layer (config: ``attention.sparse``).

    ``__call__(x, q, k, k_raw, v, positions, segment_ids) -> [b, t, h, Dv]`` with ``x [b, t, d]`` (the gates'
    input), rotated queries ``q [b, t, h, D]``, rotated keys ``k [b, t, g, D]`` and the same keys before RoPE
    ``k_raw``, values ``v [b, t, g, Dv]``. The last ``rope_dim`` key dims are rotary. ``shared_value``: the
    values are the first ``Dv`` key dims (MLA's latent) and one phi compresses both.

    With a ``cache`` (decoding, one document per row) it keeps its own: the rotated keys ``k``, the values
    ``v`` (not with ``shared_value``), the unrotated rotary dims ``k_rope_raw`` (what compression pools), and
    the compressed blocks ``kc``, ``vc`` ``[b, compressed_blocks(size), g, D]``, each block written by the
    call whose tokens complete it; :func:`~deepseek_jax.kernels.nsa.nsa_decode` then reads the compressed
    keys, the selected blocks and the window.
    """

    cfg: ModelConfig
    rope_dim: int
    shared_value: bool = False
    cache: CacheConfig | None = None

    @nn.compact
    def __call__(self, x, q, k, k_raw, v, positions, segment_ids):
        c, s = self.cfg, self.cfg.attention.sparse
        pd = jnp.dtype(c.param_dtype)
        h = q.shape[2]
        w_gate = param(self, "w_gate", (c.d_model, h, 3), ("embed", "heads", None), c.init_std, pd)
        b_gate = self.param("b_gate", nn.with_logical_partitioning(
            lambda _, shp, dt: jnp.broadcast_to(jnp.asarray(s.gate_bias, dt), shp), ("heads", None)), (h, 3), pd)
        gates = jax.nn.sigmoid(jnp.einsum("btd,dhc->bthc", x, w_gate.astype(x.dtype)) + b_gate.astype(x.dtype))
        if self.cache is not None:
            return self._decode(q, k, k_raw, v, gates, positions)
        compress = self._compressor(k.shape[-1], v.shape[-1])
        kc, vc = compress(block_tokens(k_raw, s.shape), block_tokens(v, s.shape),
                          block_tokens(positions, s.shape)[:, :, 0])
        return nsa_attention(q, k, v, kc.astype(k.dtype), vc.astype(v.dtype), gates, segment_ids, positions,
                             c.softmax_scale, s.shape, s.impl, s.chunk)

    def _compressor(self, dk: int, dv: int):
        """Creates (or reads) phi's parameters and returns the pure ``(k_blocks [b, m, l, g, dk], v_blocks,
        starts [b, m]) -> (compressed keys, rotary part rotated at starts; compressed values)``."""
        phi_k = self._phi("k", dk)
        phi_v = None if self.shared_value else self._phi("v", dv)
        nope, rope = dk - self.rope_dim, self.cfg.rope

        def compress(k_blocks, v_blocks, starts):
            kc = phi_k(k_blocks)
            vc = kc[..., :dv] if self.shared_value else phi_v(v_blocks)
            return jnp.concatenate([kc[..., :nope], apply_rope(kc[..., nope:], starts, rope)], -1), vc
        return compress

    def _decode(self, q, k, k_raw, v, gates, positions):
        c, s, cc = self.cfg, self.cfg.attention.sparse, self.cache
        if cc.dtype == "fp8":
            raise ValueError("attention.sparse caches are float (cache_dtype='fp8' is for dense attention)")
        nope = k.shape[-1] - self.rope_dim
        k_all = cache_update(self, "k", k, positions, cc)
        v_all = k_all[..., :v.shape[-1]] if self.shared_value else cache_update(self, "v", v, positions, cc)
        rope_raw = cache_update(self, "k_rope_raw", k_raw[..., nope:], positions, cc)
        b, nb, l = k.shape[0], compressed_blocks(cc.size, s.shape), s.cmp_block
        idx, new = new_blocks(positions, nb, s.shape)  # [b, m]
        tok = jnp.minimum(idx[..., None] * s.cmp_stride + jnp.arange(l), cc.size - 1)  # [b, m, l]
        compress = self._compressor(k.shape[-1], v.shape[-1])

        def completed():  # the rows gathered, then sliced: never a copy of a whole cache
            rows_of = lambda x: jax.vmap(lambda x, i: x[i])(x, tok)  # noqa: E731
            raw = jnp.concatenate([rows_of(k_all)[..., :nope], rows_of(rope_raw)], -1)
            return compress(raw, rows_of(v_all), idx * s.cmp_stride)

        # a block completes every cmp_stride tokens: phi (l x D x hidden weights, the step's largest read) runs
        # only in the steps that complete one
        shapes = jax.eval_shape(completed)
        kc_new, vc_new = jax.lax.cond(new.any(), completed,
                                      lambda: tuple(jnp.zeros(x.shape, x.dtype) for x in shapes))
        rows = jnp.arange(b)[:, None]
        slot = jnp.where(new, idx, nb)  # out of range: dropped

        def write(name, val):
            var = self.variable(tree.CACHE, name, jnp.zeros, (b, nb) + val.shape[2:], jnp.dtype(cc.dtype))
            var.value = var.value.at[rows, slot].set(val.astype(var.value.dtype), mode="drop")
            return var.value.astype(k.dtype)

        kc_all = write("kc", kc_new)
        vc_all = kc_all[..., :v.shape[-1]] if self.shared_value else write("vc", vc_new)
        # a long prefill in chunks of `chunk` queries (each gathers [b, g, chunk, n, l', D] blocks); the caches
        # already hold every new token
        return in_query_chunks(lambda q, g, p: nsa_decode(q, k_all, v_all, kc_all, vc_all, g, p, c.softmax_scale,
                                                          s.shape), s.chunk, q, gates, positions)

    def _phi(self, name: str, d: int):
        """Phi's parameters for width ``d`` and the pure ``blocks [b, nb, l, g, d] -> [b, nb, g, d]`` (the MLP,
        ``compress: mlp``, or the mean)."""
        s = self.cfg.attention.sparse
        if s.compress == "mean":
            return compress_mean
        l, hid = s.cmp_block, s.compress_hidden or d
        pd = jnp.dtype(self.cfg.param_dtype)
        pos = param(self, f"phi_{name}_pos", (l, d), (None, "nsa_feature"), self.cfg.init_std, pd)
        w1 = param(self, f"phi_{name}_w1", (l * d, hid), ("nsa_in", None), (l * d) ** -0.5, pd)
        w2 = param(self, f"phi_{name}_w2", (hid, d), ("nsa_hidden", None), hid ** -0.5, pd)
        return lambda blocks: compress_mlp(blocks, *(w.astype(blocks.dtype) for w in (pos, w1, w2)))


class LayerNorm(nn.Module):
    """LayerNorm with a bias, in float32 (V3.2's indexer ``k_norm``); the name ends in ``norm``: no weight decay."""

    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, k):
        d = k.shape[-1]
        scale = param(self, "scale", (d,), ("norm",), None, self.param_dtype)
        zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("norm",))
        bias = self.param("bias", zeros, (d,), self.param_dtype)
        kf = k.astype(jnp.float32)
        mu = kf.mean(-1, keepdims=True)
        var = jnp.square(kf - mu).mean(-1, keepdims=True)
        return ((kf - mu) * jax.lax.rsqrt(var + 1e-6) * scale + bias).astype(k.dtype)


class Indexer(nn.Module):
    """DSA's lightning indexer (DeepSeek-V3.2): ``I [b, t, s]`` for queries ``t`` against every key slot ``s``.

    ``q_I = cq W_q [b, t, H, d_I]`` from the q-LoRA latent, one key per token ``k_I = LayerNorm(x W_k)``, head
    weights ``w = x W_w H^-1/2 d_I^-1/2``; RoPE on the first ``qk_rope_head_dim`` dims of both ([rope, nope]
    order). With a ``cache`` the keys are cached (``[b, size, d_I]``) and ``s`` runs over the slots.
    """

    cfg: ModelConfig
    cache: CacheConfig | None = None

    @nn.compact
    def __call__(self, x, cq, positions):
        c, s = self.cfg, self.cfg.attention.sparse
        pd, std = jnp.dtype(c.param_dtype), c.init_std
        h, d, r = s.index_heads, s.index_head_dim, c.attention.qk_rope_head_dim
        wq = param(self, "wq", (c.attention.q_lora_rank, h, d), ("q_latent", None, None), std, pd)
        wk = param(self, "wk", (c.d_model, d), ("embed", None), std, pd)
        ww = param(self, "w_weights", (c.d_model, h), ("embed", None), std, pd)
        q = jnp.einsum("btq,qhd->bthd", cq, wq.astype(cq.dtype))
        k = LayerNorm(pd, name="k_norm")(x @ wk.astype(x.dtype))
        q = jnp.concatenate([apply_rope(q[..., :r], positions, c.rope), q[..., r:]], -1)
        k = jnp.concatenate([apply_rope(k[..., :r], positions, c.rope), k[..., r:]], -1)
        if self.cache is not None:
            k = cache_update(self, "k", k, positions, self.cache)
        w = (x @ ww.astype(x.dtype)) * (h ** -0.5 * d ** -0.5)
        return indexer_scores(q, k, w)

