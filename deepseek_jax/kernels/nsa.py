"""Native Sparse Attention (NSA, arXiv 2502.11089 §3.2-3.3) as pure array functions.

Three branches per query ``t``, mixed by per-head sigmoid gates ``o_t = sum_c g_t^c Attn(q_t, K^c, V^c)``:

* **compression** (``cmp``): block ``i`` covers tokens ``[i d, i d + l)`` and is pooled into one key and one
  value (:func:`compress_mean`, :func:`compress_mlp`); it is visible to ``t`` once complete,
  ``i d + l - 1 <= t``, and only when every token of it belongs to ``t``'s document. Without a visible block
  the branch is zero (masked with ``where`` before the softmax: no NaN in values or gradients).
* **selection** (``slc``): block importance ``p_slc[t, j] = sum_i p_cmp[t, i] |[i d, i d + l) & [j l', (j+1) l')|
  / d``, summed over the query heads of a KV group (one selection per group; MLA in its absorbed form is one
  group), top ``n`` selection blocks of ``l'`` tokens, ``n`` counting the forced ``init_blocks`` first blocks
  of the document and the ``local_blocks`` blocks ending at ``t``'s own block; ties go to the lower index.
  Fewer candidate blocks than ``n`` leave ``-1`` sentinels, which select nothing. Tokens past ``t`` or of
  another document are masked inside the selected blocks.
* **window** (``win``): the last ``w`` tokens, ``t`` included.

Document starts come from ``positions`` (``t - positions[t]``, as packing writes them), so the forced initial
blocks are the document's own. Two paths give the same numbers: ``impl="dense"`` scatters the selection into
``[b, g, t, t]`` masks (exact and simple: the oracle, quadratic in memory), ``impl="gather"`` gathers whole
selected blocks and each chunk's window span for ``chunk`` queries at a time (``long-context.md`` §8).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["NSAShape", "compressed_blocks", "block_tokens", "compress_mean", "compress_mlp", "overlap_weights",
           "block_importance", "select_blocks", "nsa_attention", "new_blocks", "nsa_decode", "decode_keys"]

NEG = -1e30  # a finite "minus infinity": masked scores stay finite, so no NaN reaches a gradient


@dataclass(frozen=True)
class NSAShape:
    """The sizes of the three branches (paper defaults §4.1: 32, 16, 64, 16, 1, 2, 512).

    Attributes:
      cmp_block: l, tokens per compressed block. cmp_stride: d, the step between compressed blocks (d | l).
      slc_block: l', tokens per selection block (d | l', l <= l'). slc_count: n, selected blocks per query,
      including init_blocks + local_blocks forced ones. window: w, the sliding window, the query included.
    """

    cmp_block: int = 32
    cmp_stride: int = 16
    slc_block: int = 64
    slc_count: int = 16
    init_blocks: int = 1
    local_blocks: int = 2
    window: int = 512

    def __post_init__(self):
        for name in ("cmp_block", "cmp_stride", "slc_block", "slc_count", "window"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"attention.sparse.{name}={getattr(self, name)!r} must be a positive integer")
        for name in ("init_blocks", "local_blocks"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"attention.sparse.{name}={getattr(self, name)!r} must be a non-negative integer")
        l, d, lp = self.cmp_block, self.cmp_stride, self.slc_block
        if l % d or lp % d:
            raise ValueError(f"attention.sparse.cmp_stride={d} must divide cmp_block={l} and slc_block={lp}")
        if l > lp:
            raise ValueError(f"attention.sparse.cmp_block={l} must not exceed slc_block={lp}")
        if self.slc_count < self.init_blocks + self.local_blocks:
            raise ValueError(f"attention.sparse.slc_count={self.slc_count} must be at least init_blocks + "
                             f"local_blocks = {self.init_blocks + self.local_blocks} (the forced blocks count in it)")


def compressed_blocks(t: int, shape: NSAShape) -> int:
    """How many complete compressed blocks ``t`` tokens hold: ``floor((t - l) / d) + 1`` (0 when ``t < l``)."""
    return max((t - shape.cmp_block) // shape.cmp_stride + 1, 0)


def block_tokens(x: jax.Array, shape: NSAShape) -> jax.Array:
    """``x [b, t, ...] -> [b, nb, l, ...]``: the tokens of every complete compressed block."""
    nb = compressed_blocks(x.shape[1], shape)
    idx = np.arange(nb)[:, None] * shape.cmp_stride + np.arange(shape.cmp_block)[None]
    return x[:, idx]


def compress_mean(blocks: jax.Array) -> jax.Array:
    """``[b, nb, l, g, D] -> [b, nb, g, D]``: the mean of each block (the parameter-free phi)."""
    return blocks.mean(2)


def compress_mlp(blocks: jax.Array, pos: jax.Array, w1: jax.Array, w2: jax.Array) -> jax.Array:
    """``[b, nb, l, g, D] -> [b, nb, g, D]``: phi as in the paper, an MLP of the block's tokens with a learned
    intra-block position encoding ``pos [l, D]``: ``gelu(flatten(x + pos) @ w1) @ w2``, ``w1 [l D, H]``,
    ``w2 [H, D]``, shared by the KV groups."""
    b, nb, l, g, d = blocks.shape
    x = (blocks + pos[None, None, :, None]).transpose(0, 1, 3, 2, 4).reshape(b, nb, g, l * d)
    return jax.nn.gelu(x @ w1) @ w2


def overlap_weights(t: int, shape: NSAShape) -> np.ndarray:
    """``[nb, ns]``: ``|compressed block i & selection block j| / d``, the weights turning compressed scores
    into selection-block importance (1, 2, 2, 2, 1 over blocks 4j-1..4j+3 at l = 32, d = 16, l' = 64)."""
    l, d, lp = shape.cmp_block, shape.cmp_stride, shape.slc_block
    nb, ns = compressed_blocks(t, shape), -(-t // lp)
    start = np.arange(nb)[:, None] * d
    lo = np.maximum(start, np.arange(ns)[None] * lp)
    hi = np.minimum(start + l, (np.arange(ns)[None] + 1) * lp)
    return np.maximum(hi - lo, 0).astype(np.float32) / d


def block_importance(p_cmp: jax.Array, t: int, shape: NSAShape) -> jax.Array:
    """``p_cmp [..., nb]`` (compressed-block probabilities, ``nb = compressed_blocks(t)``) -> ``[..., ns]``
    selection-block importance ``sum_i p_cmp[i] overlap_weights(t)[i, j]`` without the ``[nb, ns]`` matrix:
    block ``j k + m`` (``k = l' / d``) overlaps selection block ``j`` by a weight that depends on ``m`` only,
    ``-(l/d - 1) <= m < k``, so the sum is ``l/d - 1 + k`` strided slices: linear in ``nb``, not ``nb * ns``."""
    l, d, lp = shape.cmp_block, shape.cmp_stride, shape.slc_block
    k, lead = lp // d, l // d - 1
    nb, ns = p_cmp.shape[-1], -(-t // lp)
    pad = jnp.pad(p_cmp, [(0, 0)] * (p_cmp.ndim - 1) + [(lead, ns * k - nb)])
    out = 0.0
    for m in range(-lead, k):
        w = (min(m * d + l, lp) - max(m * d, 0)) / d
        out = out + w * pad[..., m + lead: m + lead + (ns - 1) * k + 1: k]
    return out


def select_blocks(importance: jax.Array, positions: jax.Array, shape: NSAShape,
                  times: jax.Array | None = None) -> jax.Array:
    """``importance [b, g, t, ns]``, ``positions [b, t]`` -> ``[b, g, t, n]`` int32 selection-block indices:
    the forced blocks (the document's first ``init_blocks``, the ``local_blocks`` ending at ``t``'s block),
    then the most important others inside ``[document start, t]``, ties to the lower index; ``-1`` where
    fewer than ``n`` blocks exist. ``times [b, t]``: the queries' slots (default ``0 .. t-1``; decoding
    passes the positions of its new tokens)."""
    lp, n = shape.slc_block, shape.slc_count
    t, ns = importance.shape[2], importance.shape[3]
    if ns < n:  # fewer blocks than selections: pad with blocks past the end (never valid)
        importance = jnp.pad(importance, ((0, 0),) * 3 + ((0, n - ns),))
        ns = n
    q = jnp.broadcast_to(jnp.arange(t), positions.shape) if times is None else times
    first = ((q - positions) // lp)[:, None, :, None]  # [b, 1, t, 1]: the document's first block
    last = (q // lp)[:, None, :, None]
    j = jnp.arange(ns)[None, None, None]
    valid = (j >= first) & (j <= last)
    forced = valid & ((j < first + shape.init_blocks) | (j > last - shape.local_blocks))
    key = jnp.where(forced, jnp.inf, jnp.where(valid, jax.lax.stop_gradient(importance), -jnp.inf))
    order = jnp.argsort(-key, axis=-1, stable=True)[..., :n].astype(jnp.int32)
    return jnp.where(jnp.take_along_axis(jnp.broadcast_to(valid, key.shape), order, -1), order, -1)


def _masked_attention(q, k, v, mask, scale):
    """``q [b, t, g, r, D]``, ``k [b, s, g, D]``, ``v [b, s, g, Dv]``, ``mask [b, g, t, s]`` (broadcast over the
    ``r`` heads of a group) -> ``([b, t, g, r, Dv], p [b, g, r, t, s])``, zero where a row has no key."""
    s = jnp.einsum("btgrd,bsgd->bgrts", q, k).astype(jnp.promote_types(q.dtype, jnp.float32)) * scale
    m = mask[:, :, None]
    p = jax.nn.softmax(jnp.where(m, s, NEG), axis=-1)
    p = jnp.where(m.any(-1, keepdims=True), p, 0.0)
    return jnp.einsum("bgrts,bsgd->btgrd", p.astype(v.dtype), v), p


def _softmax_where(s, ok):
    """Softmax of ``s`` over its last axis where ``ok``; rows without a key give zeros (finite everywhere)."""
    p = jax.nn.softmax(jnp.where(ok, s, NEG), axis=-1)
    return jnp.where(ok.any(-1, keepdims=True), p, 0.0)


def _dense_branches(qg, k, v, sel, segment_ids, scale, shape):
    """Selection and window outputs ``[b, t, g, r, Dv]`` through ``[b, g, t, t]`` masks."""
    b, t, g = qg.shape[:3]
    seg_ok = segment_ids[:, :, None] == segment_ids[:, None, :]  # [b, t, s]
    causal = jnp.tril(jnp.ones((t, t), bool))[None]
    chosen = (sel[..., None] == jnp.arange(-(-t // shape.slc_block))).any(-2)  # [b, g, t, ns]
    slc_mask = chosen[..., jnp.arange(t) // shape.slc_block] & (seg_ok & causal)[:, None]
    o_slc, _ = _masked_attention(qg, k, v, slc_mask, scale)
    near = jnp.arange(t)[:, None] - jnp.arange(t)[None] < shape.window
    win_mask = jnp.broadcast_to((seg_ok & causal & near[None])[:, None], (b, g, t, t))
    o_win, _ = _masked_attention(qg, k, v, win_mask, scale)
    return o_slc, o_win


def _pad_time(x, n, value=0):
    return jnp.pad(x, ((0, 0), (0, n - x.shape[1])) + ((0, 0),) * (x.ndim - 2), constant_values=value)


def _gathered_branches(qg, k, v, sel, segment_ids, scale, shape, chunk, unroll=False):
    """The same outputs with block-granular gathers, ``chunk`` queries at a time (``lax.map``): per chunk the
    ``n`` selected blocks ``[b, g, c, n, l', D]`` and the ``c + w - 1`` keys its windows span; memory grows
    with ``t`` only through the compressed branch."""
    b, t, g, r, _ = qg.shape
    lp, w = shape.slc_block, shape.window
    c = min(chunk, t)
    tp = -(-t // c) * c
    nsp = -(-tp // lp)
    seg_k = _pad_time(segment_ids, nsp * lp, -1)  # padding belongs to no document (and lies in the future)
    kb, vb = ((_pad_time(x, nsp * lp).reshape(b, nsp, lp, g, -1).transpose(0, 3, 1, 2, 4)) for x in (k, v))
    kw, vw = (jnp.pad(x, ((0, 0), (w - 1, tp - t), (0, 0), (0, 0))) for x in (k, v))
    seg_w = jnp.pad(segment_ids, ((0, 0), (w - 1, tp - t)), constant_values=-1)
    qp, selp, seg_q = _pad_time(qg, tp), _pad_time(sel.transpose(0, 2, 1, 3), tp, -1), _pad_time(segment_ids, tp, -1)
    pick = jax.vmap(jax.vmap(lambda blocks, i: blocks[i]))  # [b, g] of (blocks [ns, l', D], index [c, n])

    def one(c0):
        qc = jax.lax.dynamic_slice_in_dim(qp, c0, c, 1)  # [b, c, g, r, D]
        sc = jax.lax.dynamic_slice_in_dim(selp, c0, c, 1).transpose(0, 2, 1, 3)  # [b, g, c, n]
        sq = jax.lax.dynamic_slice_in_dim(seg_q, c0, c, 1)[:, None, :, None, None]  # [b, 1, c, 1, 1]
        tq = (c0 + jnp.arange(c))[None, None, :, None, None]
        blk = jnp.maximum(sc, 0)
        tok = blk[..., None] * lp + jnp.arange(lp)  # [b, g, c, n, l']
        seg_tok = jax.vmap(lambda s, i: s[i])(seg_k, tok)
        ok = (sc >= 0)[..., None] & (tok <= tq) & (seg_tok == sq)
        kk, vv = pick(kb, blk), pick(vb, blk)  # [b, g, c, n, l', D]
        s = jnp.einsum("bcgrd,bgcnld->bgrcnl", qc, kk).astype(jnp.promote_types(qc.dtype, jnp.float32)) * scale
        p = _softmax_where(s.reshape(s.shape[:4] + (-1,)), ok.reshape(ok.shape[:3] + (-1,))[:, :, None])
        o_slc = jnp.einsum("bgrcm,bgcmd->bcgrd", p.astype(vv.dtype), vv.reshape(vv.shape[:3] + (-1, vv.shape[-1])))
        # window: keys c0 - w + 1 .. c0 + c - 1 (front-padded by w - 1)
        kc_, vc_ = (jax.lax.dynamic_slice_in_dim(x, c0, c + w - 1, 1) for x in (kw, vw))
        sw = jax.lax.dynamic_slice_in_dim(seg_w, c0, c + w - 1, 1)  # [b, c + w - 1]
        key = c0 - (w - 1) + jnp.arange(c + w - 1)
        q_at = c0 + jnp.arange(c)
        okw = ((key[None] <= q_at[:, None]) & (q_at[:, None] - key[None] < w))[None] & (
            sw[:, None, :] == sq[:, 0, :, 0])  # [b, c, c + w - 1]
        s = jnp.einsum("bcgrd,bsgd->bgrcs", qc, kc_).astype(jnp.promote_types(qc.dtype, jnp.float32)) * scale
        p = _softmax_where(s, okw[:, None, None])
        o_win = jnp.einsum("bgrcs,bsgd->bcgrd", p.astype(vc_.dtype), vc_)
        return o_slc, o_win

    if unroll:  # the same numbers; every chunk visible to XLA's cost analysis, which counts a loop body once
        outs = [one(c0) for c0 in range(0, tp, c)]
        o_slc, o_win = (jnp.stack([o[i] for o in outs]) for i in (0, 1))
    else:
        # the backward recomputes each chunk's gathers instead of keeping every chunk's [b, g, c, n, l', D] blocks
        o_slc, o_win = jax.lax.map(jax.checkpoint(one), jnp.arange(0, tp, c))  # [chunks, b, c, g, r, Dv]
    merge = lambda o: o.transpose(1, 0, 2, 3, 4, 5).reshape((b, tp) + o.shape[3:])[:, :t]  # noqa: E731
    return merge(o_slc), merge(o_win)


def nsa_attention(q: jax.Array, k: jax.Array, v: jax.Array, kc: jax.Array, vc: jax.Array, gates: jax.Array,
                  segment_ids: jax.Array, positions: jax.Array, scale: float, shape: NSAShape, impl: str = "dense",
                  chunk: int = 64, unroll: bool = False) -> jax.Array:
    """NSA output ``[b, t, h, Dv]`` (see the module docstring).

    Args:
      q: ``[b, t, h, D]``; k ``[b, t, g, D]`` and v ``[b, t, g, Dv]`` (``g`` KV groups, ``g | h``), the keys
        and values of the selection and window branches. kc ``[b, nb, g, D]``, vc ``[b, nb, g, Dv]``: the
        compressed blocks (``nb = compressed_blocks(t)``). gates: ``[b, t, h, 3]`` in (0, 1), the cmp, slc and
        win gates. segment_ids, positions: ``[b, t]`` (a query sees only keys of its own segment id, as in
        the dense attention kernel). scale: the softmax scale.
      impl: ``dense`` (``[b, g, t, t]`` masks: the oracle) or ``gather`` (whole selected blocks gathered for
        ``chunk`` queries at a time; the same numbers). unroll: the chunks as a Python loop instead of
        ``lax.map`` (for ``cost_analysis``, which counts a loop body once; a bigger program to compile).
    """
    if impl not in ("dense", "gather"):
        raise ValueError(f"impl={impl!r} must be 'dense' or 'gather'")
    b, t, h, _ = q.shape
    g = k.shape[2]
    r = h // g
    qg = q.reshape(b, t, g, r, q.shape[-1])
    # compression: complete, visible, inside the query's document
    nb = kc.shape[1]
    ends = jnp.arange(nb) * shape.cmp_stride + shape.cmp_block - 1
    same_doc = (block_tokens(segment_ids, shape)[:, None] == segment_ids[:, :, None, None]).all(-1)  # [b, t, nb]
    cmp_mask = (same_doc & (ends[None, None] <= jnp.arange(t)[None, :, None]))[:, None]  # [b, 1, t, nb]
    o_cmp, p_cmp = _masked_attention(qg, kc, vc, jnp.broadcast_to(cmp_mask, (b, g, t, nb)), scale)
    # selection: importance from the compressed probabilities, summed over the group's heads
    sel = select_blocks(block_importance(p_cmp.sum(2), t, shape), positions, shape)  # [b, g, t, n]
    if impl == "dense":
        o_slc, o_win = _dense_branches(qg, k, v, sel, segment_ids, scale, shape)
    else:
        o_slc, o_win = _gathered_branches(qg, k, v, sel, segment_ids, scale, shape, chunk, unroll)
    return _mix(gates, o_cmp, o_slc, o_win)


def _mix(gates, o_cmp, o_slc, o_win):
    """``sum_c g^c o^c`` with ``gates [b, t, h, 3]`` and branch outputs ``[b, t, g, r, Dv]`` -> ``[b, t, h, Dv]``."""
    b, t, g, r, _ = o_cmp.shape
    gg = gates.reshape(b, t, g, r, 3).astype(o_cmp.dtype)
    o = gg[..., 0:1] * o_cmp + gg[..., 1:2] * o_slc + gg[..., 2:3] * o_win
    return o.reshape(b, t, g * r, -1)


def new_blocks(positions: jax.Array, nb: int, shape: NSAShape) -> tuple[jax.Array, jax.Array]:
    """The compressed blocks that tokens at ``positions [b, tn]`` (consecutive per row) complete: block
    indices ``[b, m]`` (``m = (tn - 1) // d + 1``, the most a run of ``tn`` tokens can complete) and whether
    each is one (its last token ``i d + l - 1`` among the new ones, ``i < nb``)."""
    l, d = shape.cmp_block, shape.cmp_stride
    tn = positions.shape[1]
    p0 = positions[:, :1]
    i = jnp.maximum(-((l - 1 - p0) // d), 0) + jnp.arange((tn - 1) // d + 1)  # ceil((p0 - l + 1) / d), clamped
    end = i * d + l - 1
    return i, (end >= p0) & (end <= p0 + tn - 1) & (i < nb)


def nsa_decode(q: jax.Array, k: jax.Array, v: jax.Array, kc: jax.Array, vc: jax.Array, gates: jax.Array,
               positions: jax.Array, scale: float, shape: NSAShape) -> jax.Array:
    """NSA for new tokens against caches (one document per row; a token at position ``p`` lives in slot ``p``):
    ``q [b, tn, h, D]``, ``positions [b, tn]``, the rotated keys ``k [b, S, g, D]`` and values ``v [b, S, g, Dv]``
    written up to every query, the compressed blocks ``kc [b, nb, g, D]``, ``vc [b, nb, g, Dv]``
    (``nb = compressed_blocks(S)``) written up to each query's complete ones, gates ``[b, tn, h, 3]`` ->
    ``[b, tn, h, Dv]``. A query reads the ``nb`` compressed keys, its ``n`` selected blocks of ``l'`` slots and
    ``w`` window slots: never the whole cache."""
    b, tn, h, dk = q.shape
    size, g, nb = k.shape[1], k.shape[2], kc.shape[1]
    lp, w = shape.slc_block, min(shape.window, size)
    qg = q.reshape(b, tn, g, h // g, dk)
    t = positions[:, :, None]  # [b, tn, 1]
    vis = jnp.arange(nb) * shape.cmp_stride + shape.cmp_block - 1 <= t  # [b, tn, nb]
    o_cmp, p_cmp = _masked_attention(qg, kc, vc, jnp.broadcast_to(vis[:, None], (b, g, tn, nb)), scale)
    sel = select_blocks(block_importance(p_cmp.sum(2), size, shape), positions, shape, times=positions)
    sp = -(-size // lp) * lp
    kb, vb = (_pad_time(x, sp).reshape(b, sp // lp, lp, g, -1).transpose(0, 3, 1, 2, 4) for x in (k, v))
    blk = jnp.maximum(sel, 0)
    kk, vv = (jax.vmap(jax.vmap(lambda x, i: x[i]))(x, blk) for x in (kb, vb))  # [b, g, tn, n, l', D]
    ok = (sel >= 0)[..., None] & (blk[..., None] * lp + jnp.arange(lp) <= t[:, None, :, :, None])
    s = jnp.einsum("btgrd,bgtnld->bgrtnl", qg, kk).astype(jnp.promote_types(q.dtype, jnp.float32)) * scale
    p = _softmax_where(s.reshape(s.shape[:4] + (-1,)), ok.reshape(ok.shape[:3] + (-1,))[:, :, None])
    o_slc = jnp.einsum("bgrtm,bgtmd->btgrd", p.astype(v.dtype), vv.reshape(vv.shape[:3] + (-1, vv.shape[-1])))
    idx = jnp.clip(positions - w + 1, 0, size - w)[..., None] + jnp.arange(w)  # [b, tn, w] window slots
    kw, vw = (jax.vmap(lambda x, i: x[i])(x, idx) for x in (k, v))  # [b, tn, w, g, D]
    okw = (idx <= t) & (idx > t - w)
    s = jnp.einsum("btgrd,btwgd->bgrtw", qg, kw).astype(jnp.promote_types(q.dtype, jnp.float32)) * scale
    p = _softmax_where(s, okw[:, None, None])
    o_win = jnp.einsum("bgrtw,btwgd->btgrd", p.astype(v.dtype), vw)
    return _mix(gates, o_cmp, o_slc, o_win)


def decode_keys(length: int, shape: NSAShape) -> int:
    """Keys one decode step reads at context ``length`` (analytic, paper Table 4): every complete compressed
    block, ``n`` selection blocks of ``l'`` tokens and the window, ``floor((s - l) / d) + 1 + n l' + w``; the
    raw tokens of the last two terms counted at most once each (``length``) on short contexts."""
    raw = min(shape.slc_count * shape.slc_block + shape.window, length)
    return compressed_blocks(length, shape) + raw
