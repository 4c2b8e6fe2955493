"""Plan a run on hardware you do not have: compile the REAL training step for a TPU slice on this (CPU) host
and read what the TPU compiler says -- per-chip memory against HBM, FLOPs, collectives per mesh axis, the
kernels it chose -- beside the analytic model and a roofline of step time and MFU.

``jax.experimental.topologies.get_topology_desc(topology_name="v5p:4x4x4", platform="tpu")`` gives the
slice's compile-only devices (it needs ``libtpu``: ``pip install 'deepseek-jax[tpu-plan]'``); the mesh is built
on them, the state and batch are ``jax.ShapeDtypeStruct`` with their shardings (nothing is allocated), and the
kernels follow the mesh's platform (:func:`deepseek_jax.kernels.backend.current_platform`), so the TPU program
has TPU kernels. A program over the HBM budget fails to compile with ``RESOURCE_EXHAUSTED``: reported as not
fitting, with the compiler's numbers. GPU targets (``h100:256``) have no deviceless compiler: the analytic part
only, stated as such.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from deepseek_jax.analysis.chips import parse_topology, roofline
from deepseek_jax.analysis.estimate import (cached_pipeline_report, candidate_layouts, estimate, pipelined_candidates,
                                            state_bytes)
from deepseek_jax.analysis.layout import collectives_by_axis
from deepseek_jax.analysis.params import flops_per_token, param_counts
from deepseek_jax.nn.block import scan_unroll
from deepseek_jax.config import FP8Config, ModelConfig
from deepseek_jax.parallel.expert import dispatch_capacity
from deepseek_jax.parallel.mesh import BATCH_AXES, MESH_AXES, describe, make_mesh, mesh_size, parse_mesh
from deepseek_jax.parallel.pipeline import SCHEDULES
from deepseek_jax.train.config import REMAT_POLICIES, PipelineConfig, StepConfig
from deepseek_jax.train.objectives import Pretrain
from deepseek_jax.train.optim import OptimConfig
from deepseek_jax.train.step import make_train_fns

__all__ = ["plan", "format_plan", "topology_devices", "PlanUnavailable", "candidate_layouts", "search",
           "format_search", "rolled_roofline", "cached_plan"]

KERNELS = ("ragged-dot", "ragged-all-to-all", "all-to-all", "all-gather", "reduce-scatter", "all-reduce",
           "collective-permute")
_TOO_BIG = re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")
_UNIT = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


class PlanUnavailable(RuntimeError):
    """The TPU compiler (``libtpu``) is not installed."""


def topology_devices(topology: str) -> list[jax.Device]:
    """The compile-only devices of a TPU slice (``"v5p:4x4x4"``), from ``libtpu`` on any host."""
    from jax.experimental import topologies  # jax's own optional part, loaded only for planning

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except RuntimeError as e:
        if "not installed" in str(e):
            raise PlanUnavailable(f"planning for {topology} compiles with the TPU compiler, which is not installed: "
                               f"pip install 'deepseek-jax[tpu-plan]' (jax[tpu]=={jax.__version__})") from e
        raise ValueError(f"--topology {topology}: the TPU runtime does not know this slice ({e})") from e


def _argument_bytes(lowered, compiled) -> dict[str, int]:
    """Bytes per device of the step's arguments by their shardings: the state's parts (params, router,
    opt_state, step), the batch and the scalars; ``total`` is what the compiler's argument size should be."""
    (state, batch, hyp), _ = lowered.args_info
    (state_sh, batch_sh, hyp_sh), _ = compiled.input_shardings

    def nbytes(info, sh):
        return sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
                   for a, s in zip(jax.tree.leaves(info), jax.tree.leaves(sh)))
    out = {k: nbytes(state[k], state_sh[k]) for k in state}
    out.update(batch=nbytes(batch, batch_sh), scalars=nbytes(hyp, hyp_sh))
    out["total"] = sum(out.values())
    return out


