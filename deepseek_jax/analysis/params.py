"""Model facts from shapes alone (``jax.eval_shape``: nothing is allocated), from ONE walk over the
parameters (:func:`param_counts`), and the machine's peak FLOP/s for MFU.

* ``params_total``: main-model parameters (MTP modules excluded, as DeepSeek reports 671B).
* ``params_active``: parameters a token's forward pass multiplies with: everything but the routed
  experts it skips (``k / e`` of each MoE layer's routed experts are active) and the input embedding
  table (a row lookup; the output head is counted). This is the convention of DeepSeek's published
  figures: V3 36.7B ("37B"), V2 21B, V2-Lite 2.4B.
* ``params_mtp``: MTP-module parameters not shared with the main model (V3: ~11.5B).
* ``kv_cache_bytes_per_token``: bf16 bytes cached per token over all main layers; MLA caches the
  normalised latent and the RoPE key (``c + r`` per layer), MHA/GQA caches ``2 * g * h``.
* :func:`flops_per_token`: training FLOPs per token, from the same walk.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.kernels.nsa import decode_keys
from deepseek_jax.nn import tree
from deepseek_jax.nn.transformer import abstract_variables

__all__ = ["ParamCounts", "param_counts", "model_info", "kv_cache_elements_per_token_per_layer", "flops_per_token",
           "peak_flops", "best_seconds"]


def kv_cache_elements_per_token_per_layer(cfg: ModelConfig) -> float:
    """Cached values per token and layer: MLA's latent ``c + r``, or K and V ``2 g h``. DSA adds the indexer's
    key (``index_head_dim``); NSA the unrotated rotary dims (``r``, or the whole key ``g h``) and one compressed
    block per ``d`` tokens (``(c + r) / d``, or ``2 g h / d``): a float then."""
    a = cfg.attention
    key = a.kv_lora_rank + a.qk_rope_head_dim if a.kind == "mla" else a.kv_heads * a.head_dim
    dense = key if a.kind == "mla" else 2 * key
    if a.sparse is None:
        return dense
    if a.sparse.kind == "dsa":
        return dense + a.sparse.index_head_dim
    raw = a.qk_rope_head_dim if a.kind == "mla" else key
    return dense + raw + dense / a.sparse.cmp_stride


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one walk over ``params``: ``main`` (everything but the MTP modules), ``mtp``,
    ``embedding`` (the input table), ``norms`` (RMSNorm scales), ``routed_main`` / ``routed_mtp`` (routed-expert
    weights of the main model / of the MTP layers; 0 for dense models)."""

    main: int
    mtp: int
    embedding: int
    norms: int
    routed_main: int
    routed_mtp: int


