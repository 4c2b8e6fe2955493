"""Test oracles: independent, deliberately naive implementations the package is checked against."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["moe_dense_reference", "naive_v3_route", "e4m3_round", "fp8_quantize_reference", "naive_pack",
           "nsa_reference", "ragged_all_to_all_reference"]


def moe_dense_reference(x: jax.Array, weights: jax.Array, experts: jax.Array, w1: jax.Array, w3: jax.Array,
                        w2: jax.Array) -> jax.Array:
    """Test oracle: every expert on every token, combined with the dense gate matrix ``[n, e]``."""
    e = w1.shape[0]
    gate = jnp.einsum("nk,nke->ne", weights.astype(x.dtype), jax.nn.one_hot(experts, e, dtype=x.dtype))
    h = jax.nn.silu(jnp.einsum("nd,edf->enf", x, w1)) * jnp.einsum("nd,edf->enf", x, w3)
    return jnp.einsum("enf,efd,ne->nd", h, w2, gate)


def ragged_all_to_all_reference(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name, axis_index_groups=None):
    """``jax.lax.ragged_all_to_all`` written from its documented semantics with ``all_to_all`` and a scatter, for
    XLA:CPU (which has no ragged all-to-all): slice i of ``operand`` (``input_offsets[i]``, ``send_sizes[i]``
    rows) goes to device ``i // (K / axis size)``, which writes it at the ``output_offsets[i]`` the sender
    names; the ``recv_sizes`` rows from each source overwrite ``output`` there, the rest of ``output`` is kept."""
    assert axis_index_groups is None
    ep, k, n, m = jax.lax.axis_size(axis_name), input_offsets.shape[0], operand.shape[0], output.shape[0]
    r = jnp.arange(n)
    rows = operand[jnp.clip(input_offsets[:, None] + r, 0, n - 1)]  # [K, n, ...] every slice, padded
    trail = (1,) * (operand.ndim - 1)
    rows = jnp.where((r[None] < send_sizes[:, None]).reshape(k, n, *trail), rows, 0)
    got = jax.lax.all_to_all(rows.reshape(ep, k // ep, *rows.shape[1:]), axis_name, 0, 0).reshape(rows.shape)
    where = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # where each source's slice goes here
    idx = jnp.where(r[None] < recv_sizes[:, None], where[:, None] + r, m)  # m: out of range, dropped
    return output.at[idx.reshape(-1)].set(got.reshape(k * n, *operand.shape[1:]), mode="drop")


def naive_v3_route(logits, bias, n_group, topk_group, k, scale):
    """Per-token Python loop, written from the V3 report §2.1.2 / inference/model.py Gate."""
    s = 1 / (1 + np.exp(-logits))
    out_w, out_i = [], []
    for row, b in zip(s, np.broadcast_to(bias, s.shape)):
        choice = row + b
        groups = choice.reshape(n_group, -1)
        gscore = np.sort(groups, axis=1)[:, -2:].sum(1)
        keep = np.argsort(-gscore)[:topk_group]
        allowed = [e for g in keep for e in range(g * groups.shape[1], (g + 1) * groups.shape[1])]
        idx = sorted(allowed, key=lambda e: -choice[e])[:k]
        w = row[idx] / row[idx].sum() * scale
        order = np.argsort(idx)
        out_w.append(w[order])
        out_i.append(np.array(idx)[order])
    return np.array(out_w), np.array(out_i)


def e4m3_round(v: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even onto the E4M3 grid (3 mantissa bits, min normal 2^-6, subnormal step 2^-9),
    saturating at 448 -- written from the format's definition, not by casting."""
    a = np.abs(v.astype(np.float64))
    e = np.floor(np.log2(np.maximum(a, 2.0 ** -6)))
    step = 2.0 ** (e - 3)
    r = np.minimum(np.rint(a / step) * step, 448.0)
    return (np.sign(v) * r).astype(np.float32)


