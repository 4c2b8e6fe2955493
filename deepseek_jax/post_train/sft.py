"""Supervised fine-tuning (post-training.md §1): prompt/completion samples packed into rows with a per-token
``loss_mask``, trained by the pre-training loop (:func:`deepseek_jax.train.loop.train`) whose objective ANDs
the mask into its targets (:func:`deepseek_jax.train.objectives.batch_targets`)::

    L = sum_t m_t CE_t / sum_t m_t,    m = completion tokens and the EOS (``loss_on: completion``)

A sample is ``prompt + completion + EOS``. Packed rows hold several samples, each its own segment (attention,
positions and targets never cross), so packed and unpacked training give the same per-sample loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.post_train.config import PostConfig
from deepseek_jax.post_train.evaluate import evaluate_task
from deepseek_jax.post_train.prompts import read_records
from deepseek_jax.post_train.tasks import addition
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.data import PreparedData, eos_id
from deepseek_jax.train.hooks import log
from deepseek_jax.train.loop import train
from deepseek_jax.train.run_dir import RunDir, load_run

__all__ = ["read_pairs", "encode_pairs", "pack_samples", "sft_data", "prepared_rows", "run_sft", "final_eval"]


def read_pairs(path: str | Path, prompt_field: str = "prompt", completion_field: str = "completion") -> list[dict]:
    """The records of a JSONL file that have string ``prompt_field`` and ``completion_field`` (other columns
    kept); a line that is not JSON or lacks a field is an error naming the file and line."""
    return read_records(path, (prompt_field, completion_field), "sft.data; sft.prompt_field and "
                        "sft.completion_field name the fields")


def encode_pairs(tokenizer, records: Sequence[dict], eos: int, prompt_field: str = "prompt",
                 completion_field: str = "completion") -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, completion ids + [eos])`` per record."""
    prompts = tokenizer.encode_batch([r[prompt_field] for r in records], add_special_tokens=False)
    comps = tokenizer.encode_batch([r[completion_field] for r in records], add_special_tokens=False)
    return [(list(p.ids), list(c.ids) + [eos]) for p, c in zip(prompts, comps)]


def pack_samples(samples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int, packing: bool = True,
                 loss_on: str = "completion") -> dict[str, np.ndarray]:
    """Rows ``{"tokens", "segment_ids", "positions", "loss_mask"}`` ``[n, seq_len]`` int32 from ``(prompt,
    completion)`` id lists: each sample is one segment (ids 1, 2, ... within a row; 0 = padding) with
    positions from 0; ``loss_mask`` is 1 on the completion (all of the sample with ``loss_on="all"``).
    ``packing``: samples go into the current row while they fit (in order), else one sample per row. A
    sample longer than ``seq_len`` is an error naming it."""
    rows: list[list[tuple[list[int], list[int]]]] = []
    used = seq_len
    for i, (p, c) in enumerate(samples):
        n = len(p) + len(c)
        if n > seq_len:
            raise ValueError(f"SFT sample {i} has {n} tokens, more than train.seq_len={seq_len}; raise seq_len or "
                             "shorten the sample")
        if not packing or used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((list(p), list(c)))
        used += n
    out = {k: np.zeros((len(rows), seq_len), np.int32) for k in ("tokens", "segment_ids", "positions", "loss_mask")}
    for r, row in enumerate(rows):
        at = 0
        for s, (p, c) in enumerate(row, 1):
            n = len(p) + len(c)
            sl = slice(at, at + n)
            out["tokens"][r, sl] = p + c
            out["segment_ids"][r, sl] = s
            out["positions"][r, sl] = np.arange(n)
            out["loss_mask"][r, sl] = [loss_on == "all"] * len(p) + [1] * len(c)
            at += n
    return out


