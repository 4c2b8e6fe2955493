"""FP8 quantisation against an independent NumPy E4M3 rounding, and the FP8 matmul with its FP8 backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.kernels import fp8
from references import fp8_quantize_reference


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
        rq, rs = fp8_quantize_reference(x, block)
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


# ---------------------------------------------------------------------------------------------------
# The model's FP8 path

def _mm_highest(a, b):
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def test_model_path_dense_equals_matmul_and_native_forward_and_backward():
    """``fp8.dense`` (scales multiplied in before one float32 matmul) gives :func:`fp8.matmul`'s values (scales
    per 128-wide slice) within float32 rounding, forward and both gradients; ``impl="native"`` is that matmul."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(200, 300)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(300, 260)) * 0.05, jnp.float32)
    dy = jnp.asarray(rng.normal(size=(200, 260)), jnp.float32)
    ref = fp8.matmul(x, w)
    for impl in ("simulate", "native"):
        y = fp8.dense(x, w, impl=impl)
        assert float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref))) <= 1e-6
        g_ref = jax.grad(lambda a, b: jnp.sum(fp8.matmul(a, b) * dy), (0, 1))(x, w)
        g = jax.jit(jax.grad(lambda a, b: jnp.sum(fp8.dense(a, b, impl=impl) * dy), (0, 1)))(x, w)
        for a, b in zip(g, g_ref):
            assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) <= 1e-5, impl


def test_quantize_weight_is_blockwise_per_expert_with_straight_through_gradient():
    rng = np.random.default_rng(6)
    w = jnp.asarray(rng.normal(size=(3, 200, 130)) * np.array([1.0, 10.0, 0.01])[:, None, None], jnp.float32)
    wq = fp8.quantize_weight(w)
    for e in range(3):  # one 128x128 grid per expert (partial edge blocks)
        ref = fp8.dequantize(*fp8.quantize(w[e], (128, 128)), (128, 128))
        np.testing.assert_array_equal(np.asarray(wq[e]), np.asarray(ref))
    g = jax.grad(lambda a: jnp.sum(fp8.quantize_weight(a) * w))(w)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))  # straight through to the master weight


