"""The jitted train step: ``make_train_fns(cfg, step_cfg, objective, mesh)``.

One step (pure, jitted with explicit shardings, the state donated)::

    out, sown = Transformer(cfg, remat).apply({params, router}, tokens, positions, segment_ids)
    loss, metrics = objective(out, sown, batch, hyper)           e.g. objectives.Pretrain
    params <- AdamW(clip(grad loss))                              (optim.py)
    bias   <- bias + gamma * sign(mean(load) - load)              per MoE layer, loads over the GLOBAL batch

``hyper`` holds the per-step scalars (``mtp_lambda``, ``bias_gamma``, ...), passed as float32 arrays so
their schedules never recompile the step.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from deepseek_jax.analysis.layout import layout_report
from deepseek_jax.config import ModelConfig
from deepseek_jax.nn import tree
from deepseek_jax.nn.placement import check_layout, init_unboxed, param_shardings
from deepseek_jax.nn.transformer import Transformer
from deepseek_jax.parallel.mesh import BATCH_AXES, make_mesh, mesh_size, parse_mesh
from deepseek_jax.parallel.pipeline import make_schedule
from deepseek_jax.parallel.rules import batch_spec
from deepseek_jax.train.balance import max_violation, update_router_bias
from deepseek_jax.train.config import StepConfig
from deepseek_jax.train.objectives import Objective, Pretrain, batch_targets, cross_entropy
from deepseek_jax.train.optim import make_optimizer
from deepseek_jax.train.pipeline import pipeline_grad_fn, stage_shardings

__all__ = ["TrainFns", "make_train_fns", "step_layout_report", "objective_loss", "mesh_for", "global_batch", "local_rows", "hyper"]

BATCH_KEYS = ("tokens", "segment_ids", "positions")


@dataclass(frozen=True)
class TrainFns:
    init: Callable  # rng -> state {params, router, opt_state, step}
    step: Callable  # (state, batch, hyper) -> (state, metrics)
    eval: Callable  # (params, router, batch) -> (nll_sum, count) of the main next-token loss
    batch_sharding: NamedSharding
    compile_step: Callable  # () -> jax.stages.Compiled: the step for abstract arguments (nothing allocated)
    lower_step: Callable  # () -> jax.stages.Lowered: the same, lowered only (its StableHLO names the kernels)


def mesh_for(mesh_text: str) -> Mesh:
    """The mesh of ``train.mesh`` (every device), or ``data`` over every device when it is empty."""
    n = jax.device_count()
    if not mesh_text:
        return make_mesh({"data": n})
    axes = parse_mesh(mesh_text)
    if mesh_size(axes) != n:
        raise ValueError(f"train.mesh={mesh_text!r} has {mesh_size(axes)} devices but {n} are available "
                         "(the mesh must use every device)")
    return make_mesh(axes)


def hyper(mtp_lambda: float, bias_gamma: float) -> dict[str, np.float32]:
    """The per-step scalars of the step, as float32 (one compilation for every value)."""
    return {"mtp_lambda": np.float32(mtp_lambda), "bias_gamma": np.float32(bias_gamma)}


def objective_loss(cfg: ModelConfig, remat: str, objective: Objective, params: Any, router: Any, batch: dict,
                   hyper: dict) -> tuple[jax.Array, dict]:
    """Forward pass and ``objective``: ``(loss, metrics)``, with ``metrics["expert_load"]`` (or None)."""
    variables = {tree.PARAMS: params} | ({tree.ROUTER: router} if router else {})
    out, sown = Transformer(cfg, remat=remat).apply(variables, batch["tokens"], positions=batch["positions"],
                                                     segment_ids=batch["segment_ids"], mutable=[tree.INTERMEDIATES])
    loss, metrics = objective(out, sown, batch, hyper)
    return loss, {**metrics, "expert_load": out.expert_load}


def make_train_fns(cfg: ModelConfig, step_cfg: StepConfig, objective: Objective, mesh: Mesh) -> TrainFns:
    """Init, train-step and eval functions, jitted with explicit shardings (cached per argument set)."""
    check_layout(cfg, mesh, global_batch=step_cfg.batch_size)
    return _make_train_fns(cfg, step_cfg, objective, mesh)


def dsa_warmup_model(cfg: ModelConfig) -> ModelConfig:
    """DSA's dense warm-up reads every visible key: the model with ``topk`` at the longest context."""
    s = cfg.attention.sparse
    if s is None or s.kind != "dsa":
        raise ValueError(f"train.dsa_stage='dense_warmup' needs a model with attention.sparse.kind='dsa' "
                         f"(this one has attention.sparse={None if s is None else s.kind!r})")
    return cfg.replace(**{"attention.sparse.topk": max(s.topk, cfg.max_position_embeddings)})


