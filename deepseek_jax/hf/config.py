"""Hugging Face ``config.json`` <-> :class:`ModelConfig` for ``deepseek_v3``, ``deepseek_v2`` and ``llama``.

Both RoPE dialects are read: the released one (``rope_theta`` + ``rope_scaling`` with ``type`` or
``rope_type``) and the newer ``rope_parameters`` (which also holds ``rope_theta``). Values we do not
implement (biases, non-SiLU activations, other RoPE types, sparse MoE layer frequencies) are errors
naming the key, never silently ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deepseek_jax.config import (AttentionConfig, ModelConfig, MoEConfig, MTPConfig, RopeConfig, RouterConfig,
                                 YarnConfig)

__all__ = ["config_from_hf", "config_to_hf", "hf_model_type"]

_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "llama")


def _rope_from_hf(d: dict[str, Any]) -> RopeConfig:
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    if params and "rope_theta" in params:
        theta = params["rope_theta"]
        scaling = scaling or params
    else:
        theta = d.get("rope_theta", 10000.0)
        scaling = scaling or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return RopeConfig(theta=float(theta))
    if kind != "yarn":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (only 'default' and 'yarn')")
    factor = scaling.get("factor")
    orig = scaling.get("original_max_position_embeddings")
    if orig is None:
        raise ValueError("rope_scaling.original_max_position_embeddings is required for yarn")
    if factor is None:
        factor = d["max_position_embeddings"] / orig
    if scaling.get("attention_factor") is not None:
        raise ValueError("rope_scaling.attention_factor is not supported; use mscale / mscale_all_dim")
    return RopeConfig(theta=float(theta), yarn=YarnConfig(
        factor=float(factor), original_max_position_embeddings=int(orig),
        beta_fast=float(scaling.get("beta_fast") or 32), beta_slow=float(scaling.get("beta_slow") or 1),
        mscale=float(scaling.get("mscale") or 0.0), mscale_all_dim=float(scaling.get("mscale_all_dim") or 0.0),
        truncate=bool(scaling.get("truncate", True))))


def _first_id(v: Any) -> int | None:
    return v[0] if isinstance(v, list) else v


def _require(d: dict[str, Any], key: str, allowed: Any) -> None:
    if key in d and d[key] not in allowed:
        raise ValueError(f"{key}={d[key]!r} is not supported (expected one of {allowed})")


def config_from_hf(path_or_dict: str | Path | dict[str, Any]) -> ModelConfig:
    """Parse a Hugging Face config (a dict, a ``config.json`` path, or a checkpoint directory)."""
    if isinstance(path_or_dict, dict):
        d = path_or_dict
    else:
        p = Path(path_or_dict)
        p = p / "config.json" if p.is_dir() else p
        d = json.loads(p.read_text())
    mt = d.get("model_type")
    if mt not in _MODEL_TYPES:
        raise ValueError(f"model_type={mt!r} is not supported (expected one of {_MODEL_TYPES})")
    _require(d, "hidden_act", ("silu",))
    _require(d, "attention_bias", (False,))
    _require(d, "mlp_bias", (False,))
    common = dict(
        vocab_size=d["vocab_size"], d_model=d["hidden_size"], n_layers=d["num_hidden_layers"],
        intermediate_size=d["intermediate_size"], rope=_rope_from_hf(d),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=_first_id(d.get("bos_token_id")), eos_token_id=_first_id(d.get("eos_token_id")),
        init_std=float(d.get("initializer_range", 0.006)),
    )
    if mt == "llama":
        n, g = d["num_attention_heads"], d.get("num_key_value_heads") or d["num_attention_heads"]
        attn = AttentionConfig(kind="mha" if g == n else "gqa", n_heads=n, n_kv_heads=g, head_dim=d.get("head_dim"))
        return ModelConfig(attention=attn, **common)

    _require(d, "moe_layer_freq", (1,))
    n = d["num_attention_heads"]
    if d.get("num_key_value_heads") not in (None, n):
        raise ValueError(f"num_key_value_heads={d['num_key_value_heads']} must equal num_attention_heads={n} for MLA")
    attn = AttentionConfig(kind="mla", n_heads=n, q_lora_rank=d.get("q_lora_rank") or 0,
                           kv_lora_rank=d["kv_lora_rank"], qk_nope_head_dim=d["qk_nope_head_dim"],
                           qk_rope_head_dim=d["qk_rope_head_dim"], v_head_dim=d["v_head_dim"])
    if mt == "deepseek_v3":
        _require(d, "scoring_func", ("sigmoid",))
        _require(d, "topk_method", ("noaux_tc",))
        router = RouterConfig(scoring_func="sigmoid", topk_method="noaux_tc", n_group=d.get("n_group") or 1,
                              topk_group=d.get("topk_group") or 1, norm_topk_prob=bool(d.get("norm_topk_prob", True)),
                              routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)))
        depth = d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0)) or 0
    else:
        _require(d, "scoring_func", ("softmax",))
        method = d.get("topk_method") or "greedy"
        router = RouterConfig(scoring_func="softmax", topk_method=method,
                              n_group=(d.get("n_group") or 1) if method != "greedy" else 1,
                              topk_group=(d.get("topk_group") or 1) if method != "greedy" else 1,
                              norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                              routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)))
        depth = 0
    moe = None
    if d.get("n_routed_experts"):
        moe = MoEConfig(n_routed_experts=d["n_routed_experts"], experts_per_token=d["num_experts_per_tok"],
                        moe_intermediate_size=d["moe_intermediate_size"],
                        n_shared_experts=d.get("n_shared_experts") or 0,
                        first_k_dense_replace=d.get("first_k_dense_replace") or 0, router=router)
    return ModelConfig(attention=attn, moe=moe, mtp=MTPConfig(depth=depth), **common)


def hf_model_type(cfg: ModelConfig) -> str:
    """The ``transformers`` architecture that computes exactly what ``cfg`` does."""
    if cfg.attention.sparse is not None:
        raise ValueError(f"attention.sparse (kind {cfg.attention.sparse.kind!r}) has no transformers counterpart; "
                         "export a dense model (drop attention.sparse)")
    if cfg.attention.kind != "mla":
        if cfg.moe is not None:
            raise ValueError("attention.kind='mha'/'gqa' with moe has no transformers counterpart")
        return "llama"
    if cfg.moe is not None and cfg.moe.router.scoring_func == "softmax":
        return "deepseek_v2"
    return "deepseek_v3"


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A ``config.json`` dict in the released dialect (``rope_theta`` + ``rope_scaling``)."""
    mt = hf_model_type(cfg)
    a = cfg.attention
    d: dict[str, Any] = dict(
        model_type=mt, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        intermediate_size=cfg.intermediate_size, num_attention_heads=a.n_heads, num_key_value_heads=a.kv_heads,
        hidden_act="silu", max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, rope_theta=cfg.rope.theta,
        initializer_range=cfg.init_std, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        torch_dtype=cfg.param_dtype,
    )
    if cfg.rope.yarn is not None:
        y = cfg.rope.yarn
        d["rope_scaling"] = dict(type="yarn", factor=y.factor, original_max_position_embeddings=y.original_max_position_embeddings,
                                 beta_fast=y.beta_fast, beta_slow=y.beta_slow, mscale=y.mscale,
                                 mscale_all_dim=y.mscale_all_dim)
    if mt == "llama":
        d.update(architectures=["LlamaForCausalLM"], head_dim=a.head_dim, mlp_bias=False)
        return d
    d.update(q_lora_rank=a.q_lora_rank or None, kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim,
             qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim)
    m = cfg.moe
    if m is None:
        d.update(n_routed_experts=None, first_k_dense_replace=cfg.n_layers)
    else:
        r = m.router
        d.update(n_routed_experts=m.n_routed_experts, num_experts_per_tok=m.experts_per_token,
                 moe_intermediate_size=m.moe_intermediate_size, n_shared_experts=m.n_shared_experts,
                 first_k_dense_replace=m.first_k_dense_replace, n_group=r.n_group, topk_group=r.topk_group,
                 topk_method=r.topk_method, scoring_func=r.scoring_func, norm_topk_prob=r.norm_topk_prob,
                 routed_scaling_factor=r.routed_scaling_factor, moe_layer_freq=1)
    if mt == "deepseek_v3":
        d.update(architectures=["DeepseekV3ForCausalLM"], num_nextn_predict_layers=cfg.mtp.depth, rope_interleave=True)
    else:
        d.update(architectures=["DeepseekV2ForCausalLM"])
    return d
