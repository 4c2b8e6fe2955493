"""KV caches as arrays: allocated for a batch and a length, placed on a mesh by the rules table, measured.

The caches are the ``"cache"`` collection of :class:`~deepseek_jax.nn.transformer.Transformer` (ordinary
pytrees). For MLA the ``"latent"`` cache holds ``[RMSNorm(c_kv) | RoPE(k_pe)]`` per token and layer
(``kv_lora_rank + qk_rope_head_dim`` values); ``"naive"`` caches the expanded per-head keys and values;
``dtype="fp8"`` stores E4M3 with a float32 scale per 1x128 tile.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from deepseek_jax.config import ModelConfig
from deepseek_jax.nn import tree
from deepseek_jax.nn.attention import CacheConfig
from deepseek_jax.nn.transformer import Transformer, abstract_variables
from deepseek_jax.parallel.rules import named_sharding

__all__ = ["cache_config", "cache_axes", "init_cache", "cache_bytes_per_token"]


def cache_config(cfg: ModelConfig, size: int, kind: str = "latent", dtype: str | None = None) -> CacheConfig:
    """A :class:`CacheConfig` of ``size`` positions; ``dtype`` defaults to the model's compute dtype."""
    return CacheConfig(size=size, kind=kind, dtype=dtype or cfg.dtype)


def cache_axes(path, shape: tuple[int, ...]) -> tuple[str | None, ...]:
    """Logical axes of a cache leaf of ``shape``: ``[layers,] cache_batch, cache_length, ...``; per-head K/V
    caches (``[b, s, heads, h]``) put their head dim on ``cache_heads``, unless it is one (NSA's latent)."""
    ndim = len(shape)
    lead = 1 if tree.is_stacked(path) else 0
    names: list[str | None] = [None] * lead + ["cache_batch", "cache_length"] + ["cache_feature"] * (ndim - lead - 2)
    if ndim == lead + 4 and shape[lead + 2] > 1:
        names[lead + 2] = "cache_heads"
    return tuple(names)


@functools.lru_cache(maxsize=32)
def _cache_shapes(cfg: ModelConfig, batch: int, cc: CacheConfig, stacked: bool):
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    variables = nn.meta.unbox(abstract_variables(cfg))
    if not stacked:
        variables = jax.eval_shape(tree.unstack_layers, variables)

    def run(v, t):
        out = Transformer(cfg, cache=cc, stacked=stacked).apply(v, t, jnp.zeros(t.shape, jnp.int32),
                                                                mutable=[tree.CACHE])
        return out[1][tree.CACHE]

    return jax.eval_shape(run, variables, tokens)


def init_cache(cfg: ModelConfig, batch: int, size: int, kind: str = "latent", dtype: str | None = None,
               mesh: Mesh | None = None, stacked: bool = True) -> dict:
    """A zero cache for ``batch`` sequences of up to ``size`` positions (main model and MTP modules).

    ``kind``: ``"latent"`` or ``"naive"`` (MLA); ``dtype``: storage dtype (default ``cfg.dtype``) or ``"fp8"``.
    With a ``mesh`` the cache is born sharded: the batch like activations, per-head K/V heads over ``tensor``.
    ``stacked=False``: one array per layer, for ``Transformer(cfg, stacked=False)`` (what ``generate`` runs).
    """
    shapes = _cache_shapes(cfg, batch, cache_config(cfg, size, kind, dtype), stacked)

    def zeros():
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    if mesh is None:
        return zeros()
    shardings = jax.tree_util.tree_map_with_path(lambda p, s: named_sharding(mesh, cache_axes(p, s.shape)),
                                                 shapes)
    return jax.jit(zeros, out_shardings=shardings)()


def cache_bytes_per_token(cache: dict, include_mtp: bool = False) -> float:
    """Bytes the cache arrays hold per (sequence, position), over every layer of the main model (and the
    MTP modules when ``include_mtp``), measured from the arrays."""
    total, per = 0, 0
    for path, x in jax.tree_util.tree_flatten_with_path(cache)[0]:
        if tree.is_mtp(tree.keys(path)[0]) and not include_mtp:
            continue
        lead = 1 if tree.is_stacked(path) else 0
        per = max(per, x.shape[lead] * x.shape[lead + 1])  # sequences x positions (NSA's block caches are shorter)
        total += x.size * x.dtype.itemsize
    return total / per if per else 0.0
