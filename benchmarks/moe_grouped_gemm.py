"""Routed-expert grouped GEMM: forward+backward time of each kernel on this backend.

Problem (from the model issue): 2048 tokens, 16 experts, top-4, d 256, f 128, routed from random logits
(loads near balanced) and, with ``--skew S``, from logits with a per-expert ramp of height S added
(S = 2: the busiest expert gets ~19x the idlest one's rows; most of the capacity kernel's rows past
the mean load then run in its overflow loop). Prints JSON with the median milliseconds per kernel,
the expert loads, the useful-FLOP lower bound, and which kernel ``grouped_gemm_impl`` picks here.
Run: ``python benchmarks/moe_grouped_gemm.py [--tokens N] [--experts E] [--skew S] ...``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))  # the test oracles (references.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _provenance import provenance, time_fn  # noqa: E402
from deepseek_jax.kernels.grouped_gemm import default_block, grouped_gemm_impl, routed_experts  # noqa: E402
from deepseek_jax.config import MoEConfig, RouterConfig  # noqa: E402
from deepseek_jax.nn.moe import route  # noqa: E402
from references import moe_dense_reference  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--f", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--skew", type=float, default=0.0)
    ap.add_argument("--skip-ragged", action="store_true")
    args = ap.parse_args()
    n, e, k, d, f = args.tokens, args.experts, args.topk, args.d, args.f
    r = np.random.RandomState(0)
    x = jnp.asarray(r.randn(n, d), jnp.float32)
    w1, w3 = (jnp.asarray(r.randn(e, d, f) * 0.05, jnp.float32) for _ in range(2))
    w2 = jnp.asarray(r.randn(e, f, d) * 0.05, jnp.float32)
    moe = MoEConfig(n_routed_experts=e, experts_per_token=k, moe_intermediate_size=f,
                    router=RouterConfig(n_group=1, topk_group=1))
    logits = r.randn(n, e) + args.skew * np.linspace(0, 1, e)
    weights, experts = route(jnp.asarray(logits, jnp.float32), None, moe)
    loads = np.bincount(np.asarray(experts).ravel(), minlength=e)

    def step(fn):
        def loss(x, w1, w3, w2):
            return jnp.sum(fn(x, weights, experts, w1, w3, w2) ** 2)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))

    kernels = {"dense_all_experts": moe_dense_reference}
    for block in (32, 64, 128, 256):
        kernels[f"blocks_{block}"] = (lambda b: lambda *a: routed_experts(*a, impl="blocks", block=b))(block)
    kernels["blocks_auto"] = lambda *a: routed_experts(*a, impl="blocks")
    for cap in (1.0, 1.25):
        kernels[f"capacity_{cap}"] = (lambda c: lambda *a: routed_experts(*a, impl="capacity", main_capacity=c))(cap)
    if not args.skip_ragged:
        kernels["ragged_dot"] = lambda *a: routed_experts(*a, impl="ragged")
    results = {}
    for name, fn in kernels.items():
        results[name] = round(1e3 * time_fn(step(fn), x, w1, w3, w2, iters=args.iters), 2)
        print(f"{name}: {results[name]} ms", file=sys.stderr)
    useful_flops = 3 * 2 * n * k * 3 * d * f  # fwd + 2x bwd, three matmuls per expert
    print(json.dumps({
        "benchmark": "moe_grouped_gemm", "config": vars(args), "forward_backward_ms": results,
        "expert_loads": loads.tolist(), "max_load_over_mean": round(float(loads.max() / loads.mean()), 3),
        "useful_gflop": round(useful_flops / 1e9, 3), "chosen_impl_here": grouped_gemm_impl(), "auto_block": default_block(n * k, e),
        **provenance()}, indent=1))


if __name__ == "__main__":
    main()
