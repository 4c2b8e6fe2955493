"""FP8 on vs off: train-step time (ratio in the same run), weight bytes, and the quantisation error table.

For each preset (default ``tiny`` and ``bench``): our jitted train step (``train.make_train_fns``) with
``fp8`` off and on, alternating measurements so machine drift hits both alike; the bytes of the linear
weights as float32 master copies, as bf16, and as FP8 values plus their 128x128 block scales (what a
``keep_fp8`` checkpoint holds); and the matmul error of 1x128-tile vs 128x128-block vs per-tensor
activation scaling on activations with outliers. On CPU the FP8 path is simulated (``impl="simulate"``),
so the time ratio measures the cost of the simulation, not FP8 hardware. Prints JSON with config,
git SHA and versions.

    python benchmarks/fp8.py [--configs tiny bench] [--batch 8] [--seq 256] [--iters 8]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import deepseek_jax as dsj  # noqa: E402
from _provenance import provenance  # noqa: E402
from _train_step import step_timer  # noqa: E402
from deepseek_jax.kernels import fp8  # noqa: E402


def weight_bytes(cfg) -> dict:
    """Bytes of the weights the FP8 path quantises (every parameter but embedding, head, router and norms),
    measured on the arrays: float32 masters, a bf16 copy, and FP8 values plus 128x128-block float32 scales
    (per layer and expert, over the flattened ``[in, out]`` matrix, as ``keep_fp8`` holds them)."""
    params = dsj.init_variables(cfg, 0)["params"]
    out = {"values": 0, "float32_bytes": 0, "bf16_bytes": 0, "fp8_bytes": 0, "fp8_scale_bytes": 0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [getattr(k, "key", "") for k in path]
        if names[-1] in ("embed", "head", "router", "scale"):
            continue
        n_in = 2 if names[-1] == "wo" else 1  # [heads, v, d]: two input dims
        lead = 1 if names[0] in ("dense_layers", "moe_layers") else 0  # scanned layers
        routed = cfg.moe is not None and names[-2] == "ffn" and names[0] != "dense_layers"
        lead += 1 if routed else 0  # routed experts: one grid per expert
        core = leaf.shape[lead:]
        mat = leaf.reshape(leaf.shape[:lead] + (math.prod(core[:n_in]), -1))
        q, sc = fp8.quantize(mat, (128, 128))
        out["values"] += leaf.size
        out["float32_bytes"] += leaf.size * 4
        out["bf16_bytes"] += leaf.astype(jnp.bfloat16).nbytes
        out["fp8_bytes"] += q.nbytes
        out["fp8_scale_bytes"] += sc.nbytes
    out["fp8_over_bf16"] = (out["fp8_bytes"] + out["fp8_scale_bytes"]) / out["bf16_bytes"]
    return out


def error_table() -> list[dict]:
    rng = np.random.default_rng(4)
    base = rng.normal(size=(256, 512)).astype(np.float32)
    w = jnp.asarray((rng.normal(size=(512, 256)) * 0.05).astype(np.float32))
    rows, cols = rng.choice(256, 8, replace=False), rng.integers(0, 512, 8)
    keep = np.setdiff1d(np.arange(256), rows)
    out = []
    for mag in (1.0, 1e2, 1e3, 1e4, 1e5, 1e6):
        x = base.copy()
        x[rows, cols] = mag
        ref = (x @ np.asarray(w))[keep]
        rec = {"outlier": mag}
        for name, block in (("tile_1x128", (1, 128)), ("block_128x128", (128, 128)), ("per_tensor", x.shape)):
            xh = fp8.dequantize(*fp8.quantize(jnp.asarray(x), block), block)
            y = np.asarray(jnp.matmul(xh, w, precision="highest"))[keep]
            rec[name] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        out.append(rec)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["tiny", "bench"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=8)
    args = ap.parse_args()
    results = []
    for name in args.configs:
        cfg = dsj.load_config(name, **{"mtp.depth": 0})
        runs = {}
        for on in (False, True):
            c = cfg.replace(fp8=on)
            t0 = time.perf_counter()
            runs[on] = step_timer(c, args.batch, args.seq)
            runs[on]()  # compile + first step
            print(f"{name} fp8={on}: compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        times = {False: [], True: []}
        for _ in range(args.iters):  # alternate, so drift of the machine's speed hits both
            for on in (False, True):
                times[on].append(runs[on]()[0])
        off, on = statistics.median(times[False]), statistics.median(times[True])
        tok = args.batch * args.seq
        results.append({"config": name, "batch": args.batch, "seq": args.seq, "fp8_impl": fp8.default_impl(),
                        "step_s_off": off, "step_s_fp8": on, "tokens_per_s_off": tok / off,
                        "tokens_per_s_fp8": tok / on, "fp8_over_off_time": on / off, "weights": weight_bytes(cfg)})
        print(json.dumps(results[-1]), file=sys.stderr)
    print(json.dumps({"benchmark": "fp8", "results": results, "quantisation_error": error_table(),
                      **provenance()}, indent=1))


if __name__ == "__main__":
    main()
