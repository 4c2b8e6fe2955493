"""The DeepSeek decoder-only Transformer (LLM 7B/67B, V2, V2-Lite, V3) with multi-token prediction.

Pre-norm blocks (V3 §2.1)::

    x = x + Attention(RMSNorm(x))          MLA (V2/V3) or MHA/GQA (DeepSeek LLM)
    x = x + FFN(RMSNorm(x))                dense SwiGLU for the first ``first_k_dense_replace`` layers, then MoE
    logits = RMSNorm(x) · W_head           [b, t, d] · [d, v]

Repeated layers are two ``nn.scan`` stacks (``dense_layers`` then ``moe_layers``) so a 61- or 95-layer
preset traces one layer per stack. Parameters of a stack carry a leading ``layers`` axis.

Multi-token prediction (V3 §2.2): module k (1..D) computes, for every position i,
``h^k_i = TRM_k(eh_proj[RMSNorm_e(Emb(t_{i+k})) ; RMSNorm_h(h^{k-1}_i)])`` and
``mtp_logits[k-1, :, i] = RMSNorm_k(h^k_i) · W_head`` (predicting token i+k+1). Embedding-first
concatenation follows the released checkpoint's ``eh_proj`` (as engines that load it do); ``h^0`` is
the main model's final-normed hidden state. Embedding and head are shared with the main model.
Positions i >= t-k see padding in place of ``t_{i+k}``; losses must mask them.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deepseek_jax.attention import CacheConfig, make_attention
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import MLP, RMSNorm, dense, dtype_of, linear, param
from deepseek_jax.moe import MoE
from deepseek_jax.sharding import BATCH_AXES, check_layout, constrain, param_shardings

__all__ = ["REMAT_POLICIES", "remat_policy", "ModelOutput", "DecoderLayer", "Transformer", "forward", "init_variables", "abstract_variables",
           "check_tokens"]


@flax.struct.dataclass
class ModelOutput:
    """``logits [b, t, v]`` float32; ``mtp_logits [D, b, t, v]`` float32 or None; ``expert_load
    [n_moe_layers + D, e]`` float32 tokens per expert (MTP layers last) or None for dense models;
    ``hidden [b, t, d]`` the final-normed hidden state (the head's input, and MTP's ``h^0``)."""

    logits: jax.Array
    mtp_logits: jax.Array | None = None
    expert_load: jax.Array | None = None
    hidden: jax.Array | None = None


class DecoderLayer(nn.Module):
    """One pre-norm block: ``(x [b, t, d], positions [b, t], segment_ids [b, t]) -> (x, load [e] | None)``."""

    cfg: ModelConfig
    moe: bool
    cache: CacheConfig | None = None

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        c, pd = self.cfg, dtype_of(self.cfg.param_dtype)
        h = RMSNorm(c.d_model, c.rms_norm_eps, pd, name="attn_norm")(x)
        x = x + make_attention(c, "attn", self.cache)(h, positions, segment_ids)
        h = RMSNorm(c.d_model, c.rms_norm_eps, pd, name="ffn_norm")(x)
        if self.moe:
            y, load = MoE(c, name="ffn")(h)
        else:
            y, load = MLP(c, c.intermediate_size, name="ffn")(h), None
        return constrain(x + y, *_ACT), load


_ACT = ("act_batch", "act_length", "act_embed")


REMAT_POLICIES = ("none", "full", "deepseek")

# Values the "deepseek" policy keeps for the backward pass; everything else in a layer (RMSNorm outputs,
# the MLA up-projections q = c_q W_uq and [k_nope|v] = c_kv W_ukv, the attention core, the SwiGLU
# activation) is recomputed, as DeepSeek-V3 §3.2.3 / §3.3.3 describe.
DEEPSEEK_SAVED = ("c_q", "c_kv", "attn_out", "q_proj", "k_proj", "v_proj", "mlp_in", "swiglu_in", "expert_out")


def remat_policy(name: str):
    """``jax.checkpoint`` policy for ``"full"`` (save nothing) or ``"deepseek"``; ``None`` for ``"none"``."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={name!r} must be one of {REMAT_POLICIES}")
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "deepseek":
        return jax.checkpoint_policies.save_only_these_names(*DEEPSEEK_SAVED)
    return None


