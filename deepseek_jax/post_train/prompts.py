"""Where post-training prompts come from (post-training.md §3): the built-in task's generator (``task.name:
addition``) or JSONL files of prompts plus columns (``task.prompts`` for training, ``eval.prompts`` held out).

A prompt row is ``{"prompt": str, **columns}``; the columns (an ``answer``, a ``hard`` flag, ...) reach the
reward functions by name, and a boolean ``hard`` column splits the held-out scores into on / off the subset.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from deepseek_jax.post_train.config import PostConfig
from deepseek_jax.post_train.tasks import addition

__all__ = ["read_records", "training_prompts", "heldout_prompts", "task_tokenizer", "encode_prompts"]


def read_records(path: str | Path, fields: Sequence[str], what: str) -> list[dict]:
    """The records of a JSONL file, each with a string value for every name in ``fields`` (other columns kept);
    a line that is not JSON or lacks a field is an error naming the file, the line and ``what`` names it."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what}: no file at {str(path)!r}")
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: not JSON ({e.msg})") from None
        for f in fields:
            if not isinstance(rec.get(f), str):
                raise ValueError(f"{p}:{n}: the record has no string field {f!r} ({what})")
        out.append(rec)
    if not out:
        raise ValueError(f"{p}: no records ({what})")
    return out


def _file_prompts(path: str, field: str, what: str) -> list[dict]:
    rows = read_records(path, [field], what)
    return rows if field == "prompt" else [{**r, "prompt": r[field]} for r in rows]


def training_prompts(pcfg: PostConfig, n: int | None, seed) -> list[dict]:
    """``n`` training prompts drawn with ``seed`` (an int or a sequence of ints): the task's generator, or
    ``task.prompts`` (without replacement while ``n`` does not exceed the file; ``n=None``: the whole file)."""
    t = pcfg.task
    if t.name == "addition":
        return addition.prompt_rows(t.sft_examples if n is None else n, seed, t.digits)
    if not t.prompts:
        raise ValueError("no prompts: set task.name (addition) or task.prompts (a JSONL of {prompt, ...columns})")
    rows = _file_prompts(t.prompts, t.prompt_field, "task.prompts")
    if n is None:
        return rows
    pick = np.random.default_rng(seed).choice(len(rows), n, replace=n > len(rows))
    return [rows[i] for i in pick]


def heldout_prompts(pcfg: PostConfig) -> list[dict] | None:
    """The held-out prompts: ``eval.prompts`` (a JSONL), else the task's ``task.eval_prompts`` problems from
    ``task.eval_seed``; None when there are none (no evaluation)."""
    t = pcfg.task
    if pcfg.eval.prompts:
        return _file_prompts(pcfg.eval.prompts, t.prompt_field, "eval.prompts")
    if t.name == "addition":
        return addition.prompt_rows(t.eval_prompts, t.eval_seed, t.digits)
    return None


def task_tokenizer(pcfg: PostConfig, tokenizer=None):
    """``tokenizer`` (usually the initial run's), else the built-in task's own; an error when neither exists."""
    if tokenizer is not None:
        return tokenizer
    if pcfg.task.name == "addition":
        return addition.tokenizer()
    raise ValueError("no tokenizer: start from a run folder or checkpoint that has a tokenizer.json (--init), or "
                     "use a built-in task (task.name)")


def encode_prompts(tokenizer, rows: Sequence[dict]) -> list[list[int]]:
    """The prompts' token ids (no special tokens added); an empty prompt is an error naming it."""
    ids = [list(e.ids) for e in tokenizer.encode_batch([r["prompt"] for r in rows], add_special_tokens=False)]
    for r, i in zip(rows, ids):
        if not i:
            raise ValueError(f"the prompt {r['prompt']!r} encodes to no tokens")
    return ids