def _analytic(cfg: ModelConfig, sc: StepConfig, mesh_shape: dict[str, int], remat: str) -> dict[str, float]:
    """Per device: the model's FLOPs (6N + attention, no recomputation), the same with the recomputation the
    remat policy adds (``full``: one more forward, i.e. 8/6), and what the TPU compiler's cost analysis should
    then report. It counts statically: (1) a ``ragged_dot`` whose contracting dim is ragged -- the routed
    experts' weight gradient -- as dense over its groups (measured on a lone ``ragged_dot``: forward and input
    gradient 1.0x, weight gradient 16.1x with 16 groups); (2) every row of the expert-parallel receive buffer
    (``expert x capacity x k`` rows, sized for the worst case), used or not: ``r`` times the mean load."""
    n_dev = math.prod(mesh_shape.values())
    tokens = sc.batch_size * sc.seq_len / n_dev
    model = flops_per_token(cfg, sc.seq_len) * tokens
    recompute = remat == "full"
    expected = model * (8 / 6 if recompute else 1)
    extra = 0.0
    if cfg.moe is not None:
        pc, m, ep = param_counts(cfg), cfg.moe, mesh_shape["expert"]
        one = 2 * (pc.routed_main + pc.routed_mtp) * m.experts_per_token / m.n_routed_experts * tokens  # one pass
        n_local = sc.batch_size * sc.seq_len // math.prod(mesh_shape[a] for a in BATCH_AXES)
        r = ep * dispatch_capacity(n_local, m.experts_per_token, ep, m.capacity_factor) / n_local if ep > 1 else 1
        g = m.n_routed_experts // ep
        extra = (r - 1) * one * (3 if recompute else 2) + (r * g - 1) * one
    return {"model_flops_per_device": model, "expected_flops_per_device": expected,
            "expected_compiler_flops_per_device": expected + extra}


def plan(cfg: ModelConfig, topology: str, mesh: dict[str, int] | str | None = None, batch: int = 0,
         seq: int = 4096, remat: str = "full", fp8: bool = False, moments: str = "float32",
         pipeline: str = "none", microbatches: int = 1) -> dict[str, Any]:
    """The plan of one layout (see the module docstring): ``mesh`` axes over the slice's devices (default:
    everything ``fsdp``), a global batch of ``batch`` (default: one row per device) x ``seq`` tokens, AdamW
    with ``moments`` dtype, ``remat`` one of :data:`REMAT_POLICIES`, ``fp8`` the model's FP8 recipe on,
    ``pipeline`` a schedule over the mesh's ``stage`` axis (``train.pipeline.schedule``) with ``microbatches``.
    Returns a JSON-able dict (``fits``, ``per_chip_bytes``, ``flops_per_chip``, ``collectives``, ``kernels``,
    ``roofline``, ...); per chip means per JAX device (a v4 chip is two)."""
    _, chip, n_chips = parse_topology(topology)
    if remat not in REMAT_POLICIES:
        raise ValueError(f"--remat {remat!r} must be one of {REMAT_POLICIES}")
    if fp8 and cfg.fp8 is None:
        cfg = dataclasses.replace(cfg, fp8=FP8Config())
    out: dict[str, Any] = {"topology": topology, "chip": chip.name, "chips": n_chips, "seq": seq, "remat": remat,
                           "fp8": fp8, "moments": moments}
    if not chip.compilable:
        return _analytic_only(cfg, out, chip, n_chips, mesh, batch, seq, remat, fp8, moments)
    devices = topology_devices(topology)
    axes = parse_mesh(mesh) if isinstance(mesh, str) else dict(mesh or {"fsdp": len(devices)})
    m = make_mesh(axes, devices)
    batch = batch or len(devices)
    capacity = chip.hbm * n_chips / len(devices)
    sc = StepConfig(batch_size=batch, seq_len=seq, steps=10_000, remat=remat, optim=OptimConfig(moments_dtype=moments),
                    pipeline=PipelineConfig(pipeline, microbatches))
    shape = {a: m.shape[a] for a in MESH_AXES}
    out.update(mesh=describe(axes), mesh_axes=shape, batch=batch, devices=len(devices), pipeline=pipeline,
               microbatches=microbatches, **_analytic(cfg, sc, shape, remat))
    fns = make_train_fns(cfg, sc, Pretrain(), m)
    t0 = time.perf_counter()
    lowered = fns.lower_step()
    try:
        with jax.set_mesh(m):
            compiled = lowered.compile()
    except Exception as e:  # the TPU compiler refuses a program over the HBM budget
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        hit = _TOO_BIG.search(str(e))  # "... temporaries (19.22G) exceeds available HBM (15.75G)"
        need, have = ((float(hit.group(i)) * _UNIT[hit.group(i + 1)] for i in (1, 3)) if hit else (None, capacity))
        out.update(fits=False, compile_s=round(time.perf_counter() - t0, 1), error=str(e).strip().splitlines()[0],
                   per_chip_bytes={"peak": need, "capacity": have})
        return out
    out["compile_s"] = round(time.perf_counter() - t0, 1)
    out = {**out, **_read(compiled, lowered.as_text(), m, capacity, chip, fp8, out["model_flops_per_device"]),
           "analytic_bytes": _argument_bytes(lowered, compiled)}
    return rolled_roofline(cfg, out, moments)


