"""Grouped GEMMs for the routed experts of DeepSeekMoE: ``y = sum_j g_j FFN_{e_j}(x)`` over each token's
selected experts, **dropless** (every selected (token, expert) pair is computed).

Letters: n tokens, d model, e experts, k top-k, f expert hidden width, m = n*k (token, expert) pairs.
The pairs are sorted by expert once (:func:`routed_experts`), then one kernel of the registry
:data:`KERNELS` computes them (``benchmarks/moe_grouped_gemm.py`` measures them):

* ``"ragged"``: ``jax.lax.ragged_dot`` over the sorted rows (fast kernels on GPU/TPU);
* ``"capacity"`` (the CPU default): the first ``C`` rows of every expert (``C`` = the mean load times
  ``main_capacity``, static) as ONE batched matmul ``[e, C, d] · [e, d, f]`` -- each expert's own
  weights, no per-block weight copies -- plus an *overflow* loop over the rows past ``C`` in blocks of
  one expert (a ``fori_loop`` up to the dynamic block count, custom VJP), so it stays dropless and the
  overflow costs what it holds. Balanced routing (what auxiliary-loss-free balancing keeps) puts almost
  every row in the batched part;
* ``"blocks"``: rows padded per expert to multiples of ``block`` and computed as a batched matmul
  with one expert's weights per block (``[nb, B, d] · [nb, d, f]``); wastes at most ``e * (block - 1)``
  rows, and copies an expert's weights into every block;
* ``"blocks_dynamic"``: the same layout, but only the blocks in use are computed (a loop up to the
  used-block count, with a custom VJP). For buffers sized for the worst case and mostly empty, as
  the expert-parallel receive buffers are.

* ``"gather"`` (the default when there are fewer (token, expert) pairs than experts, i.e. decoding a
  few sequences): each pair's expert weights are gathered and multiplied with its token, so a step
  reads the ``m`` experts it uses, not all ``e`` (and no ``[w1 | w3]`` copy is made);
* ``"dense"`` (the default for ``m >= e`` pairs from at most ``e`` tokens: decoding a batch, which selects
  most experts): every expert on every token, ``[e, n, d] · [e, d, f]``, weighted by the gates (zero
  off the selection): each expert's weights are read once, in place, with no sorting, copies or loops.

Expert ids ``>= e`` mean "no expert": such (token, slot) pairs are not computed and contribute zero.
CPU notes: XLA:CPU runs scatter-adds serially, so rows move through gathers whose transposes are
gathers (:func:`_take_rows`), and expert weights are selected by a one-hot matmul.
"""

from __future__ import annotations

import math

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax.kernels.backend import cotangent_like, has_fast_kernels, vary_like
from deepseek_jax.kernels.fp8 import qdot

__all__ = ["KERNELS", "grouped_gemm_impl", "default_block", "capacity_rows", "routed_experts"]

def grouped_gemm_impl(backend: str | None = None) -> str:
    """``"ragged"`` where ``ragged_dot`` has a fast kernel (GPU, TPU), else ``"capacity"``."""
    return "ragged" if has_fast_kernels(backend) else "capacity"


def _swiglu(x, w13, w2, mm):
    """Expert SwiGLU with ``w13 = [w1 | w3]`` (``[..., d, 2f]``: one wider GEMM instead of two) and ``w2
    [..., f, d]``. Returns ``(h = x w13, a = silu(h_1) * h_3, y = a w2)``; the overflow loop's backward
    reuses ``h`` and ``a``."""
    f = w2.shape[-2]
    h = checkpoint_name(mm(x, w13), "swiglu_in")
    a = jax.nn.silu(h[..., :f]) * h[..., f:]
    return h, a, mm(a, w2)


