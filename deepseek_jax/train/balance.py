"""Auxiliary-loss-free load balancing (Loss-Free Balancing, Wang et al. 2024; DeepSeek-V3 §2.1.2)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from deepseek_jax.nn import tree

__all__ = ["max_violation", "update_router_bias"]


def max_violation(load: jax.Array) -> jax.Array:
    """MaxVio per row (layer): ``max(load) / mean(load) - 1`` (Loss-Free Balancing eq. 4)."""
    return load.max(-1) / jnp.maximum(load.mean(-1), 1e-9) - 1.0


def update_router_bias(router: Any, expert_load: jax.Array, gamma: jax.Array | float, center: bool = False) -> Any:
    """``b <- b + gamma * sign(mean(load) - load)`` per MoE layer (Loss-Free Balancing Alg. 1, V3 §2.1.2).

    ``expert_load [n_moe_layers + D, e]`` counted over the global batch (main-model MoE layers first, then
    the MTP layers, as ``ModelOutput.expert_load``). ``center`` removes each row's mean update.
    """
    delta = gamma * jnp.sign(expert_load.mean(-1, keepdims=True) - expert_load)
    if center:
        delta = delta - delta.mean(-1, keepdims=True)
    new, row = [], 0
    for b in tree.router_biases(router):
        rows = b.shape[0] if b.ndim == 2 else 1  # a scanned stack [L, e], or one MTP layer [e]
        d = delta[row: row + rows] if b.ndim == 2 else delta[row]
        new.append(b + d.astype(b.dtype))
        row += rows
    return tree.replace_router_biases(router, new)
