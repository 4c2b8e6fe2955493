"""DeepSeek's optimiser and learning-rate schedules (optax), bf16 Adam moments, and a host-side parameter EMA.

* AdamW ``beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1`` (not on RMSNorm scales), gradients clipped
  to global norm 1.0 (DeepSeek LLM §2.3, V3 §4.2).
* Schedules (all with a linear warm-up from 0):
  - ``multistep`` (DeepSeek LLM): peak until 80% of training, then x0.316, then x0.1 after 90%;
  - ``v3`` (DeepSeek-V3): constant until 10T/14.8T of training, cosine down to 0.1 x peak until
    14.3T/14.8T, then 0.1 x peak (2.2e-5) for 333B tokens, then 7.3e-6/2.2e-4 x peak for the last 167B;
  - ``cosine`` (to ``min_lr_ratio`` x peak) and ``constant``.
  Fractions are of the training steps (tokens, at a constant batch size).
* ``moments_dtype="bfloat16"`` stores both Adam moments in bf16 (V3 §3.3.3); the arithmetic stays fp32.
  (``optax.adamw(mu_dtype=...)`` casts only the first moment.) ``"float32"`` keeps both in float32 also for
  bf16 parameters (optax alone would keep them in bf16).
* :class:`HostEMA`: an exponential moving average of the parameters kept in host memory (V3 §3.2.3),
  ``ema <- d * ema + (1 - d) * params`` after each step, optionally on a background thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepseek_jax.nn import tree

__all__ = ["OptimConfig", "lr_schedule", "decay_mask", "scale_by_adam_lowp", "scale_by_adam_f32", "make_optimizer",
           "HostEMA"]

SCHEDULES = ("constant", "cosine", "multistep", "v3")
# DeepSeek-V3 §4.2 boundaries as fractions of the 14.8T training tokens.
_V3_TOTAL = 14.8e12
_V3_CONST_END = 10.0e12 / _V3_TOTAL
_V3_COS_END = 14.3e12 / _V3_TOTAL
_V3_TAIL1_END = (14.3e12 + 333e9) / _V3_TOTAL
_V3_LOW, _V3_TAIL2 = 0.1, 7.3e-6 / 2.2e-4


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its schedule. ``warmup_steps`` defaults to DeepSeek's 2000; tiny runs set fewer."""

    lr: float = 2.2e-4
    schedule: str = "v3"
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.1  # cosine
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    moments_dtype: str = "float32"
    ema_decay: float = 0.0  # 0 = no EMA

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r} must be one of {SCHEDULES}")
        if not self.lr > 0:
            raise ValueError(f"optim.lr={self.lr!r} must be positive")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps!r} must be >= 0")
        if self.moments_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"optim.moments_dtype={self.moments_dtype!r} must be 'float32' or 'bfloat16'")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"optim.ema_decay={self.ema_decay!r} must be in [0, 1) (0 disables the EMA)")
        for n in ("b1", "b2"):
            if not 0 <= getattr(self, n) < 1:
                raise ValueError(f"optim.{n}={getattr(self, n)!r} must be in [0, 1)")


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the optimiser step (0-based: step 0 uses ``schedule(0)``)."""
    peak, w = cfg.lr, min(cfg.warmup_steps, max(total_steps - 1, 0))
    if cfg.warmup_steps > total_steps:
        raise ValueError(f"optim.warmup_steps={cfg.warmup_steps} exceeds the run's steps={total_steps}")
    warm = optax.linear_schedule(0.0, peak, w) if w else optax.constant_schedule(peak)

    def frac(f: float) -> int:
        return int(round(f * total_steps))

    if cfg.schedule == "constant":
        rest = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        rest = optax.cosine_decay_schedule(peak, max(total_steps - w, 1), alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "multistep":
        # piecewise_constant_schedule multiplies its scales cumulatively: 0.316, then 0.1/0.316.
        rest = optax.piecewise_constant_schedule(peak, {frac(0.8) - w: 0.316, frac(0.9) - w: 0.1 / 0.316})
    else:  # v3
        c0, c1, t1 = frac(_V3_CONST_END), frac(_V3_COS_END), frac(_V3_TAIL1_END)
        if c0 < w:
            raise ValueError(f"optim.warmup_steps={cfg.warmup_steps} runs past the v3 schedule's constant phase "
                             f"(ends at step {c0} of {total_steps})")
        rest = optax.join_schedules(
            [optax.constant_schedule(peak),
             optax.cosine_decay_schedule(peak, max(c1 - c0, 1), alpha=_V3_LOW),
             optax.constant_schedule(_V3_LOW * peak),
             optax.constant_schedule(_V3_TAIL2 * peak)],
            [c0 - w, c1 - w, t1 - w])
    return optax.join_schedules([warm, rest], [w]) if w else rest


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: every parameter except RMSNorm scales (:func:`nn.tree.is_norm`)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: not tree.is_norm(path), params)


class ScaleByAdamLowpState(NamedTuple):
    count: jax.Array
    mu: Any
    nu: Any


def scale_by_adam_lowp(b1: float, b2: float, eps: float, dtype=jnp.bfloat16) -> optax.GradientTransformation:
    """Adam with **both** moments stored in ``dtype``; the update is computed in float32."""

    def init(params):
        z = jax.tree.map(lambda p: jnp.zeros(p.shape, dtype), params)
        return ScaleByAdamLowpState(jnp.zeros([], jnp.int32), z, jax.tree.map(jnp.copy, z))

    def update(grads, state, params=None):
        count = state.count + 1
        mu = jax.tree.map(lambda g, m: b1 * m.astype(jnp.float32) + (1 - b1) * g.astype(jnp.float32), grads, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * v.astype(jnp.float32) + (1 - b2) * jnp.square(g.astype(jnp.float32)),
                          grads, state.nu)
        c1 = 1 - b1 ** count.astype(jnp.float32)
        c2 = 1 - b2 ** count.astype(jnp.float32)
        upd = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
        cast = lambda t: jax.tree.map(lambda x: x.astype(dtype), t)  # noqa: E731
        return upd, ScaleByAdamLowpState(count, cast(mu), cast(nu))

    return optax.GradientTransformation(init, update)


def scale_by_adam_f32(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """``optax.scale_by_adam`` with both moments in float32 whatever the parameters' dtype: optax keeps the second
    moment (and the first, unless ``mu_dtype``) in the parameters' dtype, i.e. bfloat16 for the bf16 presets, and
    computes them in the gradients' dtype. For float32 parameters it is ``optax.scale_by_adam`` itself (the same
    state and numbers)."""
    inner = optax.scale_by_adam(b1, b2, eps, mu_dtype=jnp.float32)
    f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)  # noqa: E731
    return optax.GradientTransformation(
        lambda params: inner.init(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)),
        lambda grads, state, params=None: inner.update(f32(grads), state, params))


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``clip(global norm) -> Adam -> decoupled weight decay (not on norms) -> -lr``; returns ``(tx, schedule)``."""
    schedule = lr_schedule(cfg, total_steps)
    if cfg.moments_dtype == "bfloat16":
        adam = scale_by_adam_lowp(cfg.b1, cfg.b2, cfg.eps)
    else:
        adam = scale_by_adam_f32(cfg.b1, cfg.b2, cfg.eps)
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        adam,
        optax.add_decayed_weights(cfg.weight_decay, decay_mask),
        optax.scale_by_learning_rate(schedule),
    )
    return tx, schedule


