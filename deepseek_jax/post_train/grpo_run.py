"""The GRPO loop behind ``deepseek-jax grpo`` (post-training.md §2)::

    for each step:
        B prompts x G samples   one ``generate`` call from pi_old (T = grpo.temperature)      rollout
        rewards -> advantages   weighted reward plug-ins, group statistics                    reward
        pi_ref log-probs        only with beta > 0 (a frozen copy of the initial policy)      reference
        mu x minibatches updates through train/step.py with the GRPO objective               update

The run folder works like pre-training's (``config.yaml``, ``tokenizer.json``, ``metrics.jsonl``,
TensorBoard, checkpoints with resume; ``post_train.yaml`` holds the post-training sections). Everything a step
samples is a function of ``(train.seed, step)`` and the state, so a resumed run repeats the uninterrupted one.
The reference model (``beta > 0``) rides in each checkpoint beside the state.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import numpy as np
import yaml

from deepseek_jax.config import ModelConfig
from deepseek_jax.nn import tree
from deepseek_jax.post_train.config import PostConfig
from deepseek_jax.post_train.evaluate import evaluate_task
from deepseek_jax.post_train.grpo import group_advantages
from deepseek_jax.post_train.logprobs import per_token_logps
from deepseek_jax.post_train.objectives import GRPO
from deepseek_jax.post_train.prompts import encode_prompts, task_tokenizer, training_prompts
from deepseek_jax.post_train.rewards import Rewards
from deepseek_jax.post_train.rollout import Rollout, rollout
from deepseek_jax.train import hooks as H
from deepseek_jax.train.config import StepConfig, TrainConfig
from deepseek_jax.train.data import eos_id
from deepseek_jax.train.loop import TrainingDiverged, start_from
from deepseek_jax.train.run_dir import Checkpoints, RunDir
from deepseek_jax.train.step import global_batch, hyper, make_train_fns, mesh_for

__all__ = ["run_grpo", "grpo_objective", "reward_stats"]


def grpo_objective(pcfg: PostConfig) -> GRPO:
    g = pcfg.grpo
    return GRPO(agg=g.loss_agg, eps_low=g.epsilon_low, eps_high=g.epsilon_high, beta=g.beta, kl=g.kl_estimator,
                delta=g.delta or None, temperature=g.temperature, max_len=g.max_completion_tokens,
                balance_alpha=g.balance_alpha)


def _spread(r: np.ndarray, group: int) -> np.ndarray:
    """Per group: max - min of the rewards that exist (0 for a group without any)."""
    g = r.reshape(-1, group)
    ok = ~np.isnan(g)
    return np.where(ok.any(1), np.where(ok, g, -np.inf).max(1) - np.where(ok, g, np.inf).min(1), 0.0)


def reward_stats(r: np.ndarray, adv: np.ndarray, group: int) -> dict[str, float]:
    """Reward and advantage statistics of a rollout (NaN rewards = no function applied, left out)."""
    g = r.reshape(-1, group)
    spread = _spread(r, group)
    return {"reward/mean": float(np.nanmean(r)), "reward/std": float(np.nanstd(r)),
            "frac_reward_zero_std": float(np.mean(spread == 0)),
            "frac_groups_all_correct": float(np.mean(np.nanmin(g, 1) >= 1)),
            "frac_groups_all_wrong": float(np.mean(np.nanmax(g, 1) <= 0)),
            "adv/abs_mean": float(np.abs(adv).mean()), "adv/min": float(adv.min()), "adv/max": float(adv.max()),
            "adv/nonzero_frac": float(np.mean(adv != 0))}


def run_grpo(cfg: ModelConfig, tcfg: TrainConfig, pcfg: PostConfig, init: dict | None = None, tokenizer=None,
             progress: bool = True, on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Run (or resume) GRPO in ``tcfg.out`` from ``init``'s variables (usually the SFT run's); ``train.steps``
    GRPO steps, ``train.seq_len`` the rollout width. Returns a summary with the last evaluation."""
    if not pcfg.task.name and not pcfg.task.prompts:
        raise ValueError("grpo needs prompts: set task.name (addition) or task.prompts (a JSONL of {prompt, ...})")
    if not pcfg.reward:
        raise ValueError("grpo needs at least one reward: the reward: list of {fn: module:function, weight: w}")
    with RunDir(tcfg.out).open_for_writing(cfg, lock=jax.process_index() == 0) as run:
        return GRPORun(run, cfg, tcfg, pcfg, task_tokenizer(pcfg, tokenizer), progress, on_step).run(init)


