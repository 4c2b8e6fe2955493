"""Model-level invariants: packing, dtypes, logical axis names, the jitted forward."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dsj


def test_packed_documents_equal_separate_runs(tiny_cfg, tiny_vars, jit_apply):
    """Segment ids stop attention at document borders; positions restart per document."""
    r = np.random.RandomState(0)
    a, b = r.randint(0, 512, 7), r.randint(0, 512, 9)
    packed = np.concatenate([a, b])[None]
    seg = np.array([[0] * 7 + [1] * 9])
    pos = np.array([list(range(7)) + list(range(9))])
    apply = jit_apply(tiny_cfg)
    out = apply(tiny_vars, packed, positions=pos, segment_ids=seg)
    alone_a = apply(tiny_vars, a[None]).logits
    alone_b = apply(tiny_vars, b[None]).logits
    np.testing.assert_allclose(out.logits[:, :7], alone_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.logits[:, 7:], alone_b, rtol=1e-5, atol=1e-5)


def test_bfloat16_forward_close_to_float32(tiny_cfg, tiny_vars, jit_apply):
    tokens = np.random.RandomState(0).randint(0, 512, (2, 16))
    ref = np.asarray(dsj.forward(tiny_cfg, tiny_vars, tokens))
    cfg16 = tiny_cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    v16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, tiny_vars)
    v16["router"] = tiny_vars["router"]  # the correction bias stays float32
    out = jit_apply(cfg16)(v16, tokens)
    assert out.logits.dtype == jnp.float32  # logits are always float32
    err = np.abs(np.asarray(out.logits) - ref).max() / np.abs(ref).max()
    assert err < 3e-2, err


def test_every_parameter_has_logical_axes(tiny_cfg):
    abstract = dsj.abstract_variables(tiny_cfg)
    leaves = jax.tree_util.tree_leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for x in leaves:
        assert len(x.names) == x.value.ndim and all(isinstance(n, str) for n in x.names), x
    stacked = abstract["params"]["moe_layers"]["ffn"]["w1"]
    assert stacked.names == ("layers", "exp", "embed", "mlp_moe")


@pytest.mark.parametrize("preset", ["deepseek-llm-67b", "deepseek-v2-lite-16b"])
def test_scan_keeps_big_presets_cheap_to_trace(preset):
    cfg = dsj.load_config(preset)
    shapes = dsj.abstract_variables(cfg)  # 95 / 27 layers: traced once per stack
    wq = shapes["params"]["dense_layers"]["attn"]["wq"].value
    assert wq.shape[0] == cfg.n_dense_layers
    # the forward's program does not grow with depth: the same number of equations as a 3-layer model
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)

    def eqns(c):
        v = nn.meta.unbox(dsj.abstract_variables(c))
        return len(jax.make_jaxpr(lambda v, t: dsj.Transformer(c).apply(v, t).logits)(v, tokens).jaxpr.eqns)

    shallow = cfg.replace(n_layers=(cfg.moe.first_k_dense_replace if cfg.moe else 0) + 2)
    assert eqns(cfg) == eqns(shallow)


def test_forward_matches_apply(tiny_cfg, tiny_vars, jit_apply):
    tokens = np.random.RandomState(2).randint(0, 512, (2, 8))
    np.testing.assert_allclose(dsj.forward(tiny_cfg, tiny_vars, tokens),
                               jit_apply(tiny_cfg)(tiny_vars, tokens).logits, rtol=1e-5, atol=1e-6)
