"""Where the model's variables live on a mesh: their shardings from the rules table, the checks that a layout
can work, and placing or initialising variables directly in that layout."""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from deepseek_jax.config import ModelConfig
from deepseek_jax.nn.transformer import Transformer, abstract_variables
from deepseek_jax.parallel.mesh import BATCH_AXES, describe
from deepseek_jax.parallel.rules import RULES, logical_spec

__all__ = ["logical_tree", "param_shardings", "check_layout", "shard_variables", "init_tokens", "init_unboxed",
           "init_sharded"]


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


@functools.lru_cache(maxsize=16)
def logical_tree(cfg: ModelConfig) -> Any:
    """Shapes and logical axes of every variable (cached: ``forward(mesh=)`` asks on every call)."""
    return abstract_variables(cfg)


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Any:
    """A ``NamedSharding`` for every variable (plain-array tree, like ``init_variables`` returns)."""
    return jax.tree_util.tree_map(lambda b: NamedSharding(mesh, logical_spec(b.names)), logical_tree(cfg),
                                  is_leaf=_is_box)


def check_layout(cfg: ModelConfig, mesh: Mesh, global_batch: int | None = None) -> None:
    """Raise ``ValueError`` naming the field and the mesh for layouts that cannot work."""
    s = dict(mesh.shape)
    desc = describe(s)
    a = cfg.attention
    if cfg.moe is not None and cfg.moe.n_routed_experts % s["expert"]:
        raise ValueError(f"moe.n_routed_experts={cfg.moe.n_routed_experts} is not divisible by the mesh's "
                         f"expert={s['expert']} (mesh {desc})")
    if a.n_heads % s["tensor"] or a.kv_heads % s["tensor"]:
        raise ValueError(f"attention.n_heads={a.n_heads} (kv heads {a.kv_heads}) is not divisible by the mesh's "
                         f"tensor={s['tensor']} (mesh {desc})")
    n_batch = math.prod(s[x] for x in BATCH_AXES)
    if global_batch is not None and global_batch % n_batch:
        raise ValueError(f"global batch {global_batch} is not divisible by data*fsdp*expert={n_batch} (mesh {desc})")
    if cfg.moe is not None and s["expert"] > 1 and cfg.moe.router.n_group > 1:
        g = cfg.moe.router.n_group
        if g % s["expert"] and s["expert"] % g:
            raise ValueError(f"moe.router.n_group={g} does not map onto expert={s['expert']} shards: node-limited "
                             f"routing needs n_group to be a multiple or a divisor of the expert axis (mesh {desc})")
    for path, b in jax.tree_util.tree_flatten_with_path(logical_tree(cfg), is_leaf=_is_box)[0]:
        for dim, name in zip(b.value.shape, b.names):
            axes = RULES.get(name)
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            size = math.prod(s[x] for x in axes)
            if dim % size:
                raise ValueError(f"{jax.tree_util.keystr(path)} dimension {name!r}={dim} is not divisible by "
                                 f"{'*'.join(axes)}={size} (mesh {desc})")


def shard_variables(cfg: ModelConfig, variables: Any, mesh: Mesh) -> Any:
    """Place ``variables`` (plain arrays) on ``mesh`` by the rules table."""
    check_layout(cfg, mesh)
    return jax.device_put(nn.meta.unbox(variables), param_shardings(cfg, mesh))


def init_tokens(mesh: Mesh | None = None) -> np.ndarray:
    """Dummy ``[rows, 8]`` tokens to trace ``init`` with: one row per batch shard of ``mesh``."""
    rows = 1 if mesh is None else math.prod(mesh.shape[a] for a in BATCH_AXES)
    return np.zeros((rows, 8), np.int32)


def init_unboxed(cfg: ModelConfig, rng: jax.Array, mesh: Mesh | None = None) -> dict:
    """``Transformer(cfg).init`` with the logical-axis boxes removed (traceable: jit it with shardings)."""
    return nn.meta.unbox(Transformer(cfg).init(rng, init_tokens(mesh)))


def init_sharded(cfg: ModelConfig, mesh: Mesh, rng: jax.Array | int = 0) -> Any:
    """Initialise directly into the mesh layout: ``jit(init, out_shardings=...)``, nothing whole on one device."""
    check_layout(cfg, mesh)
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    with jax.set_mesh(mesh):
        return jax.jit(lambda r: init_unboxed(cfg, r, mesh), out_shardings=param_shardings(cfg, mesh))(rng)