class HostEMA:
    """``ema <- decay * ema + (1 - decay) * params`` in host (NumPy float32) memory.

    ``update(params)`` copies the parameters to the host first (so donated device buffers may be reused
    at once), then averages — on a background thread when ``background=True``. ``value()`` waits for
    the pending update and returns the average.
    """

    def __init__(self, params: Any, decay: float, background: bool = True):
        self.decay = float(decay)
        self.ema = jax.tree.map(lambda p: np.array(p, np.float32), jax.device_get(params))
        self.background = background
        self._thread: threading.Thread | None = None

    def _average(self, host: Any) -> None:
        d = self.decay

        def upd(e, p):
            e *= d
            e += (1.0 - d) * p.astype(np.float32)
            return e

        self.ema = jax.tree.map(upd, self.ema, host)

    def update(self, params: Any) -> None:
        self.wait()
        host = jax.device_get(params)  # a host copy, taken before the next step can overwrite the buffers
        if self.background:
            self._thread = threading.Thread(target=self._average, args=(host,), daemon=True)
            self._thread.start()
        else:
            self._average(host)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def value(self) -> Any:
        self.wait()
        return self.ema

    def load(self, ema: Any) -> None:
        self.wait()
        self.ema = jax.tree.map(lambda x: np.array(x, np.float32), ema)
