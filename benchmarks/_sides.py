"""Run the two sides of a comparison (``ours`` = JAX, ``torch`` = PyTorch) each in its OWN process,
alternating the order round by round, and collect the JSON each child prints last.

JAX and PyTorch must never be timed in one process: with JAX's thread pools alive a PyTorch step measured
4.6x slower on this machine. The parent process only starts children and aggregates.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from typing import Sequence


def run_child(script: str, side: str, argv: Sequence[str], timeout: int = 3600) -> dict:
    """``python script --side SIDE *argv`` -> the JSON object on its last stdout line."""
    r = subprocess.run([sys.executable, script, "--side", side, *argv], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{side} child failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def alternate(script: str, argv: Sequence[str], rounds: int, sides: Sequence[str] = ("ours", "torch")) -> dict:
    """``{side: [result of round 0, ...]}``, the order of the sides reversed every other round."""
    out: dict = {s: [] for s in sides}
    for r in range(rounds):
        for side in (sides if r % 2 == 0 else tuple(reversed(sides))):
            out[side].append(run_child(script, side, argv))
            print(f"round {r} {side}: {json.dumps(out[side][-1])[:300]}", file=sys.stderr, flush=True)
    return out


def add_side_args(ap) -> None:
    """The child-process arguments every comparison script takes: ``--side`` and the checkpoint folder."""
    ap.add_argument("--side", choices=["export", "ours", "torch"])
    ap.add_argument("--ckpt")


def run_side(args, sides: dict) -> bool:
    """In a child (``--side`` given): run that side and print its JSON; returns whether it did."""
    if args.side:
        print(json.dumps(sides[args.side](args)))
    return bool(args.side)


def median_of(results: list[dict], *keys: str) -> float:
    """Median over rounds of ``result[k0][k1]...``."""
    vals = []
    for res in results:
        for k in keys:
            res = res[k]
        vals.append(float(res))
    return statistics.median(vals)


# The DeepSeek-V3-style model of the speed issue's table: d 256, 4 layers (1 dense + 3 MoE), 16 experts
# top-4, q-LoRA 96, kv-LoRA 64, vocab 2048; the rest from configs/bench.yaml (4 heads, nope 64, rope 32,
# v 64, expert width 192, dense width 1024). No MTP: transformers' model has none.
SMALL_V3 = ("bench", {"d_model": 256, "n_layers": 4, "vocab_size": 2048, "attention.q_lora_rank": 96,
                      "attention.kv_lora_rank": 64, "mtp.depth": 0})
