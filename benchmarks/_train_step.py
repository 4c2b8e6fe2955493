"""A timed train step on one device, shared by the train-step and FP8 benchmarks."""

from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np

import deepseek_jax as dsj
from deepseek_jax import train as T


def step_timer(cfg, batch: int, seq: int, remat: str = "none") -> Callable[[], tuple[float, dict]]:
    """``run() -> (seconds, metrics)``: one jitted train step (``train.make_train_fns``: losses, backward,
    AdamW, bias update) of ``cfg`` on one device over a fixed random ``batch x seq`` batch; the first
    call compiles."""
    _, tcfg = T.load_run_config("tiny", [f"train.batch_size={batch}", f"train.seq_len={seq}", "train.steps=1000",
                                         "train.optim.warmup_steps=10", f"train.remat={remat}"])
    mesh = dsj.sharding.make_mesh({"data": 1}, jax.devices()[:1])
    fns = T.make_train_fns(cfg, T.StepConfig.from_train(tcfg), T.Pretrain(tcfg.balance_alpha, tcfg.z_loss), mesh)
    state = {"state": fns.init(jax.random.key(0))}
    toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
    b = T.global_batch({"tokens": toks, "segment_ids": np.ones_like(toks),
                        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), toks.shape).copy()},
                       fns.batch_sharding, batch)

    def run() -> tuple[float, dict]:
        t = time.perf_counter()
        state["state"], m = fns.step(state["state"], b, T.hyper(0.3, 0.001))
        jax.block_until_ready(m)
        return time.perf_counter() - t, m

    return run
