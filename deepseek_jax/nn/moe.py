"""DeepSeekMoE (DeepSeekMoE paper; V2 §2.2; V3 §2.1.2): shared experts plus fine-grained routed experts.

``y = shared(u) + sum_{i in TopK(u)} g_i FFN_i(u)`` for every token u, **dropless**. The router is here;
the routed experts' grouped GEMMs are :mod:`deepseek_jax.kernels.grouped_gemm` on one device and
:mod:`deepseek_jax.parallel.expert` (explicit all-to-all dispatch) on a mesh.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import MoEConfig, ModelConfig
from deepseek_jax.kernels.fp8 import quantize_weight
from deepseek_jax.kernels.grouped_gemm import routed_experts
from deepseek_jax.nn import tree
from deepseek_jax.nn.layers import MLP, linear, param
from deepseek_jax.parallel.expert import ep_routed_experts, local_expert_shards
from deepseek_jax.parallel.fsdp import fsdp_active

__all__ = ["route", "sequence_balance", "MoE"]


def route(logits: jax.Array, bias: jax.Array | None, moe: MoEConfig) -> tuple[jax.Array, jax.Array]:
    """Top-k routing. ``logits [n, e]`` float32 -> ``(weights [n, k] float32, experts [n, k] int32)``.

    The correction ``bias`` (V3) shifts the *selection* scores only; the returned weights are the
    unbiased scores (normalised when ``norm_topk_prob``), times ``routed_scaling_factor``.
    """
    r, e, k = moe.router, moe.n_routed_experts, moe.experts_per_token
    scores = jax.nn.sigmoid(logits) if r.scoring_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    choice = scores if bias is None else scores + bias.astype(jnp.float32)
    if r.topk_method != "greedy" and r.n_group > 1:
        grouped = choice.reshape(-1, r.n_group, e // r.n_group)
        if r.topk_method == "noaux_tc":
            group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)  # sum of each group's top-2
        else:
            group_score = grouped.max(-1)
        keep = jax.nn.one_hot(jax.lax.top_k(group_score, r.topk_group)[1], r.n_group, dtype=bool).any(-2)
        choice = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(-1, e)
    experts = jax.lax.top_k(choice, k)[1]
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if r.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * r.routed_scaling_factor, experts.astype(jnp.int32)


def sequence_balance(logits: jax.Array, experts: jax.Array, moe: MoEConfig) -> jax.Array:
    """DeepSeek-V3's sequence-wise balance term ``sum_i f_i P_i`` (eqs. 17-20), averaged over sequences.

    ``logits [b, t, e]`` router logits, ``experts [b, t, k]`` the selected ids. ``f_i = e / (k t) *
    #{t: i in TopK_t}`` and ``P_i = mean_t s'_{i,t}`` with ``s'`` the scores normalised over all experts.
    Multiply by ``alpha`` for the loss. Equals 1 under perfect balance and uniform scores.
    """
    e, k = logits.shape[-1], experts.shape[-1]
    t = logits.shape[1]
    s = jax.nn.sigmoid(logits) if moe.router.scoring_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    p = (s / s.sum(-1, keepdims=True)).mean(1)  # [b, e]
    counts = jax.nn.one_hot(experts, e, dtype=jnp.float32).sum((1, 2))  # [b, e]
    f = jax.lax.stop_gradient(counts * e / (k * t))
    return jnp.mean(jnp.sum(f * p, axis=-1))


class MoE(nn.Module):
    """DeepSeekMoE layer: ``x [b, t, d] -> (y [b, t, d], expert load [e] float32)``.

    Parameters: router ``kernel [d, e]``; routed experts ``w1, w3 [e, d, f]``, ``w2 [e, f, d]``;
    ``shared`` SwiGLU MLP of width ``n_shared_experts * f``. The V3 correction bias lives in the
    non-trainable collection ``"router"`` (``e_score_correction_bias [e]``), not in ``"params"``.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        c = self.cfg
        m, pd, dt, std = c.moe, jnp.dtype(c.param_dtype), x.dtype, c.init_std
        e, f = m.n_routed_experts, m.moe_intermediate_size
        b, t, d = x.shape
        kernel = param(self, tree.ROUTER_WEIGHT, (d, e), ("embed", "exp"), std, pd, gather=False)
        bias = None
        if m.router.topk_method == "noaux_tc":
            bias = self.variable(tree.ROUTER, tree.ROUTER_BIAS,
                                 nn.with_logical_partitioning(lambda: jnp.zeros((e,), jnp.float32), ("exp",))).value
        xf = x.reshape(b * t, d)
        logits = linear(xf.astype(jnp.float32), kernel.astype(jnp.float32))
        weights, experts = route(logits, bias, m)
        self.sow(tree.INTERMEDIATES, tree.BALANCE, sequence_balance(logits.reshape(b, t, e), experts.reshape(b, t, -1), m))
        el = e // local_expert_shards()  # per device inside a region manual over ``expert`` (the pipeline)
        w1, w3, w2 = (param(self, name, shape, names, std, pd, gather=False).astype(dt) for name, shape, names in (
            ("w1", (el, d, f), ("exp", "embed", "mlp_moe")), ("w3", (el, d, f), ("exp", "embed", "mlp_moe")),
            ("w2", (el, f, d), ("exp", "mlp_moe", "embed"))))
        sharded = c.fp8 is None and fsdp_active()  # gathered inside the dispatch (reduce-scattered gradients)
        w1, w3, w2 = (w.value if sharded else w.gathered() for w in (w1, w3, w2))
        if c.fp8 is not None:  # one 128x128-block grid per expert, straight-through to the master weights
            w1, w3, w2 = (quantize_weight(w, c.fp8.scale_fmt) for w in (w1, w3, w2))
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            y = routed_experts(xf, weights, experts, w1, w3, w2, fp8=c.fp8)
        else:  # explicit dispatch over the mesh's expert axis (shard_map)
            y, dropped, dispatched = ep_routed_experts(xf, weights, experts, w1, w3, w2, mesh, m.capacity_factor, c.fp8,
                                                       fsdp=sharded)
            self.sow(tree.INTERMEDIATES, tree.DROPPED_ROWS, dropped)
            self.sow(tree.INTERMEDIATES, tree.DISPATCHED_ROWS, dispatched)
        y = y.reshape(b, t, d)
        if m.n_shared_experts:
            y = y + MLP(c, m.n_shared_experts * f, name=tree.SHARED)(x)
        load = jnp.bincount(experts.reshape(-1), length=e).astype(jnp.float32)
        return y, load