def rolled_roofline(cfg: ModelConfig, r: dict[str, Any], moments: str = "float32") -> dict[str, Any]:
    """``r`` (a compiled plan) with its roofline on analytic FLOPs and collective bytes where the layer stacks are
    rolled loops (any remat, or more than 8 layers) or the step is the pipeline executor's loop over ticks: XLA's
    cost analysis and the HLO text count a loop body once, so the compiler's FLOPs, HBM bytes and collectives
    are per layer (per tick) there, not per step. A pipelined step's compute time is divided by ``1 - bubble``
    (the schedule's simulated bubble fraction). The compiler's own roofline is kept as ``roofline_compiler``;
    the HBM term stays the compiler's (a lower bound)."""
    stacks = [n for n in (cfg.n_dense_layers, cfg.n_moe_layers) if n]
    piped = r.get("pipeline", "none") != "none"
    if (r.get("rolled_loops") or not r.get("fits")
            or (not piped and all(scan_unroll(0, n, r["remat"]) >= n for n in stacks))):
        return r
    _, chip, _ = parse_topology(r["topology"])
    axes = {a: k for a, k in r["mesh_axes"].items() if k > 1}
    pipe = cached_pipeline_report(cfg, r["pipeline"], axes["stage"], r["microbatches"]) if piped else None
    comm = estimate(cfg, axes, r["remat"], r["batch"], r["seq"], chip, r["devices"], moments, pipe)["comm_bytes"]
    bubble = pipe["bubble_fraction"] if piped else 0.0
    rf = roofline(chip, r["expected_flops_per_device"] / (1 - bubble), r["hbm_bytes_per_chip"], comm,
                  r["model_flops_per_device"], r["fp8"])
    rf["assumptions"] += ("; rolled layer loops: compute from the analytic FLOPs (model + recomputation), "
                          "collectives from the analytic traffic, HBM bytes the compiler's (a lower bound)"
                          + (f"; pipeline bubble {bubble:.1%} of the step (simulated schedule)" if piped else ""))
    return {**r, "rolled_loops": True, "roofline": rf, "roofline_compiler": r["roofline"]}


def _analytic_only(cfg, out, chip, n_chips, mesh, batch, seq, remat, fp8, moments) -> dict[str, Any]:
    """A GPU target: no deviceless compiler exists, so the parameters, gradients and AdamW moments per chip by
    the rules table (an abstract mesh) and the compute bound of the roofline; activations, temporaries and
    collectives are not known without a compile, and ``fits`` is None."""
    axes = parse_mesh(mesh) if isinstance(mesh, str) else dict(mesh or {"fsdp": n_chips})
    if mesh_size(axes) != n_chips:
        raise ValueError(f"--mesh {describe(axes)} has {mesh_size(axes)} devices but {out['topology']} has {n_chips}")
    batch = batch or n_chips
    sc = StepConfig(batch_size=batch, seq_len=seq, steps=10_000, remat=remat)
    a = _analytic(cfg, sc, {k: axes.get(k, 1) for k in MESH_AXES}, remat)
    return {**out, **a, "mesh": describe(axes), "batch": batch, "devices": n_chips, "compiled": False, "fits": None,
            "per_chip_bytes": {**state_bytes(cfg, axes, batch, seq, moments), "capacity": int(chip.hbm)},
            "roofline": roofline(chip, a["expected_flops_per_device"], 0.0, 0.0, a["model_flops_per_device"], fp8),
            "note": f"{chip.name}: no deviceless compiler exists; analytic state bytes and the compute bound only "
                    "(activations, temporaries, HBM traffic and collectives need a compile)"}


