"""Distillation (post-training.md §1): the losses, the objective for the train step, and the data.

* ``seq`` (R1 §2.4): SFT of the student on the teacher's samples (optionally reward-filtered); works across
  tokenizers.
* ``logit`` (Hinton): ``L = alpha tau^2 KL(p_T^tau || q_S^tau) + (1 - alpha) CE``, a masked token mean over the
  completion, on the same teacher samples with the teacher's distribution at every completion position
  (``teacher_logp [N, T, V]`` computed once; ``top_k`` keeps the teacher's k most likely tokens, renormalised).
* ``on_policy`` (GKD): the generalised JSD on the student's own samples (:func:`generalized_jsd`).

``logit`` and ``on_policy`` compare distributions token by token, so teacher and student must share the
vocabulary (checked).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.nn import tree
from deepseek_jax.nn.transformer import ModelOutput, Transformer
from deepseek_jax.post_train.config import PostConfig
from deepseek_jax.post_train.grpo_run import GRPORun
from deepseek_jax.post_train.prompts import encode_prompts, heldout_prompts, task_tokenizer, training_prompts
from deepseek_jax.post_train.rewards import Rewards
from deepseek_jax.post_train.sample import sample_records
from deepseek_jax.post_train.sft import final_eval, prepared_rows
from deepseek_jax.post_train.rollout import Rollout, rollout
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.data import PreparedData, eos_id
from deepseek_jax.train.loop import train
from deepseek_jax.train.objectives import Pretrain, add_mtp_and_balance, batch_targets, cross_entropy
from deepseek_jax.train.run_dir import RunDir, load_run

__all__ = ["teacher_logprobs", "forward_kl", "generalized_jsd", "LogitDistill", "OnPolicyDistill", "check_vocabularies",
           "teacher_logp_rows", "distill_data", "OnPolicyRun", "run_distill"]


def teacher_logprobs(logits: jax.Array, temperature: float = 1.0, top_k: int = 0) -> jax.Array:
    """``log softmax(logits / temperature)`` over the ``top_k`` most likely tokens (0 = all); the others get
    ``-inf`` (probability 0)."""
    x = _f32(logits) / temperature
    if top_k:
        kth = jax.lax.top_k(x, top_k)[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    return jax.nn.log_softmax(x, axis=-1)


def _f32(x: jax.Array) -> jax.Array:
    """At least float32 (float64 stays: the tests run the losses in x64)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """``sum_v p (log p - log q)`` per position, with ``0 log 0 = 0`` (so a truncated ``p`` is fine)."""
    p = jnp.exp(logp)
    return jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    m = mask.astype(x.dtype)
    return jnp.sum(x * m) / jnp.maximum(m.sum(), 1.0)


def forward_kl(teacher_logp: jax.Array, student_logits: jax.Array, mask: jax.Array, temperature: float = 1.0
               ) -> jax.Array:
    """``tau^2 * sum_t m_t KL(p_T^tau || q_S^tau)_t / sum_t m_t``: ``teacher_logp [.., t, v]`` already at
    temperature tau (:func:`teacher_logprobs`), ``student_logits [.., t, v]`` raw, ``mask [.., t]``."""
    logq = jax.nn.log_softmax(_f32(student_logits) / temperature, axis=-1)
    return temperature ** 2 * _masked_mean(_kl(teacher_logp, logq), mask)


def generalized_jsd(teacher_logp: jax.Array, student_logits: jax.Array, mask: jax.Array, beta: float,
                    temperature: float = 1.0) -> jax.Array:
    """GKD's ``JSD_beta = beta KL(p_T || M) + (1 - beta) KL(q_S || M)``, ``M = beta p_T + (1 - beta) q_S``,
    masked token mean; ``beta = 0`` is the forward ``KL(p_T || q_S)`` and ``beta = 1`` the reverse
    ``KL(q_S || p_T)`` (the mixture form vanishes at both ends, so they are special-cased, as in TRL)."""
    logq = jax.nn.log_softmax(_f32(student_logits) / temperature, axis=-1)
    if beta == 0:
        per = _kl(teacher_logp, logq)
    elif beta == 1:
        per = _kl(logq, teacher_logp)
    else:
        logm = jnp.logaddexp(teacher_logp + jnp.log(beta), logq + jnp.log1p(-beta))
        per = beta * _kl(teacher_logp, logm) + (1 - beta) * _kl(logq, logm)
    return _masked_mean(per, mask)


