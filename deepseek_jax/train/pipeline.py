"""The DeepSeek model in the pipeline executor: ``pipeline_grad_fn(cfg, mesh, schedule, objective)`` returns a
jitted ``(params, router, batch, hyper) -> (loss, grads, expert_load)`` equal to the mean over micro-batches
of :func:`~deepseek_jax.train.step.objective_loss` and its gradient, computed by a pipelined schedule on the
``stage`` axis of ``mesh`` (``parallel/pipeline``; the stages from ``nn/stages.py``).

Per stage: the first runs the embedding and the dense layers (:func:`nn.stages.front`), each runs its slice
of the MoE stack, the last runs the final norm, head, MTP modules and the objective. The sequence-wise balance
loss joins the objective on the stage whose layers produce it; expert loads are counted in forward actions
only, summed over micro-batches and batch shards (the global-batch loads of the aux-loss-free bias update).

Supported today: meshes of ``stage`` with ``data`` (the executor is manual over every axis, and the model's
tensor, expert and FSDP sharding have no manual form yet: pipeline.md P3); the objective is averaged per
micro-batch and per data shard (token means, like gradient accumulation).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import ModelConfig
from deepseek_jax.nn import stages, tree
from deepseek_jax.nn.transformer import ModelOutput
from deepseek_jax.parallel.pipeline import Schedule
from deepseek_jax.parallel.pipeline.executor import make_executor, merge_stage_grads, stage_params
from deepseek_jax.parallel.pipeline.program import build_program
from deepseek_jax.train.objectives import Objective

__all__ = ["pipeline_grad_fn", "microbatches", "SUPPORTED_AXES"]

SUPPORTED_AXES = ("stage", "data")


def microbatches(batch: dict, n: int) -> dict:
    """``[B, ...]`` -> ``[n, B/n, ...]`` (micro-batch ``i`` = rows ``i B/n ... (i+1) B/n - 1``)."""
    rows = next(iter(batch.values())).shape[0]
    if rows % n:
        raise ValueError(f"pipeline microbatches: the batch of {rows} rows does not split into {n} micro-batches")
    return jax.tree.map(lambda a: a.reshape((n, rows // n) + a.shape[1:]), batch)


def _check_mesh(mesh) -> None:
    extra = {a: s for a, s in mesh.shape.items() if s > 1 and a not in SUPPORTED_AXES}
    if extra:
        raise ValueError(f"pipeline: mesh axes {extra} are not supported with pipelining yet (supported: "
                         f"{SUPPORTED_AXES}); the model's tensor/expert/FSDP layouts need a manual mode first")


def _model_fns(cfg: ModelConfig, objective: Objective, remat: str) -> tuple[Callable, Callable, Callable]:
    def embed_fn(shared, inp):
        return stages.front(cfg, shared, inp["tokens"], inp["positions"], inp["segment_ids"], remat)

    def stage_fn(w, shared, x, inp):
        y, load, sown = stages.stage(cfg, w, x, inp["positions"], inp["segment_ids"], remat)
        balance = sum(jnp.sum(b) for b in tree.collect(sown, tree.BALANCE))
        alpha = getattr(objective, "balance_alpha", 0.0)
        return y, alpha * balance, {"load": load}

    def loss_fn(shared, y, inp):
        out, sown = stages.back(cfg, shared, y, inp["tokens"], inp["positions"], inp["segment_ids"], remat)
        loss, _ = objective(ModelOutput(logits=out.logits, mtp_logits=out.mtp_logits), sown, inp, inp["hyper"])
        stats = {} if out.expert_load is None else {"head_load": out.expert_load}
        return loss, stats

    return embed_fn, stage_fn, loss_fn


def pipeline_grad_fn(cfg: ModelConfig, mesh, schedule: Schedule, objective: Objective, remat: str = "none"):
    """A jitted ``(params, router, batch, hyper) -> (loss, grads, expert_load)``: ``batch`` leaves ``[B, t]``
    (``tokens``, ``positions``, ``segment_ids``) split into ``schedule``'s micro-batches (per pipe); ``grads``
    the tree of ``params``; ``expert_load [n_moe_layers + D, e]`` as ``ModelOutput.expert_load``."""
    _check_mesh(mesh)
    if schedule.n_ranks != mesh.shape["stage"]:
        raise ValueError(f"pipeline: the schedule has {schedule.n_ranks} ranks but the mesh has "
                         f"stage={mesh.shape['stage']}")
    stages.check_stages(cfg, schedule.pipe_len)
    program = build_program(schedule)
    fns = _model_fns(cfg, objective, remat)
    inputs_spec = {"tokens": P(None, "data"), "positions": P(None, "data"), "segment_ids": P(None, "data"),
                   "hyper": P()}
    executors: dict = {}

    def run(params, router, batch, hyper):
        variables = {tree.PARAMS: params} | ({tree.ROUTER: router} if router else {})
        split, shared = stages.split_variables(cfg, variables, schedule.pipe_len)
        w = stage_params(program, split)  # [ranks, chunks, L/n, ...]
        key = jax.tree.structure(w)
        if key not in executors:
            specs = jax.tree.map(lambda v: P("stage", *(None,) * (v.ndim - 1)), w)
            executors[key] = make_executor(program, mesh, *fns, w_specs=specs, input_specs=inputs_spec)
        inputs = microbatches({k: batch[k] for k in ("tokens", "positions", "segment_ids")}, program.n_inputs)
        inputs["hyper"] = jax.tree.map(lambda v: jnp.broadcast_to(jnp.asarray(v), (program.n_inputs,)), hyper)
        loss, (gw, gshared), (stats, head_stats) = executors[key](w, shared, inputs)
        grads = stages.join_stage_tree(merge_stage_grads(program, gw)[tree.PARAMS], gshared[tree.PARAMS])
        loads = [merge_stage_grads(program, stats)["load"].reshape((-1, cfg.moe.n_routed_experts))]
        if "head_load" in head_stats:
            loads.append(head_stats["head_load"])
        return loss, grads, jnp.concatenate(loads)

    return jax.jit(run)
