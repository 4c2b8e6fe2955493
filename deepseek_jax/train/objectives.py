"""Training objectives: functions of the model's outputs and the batch -> ``(loss, metrics)``.

An objective is called inside the jitted step (:mod:`deepseek_jax.train.step`) as
``objective(out, intermediates, batch, hyper)``: ``out`` the :class:`~deepseek_jax.nn.transformer.ModelOutput`,
``intermediates`` what the layers sowed (the MoE balance terms, dropped rows), ``batch`` the dict of
``[b, t]`` arrays (``tokens``, ``segment_ids``, ``positions``, ...), ``hyper`` the per-step scalars
(``mtp_lambda``, ``bias_gamma``, ...). It returns the scalar loss and a dict of scalar metrics. Objectives
are frozen dataclasses, so equal objectives share one compiled step.

:class:`Pretrain` is DeepSeek-V3's pre-training loss::

    loss = CE(main) + lambda/D * sum_k CE(MTP depth k) + alpha * sum_layers L_Bal + z * mean(lse^2)

Targets never cross documents: the target of position i at distance k is token i+k when it lies in the
same packed document (same ``segment_id``), else the term is masked (padding has segment id 0).

:func:`cross_entropy` stays sharded: with the head split over ``tensor`` (``logits[B_batch, T, V_tensor]``),
``log-sum-exp`` reduces over the local vocabulary slice and all-reduces one number per token; the label's
logit is picked with a comparison against a vocabulary iota, so the full ``[b, t, v]`` logits are never
gathered on one device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

from deepseek_jax.nn import tree
from deepseek_jax.nn.transformer import ModelOutput
from deepseek_jax.parallel.rules import constrain

__all__ = ["Objective", "cross_entropy", "shifted_targets", "batch_targets", "add_mtp_and_balance", "Pretrain"]

Objective = Callable[[ModelOutput, Any, dict, dict], tuple[jax.Array, dict]]


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Mean token negative log-likelihood and the token count.

    ``logits [b, t, v]`` (any float dtype; computed in float32), ``labels [b, t]`` int, ``mask [b, t]``
    (1 = counts; default all). Returns ``(loss, n_tokens)``.
    """
    logits = constrain(logits.astype(jnp.float32), "act_batch", "act_length", "act_vocab")
    lse = jax.nn.logsumexp(logits, axis=-1)
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    label_logit = jnp.sum(jnp.where(vocab == labels[..., None], logits, 0.0), axis=-1)
    nll = lse - label_logit
    mask = jnp.ones_like(nll) if mask is None else mask.astype(jnp.float32)
    n = mask.sum()
    return jnp.sum(nll * mask) / jnp.maximum(n, 1.0), n


def shifted_targets(tokens: jax.Array, segment_ids: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Targets at distance ``k`` (``tokens[:, i + k]``) and their mask: same document, not padding."""
    tgt = jnp.pad(tokens[:, k:], ((0, 0), (0, k)))
    seg = jnp.pad(segment_ids[:, k:], ((0, 0), (0, k)))
    return tgt, (seg == segment_ids) & (segment_ids > 0)


def batch_targets(batch: dict, k: int) -> tuple[jax.Array, jax.Array]:
    """:func:`shifted_targets` of ``batch``, AND the batch's per-token ``loss_mask [b, t]`` where it has one
    (SFT: 1 on completion tokens, EOS included): the target ``tokens[:, i + k]`` counts only if
    ``loss_mask[:, i + k]``, so a prompt token is context but never a target."""
    tgt, mask = shifted_targets(batch["tokens"], batch["segment_ids"], k)
    if "loss_mask" in batch:
        mask = mask & (jnp.pad(batch["loss_mask"][:, k:], ((0, 0), (0, k))) > 0)
    return tgt, mask


def add_mtp_and_balance(loss: jax.Array, aux: dict, out: ModelOutput, intermediates: Any, batch: dict, hyper: dict,
                        balance_alpha: float, indexer_kl_weight: float = 1.0) -> jax.Array:
    """``loss`` plus the MTP losses (``hyper["mtp_lambda"] / D * sum_k CE(depth k)``, targets masked like the
    main ones), the sequence-wise balance loss (``balance_alpha``) and DSA's indexer KL summed over layers
    (``indexer_kl_weight``; it trains the indexer only), in that order; ``aux`` gains ``mtp [D]``,
    ``balance`` and ``indexer_kl`` where the model has them. Shared by every objective that trains the whole
    model."""
    if out.mtp_logits is not None:
        terms = [cross_entropy(out.mtp_logits[j], *batch_targets(batch, j + 2))[0]
                 for j in range(out.mtp_logits.shape[0])]
        aux["mtp"] = jnp.stack(terms)
        loss = loss + hyper["mtp_lambda"] / len(terms) * sum(terms)
    bal = tree.collect(intermediates, tree.BALANCE)
    if bal:
        aux["balance"] = sum(jnp.sum(b) for b in bal)
        loss = loss + balance_alpha * aux["balance"]
    kl = tree.collect(intermediates, tree.INDEXER_KL)
    if kl:
        aux["indexer_kl"] = sum(jnp.sum(k) for k in kl)
        loss = loss + indexer_kl_weight * aux["indexer_kl"]
    return loss


@dataclass(frozen=True)
class Pretrain:
    """Next-token cross-entropy, the MTP losses (weight ``hyper["mtp_lambda"]`` over the depth), the
    sequence-wise balance loss (``balance_alpha``), DSA's indexer KL (``indexer_kl``) and an optional z-loss
    (``z_loss``).

    Metrics: ``ce``, ``tokens`` (counted targets), ``mtp [D]``, ``balance``, ``z``, ``dropped_rows`` where present.
    With a ``loss_mask`` in the batch (SFT), only masked-in targets count (:func:`batch_targets`).
    """

    balance_alpha: float = 1e-4
    z_loss: float = 0.0
    indexer_kl: float = 1.0

    def __call__(self, out: ModelOutput, intermediates: Any, batch: dict, hyper: dict) -> tuple[jax.Array, dict]:
        tgt, mask = batch_targets(batch, 1)
        ce, n = cross_entropy(out.logits, tgt, mask)
        aux = {"ce": ce, "tokens": n}
        total = add_mtp_and_balance(ce, aux, out, intermediates, batch, hyper, self.balance_alpha, self.indexer_kl)
        if self.z_loss:
            lse = jax.nn.logsumexp(out.logits, axis=-1)
            m = mask.astype(jnp.float32)
            aux["z"] = jnp.sum(lse * lse * m) / jnp.maximum(m.sum(), 1.0)
            total = total + self.z_loss * aux["z"]
        dropped = tree.collect(intermediates, tree.DROPPED_ROWS)
        if dropped:
            aux["dropped_rows"] = sum(jnp.sum(d) for d in dropped)
        return total, aux
