"""AdamW over the parameter tree vs over ONE flattened parameter vector (the speed issue's last training
lever): the jitted update (clip by global norm, Adam moments, decoupled weight decay, learning rate,
apply) with parameters, moments and gradients donated, alternated in one process, medians.

A flat vector only helps if the model can read its weights out of it for free; on XLA:CPU a slice of a
larger buffer is a copy, so a real flat layout would also pay a copy of every weight per step (not
included here: this measures the best case for the optimizer alone).

    python benchmarks/optimizer_flat.py [--config bench] [--iters 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import optax  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import deepseek_jax as dsj  # noqa: E402
from _provenance import provenance  # noqa: E402


def _adamw():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(0.9, 0.95, 1e-8),
                       optax.add_decayed_weights(0.1), optax.scale_by_learning_rate(1e-3))


def _timer(params):
    tx = _adamw()

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    fn = jax.jit(step, donate_argnums=(0, 1))
    state = {"p": params, "s": tx.init(params), "g": jax.tree.map(lambda x: x * 1e-3 + 1e-4, params)}

    def run() -> float:
        t = time.perf_counter()
        state["p"], state["s"] = fn(state["p"], state["s"], state["g"])
        jax.block_until_ready(state["p"])
        return time.perf_counter() - t

    run()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="bench")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    cfg = dsj.load_config(args.config)
    params = nn.meta.unbox(dsj.init_variables(cfg, 0))["params"]
    flat, _ = ravel_pytree(params)
    leaves = len(jax.tree.leaves(params))
    runs = {"tree": _timer(params), "flat": _timer(flat)}
    times = {k: [] for k in runs}
    for _ in range(args.iters):
        for k, run in runs.items():
            times[k].append(run())
    res = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    nbytes = flat.size * 4
    out = {"benchmark": "optimizer_flat", "config": args.config, "params": int(flat.size), "leaves": leaves,
           "tree_ms": res["tree"], "flat_ms": res["flat"], "flat_over_tree_time": res["flat"] / res["tree"],
           # p, g, m, v read and p, m, v written at least once (+ one read of g for the norm)
           "min_bytes_per_update": 8 * nbytes, **provenance()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
