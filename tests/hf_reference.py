"""Tiny random ``transformers`` models used as the parity reference (no downloads).

Every weight is randomised: matrices N(0, 0.02), norm weights U(0.8, 1.2) so a misplaced norm shows,
router correction biases U(-0.05, 0.05).
"""

from __future__ import annotations

import numpy as np
import torch

V3_TINY = dict(
    model_type="deepseek_v3", vocab_size=512, hidden_size=256, intermediate_size=384, moe_intermediate_size=128,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
    q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
    n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, n_shared_experts=1,
    norm_topk_prob=True, routed_scaling_factor=2.5, rope_theta=10000.0, max_position_embeddings=2048,
    rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=1024, beta_fast=32, beta_slow=1,
                      mscale=1.0, mscale_all_dim=1.0),
    rms_norm_eps=1e-6, tie_word_embeddings=False, num_nextn_predict_layers=0,
)
V2_TINY = dict(
    model_type="deepseek_v2", vocab_size=512, hidden_size=256, intermediate_size=384, moe_intermediate_size=128,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
    q_lora_rank=None, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
    n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2, n_shared_experts=2,
    topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
    rope_theta=10000.0, max_position_embeddings=2048,
    rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=1024, beta_fast=32, beta_slow=1,
                      mscale=0.707, mscale_all_dim=0.707),
    rms_norm_eps=1e-6, tie_word_embeddings=False,
)
LLAMA_TINY = dict(
    model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=2048,
    rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
)


def build(config: dict, seed: int = 0):
    """A randomised ``*ForCausalLM`` in float32, eval mode."""
    import transformers

    torch.manual_seed(seed)
    kind = config["model_type"]
    cfg_cls = {"deepseek_v3": transformers.DeepseekV3Config, "deepseek_v2": transformers.DeepseekV2Config,
               "llama": transformers.LlamaConfig}[kind]
    model_cls = {"deepseek_v3": transformers.DeepseekV3ForCausalLM, "deepseek_v2": transformers.DeepseekV2ForCausalLM,
                 "llama": transformers.LlamaForCausalLM}[kind]
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    hf_cfg = cfg_cls(**kwargs)
    hf_cfg._attn_implementation = "eager"
    model = model_cls(hf_cfg).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name:
                continue
            if "e_score_correction_bias" in name:
                p.copy_(torch.rand(p.shape, generator=gen) * 0.1 - 0.05)
            elif "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) * 0.4 + 0.8)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|."""
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))
