"""Model facts computed from shapes alone (``jax.eval_shape``: nothing is allocated).

* ``params_total``: main-model parameters (MTP modules excluded, as DeepSeek reports 671B).
* ``params_active``: parameters a token's forward pass multiplies with: everything but the routed
  experts it skips (``k / e`` of each MoE layer's routed experts are active) and the input embedding
  table (a row lookup; the output head is counted). This is the convention of DeepSeek's published
  figures: V3 36.7B ("37B"), V2 21B, V2-Lite 2.4B.
* ``params_mtp``: MTP-module parameters not shared with the main model (V3: ~11.5B).
* ``kv_cache_bytes_per_token``: bf16 bytes cached per token over all main layers; MLA caches the
  normalised latent and the RoPE key (``c + r`` per layer), MHA/GQA caches ``2 * g * h``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import flax.linen as nn
import jax

from deepseek_jax.config import ModelConfig
from deepseek_jax.model import abstract_variables

__all__ = ["model_info", "kv_cache_elements_per_token_per_layer"]


def kv_cache_elements_per_token_per_layer(cfg: ModelConfig) -> int:
    a = cfg.attention
    return a.kv_lora_rank + a.qk_rope_head_dim if a.kind == "mla" else 2 * a.kv_heads * a.head_dim


def _count(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def model_info(cfg: ModelConfig) -> dict[str, Any]:
    """Parameter counts and KV-cache sizes of ``cfg`` (see module docstring for definitions)."""
    t0 = time.perf_counter()
    params = nn.meta.unbox(abstract_variables(cfg))["params"]
    seconds = time.perf_counter() - t0
    mtp = {k: v for k, v in params.items() if k.startswith("mtp_")}
    main = {k: v for k, v in params.items() if not k.startswith("mtp_")}
    total = _count(main)
    inactive = 0
    if cfg.moe is not None and "moe_layers" in main:
        ffn = main["moe_layers"]["ffn"]
        routed = _count([ffn["w1"], ffn["w2"], ffn["w3"]])
        inactive = routed * (1 - cfg.moe.experts_per_token / cfg.moe.n_routed_experts)
    kv = kv_cache_elements_per_token_per_layer(cfg)
    return {
        "params_total": total,
        "params_active": int(round(total - inactive)) - cfg.vocab_size * cfg.d_model,
        "params_mtp": _count(mtp),
        "params_embedding": cfg.vocab_size * cfg.d_model,
        "kv_cache_elements_per_token_per_layer": kv,
        "kv_cache_bytes_per_token_per_layer": 2 * kv,
        "kv_cache_bytes_per_token": 2 * kv * cfg.n_layers,
        "n_layers": cfg.n_layers,
        "attention": cfg.attention.kind,
        "eval_shape_seconds": round(seconds, 3),
    }
