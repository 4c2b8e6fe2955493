"""The blocked attention core (kernels/attention.py) against the plain masked softmax, values and gradients:
several documents per row, GQA, block sizes that divide the length and one that does not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.kernels.attention import attention_block, causal_attention


def naive(q, k, v, seg, scale):
    """The textbook definition: every (query, key) pair scored, masked, softmaxed."""
    b, t, n, h = q.shape
    g = k.shape[2]
    k = jnp.repeat(k, n // g, axis=2)
    v = jnp.repeat(v, n // g, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    s = jnp.where(mask[:, None], s, -jnp.inf)
    return jnp.einsum("bnts,bsnv->btnv", jax.nn.softmax(s, -1), v)


def _inputs(t=48, n=4, g=4, h=12, dv=8, seed=0):
    rng = np.random.default_rng(seed)
    b = 2
    q = rng.standard_normal((b, t, n, h)).astype(np.float32)
    k = rng.standard_normal((b, t, g, h)).astype(np.float32)
    v = rng.standard_normal((b, t, g, dv)).astype(np.float32)
    seg = np.ones((b, t), np.int32)
    seg[0, t // 3:] = 2          # two documents in row 0, the second crossing block edges
    seg[1, t - 5:] = 0           # trailing padding (segment 0) in row 1
    return tuple(map(jnp.asarray, (q, k, v, seg)))


@pytest.mark.parametrize("block", [8, 16, 48, 20])  # 20 does not divide 48: one block
@pytest.mark.parametrize("g", [4, 2, 1])
def test_values_and_gradients_match_the_plain_softmax(block, g):
    q, k, v, seg = _inputs(g=g)
    scale = 0.3
    out = causal_attention(q, k, v, seg, scale, block)
    np.testing.assert_allclose(out, naive(q, k, v, seg, scale), atol=2e-6, rtol=1e-5)

    w = jnp.asarray(np.random.default_rng(1).standard_normal(out.shape).astype(np.float32))

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v) * w)

    got = jax.grad(loss(lambda q, k, v: causal_attention(q, k, v, seg, scale, block)), (0, 1, 2))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: naive(q, k, v, seg, scale)), (0, 1, 2))(q, k, v)
    for name, a, e in zip("qkv", got, want):
        np.testing.assert_allclose(a, e, atol=2e-5, rtol=1e-4, err_msg=f"d{name}")


def test_the_block_falls_back_to_the_whole_length():
    assert attention_block(256, 64) == 64
    assert attention_block(48, 20) == 48
    assert attention_block(32, 64) == 32
    assert attention_block(32, 32) == 32


def test_bfloat16_inputs_keep_their_dtype_and_stay_close():
    q, k, v, seg = _inputs(g=2)
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out = causal_attention(qb, kb, vb, seg, 0.3, 16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), naive(q, k, v, seg, 0.3), atol=5e-2)
    grads = jax.grad(lambda q: jnp.sum(causal_attention(q, kb, vb, seg, 0.3, 16).astype(jnp.float32)))(qb)
    assert grads.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grads.astype(jnp.float32))))


def test_uneven_heads_are_an_error():
    q, k, v, seg = _inputs(n=4, g=3)
    with pytest.raises(ValueError, match="4 query heads do not divide into 3"):
        causal_attention(q, k, v, seg, 0.3, 16)
