"""FSDP (ZeRO-3) uses of a weight stored split over ``fsdp``: gathered inside ``jax.shard_map`` next to the
product that consumes it, so its gradient leaves as ONE reduce-scatter.

Why not gather first and multiply under GSPMD (:func:`~deepseek_jax.parallel.rules.fsdp_gather`)? The
gathered weight is a replicated value, so the cotangent reaching the gather's transpose must be
replicated too: GSPMD all-reduces the batch-partial weight gradient first, and the reduce-scatter then
only slices it (measured on tiny, fsdp=8: 25 MiB of all-reduce for 3 MiB of reduce-scatter per step).
Here each device multiplies its own batch rows by the gathered weight, so the weight gradient inside the
shard_map is the device's partial sum, the ``all_gather``'s transpose reduce-scatters it over ``fsdp``, and
the batch axes the weight is replicated on (``data``, ``expert``) add a psum of the 1/fsdp shard only.

Activations are ``[batch, ...]`` with the batch over :data:`~deepseek_jax.parallel.mesh.BATCH_AXES`; a
weight's feature dims map to activation dims by the same rules, ``fsdp`` dropped (features are never
split over ``fsdp``); an input dim split over ``tensor`` (row parallel) is summed over ``tensor``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax.parallel.mesh import BATCH_AXES, manual_axes
from deepseek_jax.parallel.rules import logical_spec

__all__ = ["fsdp_active", "fsdp_matmul", "fsdp_take"]


def fsdp_active() -> bool:
    """True inside ``jax.set_mesh`` of a mesh whose ``fsdp`` axis has more than one device, unless ``fsdp`` is
    manual here (the pipeline executor gathers the weights once per step and splits only the batch)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and dict(mesh.shape).get("fsdp", 1) > 1 and "fsdp" not in manual_axes()


def _batch_axis(s) -> bool:
    return s is not None and all(a in BATCH_AXES for a in ((s,) if isinstance(s, str) else s))


def _feature(specs: Sequence) -> tuple:
    """A weight dim's spec as an activation dim: batch axes (``fsdp``, ``expert``) dropped."""
    return tuple(None if _batch_axis(s) else s for s in specs)


def _gather(w: jax.Array, spec: P) -> jax.Array:
    """The weight whole over the batch axes (each device holds its own batch rows): ``fsdp`` and, for a
    weight split over ``expert`` such as the router's, ``expert``. Their transposes reduce-scatter."""
    for i, s in enumerate(spec):
        if _batch_axis(s):
            w = jax.lax.all_gather(w, s, axis=i, tiled=True)
    return w


def fsdp_matmul(x: jax.Array, w: jax.Array, n_in: int, names: Sequence[str],
                product: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """``product(x, w)`` -- ``x[B, ..., i1..in] · w[i1..in, o1..om] -> [B, ..., o1..om]`` -- per device on its
    batch rows, with ``w`` stored by its logical ``names`` and gathered inside (see the module docstring).
    Call it when :func:`fsdp_active`."""
    w_spec = logical_spec(names)
    ins, outs = _feature(w_spec[:n_in]), _feature(w_spec[n_in:])
    lead = (BATCH_AXES,) + (None,) * (x.ndim - n_in - 1)
    row_parallel = "tensor" in ins

    def local(xl, wl):
        y = product(xl, _gather(wl, w_spec))
        return jax.lax.psum(y, "tensor") if row_parallel else y

    return jax.shard_map(local, in_specs=(P(*lead, *ins), w_spec), out_specs=P(*lead, *outs),
                         check_vma=False)(x, w)


def fsdp_take(table: jax.Array, ids: jax.Array, names: Sequence[str]) -> jax.Array:
    """``table[ids]`` for an embedding ``table[V, D]`` stored by ``names`` (vocabulary maybe over ``tensor``,
    ``D`` over ``fsdp``) and ``ids[B, ...]``: ``[B, ..., D]``, each device looking up its own rows. Call it
    when :func:`fsdp_active`."""
    spec = logical_spec(names)
    vocab_split = spec[0] == "tensor"
    lead = (BATCH_AXES,) + (None,) * (ids.ndim - 1)

    def local(il, tl):
        tg = _gather(tl, spec)
        if not vocab_split:
            return jnp.take(tg, il, axis=0)
        v = tg.shape[0]
        rel = il - jax.lax.axis_index("tensor") * v
        here = (rel >= 0) & (rel < v)
        rows = jnp.take(tg, jnp.where(here, rel, 0), axis=0)
        return jax.lax.psum(jnp.where(here[..., None], rows, 0), "tensor")

    return jax.shard_map(local, in_specs=(P(*lead), spec), out_specs=P(*lead, None), check_vma=False)(ids, table)
