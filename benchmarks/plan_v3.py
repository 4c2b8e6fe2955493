"""DeepSeek-V3-671B planned for TPU v5p slices on this CPU host (``deepseek_jax.train.plan``): the layout search on
one slice, and the best estimated layout of each slice size compiled, written as one JSON file that notebook
``09_planning_v3_at_scale`` reads (V3 compiles take minutes each here, so they stay out of CI).

    JAX_PLATFORMS=cpu python benchmarks/plan_v3.py --out benchmarks/results/plan_v3_v5p.json
    JAX_PLATFORMS=cpu python benchmarks/plan_v3.py --search-only --topology v5p:8x8x4 --max-compiles 3
    JAX_PLATFORMS=cpu python benchmarks/plan_v3.py --out benchmarks/results/plan_v3_v5p.json --pipelines 1f1b,dualpipev

Each slice's plan is printed as it finishes (stderr) and the file rewritten after it: an interrupted run keeps
what it finished, and a rerun with the same ``--out`` skips the plans already in it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU devices are compile-only; libtpu must not grab a chip

from _provenance import provenance  # noqa: E402

from deepseek_jax.analysis.chips import parse_topology  # noqa: E402
from deepseek_jax.config import load_config  # noqa: E402
from deepseek_jax.train.plan import format_plan, format_search, plan, rolled_roofline, search  # noqa: E402

SLICES = ("v5p:4x4x4", "v5p:4x4x8", "v5p:8x8x4", "v5p:8x8x8", "v5p:8x8x16")  # 64 .. 1,024 chips


def _save(path: str, doc: dict) -> None:
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, default=float)
        os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="deepseek-v3-671b")
    ap.add_argument("--topology", default="v5p:8x8x4", help="the slice searched")
    ap.add_argument("--slices", nargs="*", default=list(SLICES), help="slices planned with their best estimate")
    ap.add_argument("--rows-per-chip", type=int, default=1, help="global batch = rows-per-chip x chips")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--max-compiles", type=int, default=3)
    ap.add_argument("--moments", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--search-only", action="store_true")
    ap.add_argument("--pipelines", default="", help="e.g. 1f1b,dualpipev: estimate --topology's stage layouts with "
                    "these schedules too, and compile the best pipelined estimate")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    cfg = load_config(args.config)
    doc = {"benchmark": "plan_v3", "config": args.config, "seq": args.seq, "rows_per_chip": args.rows_per_chip,
           "moments": args.moments, "search": None, "slices": {}, **provenance()}
    if args.out and os.path.exists(args.out):  # plans already made are kept (their roofline brought up to date)
        old = json.load(open(args.out))
        doc.update({k: v for k, v in old.items() if k not in doc or k in ("search", "slices")})  # results and notes
        first = old.get("plans_provenance") or {k: old.get(k) for k in ("git_sha", "git_dirty", "date")}
        doc["plans_provenance"] = first  # where the compiles ran (this run's provenance is the file's)
        if doc["search"]:
            doc["search"]["compiled"] = [rolled_roofline(cfg, p, args.moments) for p in doc["search"]["compiled"]]
        for r in doc["slices"].values():
            r["plan"] = r["plan"] and rolled_roofline(cfg, r["plan"], args.moments)

    def log(i, n, mesh, remat):
        print(f"[{time.strftime('%H:%M:%S')}] compile {i + 1}/{n}: {mesh}, remat {remat}", file=sys.stderr, flush=True)

    if doc["search"] is None:
        chips = parse_topology(args.topology)[2]
        r = search(cfg, args.topology, args.rows_per_chip * chips, args.seq, max_compiles=args.max_compiles,
                   moments=args.moments, progress=log)
        r["estimated"] = r["estimated"][:40]  # the best estimates (the rest are far over budget or slower)
        doc["search"] = r
        _save(args.out, doc)
        print(format_search(r), file=sys.stderr, flush=True)
    if args.pipelines and args.topology not in (doc.get("pipelined") or {}):
        chips, pipes = parse_topology(args.topology)[2], tuple(args.pipelines.split(","))
        t0 = time.perf_counter()
        r = search(cfg, args.topology, args.rows_per_chip * chips, args.seq, max_compiles=0, moments=args.moments,
                   pipelines=pipes)
        piped = [x for x in r["estimated"] if x["pipeline"] != "none"]
        best = next(x for x in piped if x["fits_estimate"])
        entry = {"schedules": pipes, "candidates": r["candidates"], "estimate_s": round(time.perf_counter() - t0, 1),
                 "fits_estimate": sum(x["fits_estimate"] for x in r["estimated"]),
                 "rank_of_best_pipelined": r["estimated"].index(best), "estimated": piped[:20]}
        log(0, 1, best["mesh"], f"{best['remat']}, {best['pipeline']}:{best['microbatches']}")
        entry["plan"] = plan(cfg, args.topology, best["axes"], args.rows_per_chip * chips, args.seq, best["remat"],
                             moments=args.moments, pipeline=best["pipeline"], microbatches=best["microbatches"])
        doc["pipelined"] = {**(doc.get("pipelined") or {}), args.topology: entry}
        _save(args.out, doc)
        print(format_plan(entry["plan"]), file=sys.stderr, flush=True)
    for topo in [] if args.search_only else args.slices:
        if topo in doc["slices"]:
            continue
        chips = parse_topology(topo)[2]
        if topo == args.topology:  # the searched slice: its best compiled layout
            r = doc["search"]
        else:
            r = search(cfg, topo, args.rows_per_chip * chips, args.seq, max_compiles=1, moments=args.moments,
                       progress=log)
        doc["slices"][topo] = {"candidates": r["candidates"], "best_estimate": r["estimated"][0],
                               "plan": r["compiled"][0] if r["compiled"] else None}
        _save(args.out, doc)
        p = doc["slices"][topo]["plan"]
        print(f"{topo}: {p['mesh']} remat {p['remat']} fits {p['fits']} peak "
              f"{(p['per_chip_bytes'].get('peak') or 0) / 2 ** 30:.1f} GiB ({p['compile_s']} s)", file=sys.stderr,
              flush=True)
    _save(args.out, doc)
    print(json.dumps({k: v for k, v in doc.items() if k not in ("search", "slices")}, default=float))


if __name__ == "__main__":
    main()
