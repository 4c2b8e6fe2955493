"""Which kernels a backend runs well (one answer for the FP8 dots and the grouped GEMMs), and the typing
helper every custom VJP uses inside ``shard_map``."""

from __future__ import annotations

import jax

__all__ = ["FAST_KERNEL_BACKENDS", "current_platform", "has_fast_kernels", "vary", "vary_like", "cotangent_like"]

FAST_KERNEL_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


def current_platform() -> str:
    """The platform the program being traced is for: that of the ambient mesh's devices (``jax.set_mesh``), so
    a step compiled for a TPU topology's compile-only devices on a CPU host gets the TPU kernels; without a mesh
    (or one of size 1, which the train step does not enter) ``jax.default_backend()``."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def has_fast_kernels(backend: str | None = None) -> bool:
    """True on GPU/TPU, whose ``ragged_dot`` and FP8 dots are native kernels; False on XLA:CPU, where
    ``ragged_dot`` is a dense fallback and FP8 is an upcast (so the CPU paths simulate instead). ``backend``
    defaults to :func:`current_platform`."""
    return (backend or current_platform()) in FAST_KERNEL_BACKENDS


def vary(x: jax.Array, axes) -> jax.Array:
    """``x`` typed as varying over the manual mesh ``axes`` it does not yet vary over (inside ``shard_map``)."""
    missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def vary_like(x: jax.Array, ref: jax.Array) -> jax.Array:
    """``x`` typed as varying over every manual mesh axis ``ref`` varies over (identity outside
    ``shard_map``). A custom VJP's backward must return each cotangent with its primal's type; one built from
    zeros or from an invariant cotangent is cast with this (``ref``: the primal, or an empty slice of it)."""
    return vary(x, tuple(jax.typeof(ref).manual_axis_type.varying))


def cotangent_like(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """A custom VJP's cotangent typed as its primal (inside ``shard_map``; identity outside): summed over the
    manual axes it varies over and the primal does not -- the transpose of the implicit broadcast of an
    invariant primal (tokens whole over ``tensor``) into a varying computation (weights split over
    ``tensor``) -- then cast up to vary like the primal."""
    extra = tuple(a for a in jax.typeof(ct).manual_axis_type.varying
                  if a not in jax.typeof(primal).manual_axis_type.varying)
    return vary_like(jax.lax.psum(ct, extra) if extra else ct, primal)
