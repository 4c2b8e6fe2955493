"""Held-out evaluation of a verifiable task (post-training.md §5): greedy exact match on and off the hard
subset S, and pass@k from ``n`` samples at temperature 1 with the unbiased estimator (Chen et al. 2021)::

    pass@k = E_prompts[ 1 - C(n - c, k) / C(n, k) ]      c = correct samples out of n
"""

from __future__ import annotations

from math import comb
from typing import Any, Sequence

import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.infer.engine import generate
from deepseek_jax.post_train.config import EvalConfig, TaskConfig
from deepseek_jax.post_train.tasks import addition

__all__ = ["pass_at_k", "task_prompts", "evaluate_task"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one prompt with ``c`` correct out of ``n`` samples (``k <= n``)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def task_prompts(task: TaskConfig, n: int | None = None, seed: int | None = None) -> list[dict]:
    """Problems ``{"prompt", "answer", "hard"}`` of the task (``n`` of them from ``seed``; default the held-out
    set ``task.eval_prompts`` from ``task.eval_seed``)."""
    if task.name != "addition":
        raise ValueError("evaluation needs a built-in task (task.name: addition)")
    return addition.prompt_rows(task.eval_prompts if n is None else n, task.eval_seed if seed is None else seed,
                                task.digits)


def _scores(rows: Sequence[dict], gen) -> np.ndarray:
    texts = [addition.decode(t) for t in gen.tokens]
    return np.asarray(addition.exact_match([r["prompt"] for r in rows], texts, gen.tokens,
                                           answer=[r["answer"] for r in rows]))


def evaluate_task(cfg: ModelConfig, variables: dict, task: TaskConfig, ev: EvalConfig, max_new_tokens: int,
                  seed: int = 0, mesh=None) -> dict[str, Any]:
    """``em``, ``em_hard`` (on S), ``em_easy`` (off S) of greedy decoding over the held-out prompts; with
    ``pass_k``, ``pass@k`` / ``pass@k_hard`` / ``pass@k_easy`` from ``ev.samples`` samples at T = 1 on the first
    ``ev.pass_prompts`` prompts; ``samples``: the first ``ev.show`` (prompt, completion, reward) rows."""
    rows = task_prompts(task)
    ids = [addition.encode(r["prompt"]) for r in rows]
    hard = np.array([r["hard"] for r in rows])
    gen = generate(cfg, variables, ids, max_new_tokens, eos_id=addition.EOS_ID, details=True, mesh=mesh)
    ok = _scores(rows, gen)
    out: dict[str, Any] = {"em": float(ok.mean()), "em_hard": float(ok[hard].mean()) if hard.any() else None,
                           "em_easy": float(ok[~hard].mean()) if (~hard).any() else None,
                           "samples": [{"prompt": r["prompt"], "completion": addition.decode(t), "reward": float(s)}
                                       for r, t, s in list(zip(rows, gen.tokens, ok))[:ev.show]]}
    if ev.pass_k:
        m = min(ev.pass_prompts, len(rows))
        rep = [r for r in rows[:m] for _ in range(ev.samples)]
        sgen = generate(cfg, variables, [i for i in ids[:m] for _ in range(ev.samples)], max_new_tokens,
                        temperature=1.0, seed=seed, eos_id=addition.EOS_ID, details=True, mesh=mesh)
        correct = _scores(rep, sgen).reshape(m, ev.samples).sum(1).astype(int)
        for k in ev.pass_k:
            per = np.array([pass_at_k(ev.samples, int(c), k) for c in correct])
            out[f"pass@{k}"] = float(per.mean())
            for name, sel in (("hard", hard[:m]), ("easy", ~hard[:m])):
                out[f"pass@{k}_{name}"] = float(per[sel].mean()) if sel.any() else None
    return out
