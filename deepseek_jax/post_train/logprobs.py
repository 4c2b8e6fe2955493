"""Per-token log-probabilities of sequences under the training forward pass (post-training.md §1): the
``logp`` of GRPO's objective and of the distillation losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.nn import tree
from deepseek_jax.nn.transformer import Transformer
from deepseek_jax.train.objectives import shifted_targets

__all__ = ["per_token_logps"]


def per_token_logps(cfg: ModelConfig, variables: dict, tokens: jax.Array, segment_ids: jax.Array,
                    positions: jax.Array, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """``(logp [b, t], valid [b, t])``: ``logp[:, i] = log softmax(logits_i / temperature)[tokens[:, i + 1]]``,
    the log-probability of the NEXT token given the prefix (the sampler's view when ``temperature`` is the
    sampling temperature); ``valid`` where that next token exists in the same document (0 at the end of each
    segment and on padding, where ``logp`` is 0). ``tokens, segment_ids, positions [b, t]`` int32; the MTP
    modules are skipped."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 for log-probabilities (greedy has none)")
    variables = {k: v for k, v in variables.items() if k in tree.MODEL_COLLECTIONS}
    out = Transformer(cfg).apply(variables, tokens, positions=positions, segment_ids=segment_ids, with_mtp=False)
    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32) / temperature, axis=-1)
    target, valid = shifted_targets(tokens, segment_ids, 1)
    picked = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    return jnp.where(valid, picked, 0.0), valid