class GRPORun:
    """One GRPO run in an open run folder: :meth:`run` starts (or resumes) and loops :meth:`step` with
    evaluation every ``eval.every`` steps and checkpoints. A subclass changes the update's shape, objective,
    reference model, step and evaluation record through the methods below (:class:`~deepseek_jax.post_train.
    distill.OnPolicyRun` does)."""

    def __init__(self, run: RunDir, cfg: ModelConfig, tcfg: TrainConfig, pcfg: PostConfig, tokenizer, progress: bool,
                 on_step):
        self.dir, self.cfg, self.tcfg, self.pcfg, self.g = run, cfg, tcfg, pcfg, pcfg.grpo
        self.tokenizer, self.eos, self.on_step = tokenizer, eos_id(tokenizer), on_step
        self.mesh = mesh_for(tcfg.mesh)
        g = self.g
        self.rows, self.passes, self.parts = self._update_shape()
        step_cfg = StepConfig(batch_size=self.rows, seq_len=tcfg.seq_len, steps=tcfg.steps * self.passes * self.parts,
                              remat=tcfg.remat, optim=dataclasses.replace(tcfg.optim, ema_decay=0.0))
        self.fns = make_train_fns(cfg, step_cfg, self._objective(), self.mesh)
        self.rewards = Rewards.from_specs([dataclasses.asdict(r) for r in pcfg.reward]) if pcfg.reward else None
        self.logp = jax.jit(lambda v, t, s, p: per_token_logps(cfg, v, t, s, p, g.temperature)[0])
        self.metrics = H.MetricsHook(run, tcfg.log_every, tcfg.steps)
        self.progress = progress
        self.ref = None
        if jax.process_index() == 0:
            run.write_setup(cfg, tcfg, tokenizer)
            (run.path / "post_train.yaml").write_text(yaml.safe_dump(pcfg.to_dict(), sort_keys=False))

    # ------------------------------------------------------------------ what a subclass changes

    def _update_shape(self) -> tuple[int, int, int]:
        """(rows per update, passes over a step's batch, updates per pass)."""
        return self.g.rows // self.g.minibatches, self.g.num_iterations, self.g.minibatches

    def _objective(self):
        return grpo_objective(self.pcfg)

    def _wants_ref(self) -> bool:
        return self.g.beta > 0

    # ------------------------------------------------------------------ state

    def _start(self, init: dict | None) -> tuple[Any, Checkpoints, int]:
        state = self.fns.init(jax.random.key(self.tcfg.seed))
        if init is not None:
            state = start_from(state, init)
        if self._wants_ref():
            self.ref = H.to_host({tree.PARAMS: state[tree.PARAMS], tree.ROUTER: state[tree.ROUTER]})
        ckpts = Checkpoints(self.dir, self.tcfg.keep_checkpoints)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = ckpts.restore_newest(abstract, self.ref, H.log)
        start = 0
        if restored is not None:
            start, state, _, ref = restored
            self.ref = ref if ref is not None else self.ref
            H.log(f"resumed from the checkpoint at step {start}")
        if jax.process_index() == 0:
            self.dir.truncate_metrics(start, H.log)
        return state, ckpts, start

    def _variables(self, state) -> dict:
        return {tree.PARAMS: state[tree.PARAMS], tree.ROUTER: state[tree.ROUTER]}

    # ------------------------------------------------------------------ one step

    def _rollout(self, step: int, state, rows: list[dict] | None = None, attempt: int = 0
                 ) -> tuple[list[dict], Rollout]:
        g, t = self.g, self.pcfg.task
        rows = rows if rows is not None else training_prompts(self.pcfg, g.prompts_per_step, [t.train_seed, 1, step])
        ids = encode_prompts(self.tokenizer, rows)
        ro = rollout(self.cfg, self._variables(state), ids, g.num_generations, self.tcfg.seq_len,
                     g.max_completion_tokens, temperature=g.temperature,
                     seed=self.tcfg.seed * 1_000_003 + step + 7919 * attempt, eos_id=self.eos,
                     mask_truncated=g.mask_truncated, mesh=self._gen_mesh())
        return [r for r in rows for _ in range(g.num_generations)], ro

    def _resample(self, step: int, state, rows: list[dict], ro: Rollout, r: np.ndarray) -> tuple[np.ndarray, int]:
        """Dynamic sampling (DAPO; verl ``filter_groups``): groups whose rewards are all equal carry no signal;
        their prompts are sampled again (up to ``dynamic_tries`` times) and a group is replaced when the new one
        disagrees. Shapes stay fixed. Returns the rewards and the number of groups replaced."""
        G, replaced = self.g.num_generations, 0
        for attempt in range(1, self.g.dynamic_tries + 1):
            flat = np.nonzero(_spread(r, G) == 0)[0]
            if not len(flat):
                break
            sub_rows, sub = self._rollout(step, state, [rows[i * G] for i in flat], attempt)
            r2, _ = self._rewards(sub_rows, sub)
            for k in np.nonzero(_spread(r2, G) > 0)[0]:
                dst, src = slice(flat[k] * G, (flat[k] + 1) * G), slice(k * G, (k + 1) * G)
                for name in ("tokens", "segment_ids", "positions", "loss_mask", "sample_logp", "ended"):
                    getattr(ro, name)[dst] = getattr(sub, name)[src]
                ro.completions[dst] = sub.completions[src]
                r[dst] = r2[src]
                replaced += 1
        return r, replaced

    def _gen_mesh(self):
        return self.mesh if self.mesh.size > 1 else None

    def _rewards(self, rows: list[dict], ro: Rollout) -> tuple[np.ndarray, dict]:
        texts = [self.tokenizer.decode([i for i in c if i != self.eos]) for c in ro.completions]
        columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
        r, per_fn = self.rewards([r["prompt"] for r in rows], texts, ro.completions, **columns)
        return r, {f"reward/{k}": float(np.nanmean(v)) for k, v in per_fn.items()}

    def _batch(self, step: int, ro: Rollout, adv: np.ndarray, state, times: dict) -> tuple[dict, dict]:
        batch = {**ro.batch(), "advantages": adv.astype(np.float32)}
        put = lambda b: global_batch(b, self.fns.batch_sharding, len(adv))  # noqa: E731
        extra: dict[str, float] = {}
        t0 = time.perf_counter()
        if self.ref is not None:
            batch["ref_logp"] = np.asarray(self._logp(self.ref, batch, put))
        times["time/reference"] = time.perf_counter() - t0
        need_old = self.g.num_iterations > 1 or self.g.minibatches > 1
        if need_old or step % self.pcfg.eval.every == 0:  # pi_old, or just the sampler-vs-training metric
            old = np.asarray(self._logp(self._variables(state), batch, put))
            if need_old:
                batch["old_logp"] = old
            rows, cols = ro.loss_mask[:, 1:].astype(bool).nonzero()  # positions that predict a completion token
            diff = np.abs(old - ro.sample_logp)[rows, cols]
            if diff.size:
                extra = {"rollout/logp_absdiff_mean": float(diff.mean()),
                         "rollout/logp_absdiff_max": float(diff.max())}
        return batch, extra

    def _logp(self, variables, batch, put):
        b = put({k: batch[k] for k in ("tokens", "segment_ids", "positions")})
        with jax.set_mesh(self.mesh):
            return self.logp(variables, b["tokens"], b["segment_ids"], b["positions"])

    def _update(self, state, batch: dict) -> tuple[Any, dict]:
        g, n = self.g, self.rows
        ms = []
        for _ in range(self.passes):
            for k in range(self.parts):
                part = global_batch({key: v[k * n:(k + 1) * n] for key, v in batch.items()}, self.fns.batch_sharding, n)
                state, m = self.fns.step(state, part, hyper(g.mtp_lambda, g.bias_gamma))
                ms.append(jax.device_get(m))
        mean = {k: float(np.mean([np.mean(m[k]) for m in ms])) for k in ms[0] if k not in ("expert_load", "mtp")}
        if "maxvio" in ms[-1]:
            mean["maxvio"] = float(np.mean(ms[-1]["maxvio"]))
        mean["kl_max"] = float(max(m["kl_max"] for m in ms)) if "kl_max" in ms[0] else None
        return state, {k: v for k, v in mean.items() if v is not None}

    def step(self, step: int, state) -> tuple[Any, dict]:
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        rows, ro = self._rollout(step, state)
        t1 = time.perf_counter()
        r, per_fn = self._rewards(rows, ro)
        if self.g.dynamic_sampling:
            r, per_fn["dynamic/replaced_groups"] = self._resample(step, state, rows, ro, r)
        if self.g.shuffle_rewards:  # the control: the same rewards, assigned to the wrong completions
            r = r[np.random.default_rng([self.tcfg.seed, 2, step]).permutation(len(r))]
        adv = np.asarray(group_advantages(np.asarray(r, np.float32), self.g.num_generations, self.g.scale_rewards,
                                          self.g.adv_eps))
        t2 = time.perf_counter()
        batch, extra = self._batch(step, ro, adv, state, times)
        t3 = time.perf_counter()
        state, m = self._update(state, batch)
        t4 = time.perf_counter()
        lens = np.array([len(c) for c in ro.completions])
        rec = {"step": step + 1, "kind": "train", **m, **reward_stats(r, adv, self.g.num_generations), **per_fn,
               "completion/len_mean": float(lens.mean()), "completion/len_min": int(lens.min()),
               "completion/len_max": int(lens.max()), "completion/truncated_frac": float(1 - ro.ended.mean()),
               **extra, "time/rollout": t1 - t0, "time/reward": t2 - t1, **times,
               "time/update": t4 - t3, "time/step": t4 - t0}
        return state, rec

    # ------------------------------------------------------------------ the loop

    def _eval_record(self, step: int, state) -> dict | None:
        """The held-out evaluation as a metrics record (None without held-out prompts)."""
        e = evaluate_task(self.cfg, jax.device_get(self._variables(state)), self.pcfg, self.g.max_completion_tokens,
                          tokenizer=self.tokenizer, seed=self.tcfg.seed + step)
        return None if e is None else {"step": step, "kind": "eval", **e}

    def evaluate(self, step: int, state) -> dict | None:
        e = self._eval_record(step, state)
        if e is None:
            return None
        rec = {k: v for k, v in e.items() if k != "samples"}
        self.metrics.record(rec)
        if self.dir.path.exists() and jax.process_index() == 0 and e.get("samples"):
            with open(self.dir.path / "samples.jsonl", "a") as f:
                for s in e["samples"]:
                    f.write(yaml.safe_dump({"step": step, **s}, default_flow_style=True).strip() + "\n")
        return rec

    def run(self, init: dict | None) -> dict[str, Any]:
        state, ckpts, start = self._start(init)
        steps, every = self.tcfg.steps, self.pcfg.eval.every
        bar = _bar(self.progress, steps, start)
        summary: dict[str, Any] = {"out": str(self.dir.path), "start_step": start}
        if start == 0:
            summary["eval_start"] = self.evaluate(0, state)
        step, last = start, None
        try:
            with H.StopOnSignal() as stop:
                while step < steps:
                    state, rec = self.step(step, state)
                    step += 1
                    if not math.isfinite(rec["loss"]):
                        raise TrainingDiverged(f"non-finite GRPO loss ({rec['loss']}) at step {step}")
                    self.metrics.after_step(step, state, rec)
                    if self.on_step is not None:
                        self.on_step(step, rec)
                    if self.ref is not None and self.g.ref_update_every and step % self.g.ref_update_every == 0:
                        self.ref = H.to_host(self._variables(state))  # DeepSeekMath Alg. 1: pi_ref <- pi_theta
                    if step % every == 0 or step == steps:
                        last = self.evaluate(step, state)
                    if step % self.tcfg.checkpoint_every == 0 or step == steps or stop.signal is not None:
                        ckpts.save(step, state, {"data": {}, "step": step}, self.ref)
                    _advance(bar, rec, last)
                    if stop.signal is not None:
                        summary["stopped_by"] = stop.signal
                        break
        finally:
            ckpts.close()
            self.metrics.close()
            if bar is not None:
                bar.close()
        return {**summary, "step": step, "eval": last}


def _bar(enabled: bool, total: int, initial: int):
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="grpo", unit="step", dynamic_ncols=True)


def _advance(bar, rec: dict, last: dict | None) -> None:
    if bar is None:
        return
    post = {"s/step": f"{rec['time/step']:.2f}"}
    if "reward/mean" in rec:
        post["reward"] = f"{rec['reward/mean']:.3f}"
    if last is not None and last.get("em_hard") is not None:
        post["EM S"] = f"{last['em_hard']:.2f}"
    bar.set_postfix(post, refresh=False)
    bar.update(1)
