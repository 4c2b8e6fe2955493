"""What a pipeline layout costs, from shapes only: the stage split of the model, the parameter bytes each rank
holds, and the schedule's simulated bubble and activation peak (``deepseek-jax info --mesh stage=N
--pipeline SCHEDULE:MICROBATCHES``)."""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax

from deepseek_jax.config import ModelConfig
from deepseek_jax.nn import stages, tree
from deepseek_jax.nn.transformer import abstract_variables
from deepseek_jax.parallel.pipeline import make_schedule
from deepseek_jax.parallel.pipeline.simulator import UNIT_COSTS, simulate

__all__ = ["pipeline_report", "parse_pipeline"]

COSTS = {"F": 1.0, "B": 2.0, "W": 1.0}  # a backward twice a forward, split evenly into I and W


def parse_pipeline(text: str) -> tuple[str, int]:
    """``"dualpipev:8"`` -> ``("dualpipev", 8)``."""
    name, _, count = text.partition(":")
    if not count.strip().isdigit() or int(count) < 1:
        raise ValueError(f"--pipeline {text!r} must look like SCHEDULE:MICROBATCHES, e.g. 1f1b:8")
    return name.strip(), int(count)


def _bytes(tree) -> int:
    return sum(math.prod(v.shape) * v.dtype.itemsize for v in jax.tree.leaves(tree))


def pipeline_report(cfg: ModelConfig, schedule_name: str, n_ranks: int, microbatches: int,
                    split: Sequence[int] | None = None) -> dict:
    """The stage split (MoE layers per stage, :func:`~deepseek_jax.nn.stages.stage_split`; embedding + dense
    layers before the first, head + MTP after the last), parameter bytes per stage (as held in the executor:
    uneven stages padded to the longest), shared (replicated over ``stage``) and per rank, and the schedule's
    per-rank bubble (costs :data:`COSTS`), bubble fraction, peak activations and lock-step ticks."""
    schedule = make_schedule(schedule_name, n_ranks, microbatches)
    split = stages.stage_split(cfg, schedule.pipe_len, split)
    shapes = nn.meta.unbox(abstract_variables(cfg))
    per_stage, shared = jax.eval_shape(lambda v: stages.split_variables(cfg, v, schedule.pipe_len, split), shapes)
    per_stage.pop(tree.STAGE_ACTIVE)
    stage_bytes = _bytes(per_stage) // schedule.pipe_len
    shared_bytes = _bytes(shared)
    sim = simulate(schedule, COSTS)
    unit = simulate(schedule, UNIT_COSTS)
    return {"schedule": schedule_name, "ranks": n_ranks, "microbatches": microbatches,
            "stages": schedule.pipe_len, "moe_layers_per_stage": list(split),
            "dense_layers_before_stage_0": cfg.n_dense_layers,
            "stages_per_rank": [list(schedule.rank_stages(r)) for r in range(n_ranks)],
            "stage_param_bytes": stage_bytes, "shared_param_bytes": shared_bytes,
            "rank_param_bytes": [len(schedule.rank_stages(r)) * stage_bytes + shared_bytes for r in range(n_ranks)],
            "bubble": sim["bubble"], "bubble_fraction": max(sim["bubble"]) / sim["makespan"],
            "peak_activations": sim["peak_activations"], "ticks": unit["makespan"]}
