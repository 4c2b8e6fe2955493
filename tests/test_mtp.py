"""Multi-token prediction: causality and the from-scratch composition of V3 §2.2."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import deepseek_jax as dsj
from deepseek_jax.nn.layers import RMSNorm
from deepseek_jax.nn.block import DecoderLayer


def test_mtp_is_causal(tiny_cfg, jit_apply):
    cfg = tiny_cfg.replace(**{"mtp.depth": 2})
    variables = dsj.init_variables(cfg, 1)
    t = 12
    base = np.random.RandomState(0).randint(0, cfg.vocab_size, (1, t))
    apply = jit_apply(cfg)
    out0 = apply(variables, base)
    for j in (3, 7):
        pert = base.copy()
        pert[0, j] = (pert[0, j] + 1) % cfg.vocab_size
        out1 = apply(variables, pert)
        for k in (1, 2):  # depth k: position i sees tokens <= i + k
            diff = np.abs(np.asarray(out1.mtp_logits[k - 1] - out0.mtp_logits[k - 1])).max(-1)[0]
            assert np.all(diff[: j - k] == 0), (j, k, diff)
            assert np.all(diff[j - k:] > 0), (j, k, diff)
        main_diff = np.abs(np.asarray(out1.logits - out0.logits)).max(-1)[0]
        assert np.all(main_diff[:j] == 0) and np.all(main_diff[j:] > 0)


def test_mtp_depth1_equals_manual_composition(tiny_cfg, tiny_vars, jit_apply):
    """h1 = TRM(eh_proj[enorm(E t_{i+1}); hnorm(h0)]), logits = head(norm(h1)), h0 = final-normed main hidden."""
    cfg, p = tiny_cfg, tiny_vars["params"]
    tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 10))
    out = jit_apply(cfg)(tiny_vars, tokens)
    h0 = out.hidden
    np.testing.assert_allclose(h0 @ p["head"], out.logits, rtol=1e-5, atol=1e-5)
    norm = lambda name, x: RMSNorm(cfg.d_model, cfg.rms_norm_eps).apply({"params": p["mtp_0"][name]}, x)  # noqa: E731
    nxt = np.concatenate([tokens[:, 1:], np.zeros((2, 1), int)], 1)
    x = jnp.concatenate([norm("enorm", p["embed"][nxt]), norm("hnorm", h0)], -1) @ p["mtp_0"]["eh_proj"]
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    layer_vars = {"params": p["mtp_0"]["layer"], "router": tiny_vars["router"]["mtp_0"]["layer"]}
    layer = jax.jit(lambda v, x: DecoderLayer(cfg, moe=True).apply(v, x, pos, jnp.zeros((2, 10), jnp.int32)))
    h1, _ = layer(layer_vars, x)
    np.testing.assert_allclose(norm("final_norm", h1) @ p["head"], out.mtp_logits[0], rtol=1e-4, atol=1e-5)

