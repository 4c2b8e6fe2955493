"""The loop behind ``deepseek-jax train``: prepare data, build the step, resume, run the hooks, finish.

Around the step (:mod:`deepseek_jax.train.step`) the hooks (:mod:`deepseek_jax.train.hooks`) keep the
metrics (``metrics.jsonl``, TensorBoard), the progress bar (loss, lr, tokens/s, MFU, MaxVio), the host
EMA, periodic validation and async Orbax checkpoints (the last N, resumed automatically from the newest
readable one); SIGINT/SIGTERM save and exit cleanly; a non-finite loss stops naming the step; a text
sample from the decode engine ends the run.
"""

from __future__ import annotations

import math
import signal
import time
from typing import Any, Callable

import jax

from deepseek_jax.analysis.params import flops_per_token, peak_flops
from deepseek_jax.config import ModelConfig
from deepseek_jax.infer.engine import generate
from deepseek_jax.nn import tree
from deepseek_jax.nn.placement import check_layout
from deepseek_jax.train import hooks as H
from deepseek_jax.train.config import StepConfig, TrainConfig, scheduled
from deepseek_jax.train.data import Batches, PreparedData, eos_id, prepare_data
from deepseek_jax.train.objectives import Objective, Pretrain
from deepseek_jax.train.optim import HostEMA
from deepseek_jax.train.run_dir import Checkpoints, RunDir
from deepseek_jax.train.step import TrainFns, global_batch, hyper, local_rows, make_train_fns, mesh_for

__all__ = ["train", "TrainingDiverged", "start_from"]


class TrainingDiverged(RuntimeError):
    """A non-finite loss; the message names the step and the last good checkpoint."""