def _layer_cls(remat: str):
    if remat == "none":
        return DecoderLayer
    return nn.remat(DecoderLayer, policy=remat_policy(remat), prevent_cse=False)


def _unroll(unroll: int, length: int, remat: str = "none") -> int:
    """Layers per scan iteration: ``unroll`` (>= 1), or for 0 ("auto") the whole stack when it has at most
    8 layers and nothing is recomputed (XLA:CPU runs an unrolled stack ~25% faster; with recomputation,
    one layer per iteration keeps XLA from merging the recomputed values back into the forward pass)."""
    if unroll < 0:
        raise ValueError(f"scan_unroll={unroll} must be >= 0 (0 = auto)")
    auto = length if (length <= 8 and remat == "none") else 1
    return max(1, min(unroll or auto, length))


def _layer_stack(cfg: ModelConfig, moe: bool, length: int, name: str, remat: str = "none",
                 unroll: int = 0, cache: CacheConfig | None = None) -> nn.Module:
    scanned = nn.scan(
        _layer_cls(remat),
        variable_axes={"params": 0, "router": 0, "intermediates": 0, "fp8_scale": 0, "cache": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=length,
        unroll=_unroll(unroll, length, remat),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(cfg, moe, cache, name=name)


class MTPModule(nn.Module):
    """MTP depth k: ``(h_prev [b, t, d], emb_next [b, t, d]) -> (h, RMSNorm_k(h), load)``; the normed
    output feeds the shared head (HF ``shared_head.norm``)."""

    cfg: ModelConfig
    remat: str = "none"
    cache: CacheConfig | None = None

    @nn.compact
    def __call__(self, h_prev, emb_next, positions, segment_ids):
        c, pd = self.cfg, dtype_of(self.cfg.param_dtype)
        e = RMSNorm(c.d_model, c.rms_norm_eps, pd, name="enorm")(emb_next)
        h = RMSNorm(c.d_model, c.rms_norm_eps, pd, name="hnorm")(h_prev)
        w = param(self, "eh_proj", (2 * c.d_model, c.d_model), ("mtp_concat", "embed"), c.init_std, pd)
        x = linear(c, jnp.concatenate([e, h], axis=-1), w)
        h, load = _layer_cls(self.remat)(c, c.moe is not None, self.cache, name="layer")(x, positions, segment_ids)
        return h, RMSNorm(c.d_model, c.rms_norm_eps, pd, name="final_norm")(h), load


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
    (``"none"``, ``"full"``, ``"deepseek"``; see :func:`remat_policy`); ``scan_unroll`` the layers per
    scan iteration (0 = auto, see :func:`_unroll`). Neither changes the numbers.

    Inference (:mod:`deepseek_jax.generate`): with ``cache`` (an :class:`~deepseek_jax.attention.CacheConfig`)
    every attention layer reads and writes the ``"cache"`` collection (``apply(..., mutable=["cache"])``),
    and ``positions`` must be given (slot = position). ``with_mtp=False`` skips the MTP modules;
    ``draft_from=h [b, t, d]`` runs only MTP module 1 on ``(h, Emb(tokens))`` -- ``tokens`` being the
    *next* tokens ``t_{i+1}`` -- and returns its logits (predicting ``t_{i+2}``) and hidden state.
    """

    cfg: ModelConfig
    remat: str = "none"
    scan_unroll: int = 0
    cache: CacheConfig | None = None

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, *, with_mtp: bool = True,
                 draft_from=None) -> ModelOutput:
        c = self.cfg
        check_tokens(tokens, c.vocab_size)
        pd, dt = dtype_of(c.param_dtype), dtype_of(c.dtype)
        b, t = tokens.shape
        if positions is None:
            if self.cache is not None:
                raise ValueError("positions are required with a cache (slot = position)")
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.zeros((b, t), jnp.int32)
        embed = param(self, "embed", (c.vocab_size, c.d_model), ("vocab", "embed"), c.init_std, pd)
        if c.tie_embeddings:
            head = embed.T
        else:
            head = param(self, "head", (c.d_model, c.vocab_size), ("embed", "vocab"), c.init_std, pd)
        head = head.astype(dt)
        if draft_from is not None:  # MTP module 1 alone: the speculative draft
            if not c.mtp.depth:
                raise ValueError("draft_from needs MTP modules (mtp.depth >= 1)")
            emb = constrain(jnp.take(embed, tokens, axis=0).astype(dt), *_ACT)
            h1, hk, load = MTPModule(c, self.remat, self.cache, name="mtp_0")(draft_from.astype(dt), emb, positions, segment_ids)
            return ModelOutput(logits=dense(hk, head).astype(jnp.float32), hidden=h1,
                               expert_load=None if load is None else load[None])
        x = constrain(jnp.take(embed, tokens, axis=0).astype(dt), *_ACT)
        loads = []
        if c.n_dense_layers:
            x, _ = _layer_stack(c, False, c.n_dense_layers, "dense_layers", self.remat, self.scan_unroll,
                                self.cache)(x, positions, segment_ids)
        if c.n_moe_layers:
            x, load = _layer_stack(c, True, c.n_moe_layers, "moe_layers", self.remat, self.scan_unroll,
                                   self.cache)(x, positions, segment_ids)
            loads.append(load)
        h = RMSNorm(c.d_model, c.rms_norm_eps, pd, name="final_norm")(x)
        logits = constrain(dense(h, head).astype(jnp.float32), "act_batch", "act_length", "act_vocab")

        mtp_logits = None
        if c.mtp.depth and with_mtp:
            outs, prev = [], h
            for k in range(1, c.mtp.depth + 1):
                nxt = jnp.pad(tokens[:, k:], ((0, 0), (0, k)))  # t_{i+k}; padding past the end
                emb_next = constrain(jnp.take(embed, nxt, axis=0).astype(dt), *_ACT)
                prev, hk, load = MTPModule(c, self.remat, self.cache, name=f"mtp_{k - 1}")(prev, emb_next, positions, segment_ids)
                if load is not None:
                    loads.append(load[None])
                outs.append(dense(hk, head).astype(jnp.float32))
            mtp_logits = jnp.stack(outs)
        expert_load = jnp.concatenate(loads) if loads else None
        return ModelOutput(logits=logits, mtp_logits=mtp_logits, expert_load=expert_load, hidden=h)


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


@functools.lru_cache(maxsize=32)
def _jitted_forward(cfg: ModelConfig, mesh: Mesh | None):
    def fwd(variables, tokens):
        return Transformer(cfg).apply(variables, tokens).logits

    if mesh is None:
        return jax.jit(fwd)
    return jax.jit(fwd, in_shardings=(param_shardings(cfg, mesh), NamedSharding(mesh, P(BATCH_AXES, None))),
                   out_shardings=NamedSharding(mesh, P(BATCH_AXES, None, "tensor")))


def forward(cfg: ModelConfig, variables: dict, tokens, mesh: Mesh | None = None) -> jax.Array:
    """Jitted forward: ``tokens [b, t]`` -> next-token ``logits [b, t, v]`` float32.

    With a ``mesh``, variables and activations are laid out by ``sharding.RULES`` (variables are moved
    there if they are not already) and the batch is split over ``data, fsdp, expert``.
    """
    check_tokens(tokens, cfg.vocab_size)
    if not isinstance(tokens, jax.Array):
        tokens = jnp.asarray(tokens, jnp.int32)
    if mesh is None:
        return _jitted_forward(cfg, None)(variables, tokens)
    check_layout(cfg, mesh, global_batch=tokens.shape[0])
    with jax.set_mesh(mesh):
        return _jitted_forward(cfg, mesh)(nn.meta.unbox(variables), tokens)
