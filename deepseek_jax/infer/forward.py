"""The jitted forward pass: tokens in, next-token logits out, on one device or a mesh."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from deepseek_jax.config import ModelConfig
from deepseek_jax.nn.placement import check_layout, param_shardings
from deepseek_jax.nn.transformer import Transformer, check_tokens
from deepseek_jax.parallel.rules import named_sharding

__all__ = ["forward"]


@functools.lru_cache(maxsize=32)
def _jitted_forward(cfg: ModelConfig, mesh: Mesh | None):
    def fwd(variables, tokens):
        return Transformer(cfg).apply(variables, tokens).logits

    if mesh is None:
        return jax.jit(fwd)
    return jax.jit(fwd, in_shardings=(param_shardings(cfg, mesh), named_sharding(mesh, ("act_batch", None))),
                   out_shardings=named_sharding(mesh, ("act_batch", "act_length", "act_vocab")))


def forward(cfg: ModelConfig, variables: dict, tokens, mesh: Mesh | None = None) -> jax.Array:
    """Jitted forward: ``tokens [b, t]`` -> next-token ``logits [b, t, v]`` float32.

    With a ``mesh``, variables and activations are laid out by ``parallel.rules.RULES`` (variables are moved
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
