"""Post-training objectives for :func:`deepseek_jax.train.step.make_train_fns` (the ``objective(out,
intermediates, batch, hyper)`` interface of :mod:`deepseek_jax.train.objectives`).

:class:`GRPO` reads a rollout batch: ``tokens, segment_ids, positions [N, W]``, ``loss_mask [N, W]`` (1 on
completion tokens, EOS included), ``advantages [N]`` and optionally ``old_logp`` / ``ref_logp [N, W]``
aligned like :func:`~deepseek_jax.post_train.logprobs.per_token_logps` (position ``i`` holds the log-prob of
token ``i + 1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from deepseek_jax.nn.transformer import ModelOutput
from deepseek_jax.parallel.rules import constrain
from deepseek_jax.post_train.grpo import grpo_loss
from deepseek_jax.train.objectives import add_mtp_and_balance, batch_targets

__all__ = ["token_logps", "GRPO"]


def token_logps(logits: jax.Array, targets: jax.Array, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """``(log p(targets) [b, t], entropy [b, t])`` under ``softmax(logits / temperature)``, in float32. The
    label's logit is picked with a vocabulary comparison (no gather), so a vocabulary split over ``tensor``
    stays split."""
    x = constrain(logits.astype(jnp.float32) / temperature, "act_batch", "act_length", "act_vocab")
    lse = jax.nn.logsumexp(x, axis=-1)
    vocab = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    picked = jnp.sum(jnp.where(vocab == targets[..., None], x, 0.0), axis=-1)
    p = jnp.exp(x - lse[..., None])
    entropy = lse - jnp.sum(p * x, axis=-1)
    return picked - lse, entropy


@dataclass(frozen=True)
class GRPO:
    """The clipped GRPO objective (:func:`~deepseek_jax.post_train.grpo.grpo_loss`) on the training forward,
    plus the sequence-wise balance loss (``balance_alpha``) and optionally the MTP loss on completion targets
    (``hyper["mtp_lambda"]``; 0 by default in RL). Without ``old_logp`` in the batch the ratio is taken
    against ``stop_gradient(logp)`` (one update per rollout: ratio 1, the policy-gradient form).

    Metrics: ``pg_loss``, ``kl``, ``kl_max`` (with ``ref_logp``), ``clip_frac_*``, ``ratio_*``, ``entropy``
    (mean over completion tokens), ``tokens``, ``balance``."""

    agg: str = "dapo"
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0
    kl: str = "k3"
    delta: float | None = None
    temperature: float = 1.0
    max_len: int | None = None
    balance_alpha: float = 1e-4

    def __call__(self, out: ModelOutput, intermediates: Any, batch: dict, hyper: dict) -> tuple[jax.Array, dict]:
        tgt, mask = batch_targets(batch, 1)
        logp, entropy = token_logps(out.logits, tgt, self.temperature)
        m = mask.astype(jnp.float32)
        old = batch.get("old_logp", jax.lax.stop_gradient(logp))
        loss, metrics = grpo_loss(logp, old, batch.get("ref_logp"), batch["advantages"], m, agg=self.agg,
                                  eps_low=self.eps_low, eps_high=self.eps_high, beta=self.beta, kl=self.kl,
                                  max_len=self.max_len, delta=self.delta)
        n = m.sum()
        metrics.update(entropy=jax.lax.stop_gradient((entropy * m).sum() / jnp.maximum(n, 1.0)), tokens=n)
        loss = add_mtp_and_balance(loss, metrics, out, intermediates, batch, hyper, self.balance_alpha)
        return loss, metrics
