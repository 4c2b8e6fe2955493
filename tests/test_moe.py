"""Dropless grouped-GEMM MoE against the dense reference, and the router's rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax.kernels.grouped_gemm import routed_experts
from deepseek_jax.nn.moe import route
from references import moe_dense_reference, naive_v3_route


def _problem(n=96, d=32, f=16, e=8, k=2, seed=0):
    r = np.random.RandomState(seed)
    x = jnp.asarray(r.randn(n, d), jnp.float32)
    experts = jnp.asarray(np.stack([r.choice(6, size=k, replace=False) for _ in range(n)]), jnp.int32)  # 6, 7 idle
    weights = jnp.asarray(r.rand(n, k), jnp.float32)
    w1, w3 = (jnp.asarray(r.randn(e, d, f) * 0.2, jnp.float32) for _ in range(2))
    w2 = jnp.asarray(r.randn(e, f, d) * 0.2, jnp.float32)
    cot = jnp.asarray(r.randn(n, d), jnp.float32)
    return x, weights, experts, w1, w3, w2, cot


@pytest.mark.parametrize("impl,block,main_capacity", [
    ("blocks", 8, 1.0), ("blocks", 64, 1.0), ("blocks_dynamic", 8, 1.0), ("ragged", None, 1.0),
    ("capacity", 8, 1.0),  # 96*2/8 = 24 rows per expert in the batched part; ~6 overflow rows on each busy expert
    ("capacity", 8, 0.3),  # most rows in the overflow loop, several blocks per expert
    ("capacity", 16, 4.0),  # the batched part holds every row (no overflow loop)
    ("gather", None, 1.0), ("dense", None, 1.0)])  # the few-token (decoding) kernels
def test_grouped_gemm_equals_dense_reference_values_and_grads(impl, block, main_capacity):
    x, weights, experts, w1, w3, w2, cot = _problem()
    assert set(np.unique(experts)) == set(range(6))  # experts 6 and 7 get no tokens

    def loss(fn, *args):
        return jnp.sum(fn(*args) * cot)

    ours = lambda x, w, a, b, c: routed_experts(x, w, experts, a, b, c, impl=impl, block=block or 64,  # noqa: E731
                                                main_capacity=main_capacity)
    ref = lambda x, w, a, b, c: moe_dense_reference(x, w, experts, a, b, c)  # noqa: E731
    args = (x, weights, w1, w3, w2)
    np.testing.assert_allclose(ours(*args), ref(*args), rtol=1e-5, atol=1e-5)
    g_ours = jax.grad(lambda *a: loss(ours, *a), argnums=range(5))(*args)
    g_ref = jax.grad(lambda *a: loss(ref, *a), argnums=range(5))(*args)
    for name, a, b in zip(["x", "weights", "w1", "w3", "w2"], g_ours, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
    assert float(jnp.abs(g_ours[2][6:]).max()) == 0.0  # idle experts receive zero gradient


@pytest.mark.parametrize("impl", ["capacity", "blocks", "blocks_dynamic", "ragged", "gather", "dense"])
def test_no_expert_ids_contribute_nothing(impl):
    """Ids >= e mark empty slots (expert-parallel receive buffers): equal to dropping those slots."""
    x, weights, experts, w1, w3, w2, cot = _problem()
    e = w1.shape[0]
    empty = jnp.asarray(np.random.RandomState(3).rand(*experts.shape) < 0.6)
    marked = jnp.where(empty, e, experts)
    ref = lambda x, w: moe_dense_reference(x, jnp.where(empty, 0.0, w), experts, w1, w3, w2)  # noqa: E731
    ours = lambda x, w: routed_experts(x, w, marked, w1, w3, w2, impl=impl, block=8)  # noqa: E731
    np.testing.assert_allclose(ours(x, weights), ref(x, weights), rtol=1e-5, atol=1e-5)
    g1 = jax.grad(lambda x: jnp.sum(ours(x, weights) * cot))(x)
    g2 = jax.grad(lambda x: jnp.sum(ref(x, weights) * cot))(x)
    np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n,k,picked", [(1, 2, "gather"), (3, 2, "gather"), (5, 2, "dense"), (8, 2, "dense"),
                                         (9, 2, "capacity")])
def test_few_tokens_pick_the_decoding_kernels(n, k, picked, monkeypatch):
    """With 8 experts: fewer pairs than experts gather their experts' weights, at most 8 tokens run every
    expert densely, more go to the default kernel; each equals the dense reference."""
    from deepseek_jax.kernels import grouped_gemm as gg

    x, weights, experts, w1, w3, w2, _ = _problem(n=n, k=k, seed=n)
    called = []
    for name in ("_gather_kernel", "_dense_kernel"):
        monkeypatch.setattr(gg, name, (lambda f, nm: lambda *a: called.append(nm) or f(*a))(getattr(gg, name), name))
    got = routed_experts(x, weights, experts, w1, w3, w2)
    assert called == ([] if picked == "capacity" else [f"_{picked}_kernel"])
    np.testing.assert_allclose(got, moe_dense_reference(x, weights, experts, w1, w3, w2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["capacity", "blocks"])
def test_block_kernels_handle_every_token_on_one_expert(impl):
    """The worst case for the padding bound and for the capacity kernel's overflow (every row past the
    batched part is overflow): values and gradients still equal the dense reference."""
    x, weights, experts, w1, w3, w2, cot = _problem(n=70, k=1)
    experts = jnp.zeros_like(experts)
    ours = lambda x, w, a: routed_experts(x, w, experts, a, w3, w2, impl=impl, block=16)  # noqa: E731
    ref = lambda x, w, a: moe_dense_reference(x, w, experts, a, w3, w2)  # noqa: E731
    np.testing.assert_allclose(ours(x, weights, w1), ref(x, weights, w1), rtol=1e-5, atol=1e-5)
    g_ours = jax.grad(lambda *a: jnp.sum(ours(*a) * cot), argnums=(0, 1, 2))(x, weights, w1)
    g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * cot), argnums=(0, 1, 2))(x, weights, w1)
    for name, a, b in zip(["x", "weights", "w1"], g_ours, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def test_capacity_rows_and_its_errors():
    from deepseek_jax.kernels.grouped_gemm import capacity_rows

    assert capacity_rows(8192, 16, 2048) == 512  # the mean load
    assert capacity_rows(8192, 16, 2048, 1.3) == 672  # 665.6 rounded up to a multiple of 8
    assert capacity_rows(100, 16, 50) == 8  # at least 8
    assert capacity_rows(8192, 16, 300, 2.0) == 300  # never more than the tokens
    with pytest.raises(ValueError, match="main_capacity"):
        capacity_rows(8192, 16, 2048, 0.0)


def test_v3_router_matches_naive_loop_and_bias_only_selects():
    cfg = dsj.load_config("tiny")
    m = cfg.moe
    r = np.random.RandomState(0)
    logits = r.randn(64, m.n_routed_experts).astype(np.float32)
    bias = (r.rand(m.n_routed_experts) * 0.6 - 0.3).astype(np.float32)
    w, i = route(jnp.asarray(logits), jnp.asarray(bias), m)
    order = np.argsort(np.asarray(i), axis=1)
    w, i = np.take_along_axis(np.asarray(w), order, 1), np.take_along_axis(np.asarray(i), order, 1)
    w_ref, i_ref = naive_v3_route(logits, bias, m.router.n_group, m.router.topk_group, m.experts_per_token,
                                   m.router.routed_scaling_factor)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_allclose(w, w_ref, rtol=1e-6)
    # node-limited: every token's experts lie in at most topk_group groups
    per_group = m.n_routed_experts // m.router.n_group
    assert max(len(set(row // per_group)) for row in i) <= m.router.topk_group
    # the bias changes which experts are chosen, but the weights stay the unbiased sigmoid scores
    _, i0 = route(jnp.asarray(logits), None, m)
    assert not np.array_equal(np.sort(np.asarray(i0), 1), i)


def test_moe_layer_load_counts_tokens_per_expert(tiny_cfg, tiny_vars, jit_apply):
    tokens = np.random.RandomState(0).randint(0, tiny_cfg.vocab_size, (2, 16))
    out = jit_apply(tiny_cfg)(tiny_vars, tokens)
    k = tiny_cfg.moe.experts_per_token
    assert out.expert_load.shape == (tiny_cfg.n_moe_layers + tiny_cfg.mtp.depth, tiny_cfg.moe.n_routed_experts)
    np.testing.assert_array_equal(np.asarray(out.expert_load).sum(1), 2 * 16 * k)


def test_router_bias_is_not_a_parameter(tiny_vars):
    assert "router" in tiny_vars and "e_score_correction_bias" in str(jax.tree_util.tree_structure(tiny_vars["router"]))
    assert "e_score_correction_bias" not in str(jax.tree_util.tree_structure(tiny_vars["params"]))
