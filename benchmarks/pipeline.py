"""Pipeline schedules: simulated bubble fraction, executed ticks, compiled temporary memory as micro-batches
double, and the step time of the executor's toy model on 8 fake CPU devices.

Per schedule and stage count (PP ranks; DualPipeV's PP/2 ranks hold PP stages): the simulator with costs
F = 1, I = 1, W = 1 (B = 2), overlapped F&B = 2.5 (per stage chunk; chunks of twice-split schedules halved)
gives the bubble fraction (worst rank's idle / makespan) and the peak activations; the executor's program
gives its tick count and idle ticks; ``memory_analysis`` of the compiled toy step at C and 2C micro-batches
gives the temporaries; the step time is the median of ``--iters`` runs (CPU wall time says little about a
pipeline: every collective is synchronous and the fake devices share 2 cores).

    python benchmarks/pipeline.py [--stages 2 4 8] [--iters 5] [--width 256]
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

from _provenance import provenance, time_fn  # noqa: E402
from deepseek_jax.parallel.mesh import make_mesh  # noqa: E402
from deepseek_jax.parallel.pipeline import make_schedule, simulator, toy  # noqa: E402
from deepseek_jax.parallel.pipeline.executor import make_executor, stage_params  # noqa: E402
from deepseek_jax.parallel.pipeline.program import build_program  # noqa: E402

COSTS = {"F": 1.0, "I": 1.0, "W": 1.0, "FB": 2.5}
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "dualpipe", "dualpipev")


def ranks_of(name: str, pp: int) -> int:
    return pp // 2 if name == "dualpipev" else pp


def measure(name: str, pp: int, micro: int, args) -> dict:
    n = ranks_of(name, pp)
    halve = name in ("dualpipev", "interleaved_1f1b")
    costs = {k: v / 2 if halve else v for k, v in COSTS.items()}
    row: dict = {"schedule": name, "pp": pp, "ranks": n}
    mesh = make_mesh({"stage": n}, jax.devices()[:n])
    for c in (micro, 2 * micro):
        schedule = make_schedule(name, n, c)
        sim = simulator.simulate(schedule, costs)
        program = build_program(schedule)
        stacked, shared, inputs = toy.problem(schedule, batch=args.batch, width=args.width)
        step = make_executor(program, mesh, toy.embed, toy.stage, toy.loss, w_specs=toy.W_SPECS)
        w = stage_params(program, stacked)
        t0 = time.perf_counter()
        compiled = step.lower(w, shared, inputs).compile()
        compile_s = time.perf_counter() - t0
        row[f"C={c}"] = {
            "bubble_fraction": max(sim["bubble"]) / sim["makespan"], "peak_activations": sim["peak_activations"],
            "ticks": program.ticks, "idle_ticks": program.idle_ticks(), "x_stash": list(program.x_depths),
            "temp_bytes": compiled.memory_analysis().temp_size_in_bytes, "compile_s": compile_s,
            "step_s": time_fn(compiled, w, shared, inputs, warmup=1, iters=args.iters)}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16, help="rows per micro-batch")
    ap.add_argument("--width", type=int, default=256, help="toy model width (hidden 2x)")
    args = ap.parse_args()
    rows = []
    for pp in args.stages:
        for name in args.schedules:
            if ranks_of(name, pp) < 1 or (name == "dualpipe" and pp % 2):
                continue
            rows.append(measure(name, pp, 2 * pp, args))
            r, a, b = rows[-1], rows[-1][f"C={2 * pp}"], rows[-1][f"C={4 * pp}"]
            print(f"| {name} | {pp} | {r['ranks']} | {a['bubble_fraction']:.0%} | {a['ticks']} / {b['ticks']} | "
                  f"{max(a['x_stash'])} / {max(b['x_stash'])} | {a['temp_bytes'] / 1e6:.2f} / "
                  f"{b['temp_bytes'] / 1e6:.2f} | {a['step_s'] * 1e3:.0f} / {b['step_s'] * 1e3:.0f} | "
                  f"{a['compile_s']:.1f} |", file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "pipeline", "costs": COSTS, "batch": args.batch, "width": args.width,
                      "rows": rows, **provenance()}, indent=1))


if __name__ == "__main__":
    main()
