"""Inference: the jitted forward, KV caches, samplers and the decode engine (``generate``)."""

from deepseek_jax.infer.cache import cache_bytes_per_token, cache_config, init_cache
from deepseek_jax.infer.engine import generate
from deepseek_jax.infer.forward import forward
from deepseek_jax.infer.sampling import processed_logprobs, sample, speculative_accept

__all__ = ["forward", "generate", "init_cache", "cache_config", "cache_bytes_per_token", "processed_logprobs",
           "sample", "speculative_accept"]
