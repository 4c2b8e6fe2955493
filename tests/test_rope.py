"""RoPE / YaRN against the published numbers and against transformers' implementation."""

from __future__ import annotations

import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax.nn.rope import apply_rope, inv_frequencies, yarn_ramp_bounds

import hf_reference as R


def test_ramp_bounds():
    v3 = dsj.load_config("deepseek-v3-671b")
    assert yarn_ramp_bounds(64, v3.rope.theta, v3.rope.yarn) == (10, 23)
    tiny = dsj.load_config("tiny")
    assert yarn_ramp_bounds(32, tiny.rope.theta, tiny.rope.yarn) == (2, 9)


@pytest.mark.parametrize("hf_cfg", [R.V3_TINY, R.V2_TINY])
def test_inv_freq_and_amplitude_match_transformers(hf_cfg):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cls = transformers.DeepseekV3Config if hf_cfg["model_type"] == "deepseek_v3" else transformers.DeepseekV2Config
    c = cls(**{k: v for k, v in hf_cfg.items() if k != "model_type"})
    ref_f, ref_amp = ROPE_INIT_FUNCTIONS["yarn"](c)
    cfg = dsj.hf.config_from_hf(hf_cfg)
    f, amp = inv_frequencies(cfg.attention.qk_rope_head_dim, cfg.rope)
    np.testing.assert_allclose(f, ref_f.numpy(), rtol=1e-6)
    assert amp == pytest.approx(ref_amp)


def test_rope_is_a_rotation_with_relative_dot_products():
    cfg = dsj.load_config("tiny")
    r = np.random.RandomState(0)
    q, k = r.randn(1, 1, 32).astype(np.float32), r.randn(1, 1, 32).astype(np.float32)

    def dot(pq, pk):
        a = apply_rope(q, np.array([[pq]]), cfg.rope)
        b = apply_rope(k, np.array([[pk]]), cfg.rope)
        return float((np.asarray(a) * np.asarray(b)).sum())

    assert dot(5, 2) == pytest.approx(dot(105, 102), rel=1e-4)  # depends on the offset only
    np.testing.assert_allclose(np.linalg.norm(apply_rope(q, np.array([[77]]), cfg.rope)), np.linalg.norm(q), rtol=1e-5)