def test_grouped_experts_fp8_match_a_per_expert_reference():
    """FP8 routed experts (blocks kernel, one weight grid per expert) against every expert computed on every
    token with the same FP8 rounding (1x128 tiles are per row, so the forward and Dgrad do not depend on
    how rows are grouped); weight gradients within FP8 error of float32 autodiff."""
    from deepseek_jax.config import FP8Config
    from deepseek_jax.kernels.grouped_gemm import routed_experts

    rng = np.random.default_rng(7)
    n, d, f, e, k = 96, 256, 128, 8, 2
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w1, w3 = (jnp.asarray(rng.normal(size=(e, d, f)) * 0.05, jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.normal(size=(e, f, d)) * 0.05, jnp.float32)
    experts = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(n)]), jnp.int32)
    weights = jnp.asarray(rng.uniform(0.2, 1.0, (n, k)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    cfg = FP8Config()

    def grouped(x, w1, w3, w2, impl):
        q = [fp8.quantize_weight(w) for w in (w1, w3, w2)]
        return jnp.sum(routed_experts(x, weights, experts, *q, impl=impl, fp8=cfg) * dy)

    def reference(x, w1, w3, w2):  # every expert on every token, FP8 rounding written out
        tile = lambda a: fp8.dequantize(*fp8.quantize(a, (1, 128)), (1, 128))  # noqa: E731
        block = lambda a: fp8.dequantize(*fp8.quantize(a, (128, 128)), (128, 128))  # noqa: E731
        gate = jnp.einsum("nk,nke->ne", weights, jax.nn.one_hot(experts, e))
        y = 0
        for j in range(e):
            h = jax.nn.silu(_mm_highest(tile(x), block(w1[j]))) * _mm_highest(tile(x), block(w3[j]))
            y = y + gate[:, j:j + 1] * _mm_highest(tile(h), block(w2[j]))
        return jnp.sum(y * dy)

    def plain(x, w1, w3, w2):
        from references import moe_dense_reference

        return jnp.sum(moe_dense_reference(x, weights, experts, w1, w3, w2) * dy)

    ref = float(reference(x, w1, w3, w2))
    for impl in ("blocks", "blocks_dynamic"):
        val, grads = jax.jit(jax.value_and_grad(grouped, argnums=(0, 1, 2, 3)), static_argnums=4)(x, w1, w3, w2, impl)
        assert abs(float(val) - ref) <= 1e-5 * abs(ref) + 1e-3, impl
        exact = jax.grad(plain, argnums=(0, 1, 2, 3))(x, w1, w3, w2)
        for g, ex in zip(grads, exact):
            assert np.all(np.isfinite(np.asarray(g)))
            rel = float(jnp.linalg.norm(g - ex) / jnp.linalg.norm(ex))
            assert rel < 0.08, (impl, rel)  # FP8 Dgrad/Wgrad against float32 autodiff


def test_fp8_switch_routes_linear_layers_and_experts_not_the_head(tiny_cfg, tiny_vars, jit_apply):
    """``fp8: true`` changes the logits by FP8 rounding only; the embedding/head/router stay float32: with
    every routed-through weight and activation on its FP8 grid already, nothing would change."""
    cfg8 = tiny_cfg.replace(fp8=True)
    assert cfg8.fp8.scale_fmt is None and tiny_cfg.replace(fp8={"scale_fmt": "ue8m0"}).fp8.scale_fmt == "ue8m0"
    with pytest.raises(ValueError, match="fp8.scale_fmt"):
        tiny_cfg.replace(fp8={"scale_fmt": "e8"})
    with pytest.raises(ValueError, match="unknown config key"):
        tiny_cfg.replace(fp8={"block": 64})
    tokens = jnp.asarray(np.random.default_rng(8).integers(0, tiny_cfg.vocab_size, (2, 64)), jnp.int32)
    a = jit_apply(tiny_cfg)(tiny_vars, tokens)
    b = jit_apply(cfg8)(tiny_vars, tokens)
    err = float(jnp.linalg.norm(a.logits - b.logits) / jnp.linalg.norm(a.logits))
    print(f"FP8 vs float32 logits (tiny, random init): {err:.4f}")
    assert 1e-4 < err < 0.2
    # the head is not quantised: feeding the head an FP8-quantised copy of its weight changes the logits
    head_q = fp8.quantize_weight(tiny_vars["params"]["head"])
    params_q = {**tiny_vars["params"], "head": head_q}
    c = jit_apply(cfg8)({**tiny_vars, "params": params_q}, tokens)
    assert float(jnp.max(jnp.abs(c.logits - b.logits))) > 1e-4


@pytest.mark.slow
def test_fp8_training_300_steps_matches_float32_within_1_percent(tmp_path, tiny_run):
    """The tiny preset, 300 steps of 4 x 128 tokens from the same seed and data, FP8 on vs off (the off run
    is the session's ``tiny_run``), one device each."""
    import json

    from conftest import TINY_RUN, train_single_device

    def losses(out):
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if r["kind"] == "train"]

    summary = train_single_device(tmp_path / "fp8", TINY_RUN + ["fp8=true"])
    final = {}
    for on, out, s in ((False, tiny_run[0], tiny_run[1]), (True, tmp_path / "fp8", summary)):
        ls = losses(out)
        assert len(ls) == 300 and all(np.isfinite(ls))
        final[on] = (ls[-1], float(np.mean(ls[-10:])), s["val_loss"])
    # the training loss at the end as the mean of the last 10 steps: one step's batch loss moves by ~1% between
    # machines whose float rounding differs (1.04% on one, from 4.83 vs 4.78), its 10-step mean by a third of that
    rel = abs(final[True][1] - final[False][1]) / final[False][1]
    print(f"final training loss: float32 {final[False][0]:.4f}, FP8 {final[True][0]:.4f} (rel {rel:.4%}); "
          f"mean of last 10: {final[False][1]:.4f} vs {final[True][1]:.4f}; "
          f"validation {final[False][2]:.4f} vs {final[True][2]:.4f}")
    assert rel <= 0.01
    assert abs(final[True][2] - final[False][2]) / final[False][2] <= 0.01
