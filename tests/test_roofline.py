"""The decode roofline's byte count against a formula from the parameter counts, and the expected number of
distinct experts against sampling."""

from __future__ import annotations

import numpy as np
import pytest

from deepseek_jax.analysis.params import param_counts
from deepseek_jax.analysis.roofline import decode_bytes, expected_distinct_experts


@pytest.mark.parametrize("tokens", [1, 3, 8, 40])
def test_expected_distinct_experts_matches_sampling(tokens):
    rng = np.random.default_rng(tokens)
    e, k, trials = 16, 4, 20000
    # each token picks k distinct experts uniformly: the first k of a random permutation
    picks = np.argsort(rng.random((trials, tokens, e)), axis=-1)[..., :k]
    distinct = np.array([len(np.unique(p)) for p in picks])
    assert abs(distinct.mean() - expected_distinct_experts(e, k, tokens)) < 4 * distinct.std() / np.sqrt(trials) + 1e-9


@pytest.mark.parametrize("batch,context", [(1, 100), (8, 300)])
def test_decode_bytes_from_parameter_counts(tiny_cfg, batch, context):
    cfg = tiny_cfg
    pc = param_counts(cfg)
    m = cfg.moe
    used = 1 - (1 - m.experts_per_token / m.n_routed_experts) ** batch
    weights = 4 * (pc.main - pc.embedding - pc.routed_main + pc.routed_main * used + batch * cfg.d_model)
    a = cfg.attention
    cache = 4 * batch * context * (a.kv_lora_rank + a.qk_rope_head_dim) * cfg.n_layers
    got = decode_bytes(cfg, batch, context)
    assert got["weights"] == pytest.approx(weights, rel=1e-12)
    assert got["kv_cache"] == cache
    assert got["per_token"] == pytest.approx((weights + cache) / batch, rel=1e-12)
    assert cfg.param_dtype == "float32" and not cfg.tie_embeddings
