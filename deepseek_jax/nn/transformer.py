"""The DeepSeek decoder-only Transformer (LLM 7B/67B, V2, V2-Lite, V3) with multi-token prediction.

Embedding, the decoder stacks (:mod:`deepseek_jax.nn.block`: the dense-MLP layers, then the MoE layers),
``logits = RMSNorm(x) · W_head`` (``[b, t, d] · [d, v]``), then the MTP modules.

Multi-token prediction (V3 §2.2): module k (1..D) computes, for every position i,
``h^k_i = TRM_k(eh_proj[RMSNorm_e(Emb(t_{i+k})) ; RMSNorm_h(h^{k-1}_i)])`` and
``mtp_logits[k-1, :, i] = RMSNorm_k(h^k_i) · W_head`` (predicting token i+k+1). Embedding-first
concatenation follows the released checkpoint's ``eh_proj`` (as engines that load it do); ``h^0`` is
the main model's final-normed hidden state. Embedding and head are shared with the main model.
Positions i >= t-k see padding in place of ``t_{i+k}``; losses must mask them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.nn import tree
from deepseek_jax.nn.attention import CacheConfig
from deepseek_jax.nn.block import ACT, MTPModule, layer_stack
from deepseek_jax.nn.layers import RMSNorm, linear, param, take
from deepseek_jax.parallel.rules import constrain

__all__ = ["ModelOutput", "Transformer", "init_variables", "abstract_variables", "check_tokens", "embedding_params",
           "embed_and_dense", "head_and_mtp"]


@flax.struct.dataclass
class ModelOutput:
    """``logits [b, t, v]`` float32; ``mtp_logits [D, b, t, v]`` float32 or None; ``expert_load
    [n_moe_layers + D, e]`` float32 tokens per expert (MTP layers last) or None for dense models;
    ``hidden [b, t, d]`` the final-normed hidden state (the head's input, and MTP's ``h^0``)."""

    logits: jax.Array
    mtp_logits: jax.Array | None = None
    expert_load: jax.Array | None = None
    hidden: jax.Array | None = None


def check_tokens(tokens: Any, vocab_size: int) -> None:
    """Raise ``ValueError`` for concrete token ids outside ``[0, vocab_size)`` (a silent clamp otherwise)."""
    if isinstance(tokens, jax.core.Tracer) or (isinstance(tokens, jax.Array) and not tokens.is_fully_addressable):
        return  # traced, or a multi-process global array (each process checks its own rows before assembly)
    arr = np.asarray(tokens)
    if arr.ndim != 2:
        raise ValueError(f"tokens must be [batch, time], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = arr[(arr < 0) | (arr >= vocab_size)]
        raise ValueError(f"token ids must be in [0, vocab_size={vocab_size}); got {bad[:5].tolist()} "
                         f"(min {arr.min()}, max {arr.max()}): is the tokenizer's vocabulary larger than the model's?")


class Transformer(nn.Module):
    """DeepSeek causal LM. ``tokens [b, t]`` int -> :class:`ModelOutput`.

    ``positions [b, t]`` (default ``arange(t)``) feed RoPE; ``segment_ids [b, t]`` (default zeros)
    restrict attention to one packed document. ``remat`` is the recomputation policy of every layer
    (``"none"``, ``"full"``, ``"deepseek"``; see :func:`~deepseek_jax.nn.block.remat_policy`); ``scan_unroll`` the layers per
    scan iteration (0 = auto, see :func:`~deepseek_jax.nn.block.scan_unroll`). Neither changes the numbers.

    Inference (:mod:`deepseek_jax.infer`): with ``cache`` (an :class:`~deepseek_jax.nn.attention.CacheConfig`)
    every attention layer reads and writes the ``"cache"`` collection (``apply(..., mutable=["cache"])``),
    and ``positions`` must be given (slot = position). ``with_mtp=False`` skips the MTP modules;
    ``draft_from=h [b, t, d]`` runs only MTP module 1 on ``(h, Emb(tokens))`` -- ``tokens`` being the
    *next* tokens ``t_{i+1}`` -- and returns its logits (predicting ``t_{i+2}``) and hidden state.
    ``stacked=False`` expects the per-layer layout of :func:`~deepseek_jax.nn.tree.unstack_layers` (decoding).
    """

    cfg: ModelConfig
    remat: str = "none"
    scan_unroll: int = 0
    cache: CacheConfig | None = None
    stacked: bool = True

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, *, with_mtp: bool = True,
                 draft_from=None) -> ModelOutput:
        c = self.cfg
        check_tokens(tokens, c.vocab_size)
        dt = jnp.dtype(c.dtype)
        b, t = tokens.shape
        if positions is None:
            if self.cache is not None:
                raise ValueError("positions are required with a cache (slot = position)")
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.zeros((b, t), jnp.int32)
        embed, head = embedding_params(self, c)
        if draft_from is not None:  # MTP module 1 alone: the speculative draft
            if not c.mtp.depth:
                raise ValueError("draft_from needs MTP modules (mtp.depth >= 1)")
            emb = constrain(take(embed, tokens).astype(dt), *ACT)
            h1, hk, load = MTPModule(c, self.remat, self.cache, name=tree.mtp_name(0))(draft_from.astype(dt), emb, positions, segment_ids)
            return ModelOutput(logits=linear(hk, head).astype(jnp.float32), hidden=h1,
                               expert_load=None if load is None else load[None])
        x = embed_and_dense(c, embed, tokens, positions, segment_ids, self.remat, self.scan_unroll, self.cache,
                            self.stacked)
        loads = []
        if c.n_moe_layers:
            x, load = layer_stack(c, True, c.n_moe_layers, tree.MOE_STACK, self.remat, self.scan_unroll,
                                   self.cache, self.stacked)(x, positions, segment_ids)
            loads.append(load)
        out = head_and_mtp(c, x, embed, head, tokens, positions, segment_ids, self.remat, self.cache, with_mtp)
        if out.expert_load is not None:
            loads.append(out.expert_load)
        expert_load = jnp.concatenate(loads) if loads else None
        return out.replace(expert_load=expert_load)


def embedding_params(mod: nn.Module, c: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Declare (in ``mod``) the embedding ``[v, d]`` and the head ``[d, v]`` (the embedding's transpose when
    tied); the head in the compute dtype."""
    pd = jnp.dtype(c.param_dtype)
    embed = param(mod, tree.EMBED, (c.vocab_size, c.d_model), ("vocab", "embed"), c.init_std, pd, gather=False)
    if c.tie_embeddings:
        head = embed.T
    else:
        head = param(mod, tree.HEAD, (c.d_model, c.vocab_size), ("embed", "vocab"), c.init_std, pd, gather=False)
    return embed, head.astype(jnp.dtype(c.dtype))


