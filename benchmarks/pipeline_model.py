"""The DeepSeek model's training step with pipelining (``train.pipeline``) on 8 fake CPU devices: compile
time, compiled temporary memory at C and 2C micro-batches, and step time, per schedule, against the same
step without a pipeline on the same devices (``stage`` folded into ``data``, the batch of C micro-batches).

The trainer's real step (``make_train_fns``: AdamW, the bias update, the MoE stack over ``stage``) on a
preset (default ``tiny`` with 5 layers: 1 dense + 4 MoE); a micro-batch holds ``--rows-per-micro`` rows of
``--seq`` tokens per batch shard, so doubling C doubles the global batch (what a pipeline's memory must not
follow, and GPipe's does). On XLA:CPU every collective is synchronous and the 8 fake devices share the machine's
cores, so the step times compare schedules with each other, not with real pipelines.

    python benchmarks/pipeline_model.py [--config tiny] [--mesh stage=2,data=2,tensor=2] [--rows-per-micro 4]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from _provenance import provenance, time_fn  # noqa: E402
from deepseek_jax import train as T  # noqa: E402
from deepseek_jax.parallel.mesh import make_mesh, parse_mesh  # noqa: E402


def batch_rows(mesh_text: str, schedule: str, micro: int, rows_per_micro: int) -> int:
    """Global rows for ``micro`` micro-batches (two pipes of them under DualPipe) on ``mesh_text``."""
    axes = parse_mesh(mesh_text)
    shards = axes.get("data", 1) * axes.get("fsdp", 1) * axes.get("expert", 1)
    return rows_per_micro * shards * micro * (2 if schedule == "dualpipe" else 1)


def measure(cfg, tcfg, mesh_text: str, schedule: str, micro: int, iters: int, rows: int) -> dict:
    tc = tcfg.replace(mesh=mesh_text, batch_size=rows, pipeline={"schedule": schedule, "microbatches": micro})
    fns = T.make_train_fns(cfg, T.StepConfig.from_train(tc), T.Pretrain(tc.balance_alpha), make_mesh(tc.mesh))
    t0 = time.perf_counter()
    compiled = fns.compile_step()
    compile_s = time.perf_counter() - t0
    state = fns.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    shape = (tc.batch_size, tc.seq_len)
    local = {"tokens": rng.integers(0, cfg.vocab_size, shape).astype(np.int32), "segment_ids": np.ones(shape, np.int32),
             "positions": np.tile(np.arange(tc.seq_len, dtype=np.int32), (tc.batch_size, 1))}
    batch = T.global_batch(local, fns.batch_sharding, tc.batch_size)
    hyp = T.hyper(0.3, 0.001)

    held = [state]  # the step donates its state: each call takes the previous call's

    def step():
        held[0], metrics = fns.step(held[0], batch, hyp)
        return metrics["loss"]
    return {"schedule": schedule, "microbatches": micro, "rows": rows, "compile_s": compile_s,
            "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
            "argument_bytes": compiled.memory_analysis().argument_size_in_bytes,
            "step_s": time_fn(step, warmup=1, iters=iters)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--mesh", default="stage=2,data=2,tensor=2")
    ap.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b", "zb_h1", "dualpipev"])
    ap.add_argument("--micro", type=int, default=4, help="C (and 2C is measured too)")
    ap.add_argument("--rows-per-micro", type=int, default=4, help="rows per micro-batch and batch shard")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--layers", type=int, default=5, help="n_layers (tiny: 1 dense + 4 MoE, enough for DualPipeV's "
                                                          "4 stages on 2 ranks)")
    args = ap.parse_args()
    cfg, tcfg = T.load_run_config(args.config, [f"n_layers={args.layers}", f"train.seq_len={args.seq}",
                                                "train.optim.warmup_steps=1"])
    axes = parse_mesh(args.mesh)
    axes["data"] = axes.get("data", 1) * axes.pop("stage", 1)  # the same devices, the stages as data shards
    plain_mesh = ",".join(f"{a}={s}" for a, s in axes.items())
    plain_rows = batch_rows(args.mesh, "1f1b", args.micro, args.rows_per_micro)  # the pipelined C-batch
    rows = [measure(cfg, tcfg, plain_mesh, "none", 1, args.iters, plain_rows) | {"mesh": plain_mesh}]
    print(f"| none ({plain_mesh}) | - | {rows[0]['temp_bytes'] / 1e6:.1f} | - | {rows[0]['step_s'] * 1e3:.0f} | - | "
          f"{rows[0]['compile_s']:.1f} |", file=sys.stderr, flush=True)
    for name in args.schedules:
        a, b = (measure(cfg, tcfg, args.mesh, name, c, args.iters, batch_rows(args.mesh, name, c, args.rows_per_micro))
                for c in (args.micro, 2 * args.micro))
        rows += [a | {"mesh": args.mesh}, b | {"mesh": args.mesh}]
        print(f"| {name} | {args.micro} / {2 * args.micro} | {a['temp_bytes'] / 1e6:.1f} | {b['temp_bytes'] / 1e6:.1f} | "
              f"{a['step_s'] * 1e3:.0f} | {b['step_s'] * 1e3:.0f} | {a['compile_s']:.1f} |", file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "pipeline_model", "config": args.config, "mesh": args.mesh, "n_layers": args.layers,
                      "rows_per_micro": args.rows_per_micro,
                      "seq": args.seq, "results": rows, **provenance()}, indent=1))


if __name__ == "__main__":
    main()