def train(cfg: ModelConfig, tcfg: TrainConfig, *, progress: bool = True,
          on_step: Callable[[int, dict], None] | None = None, objective: Objective | None = None,
          data: PreparedData | None = None, init: dict | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns a summary dict. See the module docstring.

    ``data``: packed rows to train on instead of ``tcfg.data``'s corpus (post-training builds its own: SFT
    rows carry a ``loss_mask``). ``init``: variables (``params``, ``router``) to start from instead of a
    random initialisation (fine-tuning); a checkpoint in the run folder still takes precedence (resume).

    Raises ``ValueError`` before compiling for bad input (corpus, output folder, config, mesh) and
    :class:`TrainingDiverged` on a non-finite loss. ``on_step(step, record)`` is called after every step.
    ``objective`` defaults to :class:`~deepseek_jax.train.objectives.Pretrain` with the run's weights.
    The run folder is locked for the whole run (:class:`~deepseek_jax.train.lock.RunLocked` names the
    other writer); a failed checkpoint write raises :class:`~deepseek_jax.train.run_dir.CheckpointWriteError`.
    """
    with RunDir(tcfg.out).open_for_writing(cfg, lock=jax.process_index() == 0) as run:
        return _train(run, cfg, tcfg, progress, on_step, objective or Pretrain(tcfg.balance_alpha, tcfg.z_loss, tcfg.dsa_kl_weight),
                      data, init)


def _train(run: RunDir, cfg: ModelConfig, tcfg: TrainConfig, progress: bool,
           on_step: Callable[[int, dict], None] | None, objective: Objective, data: PreparedData | None,
           init: dict | None) -> dict[str, Any]:
    data, fns = _setup(run, cfg, tcfg, objective, data)
    rows = local_rows(fns.batch_sharding, (tcfg.batch_size, tcfg.seq_len))
    batches = Batches(data.train, tcfg.batch_size, tcfg.seed, local_rows=rows)
    state, ema, ckpts, start = _resume(run, tcfg, fns, batches, init)
    metrics = H.MetricsHook(run, tcfg.log_every, tcfg.steps)
    bar = H.ProgressHook(progress, tcfg.steps, start)
    val = H.ValidationHook(fns, H.eval_rows(data.val, tcfg.batch_size, tcfg.eval_batches), rows, tcfg.batch_size,
                           tcfg.eval_every, tcfg.steps, metrics, bar)
    saver = H.CheckpointHook(ckpts, batches, ema, tcfg.checkpoint_every, tcfg.steps, start if start else None)
    hooks = ([H.EMAHook(ema)] if ema else []) + [metrics, bar] + ([H.CallbackHook(on_step)] if on_step else [])
    hooks += [val, saver]
    fpt, (peak, peak_src) = flops_per_token(cfg, tcfg.seq_len), peak_flops(tcfg.peak_flops)
    summary: dict[str, Any] = {"out": str(run.path), "start_step": start, "data": data.stats, "peak_flops": peak,
                               "peak_source": peak_src, "flops_per_token": fpt}
    step, t_last = start, time.perf_counter()
    with H.StopOnSignal() as stop:
        while step < tcfg.steps:
            lam, gamma = scheduled(tcfg.mtp_lambda, step), scheduled(tcfg.bias_gamma, step)
            batch = global_batch(next(batches), fns.batch_sharding, tcfg.batch_size)
            state, m = fns.step(state, batch, hyper(lam, gamma))
            m = jax.device_get(m)
            step, now = step + 1, time.perf_counter()
            rec = H.step_record(step, m, now - t_last, tcfg.batch_size * tcfg.seq_len, fpt, peak,
                                {"mtp_lambda": lam, "bias_gamma": gamma})
            t_last = now
            if not math.isfinite(rec["loss"]):
                _diverged(rec["loss"], step, saver, bar, run)
            for h in hooks:
                h.after_step(step, state, rec)
            if stop.signal is not None:
                summary["stopped_by"] = _stop(stop.signal, step, state, saver, bar, run)
                break
            summary.update(last_loss=rec["loss"], last_ce=rec.get("ce"))
    for h in reversed(hooks):
        h.close()
    return _finish(cfg, tcfg, summary, start, step, state, val, data)


def _setup(run: RunDir, cfg: ModelConfig, tcfg: TrainConfig, objective: Objective,
           data: PreparedData | None = None) -> tuple[PreparedData, TrainFns]:
    """Everything that can fail on bad input, before anything compiles; then the data and the step."""
    if tcfg.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"train.seq_len={tcfg.seq_len} exceeds max_position_embeddings={cfg.max_position_embeddings}")
    mesh = mesh_for(tcfg.mesh)
    check_layout(cfg, mesh, global_batch=tcfg.batch_size)
    if data is not None:
        if jax.process_index() == 0:
            run.write_setup(cfg, tcfg, data.tokenizer)
        return data, make_train_fns(cfg, StepConfig.from_train(tcfg), objective, mesh)
    if cfg.eos_token_id is not None and cfg.eos_token_id != 0 and not tcfg.data.tokenizer:
        H.log(f"note: the trained tokenizer's EOS id is 0 (config eos_token_id={cfg.eos_token_id} is ignored)")
    t0 = time.perf_counter()
    data = prepare_data(tcfg.data, cfg.vocab_size, tcfg.seq_len, tcfg.seed)
    s = data.stats
    H.log(f"data: {s['documents']} documents, {s['exact_duplicates']} exact and {s['near_duplicates']} near "
          f"duplicates removed; train {s['train_documents']} docs / {s['train_tokens']:,} tokens "
          f"({len(data.train['tokens'])} rows), val {s['val_documents']} docs / {s['val_tokens']:,} tokens; "
          f"unigram entropy {s['unigram_entropy']:.3f} nats ({time.perf_counter() - t0:.1f} s)")
    for key, what in (("skipped_binary_files", "binary files skipped"),
                      ("skipped_non_string_records", "JSONL records skipped: their text is not a string"),
                      ("invalid_utf8_files", "files held invalid UTF-8, replaced by U+FFFD")):
        if s.get(key):
            H.log(f"warning: data: {s[key]} {what} (see data.sources)")
    if s.get("split_documents"):
        H.log(f"note: data: {s['split_documents']} documents longer than data.max_document_chars="
              f"{tcfg.data.max_document_chars:,} were split into chunks")
    if jax.process_index() == 0:
        run.write_setup(cfg, tcfg, data.tokenizer)
    return data, make_train_fns(cfg, StepConfig.from_train(tcfg), objective, mesh)


def _resume(run: RunDir, tcfg: TrainConfig, fns: TrainFns, batches: Batches, init: dict | None = None):
    """A fresh state (from ``init``'s variables if given), or the newest readable checkpoint's:
    ``(state, ema, checkpoints, start step)``."""
    state = fns.init(jax.random.key(tcfg.seed))
    if init is not None:
        state = start_from(state, init)
    ema = HostEMA(H.to_host(state[tree.PARAMS]), tcfg.optim.ema_decay) if tcfg.optim.ema_decay else None
    ckpts = Checkpoints(run, tcfg.keep_checkpoints)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = ckpts.restore_newest(abstract, ema.value() if ema else None, H.log)
    start = 0
    if restored is not None:
        start, state, meta, ema_tree = restored
        batches.restore(meta["data"])
        if ema is not None and ema_tree is not None:
            ema.load(ema_tree)
        H.log(f"resumed from the checkpoint at step {start}")
    if jax.process_index() == 0:
        run.truncate_metrics(start, H.log)  # records past the resumed step (a crash after the last save) are redone
    return state, ema, ckpts, start


def start_from(state: dict, variables: dict) -> dict:
    """``state`` with its parameters and router biases replaced by ``variables``' (placed like the state's);
    the optimiser moments stay at their initial zeros. Shapes must match the state's, with one exception:
    DSA's lightning indexer may be missing from ``variables`` (DeepSeek-V3.2 adds it to a trained dense
    checkpoint), in which case it keeps its fresh initialisation. ``variables`` are copied, never aliased."""
    placed = {}
    for col in (tree.PARAMS, tree.ROUTER):
        got = {p: a for p, a in jax.tree_util.tree_flatten_with_path(variables.get(col, {}))[0]}
        want = jax.tree_util.tree_flatten_with_path(state[col])[0]
        extra = set(got) - {p for p, _ in want}
        bad = [p for p, s in want if (p in got and tuple(got[p].shape) != s.shape) or (p not in got and
                                                                                        not tree.is_indexer(p))]
        if bad or extra:
            where = jax.tree_util.keystr((bad or sorted(extra, key=str))[0])
            raise ValueError(f"the initial {col} do not fit the model config (shapes or names differ, first at "
                             f"{where}): use the config the initial checkpoint was trained with")
        fresh = [p for p, _ in want if p not in got]
        if fresh:
            H.log(f"note: {len(fresh)} {col} arrays are not in the initial checkpoint (DSA's indexer): they start "
                  "from their initialisation")
        # copies (may_alias=False): the step donates the state, which must not delete the caller's arrays
        placed[col] = jax.tree_util.tree_map_with_path(
            lambda p, s: jax.device_put(got[p], s.sharding, may_alias=False) if p in got else s, state[col])
    return {**state, **placed}


def _diverged(loss: float, step: int, saver: H.CheckpointHook, bar: H.ProgressHook, run: RunDir) -> None:
    saver.ckpts.wait()
    where = (f"the last good checkpoint is step {saver.last_good}" if saver.last_good is not None
             else "no checkpoint was written")
    bar.close()
    saver.close()
    raise TrainingDiverged(f"non-finite loss ({loss}) at step {step}; stopped without saving; {where} "
                           f"in {run.checkpoints}")


def _stop(signum: int, step: int, state: Any, saver: H.CheckpointHook, bar: H.ProgressHook, run: RunDir) -> str:
    """A signal arrived: save this step (unless just saved), wait for the write, say so."""
    if saver.last_good != step:
        saver.save(step, state)
    saver.ckpts.wait()
    name = signal.Signals(signum).name
    bar.close()
    H.log(f"{name}: saved the checkpoint at step {step} in {run.checkpoints}; exiting (rerun to resume)")
    return name


def _finish(cfg: ModelConfig, tcfg: TrainConfig, summary: dict, start: int, step: int, state: Any,
            val: H.ValidationHook, data: PreparedData) -> dict:
    val_loss = val.val_loss
    if start >= tcfg.steps:
        H.log(f"the run in {summary['out']} is already complete ({start} of {tcfg.steps} steps); "
              "raise train.steps to go on")
        val_loss = val.validate(state)
    entropy = data.stats["unigram_entropy"]
    summary.update(step=step, val_loss=val_loss, unigram_entropy=entropy)
    if "stopped_by" in summary or step < tcfg.steps:
        return summary
    if val_loss is not None:
        H.log(f"final validation loss {val_loss:.4f} nats"
              + (f" vs unigram entropy {entropy:.4f} nats" if math.isfinite(entropy) else ""))
    if tcfg.sample_tokens and jax.process_count() == 1:
        summary["sample"] = _sample(cfg, tcfg, state, data.tokenizer)
        H.log("sample:\n" + summary["sample"])
    return summary


def _sample(cfg: ModelConfig, tcfg: TrainConfig, state: Any, tokenizer) -> str:
    """``sample_tokens`` sampled (temperature 0.8) after ``sample_prompt`` by the decode engine."""
    ids = tokenizer.encode(tcfg.sample_prompt).ids or [eos_id(tokenizer)]
    room = cfg.max_position_embeddings - len(ids)
    variables = jax.device_get({tree.PARAMS: state[tree.PARAMS], tree.ROUTER: state[tree.ROUTER]})
    new = generate(cfg, variables, [ids], max(1, min(tcfg.sample_tokens, room)), temperature=0.8, seed=tcfg.seed,
                   eos_id=eos_id(tokenizer))[0]
    return tokenizer.decode(ids + new)