def embed_and_dense(c: ModelConfig, embed, tokens, positions, segment_ids, remat="none", unroll=0, cache=None,
                    stacked=True) -> jax.Array:
    """The model's front, inside a compact method: ``Emb(tokens)`` through the dense-MLP stack -> ``[b, t, d]``."""
    x = constrain(take(embed, tokens).astype(jnp.dtype(c.dtype)), *ACT)
    if c.n_dense_layers:
        x, _ = layer_stack(c, False, c.n_dense_layers, tree.DENSE_STACK, remat, unroll, cache, stacked)(
            x, positions, segment_ids)
    return x


def head_and_mtp(c: ModelConfig, x, embed, head, tokens, positions, segment_ids, remat="none", cache=None,
                 with_mtp=True) -> ModelOutput:
    """The model's back, inside a compact method: final norm, ``logits``, then the MTP modules (their loads in
    ``expert_load``, None without MoE MTP layers)."""
    dt = jnp.dtype(c.dtype)
    h = RMSNorm(c.d_model, c.rms_norm_eps, jnp.dtype(c.param_dtype), name=tree.FINAL_NORM)(x)
    logits = constrain(linear(h, head).astype(jnp.float32), "act_batch", "act_length", "act_vocab")
    mtp_logits, loads = None, []
    if c.mtp.depth and with_mtp:
        outs, prev = [], h
        for k in range(1, c.mtp.depth + 1):
            nxt = jnp.pad(tokens[:, k:], ((0, 0), (0, k)))  # t_{i+k}; padding past the end
            emb_next = constrain(take(embed, nxt).astype(dt), *ACT)
            prev, hk, load = MTPModule(c, remat, cache, name=tree.mtp_name(k - 1))(prev, emb_next, positions, segment_ids)
            if load is not None:
                loads.append(load[None])
            outs.append(linear(hk, head).astype(jnp.float32))
        mtp_logits = jnp.stack(outs)
    return ModelOutput(logits=logits, mtp_logits=mtp_logits, expert_load=jnp.concatenate(loads) if loads else None,
                       hidden=h)


def abstract_variables(cfg: ModelConfig, batch: int = 1, length: int = 8) -> dict:
    """Shapes and dtypes of every variable (boxed with logical axes), nothing allocated."""
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    return jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens)


def init_variables(cfg: ModelConfig, rng: jax.Array | int = 0) -> dict:
    """Randomly initialised variables as plain arrays (logical-axis boxes removed)."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    boxed = jax.jit(Transformer(cfg).init)(rng, jnp.zeros((1, 8), jnp.int32))
    return nn.meta.unbox(boxed)