def fp8_quantize_reference(x: np.ndarray, block) -> tuple[np.ndarray, np.ndarray]:
    bm, bk = block
    m, k = x.shape
    gm, gk = -(-m // bm), -(-k // bk)
    scale = np.zeros((gm, gk), np.float32)
    q = np.zeros_like(x, dtype=np.float32)
    for i in range(gm):
        for j in range(gk):
            t = x[i * bm:(i + 1) * bm, j * bk:(j + 1) * bk].astype(np.float32)
            s = np.float32(max(np.float32(np.abs(t).max()), np.float32(1e-4))) / np.float32(448.0)
            scale[i, j] = s
            q[i * bm:(i + 1) * bm, j * bk:(j + 1) * bk] = e4m3_round(np.clip(t / s, -448, 448))
    return q, scale


def naive_pack(docs, t, eos):
    """Reference packer: one token at a time."""
    rows, row_tok, row_seg, row_pos = [], [], [], []
    seg, pos = 0, 0
    for d in docs:
        first = True
        for tok in list(d) + [eos]:
            if len(row_tok) == t:
                rows.append((row_tok, row_seg, row_pos))
                row_tok, row_seg, row_pos, seg = [], [], [], 0
                first = True
            if first:
                seg, pos, first = seg + 1, 0, False
            row_tok.append(tok)
            row_seg.append(seg)
            row_pos.append(pos)
            pos += 1
    if row_tok:
        pad = t - len(row_tok)
        rows.append((row_tok + [eos] * pad, row_seg + [0] * pad, row_pos + [0] * pad))
    return {k: np.array([r[i] for r in rows]) for i, k in enumerate(("tokens", "segment_ids", "positions"))}


def _softmax_attend(q, keys, values, scale):
    """One query ``q [D]`` over ``keys [m, D]``: ``(output [Dv], probabilities [m])``; zero without keys."""
    if len(keys) == 0:
        return np.zeros(values.shape[-1]), np.zeros(0)
    s = keys @ q * scale
    p = np.exp(s - s.max())
    p /= p.sum()
    return p @ values, p


def nsa_reference(q, k, v, kc, vc, gates, segment_ids, positions, scale, shape, return_selection=False):
    """NSA (arXiv 2502.11089 Eq. 5-12) one query at a time in float64, from the equations: for each (b, t,
    group), the compressed blocks ``i`` with ``i d + l - 1 <= t`` whose tokens all lie in t's document; their
    softmax per head; the selection importance ``sum_heads sum_i p[i] |[i d, i d + l) & [j l', (j+1) l')| / d``
    over the document's blocks up to t's; top-n by a Python sort (forced first/local blocks first, then
    importance descending, the lower index on ties); the window ``t - w < s <= t``. Returns ``o [b, t, h,
    Dv]`` (and the selections ``{(b, t, group): sorted block list}``)."""
    q, k, v, kc, vc, gates = (np.asarray(a, np.float64) for a in (q, k, v, kc, vc, gates))
    seg, pos = np.asarray(segment_ids), np.asarray(positions)
    B, T, H, _ = q.shape
    G = k.shape[2]
    R = H // G
    l, d, lp, n = shape.cmp_block, shape.cmp_stride, shape.slc_block, shape.slc_count
    out = np.zeros((B, T, H, v.shape[-1]))
    chosen = {}
    for b in range(B):
        for t in range(T):
            doc = [s for s in range(t + 1) if seg[b, s] == seg[b, t]]
            blocks = [i for i in range(kc.shape[1])
                      if i * d + l - 1 <= t and all(seg[b, i * d + u] == seg[b, t] for u in range(l))]
            first, last = (t - pos[b, t]) // lp, t // lp
            for g in range(G):
                importance = {j: 0.0 for j in range(first, last + 1)}
                o_cmp = []
                for r in range(R):
                    o, p = _softmax_attend(q[b, t, g * R + r], kc[b, blocks, g], vc[b, blocks, g], scale)
                    o_cmp.append(o)
                    for pi, i in zip(p, blocks):
                        for j in importance:
                            importance[j] += pi * max(min(i * d + l, (j + 1) * lp) - max(i * d, j * lp), 0) / d
                forced = [j for j in importance if j < first + shape.init_blocks or j > last - shape.local_blocks]
                rest = sorted((j for j in importance if j not in forced), key=lambda j: (-importance[j], j))
                sel = sorted(forced + rest[:max(n - len(forced), 0)])
                chosen[b, t, g] = sel
                slc = [s for s in doc if s // lp in sel]
                win = [s for s in doc if t - s < shape.window]
                for r in range(R):
                    h = g * R + r
                    o_slc, _ = _softmax_attend(q[b, t, h], k[b, slc, g], v[b, slc, g], scale)
                    o_win, _ = _softmax_attend(q[b, t, h], k[b, win, g], v[b, win, g], scale)
                    out[b, t, h] = gates[b, t, h, 0] * o_cmp[r] + gates[b, t, h, 1] * o_slc + gates[b, t, h, 2] * o_win
    return (out, chosen) if return_selection else out