def _read(compiled, stable: str, mesh, capacity: float, chip, fp8: bool, model_flops: float) -> dict[str, Any]:
    """Memory, FLOPs, collectives and kernels of a compiled step, and its roofline."""
    mem = compiled.memory_analysis()
    args, temp, outs = mem.argument_size_in_bytes, mem.temp_size_in_bytes, mem.output_size_in_bytes
    alias = mem.alias_size_in_bytes
    peak = getattr(mem, "peak_memory_in_bytes", 0) or args + temp + outs - alias
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hlo = compiled.as_text()
    coll = collectives_by_axis(hlo, {a: mesh.shape[a] for a in MESH_AXES})
    coll_bytes = sum(v["bytes"] for by in coll.values() for v in by.values())
    kernels = {k: len(re.findall(rf"(?<![\w-]){k}(?:-start)?\(", hlo)) for k in KERNELS}  # all-to-all: not ragged
    kernels["ragged-dot"] = len(set(re.findall(r"\bragged-dot[\w.-]*", hlo)))  # TPU: fusions named ragged-dot-*
    kernels["ragged_dot (StableHLO)"] = len(re.findall(r"ragged_dot", stable))
    flops = float(cost.get("flops", 0.0))
    return {"fits": bool(peak <= capacity),
            "per_chip_bytes": {"arguments": int(args), "temp": int(temp), "output": int(outs), "alias": int(alias),
                               "peak": int(peak), "capacity": int(capacity)},
            "flops_per_chip": flops, "hbm_bytes_per_chip": float(cost.get("bytes accessed", 0.0)),
            "collectives": coll, "collective_bytes_per_chip": int(coll_bytes), "kernels": kernels,
            "roofline": roofline(chip, flops, float(cost.get("bytes accessed", 0.0)), coll_bytes, model_flops, fp8)}


def format_plan(r: dict[str, Any]) -> str:
    """The plan as text tables."""
    g = 2 ** 30
    lines = [f"{r['chip']} x {r['chips']} ({r['topology']}), mesh {r.get('mesh', '?')}, batch {r.get('batch')} x "
             f"{r['seq']}, remat {r['remat']}{', fp8' if r['fp8'] else ''}; "
             + (f"compiled in {r['compile_s']} s" if "compile_s" in r else "not compiled")]
    b = r["per_chip_bytes"]
    if r.get("compiled") is False:
        rf = r["roofline"]
        return "\n".join(lines + [
            r["note"], f"state per chip: {b['state'] / g:.2f} GiB (params {b['params'] / g:.2f}, grads "
            f"{b['grads'] / g:.2f}, optimizer {b['optimizer'] / g:.2f}) of {b['capacity'] / g:.1f} GiB",
            f"compute bound: {rf['compute_s'] * 1e3:.1f} ms per step at the dense {'FP8' if r['fp8'] else 'bf16'} peak "
            f"({r['model_flops_per_device']:.3e} model FLOPs per chip)"])
    if not r["fits"]:
        used = f"{b['peak'] / g:.1f} GiB" if b.get("peak") else "?"
        return "\n".join(lines + [f"DOES NOT FIT: the compiler needs {used} per chip of {b['capacity'] / g:.1f} GiB",
                                  f"  {r.get('error', '')}"])
    lines.append(f"fits: peak {b['peak'] / g:.2f} of {b['capacity'] / g:.2f} GiB per chip (arguments "
                 f"{b['arguments'] / g:.2f}, temporaries {b['temp'] / g:.2f})")
    lines.append(f"FLOPs per chip: compiler {r['flops_per_chip']:.3e}; analytic {r['expected_flops_per_device']:.3e} "
                 f"(model {r['model_flops_per_device']:.3e} + recomputation), "
                 f"{r['expected_compiler_flops_per_device']:.3e} as the compiler counts the ragged weight gradient")
    lines.append("collectives per chip and step" + (" (rolled layer loops: each loop body counted once by the HLO, "
                                                      "so these are per layer; the roofline uses the analytic traffic):"
                                                      if r.get("rolled_loops") else ":"))
    for kind, by in sorted(r["collectives"].items()):
        for axes, v in sorted(by.items()):
            lines.append(f"  {kind:20s} over {axes:24s} x{v['count']:<5d} {v['bytes'] / 2 ** 20:12,.1f} MiB")
    lines.append("kernels: " + ", ".join(f"{k} {v}" for k, v in r["kernels"].items() if v))
    rf = r["roofline"]
    lines.append(f"roofline: compute {rf['compute_s'] * 1e3:.1f} ms, HBM {rf['memory_s'] * 1e3:.1f} ms, collectives "
                 f"{rf['collective_s'] * 1e3:.1f} ms -> step {rf['step_s_overlapped'] * 1e3:.1f}.."
                 f"{rf['step_s_serial'] * 1e3:.1f} ms, MFU {rf['mfu_serial']:.1%}..{rf['mfu_overlapped']:.1%} "
                 f"({rf['bound']}-bound)")
    lines.append(f"  ({rf['assumptions']})")
    return "\n".join(lines)


