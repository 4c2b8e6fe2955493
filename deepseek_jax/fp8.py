"""DeepSeek-V3's fine-grained FP8 (V3 §3.3), simulated with ``ml_dtypes`` float8 types.

Scales are the **dequantisation multiplier** ``s = max(amax, 1e-4) / 448`` per tile or block (as
DeepSeek's kernels and released ``weight_scale_inv`` store them), ``q = e4m3(x / s)`` rounded to nearest
even and saturated at +-448, ``x ~ q * s``.

* activations: 1x128 tiles (per token, per 128 channels) -- ``block=(1, 128)``;
* activations on the token axis (the Wgrad operand): 128x1 tiles -- ``block=(128, 1)``;
* weights: 128x128 blocks -- ``block=(128, 128)``.
Partial edge tiles and blocks are allowed (scales over the present values). ``scale_fmt="ue8m0"`` rounds
each scale up to a power of two.

:func:`matmul` is ``x [m, k] @ w [k, n]`` with ``x`` tile-quantised and ``w`` block-quantised; the
products of each 128-wide slice of ``k`` are accumulated in float32 and multiplied by that slice's
scales (the "promotion every N_C = 128" of the recipe). Its custom VJP is FP8 too: Dgrad quantises the
output gradient in 1x128 tiles against the block-quantised weight, Wgrad quantises the activation and
the gradient in 128x1 (token-axis) tiles. On CPU the FP8 values are upcast to float32 for the dots.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["E4M3", "E5M2", "quantize", "dequantize", "matmul", "FP8_MAX"]

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
FP8_MAX = {jnp.dtype(E4M3): 448.0, jnp.dtype(E5M2): 57344.0}
_AMAX_FLOOR = 1e-4  # DeepSeek's kernels: amax = max(amax, 1e-4), so zero tiles get a finite scale
_K = 128  # contraction slice whose partial sums are promoted (N_C)


def _check_finite(x: jax.Array) -> None:
    if isinstance(x, jax.core.Tracer):
        def report(n):
            if int(n):
                raise ValueError(f"fp8.quantize: {int(n)} non-finite input value(s); an FP8 scale would be NaN "
                                 "(pass nonfinite='count' to count them instead)")

        jax.debug.callback(report, jnp.sum(~jnp.isfinite(x)))
        return
    n = int(np.sum(~np.isfinite(np.asarray(x))))
    if n:
        raise ValueError(f"fp8.quantize: {n} non-finite input value(s) in an array of shape {tuple(x.shape)}; an FP8 "
                         "scale would be NaN (pass nonfinite='count' to count them instead)")


def _pad_to(x: jax.Array, bm: int, bk: int) -> jax.Array:
    m, k = x.shape
    return jnp.pad(x, ((0, -m % bm), (0, -k % bk)))


def quantize(x: jax.Array, block: tuple[int, int] = (1, 128), dtype=E4M3, scale_fmt: str | None = None,
             nonfinite: str = "raise"):
    """``x [m, k]`` -> ``(q [m, k] fp8, scale [ceil(m/bm), ceil(k/bk)] float32)``.

    ``nonfinite="raise"`` (default) raises ``ValueError`` on inf/NaN input (at run time under ``jit``);
    ``"count"`` returns ``(q, scale, n_nonfinite)`` with non-finite values quantised as 0.
    """
    if x.ndim != 2:
        raise ValueError(f"fp8.quantize expects a 2-D [m, k] array, got shape {tuple(x.shape)}")
    bm, bk = block
    if nonfinite not in ("raise", "count"):
        raise ValueError(f"nonfinite={nonfinite!r} must be 'raise' or 'count'")
    fmax = FP8_MAX[jnp.dtype(dtype)]
    x = jnp.asarray(x, jnp.float32)
    n_bad = None
    if nonfinite == "raise":
        _check_finite(x)
    else:
        n_bad = jnp.sum(~jnp.isfinite(x))
        x = jnp.where(jnp.isfinite(x), x, 0.0)
    m, k = x.shape
    xp = _pad_to(x, bm, bk)
    gm, gk = xp.shape[0] // bm, xp.shape[1] // bk
    tiles = xp.reshape(gm, bm, gk, bk)
    amax = jnp.maximum(jnp.abs(tiles).max(axis=(1, 3)), _AMAX_FLOOR)
    # A true IEEE division (XLA would otherwise rewrite "/ 448" as "* (1/448)", one ulp off the reference).
    scale = amax / jax.lax.optimization_barrier(jnp.full_like(amax, fmax))
    if scale_fmt == "ue8m0":
        scale = jnp.exp2(jnp.ceil(jnp.log2(scale)))
    elif scale_fmt is not None:
        raise ValueError(f"scale_fmt={scale_fmt!r} must be None or 'ue8m0'")
    divisor = jax.lax.optimization_barrier(jnp.broadcast_to(scale[:, None, :, None], tiles.shape))
    q = jnp.clip(tiles / divisor, -fmax, fmax).astype(dtype)  # RNE into E4M3, saturated at +-fmax
    q = q.reshape(gm * bm, gk * bk)[:m, :k]
    return (q, scale) if n_bad is None else (q, scale, n_bad)


def dequantize(q: jax.Array, scale: jax.Array, block: tuple[int, int] = (1, 128)) -> jax.Array:
    """``q * scale`` broadcast over each tile/block: float32 ``[m, k]``."""
    bm, bk = block
    m, k = q.shape
    s = jnp.repeat(jnp.repeat(scale, bm, axis=0), bk, axis=1)[:m, :k]
    return q.astype(jnp.float32) * s


def _scaled_dot(aq, sa, bq, sb, bn: int) -> jax.Array:
    """``sum_c (aq[:, c] @ bq[c, :]) * sa[:, c] * sb[c, n // bn]`` over 128-wide slices ``c`` of the contraction.

    ``aq [M, K]`` with ``sa [M, ceil(K/128)]`` (1x128 tiles); ``bq [K, N]`` with ``sb [ceil(K/128), ceil(N/bn)]``.
    """
    m, k = aq.shape
    n = bq.shape[1]
    nk = math.ceil(k / _K)
    a = _pad_to(aq.astype(jnp.float32), 1, _K).reshape(m, nk, _K)
    b = _pad_to(bq.astype(jnp.float32), _K, 1).reshape(nk, _K, n)
    partial = jnp.einsum("mci,cin->mcn", a, b, precision=jax.lax.Precision.HIGHEST)  # exact-ish per slice
    sbn = jnp.repeat(sb, bn, axis=1)[:, :n]  # [nk, n]
    return jnp.einsum("mcn,mc,cn->mn", partial, sa, sbn, precision=jax.lax.Precision.HIGHEST)


def _fwd_parts(x, w):
    xq, sx = quantize(x, (1, _K))
    wq, sw = quantize(w, (_K, _K))
    return xq, sx, wq, sw


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """FP8 ``x [m, k] @ w [k, n]`` -> float32 ``[m, n]`` (see the module docstring)."""
    xq, sx, wq, sw = _fwd_parts(x, w)
    return _scaled_dot(xq, sx, wq, sw, _K)


def _matmul_fwd(x, w):
    return matmul(x, w), (x, w)


def _matmul_bwd(res, dy):
    x, w = res
    # Dgrad: dx = dy @ w^T, dy in 1x128 tiles along n (the contraction), w^T block-quantised.
    dyq, sdy = quantize(dy, (1, _K))
    wtq, swt = quantize(w.T, (_K, _K))
    dx = _scaled_dot(dyq, sdy, wtq, swt, _K)
    # Wgrad: dw = x^T @ dy, contracting over tokens: x and dy in 128x1 (token-axis) tiles.
    xq, sx = quantize(x, (_K, 1))  # scales [ceil(m/128), k]
    dyq2, sdy2 = quantize(dy, (_K, 1))  # scales [ceil(m/128), n]
    dw = _scaled_dot(xq.T, sx.T, dyq2, sdy2, 1)
    return dx.astype(x.dtype), dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)
