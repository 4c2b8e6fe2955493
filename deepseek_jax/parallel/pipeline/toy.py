"""A toy pipelined model for examples, tests and benchmarks of the executor: tensor-parallel MLP stages
between an input projection and a regression head. Small enough to compile in seconds on 8 fake devices, and
with every ingredient the executor must get right (stage-local weights, weights shared by the first and last
stages, a tensor-parallel ``psum`` inside a stage, a batch split over data axes).

    x = tanh(inputs.x @ emb);  per layer: x = x + psum_tensor(tanh(x @ w1) @ w2);  loss = mean((x @ head - t)^2)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax.parallel.pipeline.schedule import Schedule

__all__ = ["W_SPECS", "embed", "stage", "loss", "reference_loss", "problem"]

D_IN, D, H, D_OUT, LAYERS = 6, 8, 16, 5, 2
# executor layout [ranks, chunks, layers, ...]: w1 split by columns and w2 by rows over "tensor"
W_SPECS = {"w1": P("stage", None, None, None, "tensor"), "w2": P("stage", None, None, "tensor", None)}


def embed(shared, inp):
    return jnp.tanh(inp["x"] @ shared["emb"])


def _layer(x, w, psum):
    """A Megatron tensor-parallel MLP block: ``w1`` split by columns, ``w2`` by rows, one sum."""
    return x + psum(jnp.tanh(x @ w["w1"]) @ w["w2"])


def loss(shared, y, inp):
    return jnp.mean((y @ shared["head"] - inp["t"]) ** 2)


def stage(w, shared, x, inp):
    """One stage chunk (per device, inside the executor): its layers in order."""
    return jax.lax.scan(lambda x, wl: (_layer(x, wl, lambda v: jax.lax.psum(v, "tensor")), None), x, w)[0]


def reference_loss(stacked, shared, inputs):
    """Mean micro-batch loss of the model run stage after stage (no mesh, no pipeline): the reference."""
    def one(inp):
        x = embed(shared, inp)
        for s in range(stacked["w1"].shape[0]):
            x = jax.lax.scan(lambda x, wl: (_layer(x, wl, lambda v: v), None), x,
                             jax.tree.map(lambda a: a[s], stacked))[0]
        return loss(shared, x, inp)
    return jnp.mean(jax.vmap(one)(inputs))


def problem(schedule: Schedule, batch: int = 8, seed: int = 0, width: int = D):
    """Random ``(stacked [pipe_len, layers, ...], shared, inputs [n_inputs, batch, ...])`` for ``schedule``."""
    k = jax.random.split(jax.random.key(seed), 6)
    n = schedule.pipe_len
    stacked = {"w1": 0.4 * jax.random.normal(k[0], (n, LAYERS, width, 2 * width)),
               "w2": 0.4 * jax.random.normal(k[1], (n, LAYERS, 2 * width, width)) / (width / D) ** 0.5}
    shared = {"emb": 0.5 * jax.random.normal(k[2], (D_IN, width)),
              "head": 0.5 * jax.random.normal(k[3], (width, D_OUT)) / (width / D) ** 0.5}
    n_in = schedule.n_microbatches * (schedule.n_stages // schedule.pipe_len)
    inputs = {"x": jax.random.normal(k[4], (n_in, batch, D_IN)), "t": jax.random.normal(k[5], (n_in, batch, D_OUT))}
    return stacked, shared, inputs
