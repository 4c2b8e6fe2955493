"""Training: the losses, auxiliary-loss-free balancing, the jitted train step, and the loop behind
``deepseek-jax train``.

One step (pure, jitted with explicit shardings, the state donated)::

    out = Transformer(cfg, remat).apply({params, router}, tokens, positions, segment_ids)
    loss = CE(main) + lambda/D * sum_k CE(MTP depth k) + alpha * sum_layers L_Bal + z * mean(lse^2)
    params <- AdamW(clip(grad loss))                        (optim.py)
    bias   <- bias + gamma * sign(mean(load) - load)        per MoE layer, loads over the GLOBAL batch

Targets never cross documents: the target of position i at distance k is token i+k when it lies in the
same packed document (same ``segment_id``), else the term is masked (padding has segment id 0).

The loop (:func:`train`) adds the data pipeline, a progress bar (loss, lr, tokens/s, MFU, MaxVio),
metrics to ``metrics.jsonl`` and TensorBoard, periodic validation, async Orbax checkpoints (keep the
last N) with automatic resume from the newest readable one, a clean save-and-exit on SIGINT/SIGTERM,
a stop naming the step on a non-finite loss, and a generated sample at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deepseek_jax.config import ModelConfig, _from_dict, _merge, config_from_dict, resolve_config_path
from deepseek_jax.data import Batches, DataConfig, prepare_data
from deepseek_jax.losses import cross_entropy
from deepseek_jax.model import REMAT_POLICIES, Transformer
from deepseek_jax.optim import HostEMA, OptimConfig, make_optimizer
from deepseek_jax.sharding import BATCH_AXES, check_layout, make_mesh, param_shardings, parse_mesh

__all__ = ["TrainConfig", "load_run_config", "shifted_targets", "loss_fn", "update_router_bias", "max_violation",
           "flops_per_token", "peak_flops", "make_train_fns", "train", "TrainingDiverged", "scheduled"]

Schedulable = float | tuple[tuple[int, float], ...]


def scheduled(value: Schedulable, step: int) -> float:
    """A constant, or piecewise constant ``((from_step, value), ...)``: the last entry with ``from_step <= step``."""
    if isinstance(value, (int, float)):
        return float(value)
    out = value[0][1]
    for start, v in value:
        if step >= start:
            out = v
    return float(out)


def _schedulable(name: str, value: Any) -> Schedulable:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        pairs = tuple((int(s), float(v)) for s, v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a number or a list of [from_step, value] pairs") from None
    if not pairs or pairs[0][0] != 0 or any(a[0] >= b[0] for a, b in zip(pairs, pairs[1:])):
        raise ValueError(f"{name}={value!r}: the [from_step, value] pairs must start at step 0 and increase")
    return pairs


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a run except the architecture (the ``train:`` section of a preset).

    Attributes:
      steps, batch_size (global rows), seq_len, seed.
      mesh: e.g. ``"data=2,expert=2,tensor=2"``; empty = ``data`` over every device.
      out: run folder (checkpoints, metrics.jsonl, tensorboard/, tokenizer.json).
      remat: ``none`` | ``full`` | ``deepseek`` (see ``model.remat_policy``).
      mtp_lambda: MTP loss weight (divided by the depth), number or ``[[from_step, value], ...]``
        (V3: 0.3 then 0.1). balance_alpha: sequence-wise balance loss weight (V3: 1e-4).
      z_loss: weight of ``mean(logsumexp(logits)^2)`` (0 = off).
      bias_gamma: auxiliary-loss-free bias update speed (V3: 0.001, then 0), schedulable like mtp_lambda.
      bias_center: subtract the mean of each layer's update (keeps the biases zero-mean).
      eval_every / eval_batches, checkpoint_every / keep_checkpoints, log_every.
      sample_tokens: length of the text sample generated at the end (0 = none); sample_prompt.
      peak_flops: FLOP/s of the whole machine for MFU; 0 = a table for known accelerators, or a measured
        fp32 matmul on CPU.
    """

    steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    seed: int = 0
    mesh: str = ""
    out: str = "runs/default"
    remat: str = "none"
    mtp_lambda: Schedulable = 0.3
    balance_alpha: float = 1e-4
    z_loss: float = 0.0
    bias_gamma: Schedulable = 0.001
    bias_center: bool = False
    log_every: int = 1
    eval_every: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    sample_tokens: int = 64
    sample_prompt: str = "def "
    peak_flops: float = 0.0
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self):
        for n in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
            v = getattr(self, n)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"train.{n}={v!r} must be a positive integer")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"train.remat={self.remat!r} must be one of {REMAT_POLICIES}")
        for n in ("balance_alpha", "z_loss", "peak_flops"):
            if getattr(self, n) < 0:
                raise ValueError(f"train.{n}={getattr(self, n)!r} must be >= 0")
        if self.sample_tokens < 0 or self.eval_batches < 0:
            raise ValueError("train.sample_tokens and train.eval_batches must be >= 0")
        object.__setattr__(self, "mtp_lambda", _schedulable("train.mtp_lambda", self.mtp_lambda))
        object.__setattr__(self, "bias_gamma", _schedulable("train.bias_gamma", self.bias_gamma))
        if self.mesh:
            parse_mesh(self.mesh)
        if self.optim.warmup_steps > self.steps:
            raise ValueError(f"train.optim.warmup_steps={self.optim.warmup_steps} exceeds train.steps={self.steps}; "
                             "lower the warm-up or run longer")

    def replace(self, **overrides: Any) -> "TrainConfig":
        return _from_dict(TrainConfig, _merge(dataclasses.asdict(self), overrides), "train.")


