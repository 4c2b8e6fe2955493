"""Names and layouts: every Hugging Face tensor <-> a slice of one of our variables.

One :class:`Rule` per checkpoint tensor says where it lives in our variable tree (collection, path,
leading index for scanned layers / experts) and how to convert it in both directions. Linear weights
are stored ``[out, in]`` in the checkpoint and ``[in..., out...]`` here. DeepSeek checkpoints keep the
RoPE rows of ``q_b_proj``/``q_proj`` and ``kv_a_proj_with_mqa`` interleaved; they are permuted to the
rotate-half layout on load (and back on save). Llama checkpoints are already rotate-half.

Layer ``N < n_layers`` goes to ``dense_layers[N]`` or ``moe_layers[N - first_k_dense_replace]``;
layer ``n_layers + k`` is MTP module k (its ``embed_tokens`` and ``shared_head.head`` are copies of
the shared embedding and head: written on save, checked on load).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.nn.rope import interleaved_to_half

__all__ = ["Rule", "hf_rules", "mtp_copies"]


class Rule(NamedTuple):
    hf_name: str
    hf_shape: tuple[int, ...]
    collection: str
    path: tuple[str, ...]
    index: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    n_in: int | None = None  # linear weights: how many of our (per-layer) dims are inputs
    rows: np.ndarray | None = None  # linear weights: the checkpoint-row permutation applied on load


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _linear(ours_shape: tuple[int, ...], n_in: int, rows: np.ndarray | None = None):
    """Converters for a linear ``W [out, in]`` <-> ``X [in..., out...]`` (first ``n_in`` dims are inputs)."""
    fan_in = math.prod(ours_shape[:n_in])
    fan_out = math.prod(ours_shape[n_in:])
    inv = None if rows is None else np.argsort(rows)

    def to_ours(w: np.ndarray) -> np.ndarray:
        w = w if rows is None else w[rows]
        return w.T.reshape(ours_shape)

    def to_hf(x: np.ndarray) -> np.ndarray:
        w = x.reshape(fan_in, fan_out).T
        return w if inv is None else w[inv]

    return (fan_out, fan_in), to_ours, to_hf


def _rope_rows(n_blocks: int, block: int, r: int) -> np.ndarray:
    """Row order putting the last ``r`` rows of each ``block`` into rotate-half layout."""
    rows = np.arange(n_blocks * block).reshape(n_blocks, block)
    rows[:, block - r:] = rows[:, block - r:][:, interleaved_to_half(r)]
    return rows.reshape(-1)


def _layer_rules(cfg: ModelConfig, prefix: str, path: tuple[str, ...], idx: tuple[int, ...], moe: bool) -> list[Rule]:
    a, d = cfg.attention, cfg.d_model
    out: list[Rule] = []

    def lin(hf: str, sub: tuple[str, ...], shape: tuple[int, ...], n_in: int = 1, rows=None, index=idx):
        hf_shape, f, g = _linear(shape, n_in, rows)
        out.append(Rule(f"{prefix}.{hf}.weight", hf_shape, "params", path + sub, index, f, g, n_in, rows))

    def norm(hf: str, sub: tuple[str, ...], dim: int):
        out.append(Rule(f"{prefix}.{hf}.weight", (dim,), "params", path + sub + ("scale",), idx, _identity, _identity))

    norm("input_layernorm", ("attn_norm",), d)
    norm("post_attention_layernorm", ("ffn_norm",), d)
    if a.kind == "mla":
        n, p, r, v, c = a.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
        q_rows = _rope_rows(n, p + r, r)
        if a.q_lora_rank:
            lin("self_attn.q_a_proj", ("attn", "wq_a"), (d, a.q_lora_rank))
            norm("self_attn.q_a_layernorm", ("attn", "q_norm"), a.q_lora_rank)
            lin("self_attn.q_b_proj", ("attn", "wq_b"), (a.q_lora_rank, n, p + r), rows=q_rows)
        else:
            lin("self_attn.q_proj", ("attn", "wq"), (d, n, p + r), rows=q_rows)
        lin("self_attn.kv_a_proj_with_mqa", ("attn", "wkv_a"), (d, c + r), rows=_rope_rows(1, c + r, r))
        norm("self_attn.kv_a_layernorm", ("attn", "kv_norm"), c)
        lin("self_attn.kv_b_proj", ("attn", "wkv_b"), (c, n, p + v))
        lin("self_attn.o_proj", ("attn", "wo"), (n, v, d), n_in=2)
    else:
        n, g, h = a.n_heads, a.kv_heads, a.head_dim
        lin("self_attn.q_proj", ("attn", "wq"), (d, n, h))
        lin("self_attn.k_proj", ("attn", "wk"), (d, g, h))
        lin("self_attn.v_proj", ("attn", "wv"), (d, g, h))
        lin("self_attn.o_proj", ("attn", "wo"), (n, h, d), n_in=2)

    def mlp(hf: str, sub: tuple[str, ...], f: int, index=idx):
        lin(f"{hf}.gate_proj", sub + ("w1",), (d, f), index=index)
        lin(f"{hf}.up_proj", sub + ("w3",), (d, f), index=index)
        lin(f"{hf}.down_proj", sub + ("w2",), (f, d), index=index)

    if not moe:
        mlp("mlp", ("ffn",), cfg.intermediate_size)
        return out
    m = cfg.moe
    lin("mlp.gate", ("ffn", "router"), (d, m.n_routed_experts))
    if m.router.topk_method == "noaux_tc":
        out.append(Rule(f"{prefix}.mlp.gate.e_score_correction_bias", (m.n_routed_experts,), "router",
                        path + ("ffn", "e_score_correction_bias"), idx, _identity, _identity))
    for e in range(m.n_routed_experts):
        mlp(f"mlp.experts.{e}", ("ffn",), m.moe_intermediate_size, index=idx + (e,))
    if m.n_shared_experts:
        mlp("mlp.shared_experts", ("ffn", "shared"), m.n_shared_experts * m.moe_intermediate_size)
    return out


def hf_rules(cfg: ModelConfig) -> list[Rule]:
    """Every tensor of a Hugging Face checkpoint of ``cfg`` (MTP layers included when ``cfg.mtp.depth``)."""
    d, v = cfg.d_model, cfg.vocab_size
    rules = [Rule("model.embed_tokens.weight", (v, d), "params", ("embed",), (), _identity, _identity),
             Rule("model.norm.weight", (d,), "params", ("final_norm", "scale"), (), _identity, _identity)]
    if not cfg.tie_embeddings:
        shape, f, g = _linear((d, v), 1)
        rules.append(Rule("lm_head.weight", shape, "params", ("head",), (), f, g))
    for i in range(cfg.n_layers):
        moe = i >= cfg.n_dense_layers
        stack, j = ("moe_layers", i - cfg.n_dense_layers) if moe else ("dense_layers", i)
        rules += _layer_rules(cfg, f"model.layers.{i}", (stack,), (j,), moe)
    for k in range(cfg.mtp.depth):
        prefix, base = f"model.layers.{cfg.n_layers + k}", (f"mtp_{k}",)
        rules += _layer_rules(cfg, prefix, base + ("layer",), (), cfg.moe is not None)
        for hf, sub in (("enorm", "enorm"), ("hnorm", "hnorm"), ("shared_head.norm", "final_norm")):
            rules.append(Rule(f"{prefix}.{hf}.weight", (d,), "params", base + (sub, "scale"), (), _identity, _identity))
        shape, f, g = _linear((2 * d, d), 1)
        rules.append(Rule(f"{prefix}.eh_proj.weight", shape, "params", base + ("eh_proj",), (), f, g, 1))
    return rules


def mtp_copies(cfg: ModelConfig) -> dict[str, str]:
    """MTP-layer tensors that duplicate a main-model tensor: ``{mtp name: main name}``."""
    out = {}
    head = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
    for k in range(cfg.mtp.depth):
        prefix = f"model.layers.{cfg.n_layers + k}"
        out[f"{prefix}.embed_tokens.weight"] = "model.embed_tokens.weight"
        out[f"{prefix}.shared_head.head.weight"] = head
    return out
