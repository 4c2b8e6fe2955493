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
the gradient in 128x1 (token-axis) tiles. The FP8 operands go to ``lax.dot_general`` as FP8 with a
float32 result type: a native FP8 dot where the backend has one, an exact upcast on XLA:CPU.

The model (``ModelConfig.fp8``) uses :func:`dense` and :func:`qdot`, which apply the same recipe to any
contraction (2-D linear layers, the MoE grouped GEMM): weights are block-quantised with a
straight-through gradient (:func:`quantize_weight`, master weights stay float32), activations
tile-quantised on the way in, and the backward quantises the output gradient in 1x128 tiles (Dgrad)
and the cached activation and the gradient in 128x1 token tiles (Wgrad); the cached activation is kept
as FP8 (``q``, ``scale``) between forward and backward. ``impl="simulate"`` (the default off GPU/TPU)
multiplies the scales in before one float32 matmul -- equal to the per-slice promotion up to float32
rounding and several times cheaper on CPU; ``impl="native"`` runs :func:`matmul` (FP8 operands, scales per
128-wide slice).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.kernels.backend import has_fast_kernels

__all__ = ["E4M3", "E5M2", "quantize", "dequantize", "matmul", "FP8_MAX", "quantize_weight", "qdot", "dense",
           "default_impl", "resolve_impl", "weight_bytes"]

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
    m, k = x.shape[-2:]
    return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, -m % bm), (0, -k % bk)])


def quantize(x: jax.Array, block: tuple[int, int] = (1, 128), dtype=E4M3, scale_fmt: str | None = None,
             nonfinite: str = "raise"):
    """``x [..., m, k]`` -> ``(q [..., m, k] fp8, scale [..., ceil(m/bm), ceil(k/bk)] float32)``.

    Tiles/blocks cover the last two dims; leading dims (e.g. experts) each get their own grid.
    ``nonfinite="raise"`` (default) raises ``ValueError`` on inf/NaN input (at run time under ``jit``);
    ``"count"`` returns ``(q, scale, n_nonfinite)`` with non-finite values quantised as 0;
    ``"propagate"`` (the model's choice: a diverged step is caught by the training loop's loss check,
    which names the step) lets a NaN scale through.
    """
    if x.ndim < 2:
        raise ValueError(f"fp8.quantize expects a 2-D [m, k] array (or [..., m, k]), got shape {tuple(x.shape)}")
    bm, bk = block
    if nonfinite not in ("raise", "count", "propagate"):
        raise ValueError(f"nonfinite={nonfinite!r} must be 'raise', 'count' or 'propagate'")
    fmax = FP8_MAX[jnp.dtype(dtype)]
    x = jnp.asarray(x, jnp.float32)
    n_bad = None
    if nonfinite == "raise":
        _check_finite(x)
    elif nonfinite == "count":
        n_bad = jnp.sum(~jnp.isfinite(x))
        x = jnp.where(jnp.isfinite(x), x, 0.0)
    lead, (m, k) = x.shape[:-2], x.shape[-2:]
    xp = _pad_to(x, bm, bk)
    gm, gk = xp.shape[-2] // bm, xp.shape[-1] // bk
    tiles = xp.reshape(lead + (gm, bm, gk, bk))
    amax = jnp.maximum(jnp.abs(tiles).max(axis=(-3, -1)), _AMAX_FLOOR)
    # A true IEEE division (XLA would otherwise rewrite "/ 448" as "* (1/448)", one ulp off the reference).
    scale = amax / jax.lax.optimization_barrier(jnp.full_like(amax, fmax))
    if scale_fmt == "ue8m0":
        scale = jnp.exp2(jnp.ceil(jnp.log2(scale)))
    elif scale_fmt is not None:
        raise ValueError(f"scale_fmt={scale_fmt!r} must be None or 'ue8m0'")
    divisor = jax.lax.optimization_barrier(jnp.broadcast_to(scale[..., :, None, :, None], tiles.shape))
    q = jnp.clip(tiles / divisor, -fmax, fmax).astype(dtype)  # RNE into E4M3, saturated at +-fmax
    q = q.reshape(lead + (gm * bm, gk * bk))[..., :m, :k]
    return (q, scale) if n_bad is None else (q, scale, n_bad)


