"""Native Sparse Attention, the dense-mask path (kernels/nsa.py), against a float64 NumPy reference written one
query at a time from the paper's equations (tests/references.py), on GQA (2 groups) and MLA's absorbed form (one
group), at lengths that are not multiples of the block sizes, with two packed documents in a row; the selected
blocks as sets; the limits where a branch equals dense causal attention; causality; no NaN at early positions;
the decode key count of the paper's Table 4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import nsa_reference

from deepseek_jax.kernels import nsa

SHAPE = nsa.NSAShape(cmp_block=8, cmp_stride=4, slc_block=16, slc_count=6, init_blocks=1, local_blocks=2, window=16)
NSA = jax.jit(nsa.nsa_attention, static_argnames=("scale", "shape"))


def _inputs(t, h, g, seed=0, dtype=jnp.float32, packed=True, shape=SHAPE):
    rng = np.random.default_rng(seed)
    d = 8
    q, k, v = (jnp.asarray(rng.normal(size=(2, t, n, d)), dtype) for n in (h, g, g))
    gates = jnp.asarray(rng.uniform(0.1, 0.9, (2, t, h, 3)), dtype)
    seg = np.ones((2, t), np.int32)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (2, t)).copy()
    if packed:  # row 1: two documents, the second starting off any block boundary
        cut = int(t * 0.6)
        seg[1, cut:], pos[1, cut:] = 2, np.arange(t - cut)
    kc = nsa.compress_mean(nsa.block_tokens(k, shape))
    vc = nsa.compress_mean(nsa.block_tokens(v, shape))
    return q, k, v, kc, vc, gates, jnp.asarray(seg), jnp.asarray(pos)


def _dense_causal(q, k, v, seg, scale):
    """Plain causal attention inside documents, NumPy float64 (GQA: heads grouped in order)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    seg = np.asarray(seg)
    b, t, h, _ = q.shape
    r = h // k.shape[2]
    out = np.zeros(q.shape[:3] + (v.shape[-1],))
    for i in range(b):
        for j in range(t):
            keys = [s for s in range(j + 1) if seg[i, s] == seg[i, j]]
            for hh in range(h):
                s = k[i, keys, hh // r] @ q[i, j, hh] * scale
                p = np.exp(s - s.max())
                out[i, j, hh] = (p / p.sum()) @ v[i, keys, hh // r]
    return out


@pytest.mark.parametrize("t", [17, 45])
@pytest.mark.parametrize("h,g", [(4, 2), (4, 1)], ids=["gqa", "mla-mqa"])
def test_nsa_equals_the_float64_reference(t, h, g):
    args = _inputs(t, h, g)
    got = NSA(*args, scale=0.3, shape=SHAPE)
    want = nsa_reference(*args, scale=0.3, shape=SHAPE)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    with jax.enable_x64(True):
        args64 = _inputs(t, h, g, dtype=jnp.float64)
        got64 = NSA(*args64, scale=0.3, shape=SHAPE)
        want64, chosen = nsa_reference(*args64, scale=0.3, shape=SHAPE, return_selection=True)
        np.testing.assert_allclose(np.asarray(got64), want64, rtol=1e-10, atol=1e-10)
        # the selected blocks, as sets, per (row, query, group)
        q, k, v, kc, vc, gates, seg, pos = args64
        sel = np.asarray(_selection(q.reshape(2, t, g, h // g, -1), kc, vc, _cmp_mask(seg, t, g, kc.shape[1]), pos))
    for (b, q_, grp), blocks in chosen.items():
        row = sel[b, grp, q_]
        assert sorted(row[row >= 0].tolist()) == blocks, (b, q_, grp)
        assert 0 in blocks or pos[b, q_] != q_  # the document's first block is always there
        assert q_ // SHAPE.slc_block in blocks  # so is the query's own


@jax.jit
def _selection(q, kc, vc, mask, pos):
    _, p = nsa._masked_attention(q, kc, vc, mask, 0.3)
    imp = jnp.einsum("bgrti,ij->bgtj", p, jnp.asarray(nsa.overlap_weights(q.shape[1], SHAPE)))
    return nsa.select_blocks(imp, pos, SHAPE)


def _cmp_mask(seg, t, g, nb):
    same = (nsa.block_tokens(seg, SHAPE)[:, None] == seg[:, :, None, None]).all(-1)
    ends = np.arange(nb) * SHAPE.cmp_stride + SHAPE.cmp_block - 1
    return jnp.broadcast_to((same & (ends[None, None] <= np.arange(t)[None, :, None]))[:, None], (2, g, t, nb))


def test_overlap_weights_and_the_degenerate_case():
    w = nsa.overlap_weights(256, nsa.NSAShape())  # paper sizes: l = 32, d = 16, l' = 64
    np.testing.assert_array_equal(w[7:12, 2], [1, 2, 2, 2, 1])  # compressed blocks 4j-1 .. 4j+3 for j = 2
    same = nsa.NSAShape(cmp_block=16, cmp_stride=16, slc_block=16, slc_count=4)
    np.testing.assert_array_equal(nsa.overlap_weights(70, same), np.eye(4, 5))  # l = d = l': p_slc = p_cmp


@pytest.mark.parametrize("sizes,t", [((32, 16, 64), 256), ((32, 16, 64), 200), ((8, 4, 16), 45), ((16, 16, 16), 70),
                                     ((8, 2, 8), 37), ((4, 4, 32), 33)])
def test_block_importance_equals_the_overlap_matrix_product(sizes, t):
    l, d, lp = sizes
    shape = nsa.NSAShape(cmp_block=l, cmp_stride=d, slc_block=lp, slc_count=4)
    nb = nsa.compressed_blocks(t, shape)
    p = np.random.default_rng(t).uniform(size=(2, 3, nb))
    want = p @ nsa.overlap_weights(t, shape)
    np.testing.assert_allclose(np.asarray(nsa.block_importance(jnp.asarray(p), t, shape)), want, rtol=1e-6)


@pytest.mark.parametrize("impl", ["dense", "gather"])
@pytest.mark.parametrize("branch", ["slc", "win", "cmp"])
def test_one_branch_covering_the_sequence_is_dense_causal_attention(branch, impl):
    t = 37
    shapes = {"slc": nsa.NSAShape(8, 4, 16, 3, 1, 2, 4),  # n l' = 48 >= t
              "win": nsa.NSAShape(8, 4, 16, 6, 1, 2, 64),  # w >= t
              "cmp": nsa.NSAShape(1, 1, 16, 3, 1, 2, 4)}  # l = d = 1 and a mean of one token: the keys themselves
    shape = shapes[branch]
    q, k, v, kc, vc, gates, seg, pos = _inputs(t, 4, 2, packed=False, shape=shape)
    one = jnp.zeros_like(gates).at[..., ["cmp", "slc", "win"].index(branch)].set(1.0)
    got = nsa.nsa_attention(q, k, v, kc, vc, one, seg, pos, 0.3, shape, impl=impl, chunk=16)
    np.testing.assert_allclose(np.asarray(got), _dense_causal(q, k, v, seg, 0.3), rtol=1e-5, atol=1e-5)


def test_the_future_and_other_documents_change_nothing():
    t = 45
    q, k, v, kc, vc, gates, seg, pos = _inputs(t, 4, 2)
    base = np.asarray(nsa.nsa_attention(q, k, v, kc, vc, gates, seg, pos, 0.3, SHAPE))
    cut = 30
    k2, v2 = k.at[:, cut:].add(5.0), v.at[:, cut:].add(-3.0)
    kc2, vc2 = (nsa.compress_mean(nsa.block_tokens(x, SHAPE)) for x in (k2, v2))
    moved = np.asarray(nsa.nsa_attention(q, k2, v2, kc2, vc2, gates, seg, pos, 0.3, SHAPE))
    np.testing.assert_array_equal(moved[:, :cut], base[:, :cut])  # exactly: the future is masked, not small
    # row 1 holds two documents split at int(0.6 t) = 27: the second document's keys move, the first's outputs stay
    k3 = k.at[1, 27:].multiply(-2.0)
    kc3 = nsa.compress_mean(nsa.block_tokens(k3, SHAPE))
    other = np.asarray(nsa.nsa_attention(q, k3, v, kc3, vc, gates, seg, pos, 0.3, SHAPE))
    np.testing.assert_array_equal(other[1, :27], base[1, :27])


def test_gradients_are_finite_where_no_compressed_block_exists_yet():
    q, k, v, kc, vc, gates, seg, pos = _inputs(17, 4, 2)

    def loss(q, k, v, gates):
        kc, vc = (nsa.compress_mean(nsa.block_tokens(x, SHAPE)) for x in (k, v))
        return nsa.nsa_attention(q, k, v, kc, vc, gates, seg, pos, 0.3, SHAPE).sum()

    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, gates)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)
    assert float(jnp.abs(grads[3][:, :SHAPE.cmp_block - 1, :, 0]).max()) == 0.0  # no block: the cmp gate is idle


def test_decode_key_count_reproduces_table_4():
    paper = nsa.NSAShape()
    for s, want in ((8192, 2048), (16384, 2560), (32768, 3584), (65536, 5632)):
        assert abs(nsa.decode_keys(s, paper) - want) <= 2, s


def test_inconsistent_sizes_name_the_field():
    with pytest.raises(ValueError, match="cmp_stride=5 must divide cmp_block=32"):
        nsa.NSAShape(cmp_stride=5)
    with pytest.raises(ValueError, match="cmp_block=128 must not exceed slc_block=64"):
        nsa.NSAShape(cmp_block=128)
    with pytest.raises(ValueError, match="slc_count=2 must be at least init_blocks"):
        nsa.NSAShape(slc_count=2)


def _gelu(x):  # jax.nn.gelu's default (tanh) form, in NumPy
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _compress_mlp_numpy(x, pos, w1, w2, shape):
    """phi in float64 NumPy: ``gelu(flatten(block + pos) @ w1) @ w2`` per block and group."""
    b, t, g, d = x.shape
    nb = nsa.compressed_blocks(t, shape)
    out = np.zeros((b, nb, g, w2.shape[1]))
    for i in range(nb):
        blk = x[:, i * shape.cmp_stride:i * shape.cmp_stride + shape.cmp_block] + pos[None, :, None]  # [b, l, g, d]
        out[:, i] = _gelu(blk.transpose(0, 2, 1, 3).reshape(b, g, -1) @ w1) @ w2
    return out


def test_gradients_of_every_input_match_central_differences_of_the_reference():
    """Directional derivatives: for random directions u over (q, k, v, gates, phi's position encoding and both
    MLP weights), grad . u from JAX (float64) against (f(x + eps u) - f(x - eps u)) / 2 eps of the NumPy
    reference (phi transcribed to NumPy too)."""
    t, h, g = 23, 4, 2
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        q, k, v, _, _, gates, seg, pos = _inputs(t, h, g, seed=1, dtype=jnp.float64)
        phi = [rng.normal(size=(SHAPE.cmp_block, 8)) * 0.3, rng.normal(size=(8 * SHAPE.cmp_block, 16)) * 0.1,
               rng.normal(size=(16, 8)) * 0.3]
        weight = rng.normal(size=(2, t, h, 8))
        xs = [np.asarray(a) for a in (q, k, v, gates)] + phi

        def f_jax(q, k, v, gates, pe, w1, w2):
            kc, vc = (nsa.compress_mlp(nsa.block_tokens(x, SHAPE), pe, w1, w2) for x in (k, v))
            return (nsa.nsa_attention(q, k, v, kc, vc, gates, seg, pos, 0.3, SHAPE) * weight).sum()

        grads = jax.grad(f_jax, argnums=tuple(range(7)))(*map(jnp.asarray, xs))

    def f_ref(q, k, v, gates, pe, w1, w2):
        kc, vc = (_compress_mlp_numpy(x, pe, w1, w2, SHAPE) for x in (k, v))
        return float((nsa_reference(q, k, v, kc, vc, gates, seg, pos, 0.3, SHAPE) * weight).sum())

    eps = 1e-5
    for trial in range(3):
        u = [rng.normal(size=x.shape) for x in xs]
        plus, minus = ([x + sign * eps * d for x, d in zip(xs, u)] for sign in (1, -1))
        numeric = (f_ref(*plus) - f_ref(*minus)) / (2 * eps)
        analytic = sum(float((np.asarray(gr) * d).sum()) for gr, d in zip(grads, u))
        assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (trial, analytic, numeric)


@pytest.mark.parametrize("h,g", [(4, 2), (4, 1)], ids=["gqa", "mla-mqa"])
def test_the_block_gather_path_equals_the_dense_mask_path(h, g):
    """Whole selected blocks gathered 16 queries at a time (45 = 2 chunks and a padded third), values and the
    gradients of every input, packed documents included."""
    t = 45
    q, k, v, _, _, gates, seg, pos = _inputs(t, h, g)

    def run(impl):
        def loss(q, k, v, gates):
            kc, vc = (nsa.compress_mean(nsa.block_tokens(x, SHAPE)) for x in (k, v))
            o = nsa.nsa_attention(q, k, v, kc, vc, gates, seg, pos, 0.3, SHAPE, impl=impl, chunk=16)
            return (o * jnp.cos(jnp.arange(o.size).reshape(o.shape))).sum(), o
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, gates)

    (_, dense), dgrads = run("dense")
    (_, gathered), ggrads = run("gather")
    np.testing.assert_allclose(np.asarray(gathered), np.asarray(dense), rtol=1e-5, atol=1e-6)
    for a, b in zip(ggrads, dgrads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_flops_grow_about_2x_per_doubling_for_nsa_and_4x_for_dense():
    """XLA's cost analysis of the forward at 1k..8k with the paper's sizes (chunks unrolled: a loop body is
    counted once): NSA <= 2.3x per doubling (compression grows with t^2 / d, the rest with t), dense 4x. (With
    4 heads of 32 the masks and the block ranking, which do not scale with the heads, reach 2.32 at 8k.)"""
    shape = nsa.NSAShape()
    flops = {"nsa": [], "dense": []}
    for t in (1024, 2048, 4096, 8192):
        q = jax.ShapeDtypeStruct((1, t, 16, 128), jnp.float32)  # MLA-like: 16 heads on one shared key
        kv = jax.ShapeDtypeStruct((1, t, 1, 128), jnp.float32)
        seg = jax.ShapeDtypeStruct((1, t), jnp.int32)

        def sparse(q, k, v, seg):
            kc, vc = (nsa.compress_mean(nsa.block_tokens(x, shape)) for x in (k, v))
            pos = jnp.broadcast_to(jnp.arange(t), (1, t))
            return nsa.nsa_attention(q, k, v, kc, vc, jnp.full(q.shape[:3] + (3,), 0.5), seg, pos, 0.2, shape,
                                     "gather", chunk=128, unroll=True)

        def dense(q, k, v, seg):
            return _masked_attention_dense(q, k, v)

        for name, fn in (("nsa", sparse), ("dense", dense)):
            cost = jax.jit(fn).lower(q, kv, kv, seg).compile().cost_analysis()
            flops[name].append((cost[0] if isinstance(cost, list) else cost)["flops"])
    ratios = {k: [b / a for a, b in zip(v, v[1:])] for k, v in flops.items()}
    print(ratios)
    assert all(1.9 <= r <= 2.3 for r in ratios["nsa"]), ratios
    assert all(3.9 <= r <= 4.1 for r in ratios["dense"]), ratios


def _masked_attention_dense(q, k, v):
    t = q.shape[1]
    s = jnp.einsum("bthd,bsd->bhts", q, k[:, :, 0]) * 0.2
    p = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf), -1)
    return jnp.einsum("bhts,bsd->bthd", p, v[:, :, 0])
