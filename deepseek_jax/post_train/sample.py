"""``deepseek-jax sample``: ``n`` completions per prompt through the jitted cached ``generate``, scored by the
reward plug-ins and optionally filtered -- rejection sampling (R1 step 3: keep the verified samples, then
``sft`` on them) and the data source of sequence-level distillation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.infer.engine import generate
from deepseek_jax.post_train.rewards import Rewards, parse_keep

__all__ = ["parse_keep", "sample_records", "write_jsonl"]


def sample_records(cfg: ModelConfig, variables: dict, tokenizer, records: Sequence[dict], n: int, max_new_tokens: int,
                   *, temperature: float = 1.0, seed: int = 0, eos_id: int, rewards: Rewards | None = None,
                   keep: str | None = None, prompts_per_call: int = 64, progress: bool = False) -> list[dict]:
    """For each record (``prompt`` plus columns such as ``answer``), ``n`` completions: records ``{prompt,
    completion, reward, ended, ...columns}`` (``reward`` only with ``rewards``), the ones ``keep`` rejects
    dropped. ``prompts_per_call`` prompts (x ``n`` rows) per ``generate`` call; ``seed + call index`` seeds
    each call."""
    pred = parse_keep(keep)
    if pred is not None and rewards is None:
        raise ValueError("--keep filters on the reward: give --reward (or a reward: list in the config)")
    out: list[dict] = []
    bar = _bar(progress, len(records))
    for c, lo in enumerate(range(0, len(records), prompts_per_call)):
        chunk = [r for r in records[lo:lo + prompts_per_call] for _ in range(n)]
        ids = [tokenizer.encode(r["prompt"], add_special_tokens=False).ids for r in chunk]
        gen = generate(cfg, variables, ids, max_new_tokens, temperature=temperature, seed=seed + c, eos_id=eos_id,
                       details=True)
        texts = [tokenizer.decode([t for t in g if t != eos_id]) for g in gen.tokens]
        rows = [{**r, "completion": t, "ended": e} for r, t, e in zip(chunk, texts, gen.ended)]
        if rewards is not None:
            columns = {k: [r[k] for r in chunk] for k in chunk[0] if k != "prompt"}
            scores, _ = rewards([r["prompt"] for r in chunk], texts, gen.tokens, **columns)
            for row, s in zip(rows, scores):
                row["reward"] = None if np.isnan(s) else float(s)
        out.extend(r for r in rows if pred is None or (r.get("reward") is not None and pred(r["reward"])))
        if bar is not None:
            bar.update(len(chunk) // n)
    if bar is not None:
        bar.close()
    return out


def write_jsonl(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One JSON object per line, written to a temporary file renamed over ``path`` (never half a file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(p)
    return p


def _bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sample", unit="prompt", dynamic_ncols=True)
