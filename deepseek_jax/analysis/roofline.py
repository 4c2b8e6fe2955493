"""Rooflines: what this machine can move and multiply, and what a decode step or a training step must.

* :func:`memory_bandwidth`: bytes/s of a jitted streaming read (a sum over a 256 MiB float32 array), the
  limit of decoding, which reads every weight it uses once per step.
* :func:`~deepseek_jax.analysis.params.peak_flops`: the float32 matmul peak, the limit of training.
* :func:`decode_bytes`: bytes one decode step reads: every main-model weight except the routed experts
  and the input embedding table, the routed experts the batch's tokens select (``e (1 - (1 - k/e)^b)``
  distinct experts per MoE layer expected under uniform routing), one embedding row per sequence, and each
  sequence's KV cache up to its context. Per generated token: divided by the batch.

A figure's fraction of its roofline is ``achieved / limit``: decode ``tokens/s x bytes per token /
bandwidth``, training ``tokens/s x FLOPs per token / peak``.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.analysis.params import best_seconds, kv_cache_elements_per_token_per_layer
from deepseek_jax.config import ModelConfig
from deepseek_jax.nn import tree
from deepseek_jax.nn.transformer import abstract_variables

__all__ = ["memory_bandwidth", "expected_distinct_experts", "decode_bytes"]


def memory_bandwidth(mib: int = 256, reps: int = 7) -> float:
    """Bytes/s of the best of ``reps`` jitted sums over a ``mib`` MiB float32 array (on the default device)."""
    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    return x.nbytes / best_seconds(jax.jit(jnp.sum), x, reps=reps)


def expected_distinct_experts(experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts ``tokens`` tokens select, each picking ``top_k`` of ``experts`` uniformly at
    random: ``e (1 - (1 - k/e)^n)`` (an expert is missed by one token with probability ``1 - k/e``)."""
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


@functools.lru_cache(maxsize=64)
def decode_bytes(cfg: ModelConfig, batch: int, context: int, cache_itemsize: int | None = None) -> dict:
    """Bytes one decode step of ``batch`` sequences at ``context`` cached positions reads (see the module
    docstring): ``{"weights", "kv_cache", "per_step", "per_token"}``. Weights in their parameter dtype, the cache
    in ``cache_itemsize`` bytes per value (default: the compute dtype's). MTP modules are not counted (plain
    decoding does not run them)."""
    params = nn.meta.unbox(abstract_variables(cfg))[tree.PARAMS]
    used = 1.0
    if cfg.moe is not None:
        used = expected_distinct_experts(cfg.moe.n_routed_experts, cfg.moe.experts_per_token, batch) / cfg.moe.n_routed_experts
    weights = 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if tree.is_mtp(tree.keys(path)[0]):
            continue
        nbytes = math.prod(leaf.shape) * leaf.dtype.itemsize
        if tree.is_embedding(path) and not cfg.tie_embeddings:
            nbytes = batch * cfg.d_model * leaf.dtype.itemsize  # one row per sequence
        elif cfg.moe is not None and tree.is_routed_expert(path):
            nbytes *= used
        weights += nbytes
    itemsize = cache_itemsize or jnp.dtype(cfg.dtype).itemsize
    cache = float(batch * context * kv_cache_elements_per_token_per_layer(cfg) * cfg.n_layers * itemsize)
    return {"weights": weights, "kv_cache": cache, "per_step": weights + cache, "per_token": (weights + cache) / batch}
