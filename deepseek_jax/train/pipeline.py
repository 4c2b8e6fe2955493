"""The DeepSeek model in the pipeline executor: ``pipeline_grad_fn(cfg, mesh, schedule, objective)`` returns a
jitted ``(params, router, batch, hyper) -> (loss, grads, expert_load, metrics)`` equal to the mean over
micro-batches and batch shards of :func:`~deepseek_jax.train.step.objective_loss` and its gradient, computed by
a pipelined schedule on the ``stage`` axis of ``mesh`` (``parallel/pipeline``; the stages from
``nn/stages.py``). The training step calls it when ``train.pipeline.schedule`` is set.

Per stage: the first runs the embedding and the dense layers (:func:`nn.stages.front`), each runs its slice
of the MoE stack, the last runs the final norm, head, MTP modules and the objective. The sequence-wise balance
loss joins the objective on the stage whose layers produce it; expert loads are counted in forward actions
only, summed over micro-batches and batch shards (the global-batch loads of the aux-loss-free bias update).

Layout inside the executor (manual over ``stage, data, fsdp, expert``; ``tensor`` left to the compiler):
the batch is split over ``data x fsdp x expert``; FSDP-sharded weights are gathered once per step (ZeRO-1
style, pipeline.md §9); routed experts are split over ``expert`` (the dispatch's all-to-all runs inside the
executor's branches, and ``nn/moe.py`` declares the per-device expert count) and kept whole over ``tensor``
(resharding their fused ``[w1 | w3]`` would put collective-permutes inside the per-stage branches, which
deadlock on XLA:CPU); heads, dense and shared-expert MLP widths and the vocabulary are split over ``tensor``
by the model's sharding constraints. Token means are per (micro-batch, shard) piece, like gradient
accumulation.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from deepseek_jax.config import ModelConfig
from deepseek_jax.nn import placement, stages, tree
from deepseek_jax.nn.placement import check_layout
from deepseek_jax.nn.transformer import ModelOutput
from deepseek_jax.parallel.mesh import BATCH_AXES
from deepseek_jax.parallel.pipeline import Schedule
from deepseek_jax.parallel.pipeline.executor import make_executor, merge_stage_grads, stage_params
from deepseek_jax.parallel.pipeline.program import build_program
from deepseek_jax.parallel.rules import logical_spec
from deepseek_jax.train.objectives import Objective

__all__ = ["pipeline_grad_fn", "microbatches", "stage_shardings"]

def microbatches(batch: dict, n: int) -> dict:
    """``[B, ...]`` -> ``[n, B/n, ...]`` (micro-batch ``i`` = rows ``i B/n ... (i+1) B/n - 1``)."""
    rows = next(iter(batch.values())).shape[0]
    if rows % n:
        raise ValueError(f"pipeline microbatches: the batch of {rows} rows does not split into {n} micro-batches")
    return jax.tree.map(lambda a: a.reshape((n, rows // n) + a.shape[1:]), batch)


def _layout(names: tuple, manual: bool) -> P:
    """A variable's layout in the executor from its logical names: routed-expert weights split over
    ``expert`` (EP inside a stage), heads and MLP widths over ``tensor`` (left to the compiler, so absent from
    the manual specs), everything else whole: ``fsdp`` shards are gathered once per step (ZeRO-1 style,
    pipeline.md §9), and the batch is split over ``data``, ``fsdp`` and ``expert``."""
    routed = "exp" in names and "mlp_moe" in names

    def axis(entry):
        if routed:  # EP only: see parallel/expert.py on F over tensor inside the executor
            return "expert" if entry == "expert" else None
        return "tensor" if entry == "tensor" and not manual else None
    return P(*(axis(e) for e in logical_spec(names)))


def _specs(cfg: ModelConfig, manual: bool) -> tuple[dict, dict]:
    """``(stage specs [ranks, chunks, m, ...], shared specs)`` of the executor (``manual``: only its manual
    axes, for ``shard_map``; else with ``tensor``, for the sharding constraint around it)."""
    specs = jax.tree_util.tree_map(lambda b: _layout(b.names, manual), placement.logical_tree(cfg),
                                   is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    w, shared = stages.split_tree(specs)
    w = jax.tree.map(lambda p: P("stage", None, *p), w)
    w[tree.STAGE_ACTIVE] = P("stage", None, None)
    return w, shared


def _model_fns(cfg: ModelConfig, objective: Objective, remat: str) -> tuple[Callable, Callable, Callable]:
    def embed_fn(shared, inp):
        return stages.front(cfg, shared, inp["tokens"], inp["positions"], inp["segment_ids"], remat)

    def stage_fn(w, shared, x, inp):
        y, load, balance = stages.stage(cfg, w, x, inp["positions"], inp["segment_ids"], remat)
        alpha = getattr(objective, "balance_alpha", 0.0)
        return y, alpha * balance, {"load": load, "balance": balance}

    def loss_fn(shared, y, inp):
        out, sown = stages.back(cfg, shared, y, inp["tokens"], inp["positions"], inp["segment_ids"], remat)
        loss, aux = objective(ModelOutput(logits=out.logits, mtp_logits=out.mtp_logits), sown, inp, inp["hyper"])
        # dropped rows are already counted over the batch shards inside the dispatch: left out here
        stats = {"metrics": {k: jnp.asarray(v, jnp.float32) for k, v in aux.items() if k != "dropped_rows"}}
        if out.expert_load is not None:
            stats["head_load"] = out.expert_load
        return loss, stats

    return embed_fn, stage_fn, loss_fn


def _metrics(head: dict, stage_balance: jax.Array, count: int) -> dict:
    """The objective's metrics over the step: means over the ``count`` (micro-batch, batch shard) pieces,
    like the loss; ``tokens`` summed; ``balance`` adds the stages' layers to the MTP modules'."""
    out = {k: v if k == "tokens" else v / count for k, v in head.items()}
    out["balance"] = out.get("balance", 0.0) + jnp.sum(stage_balance) / count
    return out


def stage_shardings(cfg: ModelConfig, mesh, shardings: dict) -> dict:
    """The variables' shardings (``{params, router}`` trees) for training with a pipeline: the MoE stack's
    layer dim split over ``stage`` when ``stage`` divides it, so each device stores (with the optimizer
    moments) only one ``stage``-th of the stack -- its own stages' layers under 1F1B/ZB-H1, whose stage
    ``s`` is layer block ``s``; other schedules gather once per step. Otherwise left whole over ``stage``."""
    n = mesh.shape["stage"]
    if n == 1 or cfg.n_moe_layers % n:
        return shardings

    def over_stage(sh):
        spec = tuple(sh.spec) + (None,) * max(0, 1 - len(sh.spec))
        return NamedSharding(mesh, P("stage", *spec[1:])) if spec[0] is None else sh
    out = dict(shardings)
    for col in (tree.PARAMS, tree.ROUTER):
        if tree.MOE_STACK in out.get(col, {}):
            out[col] = {**out[col], tree.MOE_STACK: jax.tree.map(over_stage, out[col][tree.MOE_STACK])}
    return out


def _like(specs: dict, variables: dict) -> dict:
    """The collections of ``specs`` that ``variables`` has (the router bias is optional)."""
    return {col: specs[col] for col in variables}


def pipeline_grad_fn(cfg: ModelConfig, mesh, schedule: Schedule, objective: Objective, remat: str = "none",
                     split: Sequence[int] | None = None):
    """A jitted ``(params, router, batch, hyper) -> (loss, grads, expert_load, metrics)``: ``batch`` leaves
    ``[B, ...]`` (``tokens``, ``positions``, ``segment_ids`` and what the objective reads) split into ``schedule``'s micro-batches (per pipe);
    ``grads`` the tree of ``params``; ``expert_load [n_moe_layers + D, e]`` as ``ModelOutput.expert_load``;
    ``metrics`` the objective's (``ce``, ``mtp``, ``balance``, ``tokens``, ...), averaged like the loss.
    ``split``: MoE layers per stage (:func:`~deepseek_jax.nn.stages.stage_split`; default as even as possible)."""
    check_layout(cfg, mesh)
    if schedule.n_ranks != mesh.shape["stage"]:
        raise ValueError(f"pipeline: the schedule has {schedule.n_ranks} ranks but the mesh has "
                         f"stage={mesh.shape['stage']}")
    split = stages.stage_split(cfg, schedule.pipe_len, split)
    program = build_program(schedule)
    fns = _model_fns(cfg, objective, remat)
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    rows = P(None, BATCH_AXES)
    w_specs, shared_specs = _specs(cfg, manual=True)
    w_layout, shared_layout = _specs(cfg, manual=False)

    def run(params, router, batch, hyper):
        variables = {tree.PARAMS: params} | ({tree.ROUTER: router} if router else {})
        per_stage, shared = stages.split_variables(cfg, variables, schedule.pipe_len, split)
        w = stage_params(program, per_stage)  # [ranks, chunks, m, ...]
        w, shared = (jax.tree.map(lambda a, s: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, s)), t, l)
                     for t, l in ((w, _like(w_layout, w)), (shared, _like(shared_layout, shared))))
        executor = make_executor(program, mesh, *fns, w_specs=_like(w_specs, w),
                                 shared_specs=_like(shared_specs, shared),
                                 input_specs={**dict.fromkeys(batch, rows), "hyper": P()}, auto_axes=("tensor",))
        inputs = microbatches(dict(batch), program.n_inputs)  # tokens, positions, segment_ids, loss_mask, ...
        inputs["hyper"] = jax.tree.map(lambda v: jnp.broadcast_to(jnp.asarray(v), (program.n_inputs,)), hyper)
        loss, (gw, gshared), (stats, head_stats) = executor(w, shared, inputs)
        grads = stages.join_stage_tree(merge_stage_grads(program, gw)[tree.PARAMS], gshared[tree.PARAMS], split)
        loads = [stages.join_layers(merge_stage_grads(program, stats)["load"], split)]
        if "head_load" in head_stats:
            loads.append(head_stats["head_load"])
        metrics = _metrics(head_stats["metrics"], stats["balance"], program.n_inputs * shards)
        return loss, grads, jnp.concatenate(loads), metrics

    return jax.jit(run)