@dataclass(frozen=True)
class LogitDistill:
    """The ``logit`` objective: ``alpha tau^2 KL(p_T^tau || q_S^tau) + (1 - alpha) CE`` on the batch's
    completion targets (``loss_mask``), with the teacher's ``teacher_logp [N, T, V]`` (at tau) in the batch;
    plus the MTP losses (``hyper["mtp_lambda"]``) and the balance loss, as in pre-training.
    Metrics: ``kd`` (the KL term), ``ce``, ``tokens``, ``mtp``, ``balance``."""

    temperature: float = 2.0
    alpha: float = 0.5
    balance_alpha: float = 1e-4

    def __call__(self, out: ModelOutput, intermediates: Any, batch: dict, hyper: dict) -> tuple[jax.Array, dict]:
        tgt, mask = batch_targets(batch, 1)
        kd = forward_kl(batch["teacher_logp"], out.logits, mask, self.temperature)
        ce, n = cross_entropy(out.logits, tgt, mask)
        loss, aux = self.alpha * kd + (1 - self.alpha) * ce, {"kd": kd, "ce": ce, "tokens": n}
        loss = add_mtp_and_balance(loss, aux, out, intermediates, batch, hyper, self.balance_alpha)
        return loss, aux


@dataclass(frozen=True)
class OnPolicyDistill:
    """The ``on_policy`` objective (GKD): ``JSD_beta(p_T^tau, q_S^tau)`` (:func:`generalized_jsd`; ``beta = 1``
    the reverse KL) over the batch's completion positions, the teacher's ``teacher_logp [N, T, V]`` (at tau)
    in the batch; plus the MTP and balance terms. Metrics: ``jsd``, ``tokens``, ``mtp``, ``balance``."""

    beta: float = 1.0
    temperature: float = 1.0
    balance_alpha: float = 1e-4

    def __call__(self, out: ModelOutput, intermediates: Any, batch: dict, hyper: dict) -> tuple[jax.Array, dict]:
        _, mask = batch_targets(batch, 1)
        jsd = generalized_jsd(batch["teacher_logp"], out.logits, mask, self.beta, self.temperature)
        aux = {"jsd": jsd, "tokens": mask.sum()}
        return add_mtp_and_balance(jsd, aux, out, intermediates, batch, hyper, self.balance_alpha), aux


def check_vocabularies(student: ModelConfig, teacher: ModelConfig, student_tok, teacher_tok, mode: str) -> None:
    """``logit`` / ``on_policy`` need one vocabulary: equal ``vocab_size`` and, where both are known, the same
    token -> id map."""
    if mode == "seq":
        return
    same = student.vocab_size == teacher.vocab_size and (
        student_tok is None or teacher_tok is None or student_tok.get_vocab() == teacher_tok.get_vocab())
    if not same:
        raise ValueError(f"distill.mode={mode!r} compares distributions token by token, so the student and the "
                         f"teacher need one vocabulary (vocab_size {student.vocab_size} vs {teacher.vocab_size}, "
                         "or different tokenizers); use distill.mode=seq, which trains on the teacher's text")


@functools.lru_cache(maxsize=8)
def _teacher_forward(cfg: ModelConfig, temperature: float, top_k: int):
    @jax.jit
    def fwd(variables, tokens, segment_ids, positions):
        out = Transformer(cfg).apply(variables, tokens, positions=positions, segment_ids=segment_ids, with_mtp=False)
        return teacher_logprobs(out.logits, temperature, top_k)

    return fwd


@functools.lru_cache(maxsize=8)
def _reverse_kl(student: ModelConfig, teacher: ModelConfig):
    @jax.jit
    def fn(s_vars, t_vars, tokens, segment_ids, positions, loss_mask):
        kw = dict(positions=positions, segment_ids=segment_ids, with_mtp=False)
        q = Transformer(student).apply(s_vars, tokens, **kw).logits
        p = teacher_logprobs(Transformer(teacher).apply(t_vars, tokens, **kw).logits)
        _, mask = batch_targets({"tokens": tokens, "segment_ids": segment_ids, "loss_mask": loss_mask}, 1)
        return generalized_jsd(p, q, mask, 1.0)

    return fn