def sft_data(tcfg: TrainConfig, pcfg: PostConfig, tokenizer=None) -> PreparedData:
    """The SFT rows: ``sft.data`` (JSONL, with ``tokenizer``) or the ``task:``'s demonstrations (with its
    own tokenizer), split into train / validation samples (seeded) and packed."""
    if pcfg.sft.data:
        if tokenizer is None:
            raise ValueError("sft.data needs a tokenizer: start from a run folder or checkpoint that has a "
                             "tokenizer.json (--init)")
        records = read_pairs(pcfg.sft.data, pcfg.sft.prompt_field, pcfg.sft.completion_field)
        fields = (pcfg.sft.prompt_field, pcfg.sft.completion_field)
    elif pcfg.task.name == "addition":
        tokenizer = addition.tokenizer()
        t = pcfg.task
        records, fields = addition.sft_rows(t.sft_examples, t.train_seed, t.digits, t.q), ("prompt", "completion")
    else:
        raise ValueError("SFT needs data: set sft.data (a JSONL of prompt/completion records) or task.name")
    return prepared_rows(tcfg, pcfg, records, tokenizer, fields)


def prepared_rows(tcfg: TrainConfig, pcfg: PostConfig, records: Sequence[dict], tokenizer,
                  fields: tuple[str, str] = ("prompt", "completion")) -> PreparedData:
    """Prompt/completion ``records`` encoded, split into train / validation samples (seeded, ``sft.val_fraction``)
    and packed (``sft.packing``, ``sft.loss_on``) at ``train.seq_len``."""
    eos = eos_id(tokenizer)
    samples = encode_pairs(tokenizer, records, eos, *fields)
    order = np.random.default_rng(tcfg.seed).permutation(len(samples))
    n_val = max(1, round(pcfg.sft.val_fraction * len(samples)))
    if len(samples) - n_val < 1:
        raise ValueError(f"{len(samples)} SFT samples leave none for training after the validation share")
    pick = lambda idx: [samples[i] for i in sorted(idx)]  # noqa: E731
    pack = lambda s: pack_samples(s, tcfg.seq_len, pcfg.sft.packing, pcfg.sft.loss_on)  # noqa: E731
    train_rows, val_rows = pack(pick(order[n_val:])), pack(pick(order[:n_val]))
    stats: dict[str, Any] = {"samples": len(samples), "train_rows": len(train_rows["tokens"]),
                             "val_rows": len(val_rows["tokens"]), "unigram_entropy": float("nan"),
                             "completion_tokens": int(train_rows["loss_mask"].sum())}
    return PreparedData(train=train_rows, val=val_rows, tokenizer=tokenizer, eos_id=eos, stats=stats)


def run_sft(cfg: ModelConfig, tcfg: TrainConfig, pcfg: PostConfig, init: dict | None = None, tokenizer=None,
            progress: bool = True, on_step=None) -> dict[str, Any]:
    """SFT as a training run in ``tcfg.out`` (checkpoints, metrics, resume as pre-training), from ``init``'s
    variables (a run folder's or a Hugging Face checkpoint's) or from scratch; the MTP loss stays on (so
    speculative decoding keeps working). Returns the loop's summary."""
    data = sft_data(tcfg, pcfg, tokenizer)
    if data.tokenizer.get_vocab_size() > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {data.tokenizer.get_vocab_size()} entries but the model's "
                         f"vocab_size is {cfg.vocab_size}")
    # the end-of-run text sample of pre-training is replaced by the task's evaluation
    summary = train(cfg, tcfg.replace(sample_tokens=0), progress=progress, on_step=on_step, data=data, init=init)
    return final_eval(cfg, tcfg, pcfg, summary)


def final_eval(cfg: ModelConfig, tcfg: TrainConfig, pcfg: PostConfig, summary: dict, tokenizer=None) -> dict:
    """With held-out prompts and a finished run: the held-out evaluation of the run's final checkpoint, logged,
    appended to ``metrics.jsonl`` (``kind: eval``) and put in the summary."""
    if summary.get("step", 0) < tcfg.steps or "stopped_by" in summary:
        return summary
    _, variables, tok = load_run(tcfg.out)
    e = evaluate_task(cfg, variables, pcfg, pcfg.grpo.max_completion_tokens, tokenizer=tok or tokenizer,
                      seed=tcfg.seed)
    if e is None:
        return summary
    rec = {"step": summary["step"], "kind": "eval", **{k: v for k, v in e.items() if k != "samples"}}
    if jax.process_index() == 0:
        RunDir(tcfg.out).append_metrics(rec)
    log(f"held-out greedy exact match {e['em']:.3f}" + (f" (hard subset {e['em_hard']:.3f}, the rest "
                                                       f"{e['em_easy']:.3f})" if e.get("em_hard") is not None else ""))
    return {**summary, "eval": rec}
