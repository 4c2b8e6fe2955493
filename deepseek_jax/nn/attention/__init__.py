"""Attention: Multi-head Latent Attention (V2/V3), MHA/GQA (DeepSeek LLM), and their KV caches."""

from __future__ import annotations

import flax.linen as nn

from deepseek_jax.config import ModelConfig
from deepseek_jax.nn.attention.cache import CacheConfig, cache_update, cached_mask
from deepseek_jax.nn.attention.common import attention_mask, masked_softmax
from deepseek_jax.nn.attention.gqa import GQA
from deepseek_jax.nn.attention.mla import MLA

__all__ = ["CacheConfig", "MLA", "GQA", "make_attention", "attention_mask", "masked_softmax", "cache_update",
           "cached_mask"]


def make_attention(cfg: ModelConfig, name: str, cache: CacheConfig | None = None) -> nn.Module:
    return (MLA if cfg.attention.kind == "mla" else GQA)(cfg, cache, name=name)