def teacher_logp_rows(cfg: ModelConfig, variables: dict, rows: dict[str, np.ndarray], temperature: float,
                      top_k: int = 0, batch: int = 64) -> np.ndarray:
    """``[N, T, V]`` float32 teacher log-probs at ``temperature`` for packed ``rows`` (a jitted forward per
    ``batch`` rows, the MTP modules skipped)."""
    v = tree.model_variables(variables)
    fwd = _teacher_forward(cfg, temperature, top_k)
    n = len(rows["tokens"])
    parts = []
    for lo in range(0, n, batch):
        sl = {k: rows[k][lo:lo + batch] for k in ("tokens", "segment_ids", "positions")}
        short = batch - len(sl["tokens"]) if n > batch else 0
        if short:
            sl = {k: np.concatenate([a, np.zeros((short,) + a.shape[1:], a.dtype)]) for k, a in sl.items()}
        parts.append(np.asarray(fwd(v, sl["tokens"], sl["segment_ids"], sl["positions"]))[:len(sl["tokens"]) - short])
    return np.concatenate(parts)


def distill_data(cfg: ModelConfig, tcfg: TrainConfig, pcfg: PostConfig, teacher: tuple, tokenizer,
                 progress: bool = False) -> PreparedData:
    """The student's rows: the teacher's completions of the training prompts (``distill.prompts`` of them, 0 =
    ``task.sft_examples`` or the whole ``task.prompts`` file; each ``samples_per_prompt`` times at
    ``sample_temperature``, filtered by ``distill.keep``), packed like SFT data; for ``logit`` with the
    teacher's log-probs at tau (``teacher_logp``)."""
    d, t = pcfg.distill, pcfg.task
    t_cfg, t_vars = teacher
    records = training_prompts(pcfg, d.prompts or None, t.train_seed)
    rewards = Rewards.from_specs([dataclasses.asdict(r) for r in pcfg.reward]) if pcfg.reward else None
    samples = sample_records(t_cfg, t_vars, tokenizer, records, d.samples_per_prompt, pcfg.grpo.max_completion_tokens,
                             temperature=d.sample_temperature, seed=tcfg.seed, eos_id=eos_id(tokenizer),
                             rewards=rewards, keep=d.keep or None, prompts_per_call=512, progress=progress)
    if not samples:
        raise ValueError(f"distill.keep={d.keep!r} rejected every teacher sample; loosen it")
    data = prepared_rows(tcfg, pcfg, samples, tokenizer)
    data.stats.update(teacher_samples=len(samples), teacher_reward=float(np.mean([s.get("reward") or 0.0
                                                                                for s in samples])))
    if d.mode == "logit":
        for rows in (data.train, data.val):
            rows["teacher_logp"] = teacher_logp_rows(t_cfg, t_vars, rows, d.temperature, d.top_k)
    return data