def cached_plan(cache: str | os.PathLike | None, cfg: ModelConfig, topology: str, axes: dict[str, int],
                **kw: Any) -> dict[str, Any]:
    """:func:`plan` through a folder of JSON results keyed by everything the compile depends on (the model, the
    slice, the layout, ``kw``, jax's version): a search rerun, or one with a larger ``max_compiles``, compiles
    only what it has not. Not keyed by this project's code: clear the folder after changing it. ``cache=None``:
    :func:`plan` itself."""
    if cache is None:
        return plan(cfg, topology, axes, **kw)
    key = json.dumps([cfg.to_dict(), topology, sorted(axes.items()), sorted(kw.items()), jax.__version__],
                     sort_keys=True, default=str)
    path = Path(cache) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    if path.exists():
        return {**json.loads(path.read_text()), "cached": True}
    r = plan(cfg, topology, axes, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(r, default=float))
    tmp.replace(path)  # whole or absent, never half written
    return r


def search(cfg: ModelConfig, topology: str, batch: int, seq: int = 4096, remats=("full", "deepseek", "none"),
           max_compiles: int = 4, moments: str = "float32", fp8: bool = False, progress=None,
           pipelines: Sequence[str] = (), cache: str | os.PathLike | None = None, jobs: int = 1) -> dict[str, Any]:
    """Rank the layouts of a slice: every valid factorisation x remat policy (with ``pipelines``, e.g.
    ``("1f1b", "dualpipev:8")``, also every ``stage`` factorisation x those schedules x every micro-batch count
    the batch allows, or the one given) estimated analytically (:func:`estimate`), those whose estimate fits 90%
    of HBM ordered by estimated step time and compiled (:func:`plan`) in that order until ``max_compiles`` fit
    (at most ``2 * max_compiles`` attempts; when none is estimated to fit, the ``max_compiles`` smallest
    estimates are compiled, to report what they need). Returns ``{"candidates": n, "estimated": [...],
    "compiled": [...plans, fitting ones first by roofline step time]}``. ``progress(i, n, mesh, remat)`` is
    called per compile (``remat`` then names the schedule too); ``cache``: a folder of compiled plans
    (:func:`cached_plan`); ``jobs``: compiles run at once, each in its own process (the TPU compiler uses about
    one core per compile; a V3 compile holds several GB)."""
    for entry in pipelines:
        name, _, count = entry.partition(":")
        if name not in SCHEDULES or (count and not count.isdigit()):
            raise ValueError(f"--pipeline {entry!r}: with --search, schedules ({', '.join(sorted(SCHEDULES))}), each "
                             "with an optional :MICROBATCHES, comma-separated")
    _, chip, n_chips = parse_topology(topology)
    n_dev = len(topology_devices(topology)) if chip.compilable else n_chips
    capacity = chip.hbm * n_chips / n_dev
    rows = []
    for axes in candidate_layouts(cfg, n_dev, batch, stages=bool(pipelines)):
        pipes = pipelined_candidates(cfg, axes, batch, pipelines) if "stage" in axes else [("none", 1, None)]
        for remat in remats:
            for name, micro, rep in pipes:
                est = estimate(cfg, axes, remat, batch, seq, chip, n_dev, moments, rep)
                rows.append({"mesh": describe(axes), "axes": axes, "remat": remat, "pipeline": name,
                             "microbatches": micro, **est, "fits_estimate": est["bytes"] <= 0.9 * capacity})
    rows.sort(key=lambda r: (not r["fits_estimate"], r["step_s"], r["bytes"]))
    # the promising ones in order until max_compiles of them fit (an over-budget compile fails in about a
    # minute; at most twice as many attempts); if none is estimated to fit, the smallest estimates
    fitting = [r for r in rows if r["fits_estimate"]]
    chosen = fitting[:2 * max_compiles] if fitting else sorted(rows, key=lambda r: r["bytes"])[:max_compiles]
    jobs_kw = [(cache, cfg, topology, r["axes"], dict(batch=batch, seq=seq, remat=r["remat"], fp8=fp8, moments=moments,
                                                      pipeline=r["pipeline"], microbatches=r["microbatches"]))
               for r in chosen]
    compiled = _compile_in_order(chosen, jobs_kw, max_compiles, jobs, progress)
    compiled.sort(key=lambda p: (not p["fits"], p.get("roofline", {}).get("step_s_overlapped", float("inf"))))
    return {"topology": topology, "batch": batch, "seq": seq, "candidates": len(rows), "estimated": rows,
            "compiled": compiled}