@functools.lru_cache(maxsize=32)
def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Walk every parameter once (shapes only) and sort it into :class:`ParamCounts`."""
    params = nn.meta.unbox(abstract_variables(cfg))[tree.PARAMS]
    c = dict(main=0, mtp=0, embedding=0, norms=0, routed_main=0, routed_mtp=0)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        size = math.prod(leaf.shape)
        mtp = tree.is_mtp(tree.keys(path)[0])
        c["mtp" if mtp else "main"] += size
        if tree.is_embedding(path):
            c["embedding"] += size
        elif tree.is_norm(path):
            c["norms"] += size
        elif cfg.moe is not None and tree.is_routed_expert(path):
            c["routed_mtp" if mtp else "routed_main"] += size
    return ParamCounts(**c)


def model_info(cfg: ModelConfig) -> dict[str, Any]:
    """Parameter counts and KV-cache sizes of ``cfg`` (see module docstring for definitions)."""
    t0 = time.perf_counter()
    pc = param_counts(cfg)
    seconds = time.perf_counter() - t0
    total = pc.main
    inactive = pc.routed_main * (1 - cfg.moe.experts_per_token / cfg.moe.n_routed_experts) if cfg.moe else 0
    kv = kv_cache_elements_per_token_per_layer(cfg)
    return {
        "params_total": total,
        "params_active": int(round(total - inactive)) - cfg.vocab_size * cfg.d_model,
        "params_mtp": pc.mtp,
        "params_embedding": cfg.vocab_size * cfg.d_model,
        "kv_cache_elements_per_token_per_layer": kv,
        "kv_cache_bytes_per_token_per_layer": 2 * kv,
        "kv_cache_bytes_per_token": 2 * kv * cfg.n_layers,
        "n_layers": cfg.n_layers,
        "attention": cfg.attention.kind,
        "decode_keys_per_step": decode_key_counts(cfg),
        "eval_shape_seconds": round(seconds, 3),
    }


def decode_key_counts(cfg: ModelConfig) -> dict[int, dict[str, int]] | None:
    """Keys (KV entries) one decode step reads per layer at context lengths 1k, 4k, 8k, 32k, 64k and
    ``max_position_embeddings`` (those up to it), sparse beside dense; None for dense attention. NSA:
    ``floor((s - l) / d) + 1 + n l' + w`` (:func:`~deepseek_jax.kernels.nsa.decode_keys`, paper Table 4);
    DSA: ``min(topk, s)`` latent rows, plus ``indexer``: the ``s`` indexer keys it scores."""
    s = cfg.attention.sparse
    if s is None:
        return None
    top = cfg.max_position_embeddings
    lengths = sorted({n for n in (1024, 4096, 8192, 32768, 65536) if n <= top} | {top})
    if s.kind == "dsa":
        return {n: {"sparse": min(s.topk, n), "dense": n, "indexer": n} for n in lengths}
    return {n: {"sparse": decode_keys(n, s.shape), "dense": n} for n in lengths}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: ``6 * (matmul parameters a token uses)`` plus attention
    ``6 * layers * heads * (d_qk + d_v) * seq_len`` (PaLM's convention: the full, non-causal score
    matrix). Counts the active routed experts only (``k / e``), the output head (once per MTP depth too),
    not the embedding lookup nor the norms; MTP layers included."""
    pc = param_counts(cfg)
    routed = pc.routed_main + pc.routed_mtp
    n = float(pc.main + pc.mtp - pc.embedding - pc.norms - routed)
    if cfg.moe is not None:
        n += routed * cfg.moe.experts_per_token / cfg.moe.n_routed_experts
    head = cfg.d_model * cfg.vocab_size
    n += cfg.mtp.depth * head  # the shared head runs once more per MTP depth
    if cfg.tie_embeddings:
        n += head
    a = cfg.attention
    dqk, dv = (a.qk_head_dim, a.v_head_dim) if a.kind == "mla" else (a.head_dim, a.head_dim)
    attn = 6.0 * (cfg.n_layers + cfg.mtp.depth) * a.n_heads * (dqk + dv) * seq_len
    return 6.0 * n + attn


_PEAK_TABLE = {  # dense bf16 FLOP/s per chip
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
    "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12,
}


def best_seconds(fn, *args, reps: int = 5) -> float:
    """Fastest of ``reps`` timed calls of a jitted ``fn(*args)`` after one warm-up (compiling) call."""
    fn(*args).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best


@functools.lru_cache(maxsize=1)
def _measured_cpu_peak(n: int = 2048, reps: int = 5) -> float:
    return 2 * n ** 3 / best_seconds(jax.jit(lambda x: x @ x), jnp.ones((n, n), jnp.float32), reps=reps)


def peak_flops(override: float = 0.0) -> tuple[float, str]:
    """``(FLOP/s of the machine, where the number came from)``: the override, a table of accelerators
    times the device count, or a measured fp32 matmul on CPU (one process: fake CPU devices share cores)."""
    if override:
        return override, "override"
    devs = jax.devices()
    if devs[0].platform == "cpu":
        return _measured_cpu_peak(), "measured fp32 matmul (CPU)"
    kind = devs[0].device_kind
    for name, f in _PEAK_TABLE.items():
        if name.lower() in kind.lower():
            return f * len(devs), f"table: {name} x {len(devs)}"
    return _measured_cpu_peak() * len(devs), f"measured fp32 matmul ({kind})"
