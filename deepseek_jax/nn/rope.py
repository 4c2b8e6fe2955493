"""Rotary position embedding with YaRN (arXiv 2309.00071; DeepSeek-V2 §3.1.2, V3 §4.3).

Layout: this package applies RoPE in the *rotate-half* layout (pairs ``(x[i], x[i + r/2])``).
DeepSeek's released checkpoints use the *interleaved* layout (pairs ``(x[2i], x[2i+1])``); the
Hugging Face loader permutes the RoPE rows of ``q_b_proj``/``q_proj`` and ``kv_a_proj_with_mqa``
once at load time (``interleaved_to_half``), so no permutation happens at run time. Attention scores
are identical either way because queries and keys share the permutation.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import RopeConfig, yarn_mscale

__all__ = ["inv_frequencies", "yarn_ramp_bounds", "apply_rope", "interleaved_to_half"]


def yarn_ramp_bounds(dim: int, theta: float, factor_cfg) -> tuple[float, float]:
    """``(low, high)`` frequency indices of the YaRN ramp (V3: dim 64 -> (10, 23))."""
    y = factor_cfg

    def cdim(rotations: float) -> float:
        return dim * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = cdim(y.beta_fast), cdim(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    return low, high


def inv_frequencies(dim: int, rope: RopeConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies ``[dim/2]`` (float32) and the cos/sin amplitude factor.

    Plain RoPE: ``f_i = theta^(-2i/dim)``. YaRN: ``f'_i = f_i/s * ramp_i + f_i * (1 - ramp_i)`` with a
    linear ramp between the correction-range bounds; the amplitude is ``m(s, mscale)/m(s, mscale_all_dim)``
    when both are set (1 for all released DeepSeek configs), else ``m(s, 1)``.
    """
    f = 1.0 / (rope.theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    y = rope.yarn
    if y is None:
        return f.astype(np.float32), 1.0
    low, high = yarn_ramp_bounds(dim, rope.theta, y)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    f = f / y.factor * ramp + f * (1 - ramp)
    if y.mscale and y.mscale_all_dim:
        amp = yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)
    else:
        amp = yarn_mscale(y.factor, 1.0)
    return f.astype(np.float32), float(amp)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, rope: RopeConfig) -> jnp.ndarray:
    """Rotate ``x [b, t, ..., r]`` (rotate-half layout) by ``positions [b, t]``; computed in float32."""
    r = x.shape[-1]
    inv_freq, amp = inv_frequencies(r, rope)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, t, r/2]
    angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[-1:])
    cos, sin = jnp.cos(angles) * amp, jnp.sin(angles) * amp
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : r // 2], xf[..., r // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def interleaved_to_half(r: int) -> np.ndarray:
    """Row permutation ``perm`` with ``half[k] = interleaved[perm[k]]``: ``[0, 2, ..., r-2, 1, 3, ..., r-1]``."""
    return np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2)])
