"""One decoder block, its scanned stacks, the multi-token-prediction module, and the recomputation policies.

Pre-norm blocks (V3 §2.1)::

    x = x + Attention(RMSNorm(x))          MLA (V2/V3) or MHA/GQA (DeepSeek LLM)
    x = x + FFN(RMSNorm(x))                dense SwiGLU for the first ``first_k_dense_replace`` layers, then MoE

Repeated layers are ``nn.scan`` stacks (:func:`layer_stack`), so a 61- or 95-layer preset traces one layer
per stack; their parameters carry a leading ``layers`` axis.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.nn import tree
from deepseek_jax.nn.attention import CacheConfig, make_attention
from deepseek_jax.nn.layers import MLP, RMSNorm, linear, param
from deepseek_jax.nn.moe import MoE
from deepseek_jax.parallel.rules import constrain

__all__ = ["ACT", "REMAT_POLICIES", "DEEPSEEK_SAVED", "remat_policy", "DecoderLayer", "MTPModule", "layer_cls",
           "scan_unroll", "layer_stack", "LayerList"]


class DecoderLayer(nn.Module):
    """One pre-norm block: ``(x [b, t, d], positions [b, t], segment_ids [b, t]) -> (x, load [e] | None)``."""

    cfg: ModelConfig
    moe: bool
    cache: CacheConfig | None = None

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        c, pd = self.cfg, jnp.dtype(self.cfg.param_dtype)
        h = RMSNorm(c.d_model, c.rms_norm_eps, pd, name="attn_norm")(x)
        x = x + make_attention(c, "attn", self.cache)(h, positions, segment_ids)
        h = RMSNorm(c.d_model, c.rms_norm_eps, pd, name="ffn_norm")(x)
        if self.moe:
            y, load = MoE(c, name=tree.FFN)(h)
        else:
            y, load = MLP(c, c.intermediate_size, name=tree.FFN)(h), None
        return constrain(x + y, *ACT), load


ACT = ("act_batch", "act_length", "act_embed")  # [b, t, d] activations


REMAT_POLICIES = ("none", "full", "deepseek")

# Values the "deepseek" policy keeps for the backward pass; everything else in a layer (RMSNorm outputs,
# the MLA up-projections q = c_q W_uq and [k_nope|v] = c_kv W_ukv, the attention core, the SwiGLU
# activation) is recomputed, as DeepSeek-V3 §3.2.3 / §3.3.3 describe.
DEEPSEEK_SAVED = ("c_q", "c_kv", "attn_out", "q_proj", "k_proj", "v_proj", "mlp_in", "swiglu_in", "expert_out")


def remat_policy(name: str):
    """``jax.checkpoint`` policy for ``"full"`` (save nothing) or ``"deepseek"``; ``None`` for ``"none"``."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={name!r} must be one of {REMAT_POLICIES}")
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "deepseek":
        return jax.checkpoint_policies.save_only_these_names(*DEEPSEEK_SAVED)
    return None


def layer_cls(remat: str):
    if remat == "none":
        return DecoderLayer
    return nn.remat(DecoderLayer, policy=remat_policy(remat), prevent_cse=False)


def scan_unroll(unroll: int, length: int, remat: str = "none") -> int:
    """Layers per scan iteration: ``unroll`` (>= 1), or for 0 ("auto") the whole stack when it has at most
    8 layers and nothing is recomputed (XLA:CPU runs an unrolled stack ~25% faster; with recomputation,
    one layer per iteration keeps XLA from merging the recomputed values back into the forward pass)."""
    if unroll < 0:
        raise ValueError(f"scan_unroll={unroll} must be >= 0 (0 = auto)")
    auto = length if (length <= 8 and remat == "none") else 1
    return max(1, min(unroll or auto, length))


class LayerList(nn.Module):
    """``length`` decoder layers as separate modules ``layer_0 ..`` (the unstacked layout of
    :func:`~deepseek_jax.nn.tree.unstack_layers`, for decoding): same call and result as the scanned stack,
    ``(x, loads [length, e] | None)``."""

    cfg: ModelConfig
    moe: bool
    length: int
    cache: CacheConfig | None = None

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        loads = []
        for i in range(self.length):
            x, load = DecoderLayer(self.cfg, self.moe, self.cache, name=tree.layer_name(i))(x, positions, segment_ids)
            loads.append(load)
        return x, (jnp.stack(loads) if self.moe else None)


def layer_stack(cfg: ModelConfig, moe: bool, length: int, name: str, remat: str = "none",
                unroll: int = 0, cache: CacheConfig | None = None, stacked: bool = True) -> nn.Module:
    """The ``length`` layers of one stack: an ``nn.scan`` over stacked parameters, or (``stacked=False``,
    decoding) a :class:`LayerList`."""
    if not stacked:
        return LayerList(cfg, moe, length, cache, name=name)
    scanned = nn.scan(
        layer_cls(remat),
        variable_axes={tree.PARAMS: 0, tree.ROUTER: 0, tree.INTERMEDIATES: 0, tree.FP8_SCALE: 0, tree.CACHE: 0},
        split_rngs={tree.PARAMS: True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=length,
        unroll=scan_unroll(unroll, length, remat),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(cfg, moe, cache, name=name)


class MTPModule(nn.Module):
    """MTP depth k: ``(h_prev [b, t, d], emb_next [b, t, d]) -> (h, RMSNorm_k(h), load)``; the normed
    output feeds the shared head (HF ``shared_head.norm``)."""

    cfg: ModelConfig
    remat: str = "none"
    cache: CacheConfig | None = None

    @nn.compact
    def __call__(self, h_prev, emb_next, positions, segment_ids):
        c, pd = self.cfg, jnp.dtype(self.cfg.param_dtype)
        e = RMSNorm(c.d_model, c.rms_norm_eps, pd, name="enorm")(emb_next)
        h = RMSNorm(c.d_model, c.rms_norm_eps, pd, name="hnorm")(h_prev)
        w = param(self, "eh_proj", (2 * c.d_model, c.d_model), ("mtp_concat", "embed"), c.init_std, pd, gather=False)
        x = linear(jnp.concatenate([e, h], axis=-1), w, fp8=c.fp8)
        h, load = layer_cls(self.remat)(c, c.moe is not None, self.cache, name=tree.MTP_LAYER)(x, positions, segment_ids)
        return h, RMSNorm(c.d_model, c.rms_norm_eps, pd, name=tree.FINAL_NORM)(h), load
