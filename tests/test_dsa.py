"""DeepSeek Sparse Attention's pure parts (kernels/dsa.py) against NumPy: the indexer's scores (and their
invariance under an orthogonal (Hadamard) rotation of queries and keys, which V3.2 applies), the top-k mask
against a brute force with the stated tie rule, and the KL loss against its formula, with its gradient
reaching the indexer only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import hadamard

from deepseek_jax.kernels import dsa


def _numpy_scores(q, k, w):
    b, t, h, _ = q.shape
    out = np.zeros((b, t, k.shape[1]))
    for bi in range(b):
        for ti in range(t):
            for s in range(k.shape[1]):
                out[bi, ti, s] = sum(w[bi, ti, j] * max(float(q[bi, ti, j] @ k[bi, s]), 0.0) for j in range(h))
    return out


def test_indexer_scores_equal_numpy_and_ignore_a_hadamard_rotation():
    rng = np.random.default_rng(0)
    q, k, w = rng.normal(size=(2, 9, 4, 16)), rng.normal(size=(2, 9, 16)), rng.normal(size=(2, 9, 4))
    got = np.asarray(dsa.indexer_scores(*(jnp.asarray(a, jnp.float32) for a in (q, k, w))))
    np.testing.assert_allclose(got, _numpy_scores(q, k, w), rtol=1e-5, atol=1e-5)
    hd = hadamard(16) / 4.0  # orthogonal
    rot = np.asarray(dsa.indexer_scores(jnp.asarray(q @ hd, jnp.float32), jnp.asarray(k @ hd, jnp.float32),
                                        jnp.asarray(w, jnp.float32)))
    np.testing.assert_allclose(rot, got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 6, 40])
def test_topk_mask_equals_a_brute_force_with_lower_index_ties(k):
    rng = np.random.default_rng(k)
    t = 13
    scores = rng.integers(0, 4, (2, t, t)).astype(np.float32)  # many ties
    seg = np.ones((2, t), np.int32)
    seg[1, 7:] = 2
    ok = np.asarray(dsa.visible(jnp.asarray(seg)))
    got = np.asarray(dsa.topk_mask(jnp.asarray(scores), jnp.asarray(ok), k))
    for b in range(2):
        for i in range(t):
            keys = [s for s in range(t) if s <= i and seg[b, s] == seg[b, i]]
            best = sorted(keys, key=lambda s: (-scores[b, i, s], s))[:k]
            assert set(np.flatnonzero(got[b, i])) == set(best), (b, i)


def test_indexer_kl_equals_its_formula_and_trains_the_indexer_only():
    rng = np.random.default_rng(1)
    b, n, t = 2, 3, 7
    probs = rng.uniform(size=(b, n, t, t))
    scores = rng.normal(size=(b, t, t))
    mask = np.asarray(dsa.topk_mask(jnp.asarray(scores), dsa.visible(jnp.zeros((b, t), jnp.int32)), 4))
    want = []
    for bi in range(b):
        for ti in range(t):
            m = mask[bi, ti]
            p = probs[bi, :, ti][:, m].sum(0)
            p = p / p.sum()
            logq = scores[bi, ti, m] - np.log(np.exp(scores[bi, ti, m]).sum())
            want.append(float((p * (np.log(p) - logq)).sum()))
    with jax.enable_x64(True):
        got = dsa.indexer_kl(jnp.asarray(probs), jnp.asarray(scores), jnp.asarray(mask))
        assert abs(float(got) - np.mean(want)) < 1e-12
        gp, gs = jax.grad(lambda p, s: dsa.indexer_kl(p, s, jnp.asarray(mask)), argnums=(0, 1))(
            jnp.asarray(probs), jnp.asarray(scores))
        assert float(jnp.abs(gp).max()) == 0.0  # the target is constant: the main attention gets nothing
        assert float(jnp.abs(gs).max()) > 0.0
        # the gradient wrt the scores is (softmax - p) / queries on the mask, 0 elsewhere
        q = np.where(mask, np.exp(scores - scores.max(-1, keepdims=True)), 0)
        q = q / q.sum(-1, keepdims=True)
        p = np.where(mask, probs.sum(1), 0)
        p = p / p.sum(-1, keepdims=True)
        np.testing.assert_allclose(np.asarray(gs), (q - p) / (b * t), atol=1e-12)
