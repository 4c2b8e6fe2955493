"""Checkpoint integrity: a fingerprint of every array, written with each checkpoint and verified on restore.

Orbax verifies no content (flipped bytes in a tensorstore chunk restore silently), so each checkpoint's
``meta`` carries ``fingerprint``: per leaf, two 32-bit sums of the raw bits (plain, and weighted by the
element index, so a changed value and moved values both show). It is computed on the device(s) in one
jitted program over the global arrays, so sharded and multi-process states take the same path.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["fingerprint", "nonfinite_leaves"]

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def _leaf_sums(x: jax.Array) -> jax.Array:
    bits = jax.lax.bitcast_convert_type(x, _UINT[jnp.dtype(x.dtype).itemsize]).reshape(-1)
    if bits.dtype == jnp.uint64:  # fold the high half in
        bits = (bits ^ (bits >> 32)).astype(jnp.uint32)
    u = bits.astype(jnp.uint32)
    idx = jnp.arange(u.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * idx, dtype=jnp.uint32)])


@jax.jit
def _sums(tree: Any) -> Any:
    return jax.tree.map(_leaf_sums, tree)


def _host(x: jax.Array) -> np.ndarray:
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def fingerprint(tree: Any) -> str:
    """A hex string that changes when any bit of any array in ``tree`` changes (with probability ~1 - 2^-64)."""
    leaves = jax.tree.leaves(_sums(tree))
    return "".join(f"{int(v):08x}" for leaf in leaves for v in _host(leaf))


@jax.jit
def _finite(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.floating) else True, tree)


def nonfinite_leaves(tree: Any) -> list[str]:
    """Paths of floating leaves holding an inf or NaN."""
    flags = jax.tree_util.tree_flatten_with_path(_finite(tree))[0]
    return [jax.tree_util.keystr(p) for p, ok in flags if not bool(_host(ok))]
