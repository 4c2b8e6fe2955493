"""KV caches of the attention layers (inference): their configuration, the write of new entries at their
positions, and the mask over cached slots. The caches are the ``"cache"`` collection of the model;
:mod:`deepseek_jax.infer.cache` allocates and places them."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.kernels import fp8
from deepseek_jax.nn import tree

__all__ = ["CacheConfig", "cache_update", "cached_mask"]


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """A KV cache of ``size`` positions per sequence (inference; see :mod:`deepseek_jax.infer`).

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


def cache_update(module: nn.Module, name: str, new: jax.Array, positions: jax.Array, cache: CacheConfig) -> jax.Array:
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
        var = module.variable(tree.CACHE, name, jnp.zeros, (b, cache.size) + feat, jnp.dtype(cache.dtype))
        return write(var, new).astype(new.dtype)
    flat = new.reshape(b, t, -1)
    k = flat.shape[-1]
    q, sc = fp8.quantize(flat, (1, 128), nonfinite="propagate")
    qv = module.variable(tree.CACHE, name, jnp.zeros, (b, cache.size, k), fp8.E4M3)
    sv = module.variable(tree.CACHE, name + "_scale", jnp.zeros, (b, cache.size, sc.shape[-1]), jnp.float32)
    full = fp8.dequantize(write(qv, q), write(sv, sc), (1, 128))
    return full.reshape((b, cache.size) + feat).astype(new.dtype)


def cached_mask(positions: jax.Array, size: int) -> jax.Array:
    """``[b, 1, t, size]``: a query at position p sees slots 0..p (every one of them written by then)."""
    return (jnp.arange(size)[None, None, :] <= positions[:, :, None])[:, None]
