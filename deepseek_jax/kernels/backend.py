"""Which kernels a backend runs well: one answer for the FP8 dots and the grouped GEMMs."""

from __future__ import annotations

import jax

__all__ = ["FAST_KERNEL_BACKENDS", "has_fast_kernels"]

FAST_KERNEL_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


def has_fast_kernels(backend: str | None = None) -> bool:
    """True on GPU/TPU, whose ``ragged_dot`` and FP8 dots are native kernels; False on XLA:CPU, where
    ``ragged_dot`` is a dense fallback and FP8 is an upcast (so the CPU paths simulate instead)."""
    return (backend or jax.default_backend()) in FAST_KERNEL_BACKENDS
