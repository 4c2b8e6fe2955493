"""SPMD layouts on ``jax.sharding`` meshes with the axes ``data, fsdp, expert, tensor, stage``.

One table, :data:`RULES`, maps every logical axis name (parameters and activations) to mesh axes;
everything else derives from it. In the scaling-book notation (``A[I_X, J]``: dim I split over
mesh axis X):

* parameters: ``W_embed[V_tensor, D_fsdp]`` (vocabulary-parallel), attention ``Wq_b[Q, N_tensor, H]``,
  ``Wo[N_tensor, V, D_fsdp]`` (head-parallel), ``W1[D_fsdp, F_tensor]``, experts ``W1[E_expert, D_fsdp,
  F_tensor]``; norms and latent projections replicated (small);
* activations: ``x[B_(data,fsdp,expert), T, D]`` (attention and dense layers are batch-parallel over
  the expert axis too, so no device idles), heads and MLP hidden split over ``tensor``.

FSDP (ZeRO-3): parameters live split over ``fsdp``; XLA all-gathers each layer's weights where they
are used and reduce-scatters their gradients. Layers call :func:`constrain` on their activations;
it does nothing unless a mesh is set (``jax.set_mesh``), so single-device code is unchanged.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from deepseek_jax.config import ModelConfig

__all__ = ["MESH_AXES", "RULES", "BATCH_AXES", "make_mesh", "parse_mesh", "logical_spec", "constrain",
           "param_shardings", "fsdp_gather", "shard_variables", "init_sharded", "check_layout"]

MESH_AXES = ("data", "fsdp", "expert", "tensor", "stage")
BATCH_AXES = ("data", "fsdp", "expert")

RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "qk_head": None,
    "q_lora": None,
    "kv_lora": None,
    "exp": "expert",
    "mlp_moe": "tensor",
    "mtp_concat": None,
    "norm": None,
    "layers": None,
    # activations
    "act_batch": BATCH_AXES,
    "act_length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,expert=2,tensor=2"`` -> ``{"data": 2, "expert": 2, "tensor": 2}``."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, size = part.partition("=")
        if not size.isdigit():
            raise ValueError(f"mesh entry {part!r} must look like name=size, e.g. data=2")
        out[name.strip()] = int(size)
    return out


def make_mesh(axes: dict[str, int] | str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with all five axes (unnamed ones have size 1); the sizes must multiply to the device count."""
    if isinstance(axes, str):
        axes = parse_mesh(axes)
    unknown = sorted(set(axes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axis {unknown}; mesh axes are {MESH_AXES}")
    bad = {k: v for k, v in axes.items() if not isinstance(v, int) or v < 1}
    if bad:
        raise ValueError(f"mesh axis sizes must be positive integers, got {bad}")
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(axes.get(a, 1) for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        desc = " x ".join(f"{a}={axes[a]}" for a in MESH_AXES if a in axes) or "(empty)"
        raise ValueError(f"mesh {desc} has {math.prod(shape)} devices but {len(devices)} are in use; "
                         "make the sizes multiply to the device count")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_spec(names: Sequence[str | None]) -> P:
    """PartitionSpec of logical axis ``names`` under :data:`RULES` (``None`` = replicated dim)."""
    missing = [n for n in names if n is not None and n not in RULES]
    if missing:
        raise KeyError(f"logical axis {missing} has no entry in sharding.RULES")
    return P(*(None if n is None else RULES[n] for n in names))


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """``with_sharding_constraint`` by logical names when a mesh is set, else ``x`` unchanged."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(names))


@functools.lru_cache(maxsize=16)
def _logical_tree(cfg: ModelConfig) -> Any:
    """Shapes and logical axes of every variable (cached: ``forward(mesh=)`` asks on every call)."""
    from deepseek_jax.model import abstract_variables

    return abstract_variables(cfg)


def fsdp_gather(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """FSDP (ZeRO-3): a parameter stored sharded over ``fsdp``, gathered whole where a layer uses it.

    ``W[D_fsdp, F] -> W[D, F]`` by an explicit ``all_gather`` over ``fsdp`` in ``jax.shard_map``; its
    transpose is ``psum_scatter``, so the gradient leaves the layer as a **reduce-scatter** (GSPMD alone
    lowers it to all-reduce + slice on XLA:CPU). A no-op without a mesh or with ``fsdp = 1``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or dict(mesh.shape).get("fsdp", 1) == 1:
        return x
    spec = logical_spec(names)
    dims = [i for i, s in enumerate(spec) if s == "fsdp"]
    if not dims:
        return x
    dim = dims[0]
    out = P(*(None if i == dim else s for i, s in enumerate(spec)))
    return jax.shard_map(lambda v: jax.lax.all_gather(v, "fsdp", axis=dim, tiled=True), mesh=mesh,
                         in_specs=spec, out_specs=out, check_vma=False)(x)


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Any:
    """A ``NamedSharding`` for every variable (plain-array tree, like ``init_variables`` returns)."""
    boxed = _logical_tree(cfg)
    return jax.tree_util.tree_map(lambda b: NamedSharding(mesh, logical_spec(b.names)), boxed,
                                  is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def check_layout(cfg: ModelConfig, mesh: Mesh, global_batch: int | None = None) -> None:
    """Raise ``ValueError`` naming the field and the mesh for layouts that cannot work."""
    s = dict(mesh.shape)
    desc = ", ".join(f"{a}={s[a]}" for a in MESH_AXES if s.get(a, 1) > 1) or "single device"
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
    boxed = _logical_tree(cfg)
    for path, b in jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]:
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


def init_sharded(cfg: ModelConfig, mesh: Mesh, rng: jax.Array | int = 0) -> Any:
    """Initialise directly into the mesh layout: ``jit(init, out_shardings=...)``, nothing whole on one device."""
    from deepseek_jax.model import Transformer

    check_layout(cfg, mesh)
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    shardings = param_shardings(cfg, mesh)
    tokens = np.zeros((math.prod(mesh.shape[a] for a in BATCH_AXES), 8), np.int32)

    def init(r):
        return nn.meta.unbox(Transformer(cfg).init(r, tokens))

    with jax.set_mesh(mesh):
        return jax.jit(init, out_shardings=shardings)(rng)