@functools.lru_cache(maxsize=8)
def _make_train_fns(cfg: ModelConfig, sc: StepConfig, objective: Objective, mesh: Mesh) -> TrainFns:
    warmup = sc.dsa_stage == "dense_warmup"
    if warmup:  # dense attention, only the indexer trained
        cfg = dsa_warmup_model(cfg)
    tx, schedule = make_optimizer(sc.optim, sc.steps)
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_sh = NamedSharding(mesh, batch_spec(1))  # every batch leaf [B, ...] split over the batch axes

    def init(rng):
        v = init_unboxed(cfg, rng, mesh)
        return {tree.PARAMS: v[tree.PARAMS], tree.ROUTER: v.get(tree.ROUTER, {}),
                "opt_state": tx.init(v[tree.PARAMS]), "step": jnp.zeros([], jnp.int32)}

    state_sh = _state_shardings(cfg, mesh, tx, init, replicated, sc.pipeline.on)

    grad_fn = _grad_fn(cfg, sc, objective, mesh)

    def step(state, batch, hyper):
        params, router = state[tree.PARAMS], state[tree.ROUTER]
        loss, aux, grads = grad_fn(params, router, batch, hyper)
        if warmup:  # the clip sees the indexer's gradients only, and nothing else moves (no weight decay either)
            grads = _indexer_only(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        if warmup:
            updates = _indexer_only(updates)
        load = aux.pop("expert_load")
        metrics = {**aux, "loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}
        if load is not None:
            metrics.update(maxvio=max_violation(load), expert_load=load)
            if router:
                router = update_router_bias(router, load, hyper["bias_gamma"], sc.bias_center)
        return {tree.PARAMS: optax.apply_updates(params, updates), tree.ROUTER: router, "opt_state": opt_state,
                "step": state["step"] + 1}, metrics

    def evaluate(params, router, batch):
        variables = {tree.PARAMS: params} | ({tree.ROUTER: router} if router else {})
        out = Transformer(cfg).apply(variables, batch["tokens"], positions=batch["positions"],
                                     segment_ids=batch["segment_ids"])
        tgt, mask = batch_targets(batch, 1)
        loss, n = cross_entropy(out.logits, tgt, mask)
        return loss * n, n

    # the batch: any dict of [B, ...] arrays (tokens, segment_ids, positions and what the objective reads)
    jit_step = jax.jit(step, in_shardings=(state_sh, batch_sh, None), out_shardings=(state_sh, None),
                       donate_argnums=(0,))
    jit_eval = jax.jit(evaluate, in_shardings=(state_sh[tree.PARAMS], state_sh[tree.ROUTER], batch_sh))
    jit_init = jax.jit(init, out_shardings=state_sh)

    def lower_step() -> jax.stages.Lowered:
        key = jax.random.key(0)
        with jax.set_mesh(mesh):
            state = jax.eval_shape(jit_init, key)
            state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), state, state_sh)
            batch = {k: jax.ShapeDtypeStruct((sc.batch_size, sc.seq_len), jnp.int32, sharding=batch_sh)
                     for k in BATCH_KEYS}
            hyp = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=replicated)
                   for k, v in hyper(1.0, 1e-3).items()}
            return jit_step.lower(state, batch, hyp)

    def compile_step() -> jax.stages.Compiled:
        lowered = lower_step()  # its PRNG key made outside the mesh: a TPU slice's devices cannot run it
        with jax.set_mesh(mesh):
            return lowered.compile()

    wrap = functools.partial(_in_mesh, mesh)
    return TrainFns(init=wrap(jit_init), step=wrap(jit_step), eval=wrap(jit_eval), batch_sharding=batch_sh,
                    compile_step=compile_step, lower_step=lower_step)


