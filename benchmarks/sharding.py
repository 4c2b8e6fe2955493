"""Training-step tokens/s and collective bytes per step of the tiny preset on 8 fake CPU devices, for
each layout of the sharding issue: the REAL step (pre-training loss, AdamW, state shardings, donation). Prints JSON (and a Markdown table with --markdown).

Fake devices share the same 2 cores, so tokens/s measures the cost of the partitioned program
(collectives become memory copies), not a real speed-up; the collective bytes are what a real
interconnect would carry per device and step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import deepseek_jax as dsj  # noqa: E402
from _provenance import provenance  # noqa: E402
from deepseek_jax import sharding as S  # noqa: E402
from deepseek_jax.analysis.layout import hlo_collectives  # noqa: E402
from deepseek_jax.train.config import StepConfig  # noqa: E402
from deepseek_jax.train.objectives import Pretrain  # noqa: E402
from deepseek_jax.train.step import global_batch, hyper, make_train_fns  # noqa: E402

LAYOUTS = ["data=8", "fsdp=8", "expert=8", "tensor=2,expert=4", "data=2,fsdp=2,expert=2", "data=2,tensor=2,expert=2"]


def _measure(cfg, layout: str, args) -> dict:
    mesh = S.make_mesh({}, jax.devices()[:1]) if layout == "1 device" else S.make_mesh(layout)
    fns = make_train_fns(cfg, StepConfig(args.batch, args.seq, steps=10_000, remat=args.remat), Pretrain(), mesh)
    rng = np.random.RandomState(0)
    rows = {"tokens": rng.randint(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32),
            "segment_ids": np.ones((args.batch, args.seq), np.int32),
            "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), (args.batch, args.seq)).copy()}
    batch = global_batch(rows, fns.batch_sharding, args.batch)
    state, h, times = fns.init(jax.random.key(0)), hyper(0.3, 1e-3), []
    for _ in range(args.iters + 1):  # the first call compiles
        t0 = time.perf_counter()
        state, m = fns.step(state, batch, h)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    coll = hlo_collectives(fns.compile_step().as_text()) if mesh.size > 1 else {}
    return {"layout": layout, "tokens_per_s": round(args.batch * args.seq / float(np.median(times[1:])), 1),
            "collective_mib": round(sum(c["bytes"] for c in coll.values()) / 2**20, 3),
            "collectives": {k: {"count": c["count"], "mib": round(c["bytes"] / 2**20, 3)} for k, c in coll.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--remat", default="none")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    cfg = dsj.load_config(args.config)
    rows = []
    for layout in ["1 device"] + LAYOUTS:
        rows.append(_measure(cfg, layout, args))
        print(rows[-1], file=sys.stderr)
    if args.markdown:
        print("| layout | train-step tokens/s | collective MiB/step/device | collectives (count) |")
        print("|---|---|---|---|")
        for r in rows:
            kinds = ", ".join(f"{k} x{v['count']}" for k, v in sorted(r["collectives"].items())) or "-"
            print(f"| {r['layout']} | {r['tokens_per_s']:,.0f} | {r['collective_mib']:.2f} | {kinds} |")
    print(json.dumps({"benchmark": "sharding", "config": args.config, "batch": args.batch, "seq": args.seq,
                      "remat": args.remat, "results": rows, **provenance()}, indent=1))


if __name__ == "__main__":
    main()
