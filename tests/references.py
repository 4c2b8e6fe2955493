"""Test oracles: independent, deliberately naive implementations the package is checked against."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["moe_dense_reference", "naive_v3_route", "e4m3_round", "fp8_quantize_reference", "naive_pack"]


def moe_dense_reference(x: jax.Array, weights: jax.Array, experts: jax.Array, w1: jax.Array, w3: jax.Array,
                        w2: jax.Array) -> jax.Array:
    """Test oracle: every expert on every token, combined with the dense gate matrix ``[n, e]``."""
    e = w1.shape[0]
    gate = jnp.einsum("nk,nke->ne", weights.astype(x.dtype), jax.nn.one_hot(experts, e, dtype=x.dtype))
    h = jax.nn.silu(jnp.einsum("nd,edf->enf", x, w1)) * jnp.einsum("nd,edf->enf", x, w3)
    return jnp.einsum("enf,efd,ne->nd", h, w2, gate)


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