class OnPolicyRun(GRPORun):
    """GKD's on-policy distillation as a rollout loop (the GRPO loop's run folder, metrics, checkpoints, resume
    and held-out evaluation). Each step ``train.batch_size`` training prompts are completed -- with probability
    ``distill.lmbda`` by the student (on-policy), else by the teacher -- at ``distill.sample_temperature``; the
    teacher scores every completion position (log-probs at tau) and one update lowers
    :class:`OnPolicyDistill`. The evaluation adds ``reverse_kl``: ``KL(q_S || p_T)`` per completion token of
    the student's samples (T = 1, a fixed seed) on the first ``eval.pass_prompts`` held-out prompts."""

    def __init__(self, run: RunDir, cfg: ModelConfig, tcfg: TrainConfig, pcfg: PostConfig, tokenizer, teacher: tuple,
                 progress: bool, on_step):
        self.t_cfg, t_vars = teacher
        self.t_vars = tree.model_variables(t_vars)
        super().__init__(run, cfg, tcfg, pcfg, tokenizer, progress, on_step)

    def _update_shape(self) -> tuple[int, int, int]:
        return self.tcfg.batch_size, 1, 1

    def _objective(self):
        d = self.pcfg.distill
        return OnPolicyDistill(d.beta, d.temperature, self.tcfg.balance_alpha)

    def _wants_ref(self) -> bool:
        return False

    def _complete(self, cfg, variables, rows: list[dict], seed: int, mesh=None, temperature: float | None = None
                  ) -> Rollout:
        """One completion per row (up to ``grpo.max_completion_tokens``), at ``distill.sample_temperature``
        unless ``temperature`` is given."""
        t = self.pcfg.distill.sample_temperature if temperature is None else temperature
        return rollout(cfg, variables, encode_prompts(self.tokenizer, rows), 1, self.tcfg.seq_len,
                       self.g.max_completion_tokens, temperature=t, seed=seed, eos_id=self.eos, mesh=mesh)

    def step(self, step: int, state) -> tuple[Any, dict]:
        d, t, seed = self.pcfg.distill, self.pcfg.task, self.tcfg.seed
        t0 = time.perf_counter()
        rows = training_prompts(self.pcfg, self.rows, [t.train_seed, 3, step])
        on = bool(np.random.default_rng([seed, 4, step]).random() < d.lmbda)
        src = (self.cfg, self._variables(state)) if on else (self.t_cfg, self.t_vars)
        ro = self._complete(*src, rows, seed * 1_000_003 + step, self._gen_mesh())
        t1 = time.perf_counter()
        batch = ro.batch()
        fwd = _teacher_forward(self.t_cfg, d.temperature, d.top_k)
        batch["teacher_logp"] = np.asarray(fwd(self.t_vars, batch["tokens"], batch["segment_ids"],
                                               batch["positions"]))
        t2 = time.perf_counter()
        state, m = self._update(state, batch)
        t3 = time.perf_counter()
        lens = np.array([len(c) for c in ro.completions])
        return state, {"step": step + 1, "kind": "train", **m, "on_policy": float(on),
                       "completion/len_mean": float(lens.mean()),
                       "completion/truncated_frac": float(1 - ro.ended.mean()),
                       "time/rollout": t1 - t0, "time/teacher": t2 - t1, "time/update": t3 - t2, "time/step": t3 - t0}

    def _eval_record(self, step: int, state) -> dict | None:
        rec = super()._eval_record(step, state) or {"step": step, "kind": "eval"}
        rows = heldout_prompts(self.pcfg)
        if rows:
            student = tree.model_variables(jax.device_get(self._variables(state)))
            ro = self._complete(self.cfg, student, rows[:self.pcfg.eval.pass_prompts], self.tcfg.seed, temperature=1.0)
            b = ro.batch()
            rec["reverse_kl"] = float(_reverse_kl(self.cfg, self.t_cfg)(student, self.t_vars, b["tokens"],
                                                                          b["segment_ids"], b["positions"],
                                                                          b["loss_mask"]))
        return rec


def run_distill(cfg: ModelConfig, tcfg: TrainConfig, pcfg: PostConfig, teacher: str, init: dict | None = None,
                progress: bool = True, on_step=None) -> dict[str, Any]:
    """Distil the ``teacher`` (run folder or Hugging Face checkpoint) into a student of config ``cfg`` in
    ``tcfg.out``, from ``init``'s variables or from scratch: ``seq`` (plain SFT on the teacher's samples),
    ``logit`` (:class:`LogitDistill`) or ``on_policy`` (:class:`OnPolicyRun`)."""
    d = pcfg.distill
    t_cfg, t_vars, t_tok = load_run(teacher)
    tokenizer = task_tokenizer(pcfg, t_tok)
    check_vocabularies(cfg, t_cfg, None, t_tok, d.mode)
    if d.mode == "on_policy":
        with RunDir(tcfg.out).open_for_writing(cfg, lock=jax.process_index() == 0) as run:
            return OnPolicyRun(run, cfg, tcfg, pcfg, tokenizer, (t_cfg, t_vars), progress, on_step).run(init)
    data = distill_data(cfg, tcfg, pcfg, (t_cfg, t_vars), tokenizer, progress)
    objective = (Pretrain(tcfg.balance_alpha) if d.mode == "seq"
                 else LogitDistill(d.temperature, d.alpha, tcfg.balance_alpha))
    summary = train(cfg, tcfg.replace(sample_tokens=0), progress=progress, on_step=on_step, objective=objective,
                    data=data, init=init)
    return final_eval(cfg, tcfg, pcfg, summary, tokenizer)
