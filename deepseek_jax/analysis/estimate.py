"""Analytic estimates for planning (``deepseek-jax plan --search``): the layouts a slice allows and, per layout,
remat policy and pipeline schedule, the bytes per chip and the step time a cheap model predicts, used to rank the
candidates before the TPU compiler (minutes per V3 compile) sees the most promising few."""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import numpy as np
from jax.sharding import AbstractMesh, AxisType

from deepseek_jax.analysis.layout import layout_report
from deepseek_jax.analysis.params import flops_per_token, param_counts
from deepseek_jax.analysis.pipeline import pipeline_report
from deepseek_jax.config import ModelConfig
from deepseek_jax.nn.placement import check_layout
from deepseek_jax.parallel.expert import dispatch_capacity
from deepseek_jax.parallel.mesh import BATCH_AXES, MESH_AXES
from deepseek_jax.parallel.pipeline import make_schedule

__all__ = ["candidate_layouts", "estimate", "pipelined_candidates", "state_bytes", "abstract_mesh", "ACTIVATIONS",
           "cached_pipeline_report"]


def abstract_mesh(axes: dict[str, int]) -> AbstractMesh:
    """The five-axis mesh of ``axes`` without devices (the rules table and the layout check need only sizes)."""
    return AbstractMesh(tuple(axes.get(a, 1) for a in MESH_AXES), MESH_AXES,
                        axis_types=(AxisType.Auto,) * len(MESH_AXES))


def state_bytes(cfg: ModelConfig, axes: dict[str, int], batch: int, seq: int, moments: str) -> dict[str, int]:
    """Per device by the rules table: parameters, float32 gradients, the two AdamW moments in ``moments``."""
    rep = layout_report(cfg, abstract_mesh(axes), batch, seq)["bytes_per_device"]
    opt = int(rep["adam_f32"] * (2 if moments == "bfloat16" else 4) / 4)
    return {"params": rep["params"], "grads": rep["grads_f32"], "optimizer": opt,
            "state": rep["params"] + rep["grads_f32"] + opt}


