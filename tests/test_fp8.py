"""FP8 quantisation against an independent NumPy E4M3 rounding, and the FP8 matmul with its FP8 backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import fp8


def _e4m3_round(v: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even onto the E4M3 grid (3 mantissa bits, min normal 2^-6, subnormal step 2^-9),
    saturating at 448 -- written from the format's definition, not by casting."""
    a = np.abs(v.astype(np.float64))
    e = np.floor(np.log2(np.maximum(a, 2.0 ** -6)))
    step = 2.0 ** (e - 3)
    r = np.minimum(np.rint(a / step) * step, 448.0)
    return (np.sign(v) * r).astype(np.float32)


def _reference(x: np.ndarray, block) -> tuple[np.ndarray, np.ndarray]:
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
            q[i * bm:(i + 1) * bm, j * bk:(j + 1) * bk] = _e4m3_round(np.clip(t / s, -448, 448))
    return q, scale


def _adversarial() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 300)).astype(np.float32)  # 300 = 2 full tiles + a partial one
    x[1] = 0.0  # an all-zero row
    x[2, 5] = 3e4  # one huge outlier in a tile
    # exact midpoints of the E4M3 grid with scale 1 (amax 448): RNE decides each
    mids = np.array([448, 1.0625, 1.1875, 17.0, 2.0 ** -10, 3 * 2.0 ** -10, 432.0, 440.0, -1.0625, 2.0 ** -7], np.float32)
    x[3, :128] = 0.0
    x[3, :len(mids)] = mids
    x[4] = rng.normal(size=300).astype(np.float32) * 1e-6  # tiles below the amax floor (subnormals after scaling)
    x[5, 256:] = 1e-3  # the partial edge tile
    return x


@pytest.mark.parametrize("block", [(1, 128), (128, 1), (128, 128), (4, 64)])
def test_quantize_bit_for_bit_against_numpy(block):
    rng = np.random.default_rng(1)
    for x in (rng.normal(size=(130, 260)).astype(np.float32) * rng.uniform(0.01, 100, (130, 1)).astype(np.float32),
              _adversarial()):
        q, s = fp8.quantize(jnp.asarray(x), block)
        rq, rs = _reference(x, block)
        assert q.dtype == jnp.float8_e4m3fn and s.dtype == jnp.float32 and s.shape == rs.shape
        np.testing.assert_array_equal(np.asarray(s), rs)
        np.testing.assert_array_equal(np.asarray(q.astype(jnp.float32)), rq)


def test_rounding_cases_and_dequantize():
    x = _adversarial()
    q, s = fp8.quantize(jnp.asarray(x), (1, 128))
    row = np.asarray(q.astype(jnp.float32))[3, :10]
    assert row.tolist() == [448, 1.0, 1.25, 16.0, 0.0, 2.0 ** -8, 448.0, 448.0, -1.0, 2.0 ** -7]
    assert np.all(np.asarray(q.astype(jnp.float32))[1] == 0) and np.all(np.isfinite(np.asarray(s)))
    xh = np.asarray(fp8.dequantize(q, s, (1, 128)))
    assert xh.shape == x.shape
    s_full = np.repeat(np.asarray(s), 128, axis=1)[:, :300]
    normal = np.abs(x) / s_full >= 2.0 ** -6  # in E4M3's normal range after scaling
    assert np.max(np.abs(xh - x)[normal] / np.abs(x)[normal]) <= 2.0 ** -4 + 1e-7  # half an E4M3 ulp, relative
    assert np.max(np.abs(xh - x)[~normal]) <= np.max(s_full) * 2.0 ** -10 + 1e-12  # subnormal: half a step
    _, s_pow2 = fp8.quantize(jnp.asarray(x), (1, 128), scale_fmt="ue8m0")
    assert np.all(np.log2(np.asarray(s_pow2)) == np.round(np.log2(np.asarray(s_pow2))))
    assert np.all(np.asarray(s_pow2) >= np.asarray(s))


def test_nonfinite_inputs_raise_or_are_counted():
    x = np.ones((2, 128), np.float32)
    x[0, 3] = np.nan
    x[1, 7] = np.inf
    with pytest.raises(ValueError, match="2 non-finite"):
        fp8.quantize(jnp.asarray(x))
    q, s, n = fp8.quantize(jnp.asarray(x), nonfinite="count")
    assert int(n) == 2 and np.all(np.isfinite(np.asarray(s)))
    with pytest.raises(Exception, match="non-finite"):
        jax.block_until_ready(jax.jit(lambda a: fp8.quantize(a)[1])(jnp.asarray(x)))


def test_matmul_forward_equals_dequantized_matmul():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(64, 300)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(300, 200)) * 0.05, jnp.float32)
    y = fp8.matmul(x, w)
    xh = fp8.dequantize(*fp8.quantize(x, (1, 128)), (1, 128))
    wh = fp8.dequantize(*fp8.quantize(w, (128, 128)), (128, 128))
    ref = jnp.matmul(xh, wh, precision=jax.lax.Precision.HIGHEST)
    assert float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref))) <= 1e-6


def test_matmul_gradients_within_fp8_error_and_finite_with_outliers():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(256, 256)).astype(np.float32)
    x[7, 11] = 500.0  # outliers
    x[200, 3] = -900.0
    w = (rng.normal(size=(256, 192)) * 0.05).astype(np.float32)
    dy = rng.normal(size=(256, 192)).astype(np.float32)

    def f(x, w, mm):
        return jnp.sum(mm(x, w) * dy)

    exact = jax.grad(f, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w),
                                        lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST))
    got = jax.grad(f, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w), fp8.matmul)
    for g, e in zip(got, exact):
        assert np.all(np.isfinite(np.asarray(g)))
        rel = float(jnp.linalg.norm(g - e) / jnp.linalg.norm(e))
        print(f"relative gradient error {rel:.4f}")
        assert rel < 0.05  # E4M3 rounds to 2^-4 relative per value; errors average out in the sums


def test_tilewise_scaling_beats_per_tensor_on_outliers():
    """A few outlier activations (magnitude M x the typical value): per-tensor scaling pushes every other
    value toward E4M3's subnormal range as M grows; 1x128 tiles confine the damage to the outliers' tiles."""
    rng = np.random.default_rng(4)
    base = rng.normal(size=(256, 512)).astype(np.float32)
    w = (rng.normal(size=(512, 256)) * 0.05).astype(np.float32)
    rows = rng.choice(256, 8, replace=False)
    cols = rng.integers(0, 512, 8)
    keep = np.setdiff1d(np.arange(256), rows)  # the tokens without an outlier

    def err(x, block_x):
        # Only the activations are quantised: the comparison is about how they are scaled.
        xh = fp8.dequantize(*fp8.quantize(jnp.asarray(x), block_x), block_x)
        y = np.asarray(jnp.matmul(xh, jnp.asarray(w), precision="highest"))[keep]
        ref = (x @ w)[keep]
        return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))

    ratios = []
    for mag in (1e3, 1e5, 1e6):
        x = base.copy()
        x[rows, cols] = mag
        tile, tensor = err(x, (1, 128)), err(x, x.shape)
        ratios.append(tensor / tile)
        print(f"outliers {mag:.0e}: matmul relative error 1x128 tiles {tile:.4f}, per-tensor {tensor:.4f} "
              f"({tensor / tile:.1f}x)")
    assert ratios[0] < ratios[1] < ratios[2] and ratios[2] >= 5