def _grad_fn(cfg: ModelConfig, sc: StepConfig, objective: Objective, mesh: Mesh) -> Callable:
    """``(params, router, batch, hyper) -> (loss, metrics with expert_load, grads)``: ``jax.value_and_grad`` of
    the objective, or with ``sc.pipeline`` on, the pipeline executor over the mesh's ``stage`` axis (the loss
    then the mean over micro-batches and batch shards, like gradient accumulation)."""
    if not sc.pipeline.on:
        def value_and_grad(params, router, batch, hyper):
            (loss, aux), grads = jax.value_and_grad(
                lambda p: objective_loss(cfg, sc.remat, objective, p, router, batch, hyper), has_aux=True)(params)
            return loss, aux, grads
        return value_and_grad
    schedule = make_schedule(sc.pipeline.schedule, mesh.shape["stage"], sc.pipeline.microbatches)
    n_inputs = schedule.n_microbatches * (schedule.n_stages // schedule.pipe_len)
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if sc.batch_size % (n_inputs * shards):
        raise ValueError(f"train.batch_size={sc.batch_size} must split into {n_inputs} micro-batches "
                         f"(train.pipeline: {sc.pipeline.schedule}) of data*fsdp*expert={shards} shards")
    piped = pipeline_grad_fn(cfg, mesh, schedule, objective, sc.remat, sc.pipeline.split)

    def pipelined(params, router, batch, hyper):
        loss, grads, load, metrics = piped(params, router, batch, hyper)
        return loss, {**metrics, "expert_load": load}, grads
    return pipelined


def step_layout_report(cfg: ModelConfig, mesh: Mesh, batch: int, seq: int, remat: str = "none",
                       objective: Objective | None = None, compile: bool = True) -> dict[str, Any]:
    """:func:`~deepseek_jax.analysis.layout.layout_report` of the REAL training step on ``mesh``: the
    pre-training objective (or ``objective``), AdamW, the state's shardings as in/out shardings, donation and
    ``remat`` -- so the memory and collectives are the ones a run of ``batch x seq`` tokens pays. Nothing is
    allocated (abstract arguments, ``lower().compile()``)."""
    check_layout(cfg, mesh, global_batch=batch)
    compiled = None
    if compile:
        step_cfg = StepConfig(batch_size=batch, seq_len=seq, steps=10_000, remat=remat)  # AdamW defaults
        compiled = make_train_fns(cfg, step_cfg, objective or Pretrain(), mesh).compile_step()
    return layout_report(cfg, mesh, batch, seq, compiled=compiled)


def _indexer_only(t: Any) -> Any:
    """``t`` (a parameter-shaped tree) with every leaf outside DSA's indexer zeroed."""
    return jax.tree_util.tree_map_with_path(lambda p, x: x if tree.is_indexer(p) else jnp.zeros_like(x), t)


def _state_shardings(cfg: ModelConfig, mesh: Mesh, tx: optax.GradientTransformation, init: Callable,
                     replicated: NamedSharding, pipelined: bool = False) -> dict:
    """Parameters and router by the rules table (the MoE stack over ``stage`` when pipelined); optimiser
    moments like their parameters; counters replicated."""
    var_sh = param_shardings(cfg, mesh)
    if pipelined:
        var_sh = stage_shardings(cfg, mesh, var_sh)
    key = jax.random.key(0)  # made outside the mesh: its devices may be compile-only (a TPU topology)
    with jax.set_mesh(mesh):
        abstract = jax.eval_shape(init, key)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract["opt_state"], var_sh[tree.PARAMS],
                                   transform_non_params=lambda _: replicated)
    return {tree.PARAMS: var_sh[tree.PARAMS], tree.ROUTER: var_sh.get(tree.ROUTER, {}), "opt_state": opt_sh,
            "step": replicated}


def _in_mesh(mesh: Mesh, f: Callable) -> Callable:
    """``f`` called inside ``jax.set_mesh(mesh)`` (the layers' sharding constraints read the ambient mesh)."""
    if mesh.size == 1:
        return f

    @functools.wraps(f)
    def g(*a):
        with jax.set_mesh(mesh):
            return f(*a)
    return g


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding, global_rows: int) -> dict[str, jax.Array]:
    """Assemble the global batch from each process's rows (``jax.make_array_from_process_local_data``)."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_rows,) + v.shape[1:])
            for k, v in local.items()}


def local_rows(sharding: NamedSharding, shape: tuple[int, int]) -> list[int]:
    """The global batch rows this process holds under ``sharding``."""
    return sorted({i for idx in sharding.addressable_devices_indices_map(shape).values()
                   for i in range(*idx[0].indices(shape[0]))})
