"""Held-out evaluation (post-training.md §5), judged by the reward functions: greedy reward and exact match (a
completion is right when its reward passes ``eval.correct``), on and off the hard subset S when the prompts
carry a boolean ``hard`` column; from ``n`` samples per prompt at temperature 1, pass@k with the unbiased
estimator (Chen et al. 2021) and maj@k (the most frequent of the first k completions, ties to the earliest)::

    pass@k = E_prompts[ 1 - C(n - c, k) / C(n, k) ]      c = correct samples out of n
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from math import comb
from typing import Any, Sequence

import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.infer.engine import generate
from deepseek_jax.post_train.config import PostConfig
from deepseek_jax.post_train.prompts import encode_prompts, heldout_prompts, task_tokenizer
from deepseek_jax.post_train.rewards import Rewards, parse_keep
from deepseek_jax.train.data import eos_id

__all__ = ["pass_at_k", "majority_correct", "evaluate_task"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one prompt with ``c`` correct out of ``n`` samples (``k <= n``)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_correct(texts: Sequence[str], correct: Sequence[bool]) -> bool:
    """maj@k of one prompt: is the most frequent completion text right? (Ties go to the one seen first.)"""
    counts = Counter(texts)
    top = max(counts.values())
    first = next(i for i, t in enumerate(texts) if counts[t] == top)
    return bool(correct[first])


def _judge(rows: Sequence[dict], gen, tokenizer, eos: int, rewards: Rewards) -> tuple[list[str], np.ndarray]:
    texts = [tokenizer.decode([t for t in g if t != eos]) for g in gen.tokens]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    r, _ = rewards([r["prompt"] for r in rows], texts, gen.tokens, **columns)
    return texts, r


def _split(out: dict, name: str, per: np.ndarray, hard: np.ndarray | None) -> None:
    out[name] = float(np.mean(per))
    if hard is not None:
        for part, sel in (("hard", hard), ("easy", ~hard)):
            out[f"{name}_{part}"] = float(np.mean(per[sel])) if sel.any() else None


def evaluate_task(cfg: ModelConfig, variables: dict, pcfg: PostConfig, max_new_tokens: int, tokenizer=None,
                  seed: int = 0, mesh=None) -> dict[str, Any] | None:
    """The held-out evaluation (None without held-out prompts or rewards): ``reward`` (greedy mean), ``em``
    (share right), with a ``hard`` column ``em_hard`` / ``em_easy`` (and the same split of the sampled
    scores); with ``eval.pass_k``, ``pass@k`` and ``maj@k`` from ``eval.samples`` samples at T = 1 on the first
    ``eval.pass_prompts`` prompts; ``samples``: the first ``eval.show`` (prompt, completion, reward) rows."""
    rows, ev = heldout_prompts(pcfg), pcfg.eval
    if not rows or not pcfg.reward:
        return None
    tok = task_tokenizer(pcfg, tokenizer)
    eos, ok_fn = eos_id(tok), parse_keep(ev.correct, "eval.correct")
    rewards = Rewards.from_specs([dataclasses.asdict(r) for r in pcfg.reward])
    ids = encode_prompts(tok, rows)
    hard = np.array([bool(r["hard"]) for r in rows]) if all(isinstance(r.get("hard"), bool) for r in rows) else None
    gen = generate(cfg, variables, ids, max_new_tokens, eos_id=eos, details=True, mesh=mesh)
    texts, r = _judge(rows, gen, tok, eos, rewards)
    ok = np.array([not np.isnan(x) and ok_fn(x) for x in r])
    out: dict[str, Any] = {"reward": float(np.nanmean(r)) if not np.isnan(r).all() else None}
    _split(out, "em", ok, hard)
    out["samples"] = [{"prompt": q["prompt"], "completion": t, "reward": None if np.isnan(x) else float(x)}
                      for q, t, x in list(zip(rows, texts, r))[:ev.show]]
    if ev.pass_k:
        m, n = min(ev.pass_prompts, len(rows)), ev.samples
        rep = [q for q in rows[:m] for _ in range(n)]
        sgen = generate(cfg, variables, [i for i in ids[:m] for _ in range(n)], max_new_tokens, temperature=1.0,
                        seed=seed, eos_id=eos, details=True, mesh=mesh)
        stexts, sr = _judge(rep, sgen, tok, eos, rewards)
        right = np.array([not np.isnan(x) and ok_fn(x) for x in sr]).reshape(m, n)
        sub = None if hard is None else hard[:m]
        for k in ev.pass_k:
            _split(out, f"pass@{k}", np.array([pass_at_k(n, int(c), k) for c in right.sum(1)]), sub)
            if k > 1:
                maj = [majority_correct(stexts[i * n:i * n + k], right[i, :k]) for i in range(m)]
                _split(out, f"maj@{k}", np.array(maj, float), sub)
    return out
