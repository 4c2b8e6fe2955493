"""Native Sparse Attention inside an attention layer: NSA's parameters (the compression MLP phi with its
intra-block position encoding, the gate projection) around :func:`deepseek_jax.kernels.nsa.nsa_attention`.

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
from deepseek_jax.kernels.nsa import block_tokens, compress_mean, compress_mlp, nsa_attention
from deepseek_jax.nn.layers import param
from deepseek_jax.nn.rope import apply_rope

__all__ = ["NSA", "check_sparse_without_cache"]


def check_sparse_without_cache(cache) -> None:
    """Sparse attention runs on whole sequences (training, teacher-forced evaluation) for now."""
    if cache is not None:
        raise NotImplementedError("attention.sparse has no KV-cache decoding yet: train and evaluate it with "
                                  "whole-sequence forwards (eval niah --scoring argmax), or drop attention.sparse")


class NSA(nn.Module):
    """NSA's three gated branches for one layer (config: ``attention.sparse``).

    ``__call__(x, q, k, k_raw, v, positions, segment_ids) -> [b, t, h, Dv]`` with ``x [b, t, d]`` (the gates'
    input), rotated queries ``q [b, t, h, D]``, rotated keys ``k [b, t, g, D]`` and the same keys before RoPE
    ``k_raw``, values ``v [b, t, g, Dv]``. The last ``rope_dim`` key dims are rotary. ``shared_value``: the
    values are the first ``Dv`` key dims (MLA's latent) and one phi compresses both.
    """

    cfg: ModelConfig
    rope_dim: int
    shared_value: bool = False

    @nn.compact
    def __call__(self, x, q, k, k_raw, v, positions, segment_ids):
        c, s = self.cfg, self.cfg.attention.sparse
        shape, h, dv = s.shape, q.shape[2], v.shape[-1]
        kc = self._compress("k", block_tokens(k_raw, shape))
        vc = kc[..., :dv] if self.shared_value else self._compress("v", block_tokens(v, shape))
        starts = block_tokens(positions, shape)[:, :, 0]  # [b, nb]: each block's first position
        r = self.rope_dim
        kc = jnp.concatenate([kc[..., :kc.shape[-1] - r], apply_rope(kc[..., kc.shape[-1] - r:], starts, c.rope)], -1)
        pd = jnp.dtype(c.param_dtype)
        w_gate = param(self, "w_gate", (c.d_model, h, 3), ("embed", "heads", None), c.init_std, pd)
        b_gate = self.param("b_gate", nn.with_logical_partitioning(
            lambda _, shp, dt: jnp.broadcast_to(jnp.asarray(s.gate_bias, dt), shp), ("heads", None)), (h, 3), pd)
        gates = jax.nn.sigmoid(jnp.einsum("btd,dhc->bthc", x, w_gate.astype(x.dtype)) + b_gate.astype(x.dtype))
        return nsa_attention(q, k, v, kc.astype(k.dtype), vc.astype(v.dtype), gates, segment_ids, positions,
                             c.softmax_scale, shape, s.impl, s.chunk)

    def _compress(self, name: str, blocks: jax.Array) -> jax.Array:
        """``blocks [b, nb, l, g, D] -> [b, nb, g, D]`` by phi (``compress: mlp``) or the mean."""
        s = self.cfg.attention.sparse
        if s.compress == "mean":
            return compress_mean(blocks)
        l, d = blocks.shape[2], blocks.shape[-1]
        hid = s.compress_hidden or d
        pd = jnp.dtype(self.cfg.param_dtype)
        pos = param(self, f"phi_{name}_pos", (l, d), (None, None), self.cfg.init_std, pd)
        w1 = param(self, f"phi_{name}_w1", (l * d, hid), (None, None), (l * d) ** -0.5, pd)
        w2 = param(self, f"phi_{name}_w2", (hid, d), (None, None), hid ** -0.5, pd)
        dt = blocks.dtype
        return compress_mlp(blocks, pos.astype(dt), w1.astype(dt), w2.astype(dt))
