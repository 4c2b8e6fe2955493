"""Forward+backward tokens/s and collective bytes per step of the tiny preset on 8 fake CPU devices,
for each layout of the sharding issue. Prints JSON (and a Markdown table with --markdown).

Fake devices share the same 2 cores, so tokens/s measures the cost of the partitioned program
(collectives become memory copies), not a real speed-up; the collective bytes are what a real
interconnect would carry per device and step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import deepseek_jax as dsj  # noqa: E402
from _provenance import provenance, time_fn  # noqa: E402
from deepseek_jax import sharding as S  # noqa: E402
from deepseek_jax.analysis.layout import hlo_collectives  # noqa: E402
from deepseek_jax.train.objectives import cross_entropy  # noqa: E402

LAYOUTS = ["data=8", "fsdp=8", "expert=8", "tensor=2,expert=4", "data=2,fsdp=2,expert=2", "data=2,tensor=2,expert=2"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    cfg = dsj.load_config(args.config)
    variables = dsj.init_variables(cfg, 0)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq)), jnp.int32)

    def loss(v, t):
        return cross_entropy(dsj.Transformer(cfg).apply(v, t).logits[:, :-1], t[:, 1:])[0]

    rows = []
    for layout in ["single"] + LAYOUTS:
        if layout == "single":
            step = jax.jit(jax.value_and_grad(loss))
            sec = time_fn(step, variables, tokens, iters=args.iters)
            rows.append({"layout": "1 device", "tokens_per_s": round(args.batch * args.seq / sec, 1),
                         "collective_mib": 0.0, "collectives": {}})
            continue
        mesh = S.make_mesh(layout)
        v = S.shard_variables(cfg, variables, mesh)
        t = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(S.BATCH_AXES, None)))
        with jax.set_mesh(mesh):
            step = jax.jit(jax.value_and_grad(loss))
            compiled = step.lower(v, t).compile()
            sec = time_fn(compiled, v, t, iters=args.iters)
        coll = hlo_collectives(compiled.as_text())
        rows.append({"layout": layout, "tokens_per_s": round(args.batch * args.seq / sec, 1),
                     "collective_mib": round(sum(c["bytes"] for c in coll.values()) / 2**20, 3),
                     "collectives": {k: {"count": c["count"], "mib": round(c["bytes"] / 2**20, 3)} for k, c in coll.items()}})
        print(rows[-1], file=sys.stderr)
    if args.markdown:
        print("| layout | fwd+bwd tokens/s | collective MiB/step/device | collectives (count) |")
        print("|---|---|---|---|")
        for r in rows:
            kinds = ", ".join(f"{k} x{v['count']}" for k, v in sorted(r["collectives"].items())) or "-"
            print(f"| {r['layout']} | {r['tokens_per_s']:,.0f} | {r['collective_mib']:.2f} | {kinds} |")
    print(json.dumps({"benchmark": "sharding", "config": args.config, "batch": args.batch, "seq": args.seq,
                      "results": rows, **provenance()}, indent=1))


if __name__ == "__main__":
    main()