def _parse_value(text: str) -> Any:
    """A YAML value; numbers YAML 1.1 reads as strings (``1e30``) become floats."""
    v = yaml.safe_load(text)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    return v


def load_run_config(path: str | Path, overrides: list[str] | dict[str, Any] = ()) -> tuple[ModelConfig, TrainConfig]:
    """A preset's model and ``train:`` sections, with ``key=value`` overrides (``train.steps=50``,
    ``moe.n_routed_experts=8``; values are YAML). Unknown keys are errors."""
    p = resolve_config_path(path)
    d = yaml.safe_load(p.read_text()) or {}
    if isinstance(overrides, dict):
        items = overrides
    else:
        items = {}
        for o in overrides:
            key, eq, val = o.partition("=")
            if not eq or not key:
                raise ValueError(f"override {o!r} must look like key=value (e.g. train.steps=50)")
            items[key.strip()] = _parse_value(val)
    d = _merge(d, items)
    train_d = d.pop("train", None) or {}
    try:
        model = config_from_dict(d)
        tcfg = _from_dict(TrainConfig, train_d, "train.")
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None
    return model, tcfg


# ------------------------------------------------------------------------------------------------------
# Losses and balancing
def shifted_targets(tokens: jax.Array, segment_ids: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Targets at distance ``k`` (``tokens[:, i + k]``) and their mask: same document, not padding."""
    tgt = jnp.pad(tokens[:, k:], ((0, 0), (0, k)))
    seg = jnp.pad(segment_ids[:, k:], ((0, 0), (0, k)))
    return tgt, (seg == segment_ids) & (segment_ids > 0)


def _collect(tree: Any, name: str) -> list[jax.Array]:
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if any(getattr(k, "key", None) == name for k in path):
            out.append(leaf)
    return out


def loss_fn(cfg: ModelConfig, remat: str, params: Any, router: Any, batch: dict[str, jax.Array],
            mtp_lambda: jax.Array | float, balance_alpha: float, z_loss: float = 0.0):
    """Total loss and its parts. ``batch``: ``tokens, segment_ids, positions`` ``[b, t]`` int32."""
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    variables = {"params": params} | ({"router": router} if router else {})
    out, inter = Transformer(cfg, remat=remat).apply(variables, tokens, positions=pos, segment_ids=seg,
                                                      mutable=["intermediates"])
    tgt, mask = shifted_targets(tokens, seg, 1)
    ce, n = cross_entropy(out.logits, tgt, mask)
    total = ce
    aux = {"ce": ce, "tokens": n}
    if out.mtp_logits is not None:
        depth = out.mtp_logits.shape[0]
        terms = []
        for j in range(depth):
            t_j, m_j = shifted_targets(tokens, seg, j + 2)
            terms.append(cross_entropy(out.mtp_logits[j], t_j, m_j)[0])
        aux["mtp"] = jnp.stack(terms)
        total = total + mtp_lambda / depth * sum(terms)
    bal = _collect(inter, "balance")
    if bal:
        aux["balance"] = sum(jnp.sum(b) for b in bal)
        total = total + balance_alpha * aux["balance"]
    if z_loss:
        lse = jax.nn.logsumexp(out.logits, axis=-1)
        m = mask.astype(jnp.float32)
        aux["z"] = jnp.sum(lse * lse * m) / jnp.maximum(m.sum(), 1.0)
        total = total + z_loss * aux["z"]
    dropped = _collect(inter, "dropped_rows")
    if dropped:
        aux["dropped_rows"] = sum(jnp.sum(d) for d in dropped)
    aux["expert_load"] = out.expert_load
    return total, aux


def max_violation(load: jax.Array) -> jax.Array:
    """MaxVio per row (layer): ``max(load) / mean(load) - 1`` (Loss-Free Balancing eq. 4)."""
    return load.max(-1) / jnp.maximum(load.mean(-1), 1e-9) - 1.0


def update_router_bias(router: Any, expert_load: jax.Array, gamma: jax.Array | float, center: bool = False) -> Any:
    """``b <- b + gamma * sign(mean(load) - load)`` per MoE layer (Loss-Free Balancing Alg. 1, V3 §2.1.2).

    ``expert_load [n_moe_layers + D, e]`` counted over the global batch (main-model MoE layers first, then
    the MTP layers, as ``ModelOutput.expert_load``). ``center`` removes each row's mean update.
    """
    delta = gamma * jnp.sign(expert_load.mean(-1, keepdims=True) - expert_load)
    if center:
        delta = delta - delta.mean(-1, keepdims=True)
    router = jax.tree.map(lambda x: x, router)  # a copy of the dict structure
    row = 0
    if "moe_layers" in router:
        b = router["moe_layers"]["ffn"]["e_score_correction_bias"]
        router["moe_layers"]["ffn"]["e_score_correction_bias"] = b + delta[row: row + b.shape[0]].astype(b.dtype)
        row += b.shape[0]
    for k in sorted(x for x in router if x.startswith("mtp_")):
        b = router[k]["layer"]["ffn"]["e_score_correction_bias"]
        router[k]["layer"]["ffn"]["e_score_correction_bias"] = b + delta[row].astype(b.dtype)
        row += 1
    return router


# ------------------------------------------------------------------------------------------------------
# FLOPs and MFU
def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: ``6 * (matmul parameters a token uses)`` plus attention
    ``6 * layers * heads * (d_qk + d_v) * seq_len`` (PaLM's convention: the full, non-causal score
    matrix). Counts the active routed experts only (``k / e``), the output head (once per MTP depth too),
    not the embedding lookup; MTP layers included."""
    from deepseek_jax.model import abstract_variables

    params = nn.meta.unbox(abstract_variables(cfg))["params"]
    n = 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [getattr(k, "key", "") for k in path]
        size = math.prod(leaf.shape)
        if keys[-1] == "embed" or "norm" in "/".join(keys):
            continue
        routed = keys[-1] in ("w1", "w2", "w3") and "shared" not in keys and (
            "moe_layers" in keys or keys[0].startswith("mtp_"))
        if cfg.moe is not None and routed:
            size *= cfg.moe.experts_per_token / cfg.moe.n_routed_experts
        n += size
    head = cfg.d_model * cfg.vocab_size
    n += cfg.mtp.depth * head  # the shared head runs once more per MTP depth
    if cfg.tie_embeddings:
        n += head
    a = cfg.attention
    dqk, dv = (a.qk_head_dim, a.v_head_dim) if a.kind == "mla" else (a.head_dim, a.head_dim)
    attn = 6.0 * (cfg.n_layers + cfg.mtp.depth) * a.n_heads * (dqk + dv) * seq_len
    return 6.0 * n + attn


_PEAK_TABLE = {  # dense bf16 FLOP/s per chip
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
    "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12,
}


@functools.lru_cache(maxsize=1)
def _measured_cpu_peak(n: int = 2048, reps: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def peak_flops(override: float = 0.0) -> tuple[float, str]:
    """``(FLOP/s of the machine, where the number came from)``: the override, a table of accelerators
    times the device count, or a measured fp32 matmul on CPU (one process: fake CPU devices share cores)."""
    if override:
        return override, "override"
    devs = jax.devices()
    if devs[0].platform == "cpu":
        return _measured_cpu_peak(), "measured fp32 matmul (CPU)"
    kind = devs[0].device_kind
    for name, f in _PEAK_TABLE.items():
        if name.lower() in kind.lower():
            return f * len(devs), f"table: {name} x {len(devs)}"
    return _measured_cpu_peak() * len(devs), f"measured fp32 matmul ({kind})"


# ------------------------------------------------------------------------------------------------------
# Jitted functions
@dataclass
class TrainFns:
    init: Callable  # rng -> state
    step: Callable  # (state, batch, mtp_lambda, gamma) -> (state, metrics)
    eval: Callable  # (params, router, batch) -> (nll_sum, count)
    state_shardings: Any
    batch_sharding: NamedSharding
    schedule: Callable
    mesh: Mesh


def _mesh_for(tcfg: TrainConfig) -> Mesh:
    if tcfg.mesh:
        axes = parse_mesh(tcfg.mesh)
        n = math.prod(axes.values())
        if n != jax.device_count():
            raise ValueError(f"train.mesh={tcfg.mesh!r} has {n} devices but {jax.device_count()} are available "
                             "(the mesh must use every device)")
        return make_mesh(axes)
    return make_mesh({"data": jax.device_count()})


def _key(tcfg: TrainConfig) -> TrainConfig:
    """The fields that change the compiled functions (run folders, logging and data do not)."""
    return dataclasses.replace(tcfg, out="", log_every=1, eval_every=1, checkpoint_every=1, keep_checkpoints=1,
                               sample_tokens=0, sample_prompt="", peak_flops=0.0, data=DataConfig(),
                               mtp_lambda=0.0, bias_gamma=0.0, seed=0,
                               optim=dataclasses.replace(tcfg.optim, ema_decay=0.0))


def make_train_fns(cfg: ModelConfig, tcfg: TrainConfig, mesh: Mesh | None = None) -> TrainFns:
    """Init, train-step and eval functions, jitted with explicit shardings (cached per config and mesh)."""
    mesh = mesh or _mesh_for(tcfg)
    return _make_train_fns(cfg, _key(tcfg), mesh)


@functools.lru_cache(maxsize=8)
def _make_train_fns(cfg: ModelConfig, tcfg: TrainConfig, mesh: Mesh) -> TrainFns:
    check_layout(cfg, mesh, global_batch=tcfg.batch_size)
    tx, schedule = make_optimizer(tcfg.optim, tcfg.steps)
    var_sh = param_shardings(cfg, mesh)
    replicated = NamedSharding(mesh, P())
    batch_sh = NamedSharding(mesh, P(BATCH_AXES, None))
    use_mesh = mesh.size > 1
    tokens0 = np.zeros((math.prod(mesh.shape[a] for a in BATCH_AXES), 8), np.int32)

    def init(rng):
        v = nn.meta.unbox(Transformer(cfg).init(rng, tokens0))
        return {"params": v["params"], "router": v.get("router", {}), "opt_state": tx.init(v["params"]),
                "step": jnp.zeros([], jnp.int32)}

    with jax.set_mesh(mesh):
        abstract = jax.eval_shape(init, jax.random.key(0))
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract["opt_state"], var_sh["params"],
                                   transform_non_params=lambda _: replicated)
    state_sh = {"params": var_sh["params"], "router": var_sh.get("router", {}), "opt_state": opt_sh,
                "step": replicated}

    def step(state, batch, mtp_lambda, gamma):
        grad_fn = jax.value_and_grad(
            lambda p: loss_fn(cfg, tcfg.remat, p, state["router"], batch, mtp_lambda, tcfg.balance_alpha,
                              tcfg.z_loss), has_aux=True)
        (loss, aux), grads = grad_fn(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        router = state["router"]
        metrics = {"loss": loss, "ce": aux["ce"], "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state["step"]), "tokens": aux["tokens"]}
        for k in ("mtp", "balance", "z", "dropped_rows"):
            if k in aux:
                metrics[k] = aux[k]
        if aux["expert_load"] is not None:
            metrics["maxvio"] = max_violation(aux["expert_load"])
            metrics["expert_load"] = aux["expert_load"]
            if router:
                router = update_router_bias(router, aux["expert_load"], gamma, tcfg.bias_center)
        new = {"params": params, "router": router, "opt_state": opt_state, "step": state["step"] + 1}
        return new, metrics

    def evaluate(params, router, batch):
        variables = {"params": params} | ({"router": router} if router else {})
        out = Transformer(cfg).apply(variables, batch["tokens"], positions=batch["positions"],
                                     segment_ids=batch["segment_ids"])
        tgt, mask = shifted_targets(batch["tokens"], batch["segment_ids"], 1)
        loss, n = cross_entropy(out.logits, tgt, mask)
        return loss * n, n

    batch_shs = {"tokens": batch_sh, "segment_ids": batch_sh, "positions": batch_sh}
    jit_init = jax.jit(init, out_shardings=state_sh)
    jit_step = jax.jit(step, in_shardings=(state_sh, batch_shs, None, None), out_shardings=(state_sh, None),
                       donate_argnums=(0,))
    jit_eval = jax.jit(evaluate, in_shardings=(state_sh["params"], state_sh["router"], batch_shs))

    def in_mesh(f):
        if not use_mesh:
            return f

        @functools.wraps(f)
        def g(*a):
            with jax.set_mesh(mesh):
                return f(*a)
        g.lower = lambda *a: _lower_in(mesh, f, *a)
        return g

    return TrainFns(init=in_mesh(jit_init), step=in_mesh(jit_step), eval=in_mesh(jit_eval), state_shardings=state_sh,
                    batch_sharding=batch_sh, schedule=schedule, mesh=mesh)


def _lower_in(mesh, f, *a):
    with jax.set_mesh(mesh):
        return f.lower(*a)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding, global_rows: int) -> dict[str, jax.Array]:
    """Assemble the global batch from each process's rows (``jax.make_array_from_process_local_data``)."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_rows,) + v.shape[1:])
            for k, v in local.items()}


# ------------------------------------------------------------------------------------------------------
# The loop
class TrainingDiverged(RuntimeError):
    """A non-finite loss; the message names the step and the last good checkpoint."""


class _Stop:
    def __init__(self):
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"train.out={str(out)!r} is not a writable folder ({e.strerror}); choose another") from None


def _restore(mngr, abstract_state, ema_like, log, ckpt_dir: Path) -> tuple[int, Any, dict, Any] | None:
    """The newest readable checkpoint as ``(step, state, meta, ema)``. Unreadable ones are reported and
    moved to ``checkpoints_unreadable/`` beside the checkpoint folder (kept for inspection; the run then
    writes those steps afresh)."""
    import shutil

    import orbax.checkpoint as ocp

    bad, found = [], None
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
            if ema_like is not None:
                items["ema"] = ocp.args.StandardRestore(ema_like)
            r = mngr.restore(step, args=ocp.args.Composite(**items))
            found = step, r["state"], r["meta"], r.get("ema") if ema_like is not None else None
            break
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back to the previous one
            log(f"checkpoint at step {step} is unreadable ({type(e).__name__}: {str(e)[:200]}); trying an older one")
            bad.append(step)
    if bad:
        if jax.process_index() == 0:
            aside = ckpt_dir.parent / "checkpoints_unreadable"
            aside.mkdir(exist_ok=True)
            for step in bad:
                dst = aside / f"{step}-{int(time.time())}"
                shutil.move(str(ckpt_dir / str(step)), str(dst))
                log(f"moved the unreadable checkpoint {step} to {dst}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("deepseek_jax: unreadable checkpoints moved")
        mngr.reload()
    return found


def _to_host(tree: Any) -> Any:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def train(cfg: ModelConfig, tcfg: TrainConfig, *, progress: bool = True,
          on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns a summary dict. See the module docstring.

    Raises ``ValueError`` before compiling for bad input (corpus, output folder, config, mesh) and
    :class:`TrainingDiverged` on a non-finite loss. ``on_step(step, metrics)`` is called after every step.
    """
    import orbax.checkpoint as ocp

    is_main = jax.process_index() == 0
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if is_main else (lambda msg: None)
    out = Path(tcfg.out).resolve()
    _check_out(out)
    if tcfg.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"train.seq_len={tcfg.seq_len} exceeds max_position_embeddings={cfg.max_position_embeddings}")
    previous = out / "config.yaml"
    if previous.exists():
        old = yaml.safe_load(previous.read_text()) or {}
        old.pop("train", None)
        if old != yaml.safe_load(yaml.safe_dump(cfg.to_dict())):
            raise ValueError(f"train.out={str(out)!r} holds a run of a different model (see {previous}); "
                             "resume it with the same model config, or choose another train.out")
    mesh = _mesh_for(tcfg)
    check_layout(cfg, mesh, global_batch=tcfg.batch_size)
    if cfg.eos_token_id is not None and cfg.eos_token_id != 0 and not tcfg.data.tokenizer:
        log(f"note: the trained tokenizer's EOS id is 0 (config eos_token_id={cfg.eos_token_id} is ignored)")

    t0 = time.perf_counter()
    data = prepare_data(tcfg.data, cfg.vocab_size, tcfg.seq_len, tcfg.seed)
    s = data.stats
    log(f"data: {s['documents']} documents, {s['exact_duplicates']} exact and {s['near_duplicates']} near duplicates "
        f"removed; train {s['train_documents']} docs / {s['train_tokens']:,} tokens ({len(data.train['tokens'])} rows), "
        f"val {s['val_documents']} docs / {s['val_tokens']:,} tokens; unigram entropy {s['unigram_entropy']:.3f} nats "
        f"({time.perf_counter() - t0:.1f} s)")
    if is_main:
        data.tokenizer.save(str(out / "tokenizer.json"))
        (out / "config.yaml").write_text(yaml.safe_dump({**cfg.to_dict(), "train": _plain(dataclasses.asdict(tcfg))},
                                                        sort_keys=False))
    pcount = jax.process_count()
    fns = make_train_fns(cfg, tcfg, mesh)
    shape = (tcfg.batch_size, tcfg.seq_len)
    local_rows = sorted({i for idx in fns.batch_sharding.addressable_devices_indices_map(shape).values()
                         for i in range(*idx[0].indices(shape[0]))})
    batches = Batches(data.train, tcfg.batch_size, tcfg.seed, local_rows=local_rows)
    fpt = flops_per_token(cfg, tcfg.seq_len)
    peak, peak_src = peak_flops(tcfg.peak_flops)

    state = fns.init(jax.random.key(tcfg.seed))
    ema = HostEMA(_to_host(state["params"]), tcfg.optim.ema_decay) if tcfg.optim.ema_decay else None
    mngr = ocp.CheckpointManager(out / "checkpoints", options=ocp.CheckpointManagerOptions(
        max_to_keep=tcfg.keep_checkpoints, enable_async_checkpointing=True, create=True))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = _restore(mngr, abstract, ema.value() if ema else None, log, out / "checkpoints")
    start = 0
    if restored is not None:
        start, state, meta, ema_tree = restored
        batches.restore(meta["data"])
        if ema is not None and ema_tree is not None:
            ema.load(ema_tree)
        log(f"resumed from the checkpoint at step {start}")
    last_good = start if restored is not None else None

    metrics_path = out / "metrics.jsonl"
    if is_main and metrics_path.exists():  # drop records past the resumed step (a crash after the last save)
        keep = [ln for ln in metrics_path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= start]
        metrics_path.write_text("".join(k + "\n" for k in keep))
    writer = None
    if is_main:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))

    def record(rec: dict) -> None:
        if not is_main:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        for k, v in rec.items():
            if isinstance(v, (int, float)) and k != "step":
                writer.add_scalar(f"{rec.get('kind', 'train')}/{k}", v, rec["step"])

    def save(step: int, wait: bool = False) -> None:
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave({"data": batches.state(), "step": step})}
        if ema is not None:
            items["ema"] = ocp.args.StandardSave(ema.value())
        mngr.save(step, args=ocp.args.Composite(**items), force=True)
        if wait:
            mngr.wait_until_finished()

    val_rows = _eval_rows(data.val, tcfg.batch_size, tcfg.eval_batches)

    def validate() -> float:
        tot, cnt = 0.0, 0.0
        for rows in val_rows:
            b = global_batch({k: v[local_rows] for k, v in rows.items()}, fns.batch_sharding, tcfg.batch_size)
            s_, n_ = fns.eval(state["params"], state["router"], b)
            tot, cnt = tot + float(s_), cnt + float(n_)
        return tot / max(cnt, 1.0)

    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    bar = None
    if is_main and progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tcfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    summary: dict[str, Any] = {"out": str(out), "start_step": start, "data": data.stats, "peak_flops": peak,
                               "peak_source": peak_src, "flops_per_token": fpt}
    val_loss = None
    step = start
    t_last = time.perf_counter()
    with _Stop() as stop:
        while step < tcfg.steps:
            local = next(batches)
            batch = global_batch(local, fns.batch_sharding, tcfg.batch_size)
            lam = scheduled(tcfg.mtp_lambda, step)
            gamma = scheduled(tcfg.bias_gamma, step)
            state, m = fns.step(state, batch, jnp.float32(lam), jnp.float32(gamma))
            m = jax.device_get(m)
            step += 1
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            loss = float(m["loss"])
            if not math.isfinite(loss):
                mngr.wait_until_finished()
                where = f"the last good checkpoint is step {last_good}" if last_good is not None else "no checkpoint was written"
                if bar:
                    bar.close()
                mngr.close()
                raise TrainingDiverged(f"non-finite loss ({loss}) at step {step}; stopped without saving; {where} "
                                       f"in {out / 'checkpoints'}")
            if ema is not None:
                ema.update(_to_host(state["params"]) if pcount > 1 else state["params"])
            tps = tokens_per_step / dt
            rec = {"step": step, "kind": "train", "loss": loss, "ce": float(m["ce"]), "lr": float(m["lr"]),
                   "grad_norm": float(m["grad_norm"]), "tokens_per_s": tps, "mfu": fpt * tps / peak,
                   "mtp_lambda": lam, "bias_gamma": gamma}
            if "mtp" in m:
                rec["mtp"] = [float(x) for x in np.atleast_1d(m["mtp"])]
            for k in ("balance", "z", "dropped_rows"):
                if k in m:
                    rec[k] = float(m[k])
            if "maxvio" in m:
                rec["maxvio_layers"] = [float(x) for x in m["maxvio"]]
                rec["maxvio"] = float(np.mean(m["maxvio"]))
                rec["expert_load"] = np.asarray(m["expert_load"]).astype(int).tolist()
            if step % tcfg.log_every == 0 or step == tcfg.steps:
                record(rec)
            if bar:
                post = {"loss": f"{loss:.3f}", "lr": f"{rec['lr']:.2e}", "tok/s": f"{tps:,.0f}", "MFU": f"{rec['mfu']:.1%}"}
                if "maxvio" in rec:
                    post["MaxVio"] = f"{rec['maxvio']:.2f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if on_step is not None:
                on_step(step, rec)
            if val_rows and (step % tcfg.eval_every == 0 or step == tcfg.steps):
                val_loss = validate()
                record({"step": step, "kind": "val", "loss": val_loss})
                if bar:
                    bar.write(f"step {step}: validation loss {val_loss:.4f}")
            if step % tcfg.checkpoint_every == 0 or step == tcfg.steps:
                save(step)
                last_good = step
            if stop.signal is not None:
                if last_good != step:
                    save(step)
                    last_good = step
                mngr.wait_until_finished()
                name = signal.Signals(stop.signal).name
                if bar:
                    bar.close()
                    bar = None
                log(f"{name}: saved the checkpoint at step {step} in {out / 'checkpoints'}; exiting (rerun to resume)")
                summary["stopped_by"] = name
                break
            summary["last_loss"] = loss
            summary["last_ce"] = rec["ce"]
    mngr.wait_until_finished()
    mngr.close()
    if bar:
        bar.close()
    if writer is not None:
        writer.close()
    if start >= tcfg.steps:
        log(f"the run in {out} is already complete ({start} of {tcfg.steps} steps); raise train.steps to go on")
        val_loss = validate() if val_rows else None
    summary.update(step=step, val_loss=val_loss, unigram_entropy=data.stats["unigram_entropy"])
    if "stopped_by" not in summary and step >= tcfg.steps:
        if val_loss is not None:
            log(f"final validation loss {val_loss:.4f} nats vs unigram entropy {data.stats['unigram_entropy']:.4f} nats")
        if tcfg.sample_tokens and pcount == 1:
            text = sample_text(cfg, jax.device_get({"params": state["params"], "router": state["router"]}),
                               data.tokenizer, tcfg.sample_prompt, tcfg.sample_tokens, min(tcfg.seq_len, 256),
                               temperature=0.8, seed=tcfg.seed)
            summary["sample"] = text
            log("sample:\n" + text)
    return summary


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _eval_rows(val: dict[str, np.ndarray], batch: int, n_batches: int) -> list[dict[str, np.ndarray]]:
    """The first ``n_batches`` global batches of validation rows (the last padded with masked rows)."""
    n = min(len(val["tokens"]), batch * n_batches)
    out = []
    for i in range(0, n, batch):
        rows = {k: v[i:i + batch] for k, v in val.items()}
        short = batch - len(rows["tokens"])
        if short:
            rows = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in rows.items()}
        out.append(rows)
    return out


def sample_text(cfg: ModelConfig, variables: dict, tokenizer, prompt: str, n_tokens: int, window: int,
                temperature: float = 0.0, seed: int = 0) -> str:
    """Generate ``n_tokens`` after ``prompt`` with full forwards over a fixed window (one compilation)."""
    ids = tokenizer.encode(prompt).ids or [0]
    buf = np.zeros((1, window), np.int32)

    @jax.jit
    def next_logits(v, toks, i):
        return Transformer(cfg).apply(v, toks).logits[0, i]

    variables = {k: v for k, v in variables.items() if v}
    rng = np.random.default_rng(seed)
    out = list(ids)
    for _ in range(n_tokens):
        ctx = out[-window:]
        buf[0, :len(ctx)] = ctx
        logits = np.asarray(next_logits(variables, buf, len(ctx) - 1), np.float64)
        if temperature > 0:
            p = np.exp((logits - logits.max()) / temperature)
            out.append(int(rng.choice(len(p), p=p / p.sum())))
        else:
            out.append(int(np.argmax(logits)))
    return tokenizer.decode(out)