def default_block(rows: int, experts: int) -> int:
    """Rows per block for the ``"blocks"`` kernel: about the mean rows per expert, a power of two in
    [8, 128] (wider blocks run closer to the matmul peak; narrower ones waste less padding)."""
    mean = max(rows // experts, 1)
    return int(min(128, max(8, 1 << (mean - 1).bit_length())))


def _zeros(like: jax.Array, *refs: jax.Array, shape=None) -> jax.Array:
    """Zeros shaped like ``like`` (or ``shape``) for a loop's carry, typed (inside ``shard_map``) as varying
    like ``like`` and every array in ``refs`` (the loop's inputs), as the loop's sums will be."""
    z = jnp.zeros_like(like) if shape is None else vary_like(jnp.zeros(shape, like.dtype), like)
    for r in (like,) + refs:
        z = vary_like(z, r)
    return z


@jax.custom_vjp
def _used_block_mm(a: jax.Array, w: jax.Array, block_e: jax.Array, n_used: jax.Array) -> jax.Array:
    """``out[g] = a[g] @ w[block_e[g]]`` for ``g < n_used`` (zeros after): ``a [nb, B, i]``, ``w [e, i, o]``."""
    out = _zeros(a, w, shape=a.shape[:2] + w.shape[2:])
    return jax.lax.fori_loop(0, n_used, lambda g, out: out.at[g].set(a[g] @ w[block_e[g]]), out)


def _used_block_mm_fwd(a, w, block_e, n_used):
    return _used_block_mm(a, w, block_e, n_used), (a, w, block_e, n_used)


def _used_block_mm_bwd(res, dy):
    a, w, block_e, n_used = res

    def body(g, carry):
        da, dw = carry
        return da.at[g].set(dy[g] @ w[block_e[g]].T), dw.at[block_e[g]].add(a[g].T @ dy[g])

    da, dw = jax.lax.fori_loop(0, n_used, body, (_zeros(a, dy, w), _zeros(w, dy, a)))
    return cotangent_like(da, a), cotangent_like(dw, w), None, None


_used_block_mm.defvjp(_used_block_mm_fwd, _used_block_mm_bwd)


@jax.custom_vjp
def _take_rows(x: jax.Array, idx: jax.Array, back: jax.Array) -> jax.Array:
    """``out[i] = x[idx[i]]`` (zeros where ``idx`` is out of range), for a gather whose transpose is known:
    ``back [rows(x), S]`` lists, for every row of ``x``, the ``S`` output rows that read it (out of range =
    none). The backward is then a gather-and-sum instead of a scatter-add (serial on XLA:CPU)."""
    return jnp.take(x, idx, axis=0, mode="fill", fill_value=0)


def _take_rows_fwd(x, idx, back):
    return _take_rows(x, idx, back), (idx, back, x[:0])  # x[:0]: x's type, for the cotangent (no data)


def _take_rows_bwd(res, g):
    idx, back, x_type = res
    r, s = back.shape
    dx = jnp.take(g, back.reshape(-1), axis=0, mode="fill", fill_value=0).reshape((r, s) + g.shape[1:]).sum(1)
    return cotangent_like(dx, x_type), None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def capacity_rows(rows: int, experts: int, tokens: int, main_capacity: float = 1.0) -> int:
    """Rows per expert in the ``"capacity"`` kernel's batched part: ``main_capacity`` times the mean load
    ``rows / experts``, rounded up to a multiple of 8, at most ``tokens`` (no expert can hold more)."""
    if not main_capacity > 0:
        raise ValueError(f"main_capacity={main_capacity} must be > 0 (a multiple of the mean rows per expert)")
    return int(min(tokens, max(8, -(-math.ceil(rows / experts * main_capacity) // 8) * 8)))


def _overflow_block(x, gates, order, blocks, g):
    """Block ``g`` of the overflow loop: sorted rows ``start .. start + B`` of expert ``blocks[g, 2]``, rows
    at or past ``blocks[g, 1]`` dead. Returns ``(pair ids (m = dead), token ids (n = dead), gates, expert, x rows)``."""
    n, m = x.shape[0], gates.shape[0]
    bsz = order.shape[0] - m
    start, end, expert = blocks[g, 0], blocks[g, 1], blocks[g, 2]
    pair = jax.lax.dynamic_slice(order, (start,), (bsz,))
    live = start + jnp.arange(bsz) < end
    pair = jnp.where(live, pair, m)
    token = jnp.where(live, pair // (m // n), n)
    gate = jnp.take(gates, pair, mode="fill", fill_value=0)
    return pair, token, gate, expert, jnp.take(x, token, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def _overflow_experts(x, gates, order, blocks, n_blocks, w13, w2):
    """``y [n, d] = sum_r gate_r FFN_{e_r}(x[token_r])`` over the overflow rows, one block of ``B`` sorted rows
    of one expert per loop step, ``n_blocks`` (dynamic) steps.

    ``x [n, d]``; ``gates [m]`` (pair order, ``m = n k``); ``order [m + B]`` sorted row -> pair, padded with
    ``m``; ``blocks [G, 3]`` int32 ``(start row, end row, expert)``; ``w13 [e, d, 2f]``, ``w2 [e, f, d]``.
    The backward recomputes each block (the overflow is small) instead of storing it.
    """
    def body(g, y):
        _, token, gate, e, xb = _overflow_block(x, gates, order, blocks, g)
        return y.at[token].add(gate[:, None] * _swiglu(xb, w13[e], w2[e], jnp.matmul)[2], mode="drop")

    return jax.lax.fori_loop(0, n_blocks, body, _zeros(x, gates, w13, w2))


def _overflow_experts_fwd(x, gates, order, blocks, n_blocks, w13, w2):
    return _overflow_experts(x, gates, order, blocks, n_blocks, w13, w2), (x, gates, order, blocks, n_blocks, w13, w2)


def _overflow_experts_bwd(res, dy):
    x, gates, order, blocks, n_blocks, w13, w2 = res
    f = w2.shape[1]

    def body(g, carry):
        dx, dgates, dw13, dw2 = carry
        pair, token, gate, e, xb = _overflow_block(x, gates, order, blocks, g)
        h, a, yb = _swiglu(xb, w13[e], w2[e], jnp.matmul)
        dyb = jnp.take(dy, token, axis=0, mode="fill", fill_value=0)
        dgates = dgates.at[pair].set(jnp.sum(dyb * yb, -1), mode="drop")
        dyb = dyb * gate[:, None]
        da = dyb @ w2[e].T
        h1, h3 = h[:, :f], h[:, f:]
        sig = jax.nn.sigmoid(h1)
        dh = jnp.concatenate([da * h3 * sig * (1 + h1 * (1 - sig)), da * h1 * sig], -1)  # d silu(z) = s(1 + z(1 - s))
        return (dx.at[token].add(dh @ w13[e].T, mode="drop"), dgates,
                dw13.at[e].add(xb.T @ dh), dw2.at[e].add(a.T @ dyb))

    zeros = tuple(_zeros(v, dy, x, gates, w13, w2) for v in (x, gates, w13, w2))
    dx, dgates, dw13, dw2 = jax.lax.fori_loop(0, n_blocks, body, zeros)
    return (cotangent_like(dx, x), cotangent_like(dgates, gates), None, None, None, cotangent_like(dw13, w13),
            cotangent_like(dw2, w2))


_overflow_experts.defvjp(_overflow_experts_fwd, _overflow_experts_bwd)


def _select_experts(w: jax.Array, block_e: jax.Array) -> jax.Array:
    """``w[block_e]`` as a one-hot matmul (exact: one term per output): its transpose sums the blocks of
    each expert with a matmul instead of XLA:CPU's serial scatter-add (3x faster forward+backward)."""
    onehot = jax.nn.one_hot(block_e, w.shape[0], dtype=w.dtype)
    return jnp.einsum("ge,e...->g...", onehot, w, precision=jax.lax.Precision.HIGHEST)


def _ragged_mm(a, w, counts):
    return jax.lax.ragged_dot(a, w, counts)


def _blocks_mm(a, w, block_e):
    """``[nb, B, i] . [nb, i, o]``: one expert's weights per block."""
    return jnp.einsum("gbi,gio->gbo", a, _select_experts(w, block_e))


def _grouped(mm, fp8, *aux):
    """``mm(a, w, *aux)``, through :func:`deepseek_jax.kernels.fp8.qdot` (FP8 activations, Dgrad, Wgrad)
    when ``fp8`` (an object with ``scale_fmt``, e.g. an ``FP8Config``) is given."""
    if fp8 is None:
        return lambda a, w: mm(a, w, *aux)
    return lambda a, w: qdot(mm, fp8.scale_fmt, a, w, *aux)


class SortedPairs(NamedTuple):
    """The (token, slot) pairs sorted by expert: ``order [m]`` sorted position -> pair (stable, "no expert"
    last), ``counts [e]`` pairs per expert, ``sorted_e [m]`` the expert of each sorted position."""

    order: jax.Array
    counts: jax.Array
    sorted_e: jax.Array


def _sort_pairs(experts: jax.Array, e: int) -> SortedPairs:
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    counts = jnp.zeros((e,), jnp.int32).at[flat].add(1, mode="drop")
    return SortedPairs(order, counts, flat[order])


def _combine(y_rows: jax.Array, pair_row: jax.Array, row_pair: jax.Array, weights: jax.Array) -> jax.Array:
    """``y [n, d] = sum_j weights[:, j] * y_rows[pair_row[n, j]]`` (rows out of range read as zero)."""
    n, k = weights.shape
    y_pairs = _take_rows(y_rows, pair_row.reshape(-1), row_pair[:, None]).reshape(n, k, -1)
    return jnp.einsum("nkd,nk->nd", y_pairs, weights.astype(y_rows.dtype))


def _rank_right(ends: jax.Array, values: jax.Array) -> jax.Array:
    """``searchsorted(ends, values, side="right")`` for short sorted ``ends`` (one per expert): how many ends
    are <= each value. Written as a comparison because ``jnp.searchsorted`` of a device-varying ``ends`` by
    an invariant ``values`` fails to type inside a partially manual ``shard_map`` (jax 0.10.2)."""
    return jnp.sum(ends[None, :] <= values[:, None], axis=1, dtype=jnp.int32)


def _capacity_kernel(x, weights, pairs: SortedPairs, w13, w2, *, block: int, fp8, main_capacity: float) -> jax.Array:
    """The ``"capacity"`` kernel (see the module docstring); no FP8 form (its overflow loop has none)."""
    del fp8
    order, counts, sorted_e = pairs
    n, d = x.shape
    e, m = w13.shape[0], order.shape[0]
    k = m // n
    cap = capacity_rows(m, e, n, main_capacity)
    start = jnp.cumsum(counts) - counts
    se = jnp.minimum(sorted_e, e - 1)
    rank = jnp.arange(m) - start[se]  # row's place within its expert
    slot = jnp.where((sorted_e < e) & (rank < cap), se * cap + rank, e * cap)  # sorted row -> main slot
    pair_slot = jnp.zeros((m,), jnp.int32).at[order].set(slot)  # pair -> main slot (e * cap = none)
    slot_pair = jnp.full((e * cap,), m, jnp.int32).at[slot].set(order, mode="drop")  # main slot -> pair (m = empty)
    slot_token = jnp.where(slot_pair < m, slot_pair // k, n)
    xm = _take_rows(x, slot_token, pair_slot.reshape(n, k)).reshape(e, cap, d)
    mm = lambda a, w: jnp.einsum("ecd,edf->ecf", a, w)  # noqa: E731 - each expert its own weights
    ym = checkpoint_name(_swiglu(xm, w13, w2, mm)[2].reshape(e * cap, d), "expert_out")
    y = _combine(ym, pair_slot, slot_pair, weights)
    if cap >= n:  # no expert can overflow
        return y
    over = jnp.maximum(counts - cap, 0)
    n_blk = (over + block - 1) // block
    blk_end = jnp.cumsum(n_blk)
    g = jnp.arange(-(-(m - cap) // block) + e)  # static bound on sum_e ceil(over_e / block)
    be = jnp.minimum(_rank_right(blk_end, g), e - 1).astype(jnp.int32)
    blocks = jnp.stack([start[be] + cap + (g - blk_end[be] + n_blk[be]) * block, start[be] + counts[be], be], -1)
    order_pad = jnp.concatenate([order, jnp.full((block,), m, jnp.int32)])
    return y + _overflow_experts(x, weights.reshape(m).astype(x.dtype), order_pad, blocks, blk_end[-1], w13, w2)


def _ragged_kernel(x, weights, pairs: SortedPairs, w13, w2, *, block: int, fp8, main_capacity: float) -> jax.Array:
    """``jax.lax.ragged_dot`` over the rows sorted by expert."""
    del block, main_capacity
    order, counts, sorted_e = pairs
    n, k = weights.shape
    e = w13.shape[0]
    xs = x[order // k]  # [m, d], grouped by expert
    ys = _swiglu(xs, w13, w2, _grouped(_ragged_mm, fp8, counts))[2]
    ys = checkpoint_name(jnp.where((sorted_e < e)[:, None], ys, 0), "expert_out")
    y_pairs = ys[jnp.argsort(order)].reshape(n, k, -1)  # back to pair order
    return jnp.einsum("nkd,nk->nd", y_pairs, weights.astype(ys.dtype))


class _BlockLayout(NamedTuple):
    xb: jax.Array  # [nb, B, d] rows padded per expert to multiples of B
    block_e: jax.Array  # [nb] the expert of each block
    n_used: jax.Array  # blocks in use
    pair_row: jax.Array  # [n, k] pair -> padded row (out of range = none)
    row_pair: jax.Array  # [nb * B] padded row -> pair (m = padding)


def _block_layout(x, pairs: SortedPairs, k: int, e: int, block: int) -> _BlockLayout:
    order, counts, sorted_e = pairs
    n, d = x.shape
    m = order.shape[0]
    nb = m // block + e  # static bound on sum_e ceil(count_e / block)
    padded = (counts + block - 1) // block * block
    pend = jnp.cumsum(padded)
    start = jnp.cumsum(counts) - counts
    se = jnp.minimum(sorted_e, e - 1)
    dest = pend[se] - padded[se] + jnp.arange(m) - start[se]  # row in the padded buffer
    dest = jnp.where(sorted_e < e, dest, nb * block)  # "no expert": outside the buffer
    src = jnp.full((nb * block,), m, jnp.int32).at[dest].set(jnp.arange(m, dtype=jnp.int32), mode="drop")
    row_pair = jnp.concatenate([order, jnp.array([m], order.dtype)])[src]
    pair_row = dest[jnp.argsort(order)].reshape(n, k)
    row_token = jnp.where(row_pair < m, row_pair // k, n)
    xb = _take_rows(x, row_token, pair_row).reshape(nb, block, d)
    block_e = jnp.minimum(_rank_right(pend, jnp.arange(nb) * block), e - 1)
    return _BlockLayout(xb, block_e, pend[-1] // block, pair_row, row_pair)


def _blocks_kernel(x, weights, pairs: SortedPairs, w13, w2, *, block: int, fp8, main_capacity: float,
                   dynamic: bool = False) -> jax.Array:
    """``"blocks"`` (every block) and ``"blocks_dynamic"`` (only the blocks in use)."""
    del main_capacity
    n, k = weights.shape
    lay = _block_layout(x, pairs, k, w13.shape[0], block)
    if dynamic:
        mm = _grouped(_used_block_mm, fp8, lay.block_e, lay.n_used)
    else:
        mm = _grouped(_blocks_mm, fp8, lay.block_e)
    nb, bsz, d = lay.xb.shape
    yb = checkpoint_name(_swiglu(lay.xb, w13, w2, mm)[2].reshape(nb * bsz, d), "expert_out")
    return _combine(yb, lay.pair_row, lay.row_pair, weights)


def _blocks_dynamic_kernel(*args, **kw) -> jax.Array:
    return _blocks_kernel(*args, **kw, dynamic=True)


KERNELS: dict[str, Callable[..., jax.Array]] = {
    "capacity": _capacity_kernel,
    "blocks": _blocks_kernel,
    "blocks_dynamic": _blocks_dynamic_kernel,
    "ragged": _ragged_kernel,
}


def _gather_kernel(x: jax.Array, weights: jax.Array, experts: jax.Array, w1: jax.Array, w3: jax.Array,
                   w2: jax.Array) -> jax.Array:
    """The ``"gather"`` kernel: ``y [n, d] = sum_j weights[:, j] FFN_{experts[:, j]}(x)`` with each pair's
    expert weights gathered (``[m, d, f]``): reads only the experts in use."""
    n, k = experts.shape
    e = w1.shape[0]
    idx = jnp.minimum(experts, e - 1).reshape(-1)
    xs = jnp.repeat(x, k, axis=0)  # [m, d]: pair (i, j) -> token i
    h1 = checkpoint_name(jnp.einsum("md,mdf->mf", xs, w1[idx]), "swiglu_in")  # the remat names of the other kernels
    h3 = checkpoint_name(jnp.einsum("md,mdf->mf", xs, w3[idx]), "swiglu_in")
    y = checkpoint_name(jnp.einsum("mf,mfd->md", jax.nn.silu(h1) * h3, w2[idx]), "expert_out").reshape(n, k, -1)
    gate = jnp.where(experts < e, weights, 0).astype(x.dtype)
    return jnp.einsum("nkd,nk->nd", y, gate)


def _dense_kernel(x: jax.Array, weights: jax.Array, experts: jax.Array, w1: jax.Array, w3: jax.Array,
                  w2: jax.Array) -> jax.Array:
    """The ``"dense"`` kernel: every expert on every token, combined with the ``[n, e]`` gate matrix."""
    e = w1.shape[0]
    gate = jnp.einsum("nk,nke->ne", weights.astype(x.dtype), jax.nn.one_hot(experts, e, dtype=x.dtype))
    h1, h3 = (checkpoint_name(jnp.einsum("nd,edf->enf", x, w), "swiglu_in") for w in (w1, w3))
    y = checkpoint_name(jnp.einsum("enf,efd->end", jax.nn.silu(h1) * h3, w2), "expert_out")
    return jnp.einsum("end,ne->nd", y, gate)


def routed_experts(x: jax.Array, weights: jax.Array, experts: jax.Array, w1: jax.Array, w3: jax.Array,
                   w2: jax.Array, impl: str | None = None, block: int | None = None,
                   fp8=None, main_capacity: float = 1.0) -> jax.Array:
    """Dropless routed experts: ``x [n, d]``, ``weights/experts [n, k]``, ``w1/w3 [e, d, f]``, ``w2 [e, f, d]``.

    Returns ``sum_j weights[:, j] * FFN_{experts[:, j]}(x)`` as ``[n, d]``; ids ``>= e`` contribute zero.
    ``impl``: a key of :data:`KERNELS`, ``"gather"`` or ``"dense"``; by default (no FP8) ``"gather"`` when
    ``m = n k < e``, ``"dense"`` when ``n <= e``, else :func:`grouped_gemm_impl`; ``block`` (rows per block of the
    block kernels and of the capacity kernel's overflow loop) defaults to :func:`default_block`;
    ``main_capacity``: the capacity kernel's batched rows per expert as a multiple of the mean load
    (:func:`capacity_rows`). ``fp8`` (an ``FP8Config``): the grouped GEMMs take FP8 activations (1x128
    tiles; 128x1 token tiles per expert block for Wgrad); the weights must already be on their per-expert
    FP8 grid (:func:`deepseek_jax.kernels.fp8.quantize_weight`, as the MoE layer does before dispatch). FP8
    runs the ``"blocks"`` kernel where ``"capacity"`` is asked for (its overflow loop has no FP8 form).
    """
    e, m = w1.shape[0], experts.size
    if impl == "gather" or (impl is None and fp8 is None and m < e):
        return _gather_kernel(x, weights, experts, w1, w3, w2)
    if impl == "dense" or (impl is None and fp8 is None and x.shape[0] <= e):
        return _dense_kernel(x, weights, experts, w1, w3, w2)
    impl = impl or grouped_gemm_impl()
    if impl == "capacity" and fp8 is not None:
        impl = "blocks"
    if impl not in KERNELS:
        raise ValueError(f"impl={impl!r} must be one of {sorted(KERNELS) + ['dense', 'gather']}")
    w13 = jnp.concatenate([w1, w3], axis=-1)
    return KERNELS[impl](x, weights, _sort_pairs(experts, e), w13, w2, block=block or default_block(m, e),
                         fp8=fp8, main_capacity=main_capacity)