def _cached_plan_job(job: tuple) -> dict[str, Any]:
    cache, cfg, topology, axes, kw = job
    return cached_plan(cache, cfg, topology, axes, **kw)


def _compile_in_order(chosen: list[dict], jobs_kw: list[tuple], max_compiles: int, jobs: int,
                      progress) -> list[dict[str, Any]]:
    """The plans of ``chosen`` in rank order until ``max_compiles`` fit: one at a time, or up to ``jobs`` at once in
    spawned processes (a new one starts while those fitted plus those in flight are fewer than ``max_compiles``;
    the workers see this process's environment, not JAX settings made in it with ``jax.config``)."""
    def note(i):
        if progress is not None:
            progress(i, len(chosen), chosen[i]["mesh"], chosen[i]["remat"] + _pipe_label(chosen[i]))
    out: list[dict[str, Any]] = []
    if jobs <= 1:
        for i, job in enumerate(jobs_kw):
            if sum(p["fits"] for p in out) >= max_compiles:
                break
            note(i)
            out.append(_cached_plan_job(job))
        return out
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        todo, running = list(enumerate(jobs_kw)), {}
        while todo or running:
            while todo and len(running) < jobs and sum(p["fits"] for p in out) + len(running) < max_compiles:
                i, job = todo.pop(0)
                note(i)
                running[pool.submit(_cached_plan_job, job)] = i
            if not running:
                break
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for f in done:
                running.pop(f)
                out.append(f.result())
    return out


def _pipe_label(r: dict[str, Any]) -> str:
    return f", {r['pipeline']}:{r['microbatches']}" if r.get("pipeline", "none") != "none" else ""


def format_search(r: dict[str, Any]) -> str:
    """The ranked table of :func:`search`."""
    g = 2 ** 30
    lines = [f"{r['topology']}: {r['candidates']} layouts x remat estimated, {len(r['compiled'])} compiled "
             f"(batch {r['batch']} x {r['seq']})", "",
             f"{'mesh':34s} {'remat':18s} {'fits':5s} {'peak GiB':>9s} {'step ms':>9s} {'MFU':>6s} {'compile s':>9s}"]
    for p in r["compiled"]:
        b, rf = p["per_chip_bytes"], p.get("roofline", {})
        peak = f"{b['peak'] / g:9.2f}" if b.get("peak") else f"{'?':>9s}"
        step = f"{rf['step_s_overlapped'] * 1e3:9.1f}" if rf else f"{'-':>9s}"
        mfu = f"{rf['mfu_overlapped']:6.1%}" if rf else f"{'-':>6s}"
        lines.append(f"{p['mesh']:34s} {p['remat'] + _pipe_label(p):18s} {str(p['fits']):5s} {peak} {step} {mfu} "
                     f"{p['compile_s']:9.1f}")
    return "\n".join(lines)
