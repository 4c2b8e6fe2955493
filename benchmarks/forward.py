"""Forward throughput of a preset on this backend, and the trace time of a big preset.

Prints JSON: tokens/s of the jitted forward (``dsj.forward``) of ``--config`` (default ``tiny``) at
``--batch x --seq`` tokens, its compile time, and the wall time of ``jax.eval_shape`` of the whole
model (init) for ``--trace-config`` (default the 61-layer DeepSeek-V3 preset; nothing is allocated).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import deepseek_jax as dsj  # noqa: E402
from _provenance import provenance, time_fn  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--trace-config", default="deepseek-v3-671b")
    args = ap.parse_args()

    cfg = dsj.load_config(args.config)
    variables = dsj.init_variables(cfg, 0)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq)), jnp.int32)
    fwd = jax.jit(lambda v, t: dsj.Transformer(cfg).apply(v, t).logits)
    t0 = time.perf_counter()
    compiled = fwd.lower(variables, tokens).compile()
    compile_s = time.perf_counter() - t0
    sec = time_fn(compiled, variables, tokens, iters=args.iters)

    big = dsj.load_config(args.trace_config)
    t0 = time.perf_counter()
    dsj.abstract_variables(big)
    eval_shape_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.jit(lambda v, t: dsj.Transformer(big).apply(v, t).logits).lower(
        dsj.abstract_variables(big), jax.ShapeDtypeStruct((1, 16), jnp.int32))
    lower_s = time.perf_counter() - t0

    print(json.dumps({
        "benchmark": "forward", "config": args.config, "batch": args.batch, "seq": args.seq,
        "params_total": dsj.model_info(cfg)["params_total"],
        "forward_ms": round(1e3 * sec, 2), "tokens_per_s": round(args.batch * args.seq / sec, 1),
        "compile_s": round(compile_s, 2),
        "trace_config": args.trace_config, "eval_shape_init_s": round(eval_shape_s, 2),
        "trace_forward_lower_s": round(lower_s, 2), **provenance()}, indent=1))


if __name__ == "__main__":
    main()