def _factorizations(n: int, parts: int) -> list[tuple[int, ...]]:
    if parts == 1:
        return [(n,)]
    return [(d,) + rest for d in range(1, n + 1) if n % d == 0 for rest in _factorizations(n // d, parts - 1)]


def candidate_layouts(cfg: ModelConfig, n_devices: int, batch: int, max_tensor: int = 8,
                      stages: bool = False) -> list[dict[str, int]]:
    """Every ``data x fsdp x expert x tensor`` (``x stage`` with ``stages``) factorisation of ``n_devices`` the
    model and batch allow (:func:`~deepseek_jax.nn.placement.check_layout`: experts, heads and every sharded dim
    divisible, the batch over the batch axes, node-limited routing mapping onto the expert shards),
    ``tensor <= max_tensor``; a ``stage`` axis needs MoE layers to split (schedules: :func:`pipelined_candidates`)."""
    out = []
    for d, f, e, t, s in _factorizations(n_devices, 5):
        if t > max_tensor or (cfg.moe is None and e > 1) or (s > 1 and (not stages or cfg.n_moe_layers < s)):
            continue
        axes = dict(zip(("data", "fsdp", "expert", "tensor", "stage"), (d, f, e, t, s)))
        try:
            check_layout(cfg, abstract_mesh(axes), global_batch=batch)
        except ValueError:
            continue
        out.append({a: k for a, k in axes.items() if k > 1} or {"data": 1})
    return out


ACTIVATIONS = {"full": 2, "deepseek": 6, "none": 24}  # saved [tokens, d] tensors per layer: a pruning heuristic


@functools.lru_cache(maxsize=64)
def cached_pipeline_report(cfg: ModelConfig, schedule: str, ranks: int, microbatches: int) -> dict[str, Any]:
    """:func:`~deepseek_jax.analysis.pipeline.pipeline_report`, once per (schedule, ranks, count) in a search."""
    return pipeline_report(cfg, schedule, ranks, microbatches)


def estimate(cfg: ModelConfig, axes: dict[str, int], remat: str, batch: int, seq: int, chip, n: int,
              moments: str, pipe: dict[str, Any] | None = None) -> dict[str, float]:
    """Analytic per-chip bytes (state by the rules table + ``ACTIVATIONS[remat]`` layer inputs per layer + the
    expert GEMMs over the expert-parallel receive buffer's (row, slot) pairs, sized for the worst case, which grow
    with ``expert``: one layer's under full remat, every MoE layer's saved ones otherwise (V3 on v5p:8x8x4 with
    the ``deepseek`` policy: 146-381 GiB by the compiler) + the local experts' weights gathered over ``fsdp``,
    which shrink with ``expert``) and a step-time estimate (compute at peak; fsdp gathers and reduce-scatters,
    data all-reduces, expert all-to-alls and tensor all-reduces at the interconnect bandwidth) to rank layouts
    before compiling. With ``pipe`` (the :func:`pipeline_report` of the layout's ``stage`` axis) a rank holds
    its share of the parameters (its stages + the shared embedding and head), saves the activations of the
    schedule's peak of micro-batches in flight over its layers, holds inside the executor (ZeRO-1) its weights
    whole but for the routed experts split over ``expert`` and the rest over ``tensor``, each with a float32
    gradient (V3 as expert=8 x tensor=8 x stage=4 under DualPipeV: ~114 GiB of them; the compiler asked for 243
    GiB of temporaries, the estimate without them said 75), sends each micro-batch's activations and gradients
    across its stage boundaries, and computes for ``1 / (1 - bubble fraction)`` of the ideal time."""
    s = axes.get("stage", 1)
    sb = state_bytes(cfg, {a: k for a, k in axes.items() if a != "stage"}, batch, seq, moments)
    frac, micro, inflight, share, bubble, chunks = 1.0, 1, 1, 1.0, 0.0, 0
    if pipe is not None:
        frac = max(pipe["rank_param_bytes"]) / (pipe["stage_param_bytes"] * pipe["stages"] + pipe["shared_param_bytes"])
        chunks = max(len(c) for c in pipe["stages_per_rank"])
        micro, inflight, share, bubble = (pipe["microbatches"], max(pipe["peak_activations"]), chunks / pipe["stages"],
                                          pipe["bubble_fraction"])
    tokens, act = batch * seq / (n // s) * axes.get("tensor", 1), np.dtype(cfg.dtype).itemsize  # per device, step
    layers, moe_layers = (cfg.n_layers + cfg.mtp.depth) * share, cfg.n_moe_layers * share  # per rank
    mb = tokens / micro  # one micro-batch (the whole batch without a pipeline)
    mem = sb["state"] * frac + ACTIVATIONS[remat] * mb * inflight * cfg.d_model * act * layers
    d, f, e, t = (axes.get(a, 1) for a in ("data", "fsdp", "expert", "tensor"))
    if cfg.moe is not None:
        m, fm = cfg.moe, cfg.moe.moe_intermediate_size
        rows = e * dispatch_capacity(int(mb), m.experts_per_token, e, m.capacity_factor) if e > 1 else mb
        pairs = rows * m.experts_per_token  # the dropless receive buffer's (row, slot) pairs, worst case
        mem += 2 * pairs * (3 * fm + cfg.d_model) * act  # one layer's [w1|w3] out, SwiGLU out, w2 out (fwd + bwd)
        if remat != "full":  # kept for the backward in every MoE layer: swiglu_in and expert_out (or everything)
            mem += pairs * ((2 if remat == "deepseek" else 3) * fm + cfg.d_model) * act * moe_layers * inflight
        if f > 1 and pipe is None:  # the local experts' weights gathered over fsdp
            mem += 2 * 3 * m.n_routed_experts * cfg.d_model * m.moe_intermediate_size * act / (e * t)
    if pipe is not None:  # inside the executor (ZeRO-1): the rank's weights whole but for the routed experts split
        # over expert and the rest over tensor (nothing over fsdp), each with a float32 gradient
        pc = param_counts(cfg)
        routed = pc.routed_main * share + pc.routed_mtp
        rest = (pc.main + pc.mtp - pc.routed_main - pc.routed_mtp) * frac
        mem += (routed / e + rest / t) * (np.dtype(cfg.param_dtype).itemsize + 4)
    comm = 3 * sb["params"] * frac * (f - 1) + 2 * sb["grads"] * frac * (d - 1) / d
    if cfg.moe is not None and e > 1:
        comm += 4 * tokens * cfg.moe.experts_per_token * cfg.d_model * act * moe_layers * (e - 1) / e
    comm += 4 * 2 * tokens * cfg.d_model * act * layers * (t - 1) / t + 2 * tokens * cfg.d_model * act * chunks
    compute = flops_per_token(cfg, seq) * batch * seq / n * (8 / 6 if remat == "full" else 1) / chip.bf16
    return {"bytes": mem, "step_s": max(compute / (1 - bubble), comm / chip.ici), "compute_s": compute / (1 - bubble),
            "comm_bytes": comm, "bubble_fraction": bubble}


def pipelined_candidates(cfg: ModelConfig, axes: dict[str, int], batch: int, schedules: Sequence[str]) -> list[tuple]:
    """``(schedule, micro-batches, report)`` for every schedule (``"1f1b"``: every count; ``"1f1b:8"``: that one)
    and micro-batch count the layout's ``stage`` axis and the batch allow: the batch splits into the schedule's
    inputs (micro-batches x stages per rank over ranks) on every ``data x fsdp x expert`` shard and the
    MoE layers fill its stages."""
    rows = batch // math.prod(axes.get(a, 1) for a in BATCH_AXES)
    out = []
    for entry in schedules:
        name, _, count = entry.partition(":")
        for m in [int(count)] if count else [k for k in range(1, rows + 1) if rows % k == 0]:
            try:
                sched = make_schedule(name, axes["stage"], m)
                if rows % (m * (sched.n_stages // sched.pipe_len)) == 0:
                    out.append((name, m, cached_pipeline_report(cfg, name, axes["stage"], m)))
            except ValueError:
                continue
    return out
