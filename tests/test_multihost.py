"""2 processes x 4 CPU devices (jax.distributed on localhost, gloo collectives) equal one device."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax.train.objectives import cross_entropy
from multiproc import free_port, run_processes


@pytest.mark.slow
def test_two_processes_equal_single_device(tmp_path, tiny_cfg, tiny_vars):
    worker = Path(__file__).parent / "multihost_worker.py"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    port = free_port()
    run_processes([[sys.executable, str(worker), str(i), "2", str(port), str(tmp_path)] for i in range(2)], env)
    got = np.load(tmp_path / "result.npz")
    assert len(got["rows0"]) == 4  # process 0 supplied only its half of the global batch

    tokens = np.random.RandomState(0).randint(0, tiny_cfg.vocab_size, (8, 16)).astype(np.int32)

    def loss(v, t):
        return cross_entropy(dsj.Transformer(tiny_cfg).apply(v, t).logits[:, :-1], t[:, 1:])[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(tiny_vars, jnp.asarray(tokens))
    ref_logits = np.asarray(dsj.forward(tiny_cfg, tiny_vars, tokens))
    assert np.abs(got["logits"] - ref_logits).max() <= 1e-5 * np.abs(ref_logits).max()
    assert float(got["loss"]) == pytest.approx(float(value), rel=1e-5)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        other = got["grad" + jax.tree_util.keystr(path)]
        assert np.abs(other - np.asarray(g)).max() <= 1e-5 * max(np.abs(np.asarray(g)).max(), 1e-30), path