def dequantize(q: jax.Array, scale: jax.Array, block: tuple[int, int] = (1, 128)) -> jax.Array:
    """``q * scale`` broadcast over each tile/block of the last two dims: float32 ``[..., m, k]``."""
    bm, bk = block
    m, k = q.shape[-2:]
    s = jnp.repeat(jnp.repeat(scale, bm, axis=-2), bk, axis=-1)[..., :m, :k]
    return q.astype(jnp.float32) * s


def _scaled_dot(aq, sa, bq, sb, bn: int) -> jax.Array:
    """``sum_c (aq[:, c] @ bq[c, :]) * sa[:, c] * sb[c, n // bn]`` over 128-wide slices ``c`` of the contraction.

    ``aq [M, K]`` with ``sa [M, ceil(K/128)]`` (1x128 tiles); ``bq [K, N]`` with ``sb [ceil(K/128), ceil(N/bn)]``.
    """
    m, k = aq.shape
    n = bq.shape[1]
    nk = math.ceil(k / _K)
    a = _pad_to(aq, 1, _K).reshape(m, nk, _K)
    b = _pad_to(bq, _K, 1).reshape(nk, _K, n)
    # FP8 x FP8 -> float32 per 128-wide slice c: a native FP8 dot where the backend has one (exact on CPU)
    partial = jax.lax.dot_general(a, b, (((2,), (1,)), ((1,), (0,))), precision=jax.lax.Precision.HIGHEST,
                                  preferred_element_type=jnp.float32)  # [nk, m, n]
    sbn = jnp.repeat(sb, bn, axis=1)[:, :n]  # [nk, n]
    return jnp.einsum("cmn,mc,cn->mn", partial, sa, sbn, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul(x: jax.Array, w: jax.Array, scale_fmt: str | None = None, nonfinite: str = "raise") -> jax.Array:
    """FP8 ``x [m, k] @ w [k, n]`` -> float32 ``[m, n]`` (see the module docstring)."""
    xq, sx = quantize(x, (1, _K), scale_fmt=scale_fmt, nonfinite=nonfinite)
    wq, sw = quantize(w, (_K, _K), scale_fmt=scale_fmt, nonfinite=nonfinite)
    return _scaled_dot(xq, sx, wq, sw, _K)


def _matmul_fwd(x, w, scale_fmt, nonfinite):
    return matmul(x, w, scale_fmt, nonfinite), (x, w)


def _matmul_bwd(scale_fmt, nonfinite, res, dy):
    x, w = res
    kw = dict(scale_fmt=scale_fmt, nonfinite=nonfinite)
    # Dgrad: dx = dy @ w^T, dy in 1x128 tiles along n (the contraction), w^T block-quantised.
    dyq, sdy = quantize(dy, (1, _K), **kw)
    wtq, swt = quantize(w.T, (_K, _K), **kw)
    dx = _scaled_dot(dyq, sdy, wtq, swt, _K)
    # Wgrad: dw = x^T @ dy, contracting over tokens: x and dy in 128x1 (token-axis) tiles.
    xq, sx = quantize(x, (_K, 1), **kw)  # scales [ceil(m/128), k]
    dyq2, sdy2 = quantize(dy, (_K, 1), **kw)  # scales [ceil(m/128), n]
    dw = _scaled_dot(xq.T, sx.T, dyq2, sdy2, 1)
    return dx.astype(x.dtype), dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


# ---------------------------------------------------------------------------------------------------
# The model's FP8 path: any contraction, simulated by scaling in before a float32 matmul.

def default_impl(backend: str | None = None) -> str:
    """``"native"`` (FP8 operands into the dot) on GPU/TPU, ``"simulate"`` elsewhere."""
    return "native" if has_fast_kernels(backend) else "simulate"


def resolve_impl(fp8_cfg) -> str:
    """The implementation an :class:`~deepseek_jax.config.FP8Config` asks for (``"auto"`` -> :func:`default_impl`)."""
    return default_impl() if fp8_cfg.impl == "auto" else fp8_cfg.impl


def _fake(x: jax.Array, block: tuple[int, int], scale_fmt: str | None) -> jax.Array:
    """``dequantize(quantize(x))`` over the last two dims, NaN-propagating (no host check)."""
    q, s = quantize(x, block, scale_fmt=scale_fmt, nonfinite="propagate")
    return dequantize(q, s, block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def quantize_weight(w: jax.Array, scale_fmt: str | None = None) -> jax.Array:
    """``w [..., K, N]`` on its FP8 grid: 128x128 blocks of the last two dims (one grid per leading
    index, e.g. per expert), returned dequantised in ``w``'s dtype. The gradient passes straight
    through to the float32 master weight (the FP8 copy is a cast, as in DeepSeek's recipe)."""
    return _fake(w, (_K, _K), scale_fmt).astype(w.dtype)


quantize_weight.defvjp(lambda w, fmt: (quantize_weight(w, fmt), None), lambda fmt, _, g: (g,))


def _rows_fake(a: jax.Array, scale_fmt) -> jax.Array:
    """1x128 tiles along the last axis of ``a [..., k]``."""
    return _fake(a, (1, _K), scale_fmt).astype(a.dtype)


def _token_block(a: jax.Array) -> tuple[int, int]:
    return (min(_K, a.shape[-2]), 1)


def _tokens_quant(a: jax.Array, scale_fmt):
    """128x1 tiles along the token axis (``-2``) of ``a [..., t, k]``, per leading index (per expert block
    of the grouped GEMM, whose tiles are then that block's rows when it holds fewer than 128)."""
    return quantize(a, _token_block(a), scale_fmt=scale_fmt, nonfinite="propagate")


def _tokens_dequant(q: jax.Array, s: jax.Array, dtype) -> jax.Array:
    return dequantize(q, s, _token_block(q)).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def qdot(mm, scale_fmt, a: jax.Array, w: jax.Array, *aux: jax.Array) -> jax.Array:
    """``mm(a, w, *aux)`` with DeepSeek's FP8 activation handling around any bilinear ``mm``.

    ``a [..., t, k]`` is quantised in 1x128 tiles on the way in; ``w`` must already be on its FP8 grid
    (:func:`quantize_weight`). Backward: ``da`` is the VJP of ``mm`` at the output gradient quantised in
    1x128 tiles (Dgrad); ``dw`` the VJP at the activation and the gradient both quantised in 128x1 token
    tiles (Wgrad). The activation is cached as FP8. ``aux`` (integer arrays, e.g. expert ids) pass to
    ``mm`` and get no gradient. ``mm`` must be a module-level function (it is a static argument).
    """
    return mm(_rows_fake(a, scale_fmt), w, *aux)


def _qdot_fwd(mm, scale_fmt, a, w, *aux):
    return qdot(mm, scale_fmt, a, w, *aux), (_tokens_quant(a, scale_fmt), jnp.zeros((), a.dtype), w, aux)


def _qdot_bwd(mm, scale_fmt, res, g):
    (aq, sa), like, w, aux = res  # ``like``: a's dtype
    a_tok = _tokens_dequant(aq, sa, like.dtype)
    g_rows = _rows_fake(g, scale_fmt)
    g_tok = _fake(g, _token_block(g), scale_fmt).astype(g.dtype)
    da = jax.vjp(lambda a_: mm(a_, w, *aux), a_tok)[1](g_rows)[0]  # Dgrad
    dw = jax.vjp(lambda w_: mm(a_tok, w_, *aux), w)[1](g_tok)[0]  # Wgrad
    return (da, dw) + tuple(None for _ in aux)


qdot.defvjp(_qdot_fwd, _qdot_bwd)


def _matmul2d(a, w):
    return a @ w


def dense(x: jax.Array, w: jax.Array, scale_fmt: str | None = None, impl: str | None = None) -> jax.Array:
    """FP8 linear layer ``x [m, k] @ w [k, n]`` -> ``[m, n]`` in ``x``'s dtype (float32 accumulation).

    ``w`` is the float32 master weight (block-quantised here with a straight-through gradient) or a
    weight already on its FP8 grid (a kept-FP8 checkpoint: re-quantising it returns its own blocks).
    ``impl``: ``"simulate"`` or ``"native"`` (default :func:`default_impl`).
    """
    impl = impl or default_impl()
    if impl == "native":
        return matmul(x, w, scale_fmt, "propagate").astype(x.dtype)
    if impl != "simulate":
        raise ValueError(f"fp8 impl={impl!r} must be 'simulate' or 'native'")
    y = qdot(_matmul2d, scale_fmt, x.astype(jnp.float32), quantize_weight(w.astype(jnp.float32), scale_fmt))
    return y.astype(x.dtype)


def weight_bytes(variables) -> int:
    """Bytes of every array in a variable tree (FP8 leaves count 1 byte per value)."""
    return int(sum(np.dtype(x.dtype).itemsize * math.prod(x.shape) for x in jax.tree_util.tree_leaves(variables)))
