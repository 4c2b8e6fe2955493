"""GRPO's pure pieces (post-training.md §1): group advantages, the KL estimators and the clipped policy loss
with its four aggregations. Arrays in, arrays out: each is checked against a NumPy transcription.

Notation: ``N = B * G`` completions (``G`` per prompt, groups contiguous), ``T`` completion positions,
``mask [N, T]`` 1 on completion tokens (EOS included), ``logp [N, T]`` the log-probability of each sampled
token under the policy being trained (from ``logits / temperature``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["SCALES", "AGGREGATIONS", "KL_ESTIMATORS", "group_advantages", "kl_estimate", "grpo_loss"]

SCALES = ("group", "batch", "none")
AGGREGATIONS = ("grpo", "bnpo", "dapo", "dr_grpo")
KL_ESTIMATORS = ("k1", "k2", "k3", "k3+")
LOG_RATIO_CLAMP = 20.0  # |log rho| and |log ref/pi| are clamped before exp (verl, Tunix): no overflow to inf


def _std(x: jax.Array, valid: jax.Array, axis) -> jax.Array:
    """Bessel-corrected (ddof = 1) standard deviation over the ``valid`` entries; 0 with fewer than two."""
    n = valid.sum(axis, keepdims=True)
    mean = jnp.where(valid, x, 0.0).sum(axis, keepdims=True) / jnp.maximum(n, 1)
    var = jnp.where(valid, (x - mean) ** 2, 0.0).sum(axis, keepdims=True) / jnp.maximum(n - 1, 1)
    return jnp.where(n > 1, jnp.sqrt(var), 0.0)


def group_advantages(rewards: jax.Array, group_size: int, scale: str = "group", eps: float = 1e-4) -> jax.Array:
    """Outcome advantages ``A [N]`` from ``rewards [N]`` (groups of ``group_size`` contiguous rows; NaN = no
    reward function applied, giving ``A = 0`` and left out of its group's statistics):

        group:  A_i = (r_i - mean_g r) / (std_g r + eps)        DeepSeekMath; std with ddof = 1, eps = 1e-4 (TRL)
        batch:  A_i = (r_i - mean_g r) / (std_batch r + eps)    one scale for the whole batch
        none:   A_i =  r_i - mean_g r                           Dr. GRPO

    A group whose rewards are all equal gets ``A = 0`` (no signal, whatever the scale)."""
    if scale not in SCALES:
        raise ValueError(f"grpo.scale_rewards={scale!r} must be one of {SCALES}")
    if group_size < 2 or rewards.shape[0] % group_size:
        raise ValueError(f"grpo.num_generations={group_size} must be >= 2 and divide the {rewards.shape[0]} rows")
    r = rewards.reshape(-1, group_size).astype(jnp.float32 if rewards.dtype != jnp.float64 else jnp.float64)
    valid = ~jnp.isnan(r)
    n = valid.sum(1, keepdims=True)
    mean = jnp.where(valid, r, 0.0).sum(1, keepdims=True) / jnp.maximum(n, 1)
    centred = jnp.where(valid, r - mean, 0.0)
    if scale == "group":
        centred = centred / (_std(r, valid, 1) + eps)
    elif scale == "batch":
        centred = centred / (_std(r.reshape(-1), valid.reshape(-1), 0) + eps)
    return centred.reshape(-1)


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, kind: str = "k3") -> jax.Array:
    """Per-token estimate of ``KL(pi || pi_ref)`` at the sampled token, ``x = ref_logp - logp`` (clamped):

        k1 = -x                 value unbiased; as a loss its expected gradient is 0 (inert)
        k2 = x^2 / 2            value biased; gradient = grad KL(pi || pi_ref)
        k3 = e^x - x - 1 >= 0   value unbiased (DeepSeek); gradient = grad KL(pi_ref || pi)
        k3+                     k3's value with k2's gradient (straight-through, verl)
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"grpo.kl_estimator={kind!r} must be one of {KL_ESTIMATORS}")
    x = jnp.clip(ref_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    k2 = 0.5 * x * x
    k3 = jnp.exp(x) - x - 1.0
    return {"k1": -x, "k2": k2, "k3": k3, "k3+": k2 + jax.lax.stop_gradient(k3 - k2)}[kind]


def _aggregate(per_token: jax.Array, mask: jax.Array, agg: str, max_len: int | None) -> jax.Array:
    """The aggregations of TRL's ``_compute_loss`` (one jitted step over the whole batch: bnpo = dapo)."""
    if agg == "grpo":  # per-sequence token mean, then the mean over sequences (DeepSeekMath eq. 3)
        return jnp.mean((per_token * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0))
    if agg in ("bnpo", "dapo"):  # token mean over the batch
        return (per_token * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    return (per_token * mask).sum() / (mask.shape[0] * (max_len or mask.shape[1]))  # dr_grpo: a constant


def grpo_loss(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None, advantages: jax.Array,
              mask: jax.Array, *, agg: str = "dapo", eps_low: float = 0.2, eps_high: float = 0.2,
              beta: float = 0.0, kl: str = "k3", max_len: int | None = None, delta: float | None = None
              ) -> tuple[jax.Array, dict]:
    """The clipped GRPO objective (to minimise) and its metrics. Per token, ``rho = exp(logp - old_logp)``::

        l = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta D(logp, ref_logp)
        (dual clip, ``delta > 1``: for A < 0, l <- min(l, -delta A))

    aggregated by ``agg`` (``grpo``: mean over sequences of token means; ``bnpo``/``dapo``: token mean over
    the batch; ``dr_grpo``: sum / (N * max_len)). ``logp, old_logp, ref_logp, mask [N, T]``, ``advantages
    [N]``. With one update per rollout pass ``old_logp = stop_gradient(logp)`` (ratio 1, the gradient of the
    unclipped objective). Metrics: ``pg_loss``, ``kl`` and ``kl_max`` (of the chosen estimator, over masked
    tokens), ``clip_frac_low`` / ``_high`` / ``_region``, ``ratio_min`` / ``_max`` / ``_mean``."""
    if agg not in AGGREGATIONS:
        raise ValueError(f"grpo.loss_agg={agg!r} must be one of {AGGREGATIONS}")
    if delta is not None and delta <= 1:
        raise ValueError(f"grpo.delta={delta} must be > 1 (the dual-clip bound for negative advantages)")
    if beta > 0 and ref_logp is None:
        raise ValueError("grpo.beta > 0 needs reference log-probs (ref_logp)")
    mask = mask.astype(logp.dtype)
    a = advantages[:, None].astype(logp.dtype)
    rho = jnp.exp(jnp.clip(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    clipped = jnp.clip(rho, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -jnp.minimum(rho * a, clipped * a)
    if delta is not None:
        per_token = jnp.where(a < 0, jnp.minimum(per_token, -delta * a), per_token)
    pg = _aggregate(per_token, mask, agg, max_len)
    n = jnp.maximum(mask.sum(), 1.0)
    low, high = (rho < 1.0 - eps_low) & (a < 0), (rho > 1.0 + eps_high) & (a > 0)
    sg = jax.lax.stop_gradient
    metrics = {"pg_loss": pg, "clip_frac_low": (low * mask).sum() / n, "clip_frac_high": (high * mask).sum() / n,
               "clip_frac_region": ((low | high) * mask).sum() / n,
               "ratio_min": sg(jnp.where(mask > 0, rho, jnp.inf).min()),
               "ratio_max": sg(jnp.where(mask > 0, rho, -jnp.inf).max()), "ratio_mean": sg((rho * mask).sum() / n)}
    loss = pg
    if ref_logp is not None:
        d = kl_estimate(logp, ref_logp, kl)
        metrics.update(kl=sg((d * mask).sum() / n), kl_max=sg(jnp.where(mask > 0, d, -jnp.inf).max()))
        if beta > 0:
            loss = loss + beta * _aggregate(d, mask, agg, max_len)
    return loss, metrics
