"""Needle-in-a-haystack evaluation and perplexity by position (long-context.md §5).

A grid of lengths x depths, ``samples`` needles per cell from :func:`deepseek_jax.train.synthetic.make_sample`
(cell ``(length i, depth j)`` draws from ``default_rng([seed, i, j])``: the same seed gives the same grid).
Scoring, deterministic:

* ``argmax``: one teacher-forced forward of the whole sample; the answer is right where the argmax at every
  answer position is the answer token.
* ``generate``: greedy decoding of the answer from the prompt (everything before it) through ``generate``'s
  KV cache (the latent cache for MLA).

Per sample, ``exact`` (the whole answer) and ``partial`` (the share of the answer's value groups that are
right: RULER's ``string_match_all``); per cell, their means and the Wilson 95% interval of ``exact``. Every
sample of one length has one shape, so a grid compiles one program per length.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.analysis.params import model_info
from deepseek_jax.config import ModelConfig, YarnConfig
from deepseek_jax.config_io import plain
from deepseek_jax.infer.cache import cache_bytes_per_token, init_cache
from deepseek_jax.infer.engine import generate
from deepseek_jax.nn import tree
from deepseek_jax.nn.transformer import Transformer
from deepseek_jax.train.synthetic import TASKS, NeedleSample, make_sample

__all__ = ["wilson", "parse_depths", "with_yarn", "variables_hash", "grid_samples", "score_argmax",
           "score_generate", "answer_nll", "niah_eval", "write_niah", "plot_niah", "document_windows",
           "perplexity_by_position"]

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``k`` successes in ``n`` trials (95% by default)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def parse_depths(text: str) -> list[float]:
    """``"0:100:11"`` (start:stop:count, both ends included) or ``"0,50,100"`` -> percentages."""
    if ":" in text:
        a, b, n = text.split(":")
        return [float(x) for x in np.linspace(float(a), float(b), int(n))]
    return [float(x) for x in text.split(",")]


def with_yarn(cfg: ModelConfig, factor: float, original: int) -> ModelConfig:
    """``cfg`` with YaRN (``factor`` s over ``original`` positions; the other YaRN settings kept when the
    model already has them) and ``max_position_embeddings`` raised to ``s * original`` when that is larger."""
    old = cfg.rope.yarn
    yarn = (dataclasses.replace(old, factor=factor, original_max_position_embeddings=original) if old
            else YarnConfig(factor=factor, original_max_position_embeddings=original))
    return dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, yarn=yarn),
                               max_position_embeddings=max(cfg.max_position_embeddings, int(factor * original)))


def variables_hash(variables: dict) -> str:
    """SHA-256 of the model's arrays (collection and path order fixed): which weights were evaluated."""
    h = hashlib.sha256()
    for path, x in sorted(jax.tree_util.tree_flatten_with_path(
            tree.model_variables(variables))[0], key=lambda pv: str(pv[0])):
        a = np.asarray(x)
        h.update(str(path).encode() + str(a.dtype).encode() + a.tobytes())
    return h.hexdigest()


def grid_samples(task: str, lengths: Sequence[int], depths: Sequence[float], samples: int, seed: int,
                 filler_words: int) -> dict[tuple[int, int], list[NeedleSample]]:
    """``{(length index, depth index): samples}``, cell ``(i, j)`` drawn from ``default_rng([seed, i, j])``."""
    return {(i, j): [make_sample(task, L, d, rng, filler_words) for _ in range(samples)]
            for i, L in enumerate(lengths) for j, d in enumerate(depths)
            for rng in [np.random.default_rng([seed, i, j])]}


def _judge(pred: np.ndarray, s: NeedleSample) -> tuple[float, float]:
    want = s.tokens[s.answer_start:s.answer_start + s.answer_len]
    ok = pred[:s.answer_len] == want
    groups = [bool(ok[o:o + n].all()) for o, n in s.groups]
    return float(ok.all()), float(np.mean(groups))


def _forward(cfg: ModelConfig):
    @jax.jit
    def fwd(variables, tokens):
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        out = Transformer(cfg).apply(variables, tokens, positions=pos, segment_ids=jnp.ones_like(tokens),
                                     with_mtp=False)
        return jnp.argmax(out.logits, axis=-1).astype(jnp.int32), jax.nn.log_softmax(
            out.logits.astype(jnp.float32), axis=-1)

    return fwd


def _batches(rows: np.ndarray, batch: int):
    """``rows`` in chunks of exactly ``batch`` (the last padded with copies of its first row): ``(chunk, n)``."""
    for lo in range(0, len(rows), batch):
        part = rows[lo:lo + batch]
        n = len(part)
        if n < batch:
            part = np.concatenate([part, np.repeat(part[:1], batch - n, 0)])
        yield part, n


def score_argmax(cfg: ModelConfig, variables: dict, samples: Sequence[NeedleSample], batch: int = 16
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(exact [N], partial [N])`` of teacher-forced argmax scoring (samples of one length)."""
    fwd = _forward(cfg)
    v = tree.model_variables(variables)
    rows = np.stack([s.tokens for s in samples])
    preds = []
    for chunk, n in _batches(rows, batch):
        preds.append(np.asarray(fwd(v, chunk)[0])[:n])
    pred = np.concatenate(preds)
    # the prediction at position t is the token t + 1
    scores = [_judge(pred[i, s.answer_start - 1:], s) for i, s in enumerate(samples)]
    return np.array([e for e, _ in scores]), np.array([p for _, p in scores])


def answer_nll(cfg: ModelConfig, variables: dict, samples: Sequence[NeedleSample], batch: int = 16) -> np.ndarray:
    """``[N]`` mean negative log-likelihood (nats per token) of each sample's answer, teacher-forced (samples of
    one length): the perplexity of the retrieved tokens, for models trained with the loss on the answer only,
    whose haystack tokens carry no meaningful likelihood."""
    fwd = _forward(cfg)
    v = tree.model_variables(variables)
    rows = np.stack([s.tokens for s in samples])
    logps = [np.asarray(fwd(v, chunk)[1])[:n] for chunk, n in _batches(rows, batch)]
    logp = np.concatenate(logps)
    return np.array([-logp[i, np.arange(s.answer_start - 1, s.answer_start + s.answer_len - 1),
                           s.tokens[s.answer_start:s.answer_start + s.answer_len]].mean() for i, s in enumerate(samples)])


def score_generate(cfg: ModelConfig, variables: dict, samples: Sequence[NeedleSample], batch: int = 16
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(exact [N], partial [N])`` of greedy decoding through the KV cache (samples of one length)."""
    out = []
    for lo in range(0, len(samples), batch):
        part = samples[lo:lo + batch]
        gen = generate(cfg, variables, [s.tokens[:s.answer_start].tolist() for s in part], part[0].answer_len)
        out += [_judge(np.array(g + [-1] * (s.answer_len - len(g))), s) for g, s in zip(gen, part)]
    return np.array([e for e, _ in out]), np.array([p for _, p in out])


def _cache_report(cfg: ModelConfig, lengths: Sequence[int]) -> dict[str, Any]:
    """Cache bytes per token measured from a real (zero) cache at each length, beside the formula's."""
    info = model_info(cfg)
    formula = info["kv_cache_bytes_per_token"] * jnp.dtype(cfg.dtype).itemsize / 2  # the formula counts bf16
    return {"formula_bytes_per_token": formula,
            "measured_bytes_per_token": {str(L): cache_bytes_per_token(init_cache(cfg, 1, L)) for L in lengths}}


def niah_eval(cfg: ModelConfig, variables: dict, *, task: str = "kv", lengths: Sequence[int] = (256,),
              depths: Sequence[float] = (0.0, 50.0, 100.0), samples: int = 20, seed: int = 0,
              scoring: str = "argmax", batch: int = 16, filler_words: int = 64, train_length: int | None = None,
              progress: bool = False) -> dict[str, Any]:
    """The grid's scores: ``{"settings", "cells": [{length, depth, n, exact, partial, exact_lo, exact_hi}],
    "by_length": {length: mean exact}, "kv_cache", "seconds"}`` (see the module docstring)."""
    if task not in TASKS:
        raise ValueError(f"--task {task!r} must be one of {TASKS}")
    if scoring not in ("argmax", "generate"):
        raise ValueError(f"--scoring {scoring!r} must be argmax or generate")
    too_long = [L for L in lengths if L > cfg.max_position_embeddings]
    if too_long:
        raise ValueError(f"lengths {too_long} exceed the model's max_position_embeddings={cfg.max_position_embeddings};"
                         " extend the context with --yarn-factor/--yarn-original (or raise max_position_embeddings "
                         "to extrapolate RoPE without YaRN)")
    grid = grid_samples(task, lengths, depths, samples, seed, filler_words)
    score = score_argmax if scoring == "argmax" else score_generate
    bar = _bar(progress, len(lengths))
    cells, t0 = [], time.perf_counter()
    for i, L in enumerate(lengths):
        flat = [s for j in range(len(depths)) for s in grid[i, j]]
        exact, partial = score(cfg, variables, flat, batch)
        for j, d in enumerate(depths):
            e, p = exact[j * samples:(j + 1) * samples], partial[j * samples:(j + 1) * samples]
            lo, hi = wilson(int(e.sum()), samples)
            cells.append({"length": int(L), "depth": float(d), "n": samples, "exact": float(e.mean()),
                          "partial": float(p.mean()), "exact_lo": lo, "exact_hi": hi})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    by_length = {str(L): float(np.mean([c["exact"] for c in cells if c["length"] == L])) for L in lengths}
    rope = cfg.rope
    settings = {"task": task, "lengths": [int(x) for x in lengths], "depths": [float(d) for d in depths],
                "samples": samples, "seed": seed, "scoring": scoring, "filler_words": filler_words,
                "train_length": train_length, "rope_theta": rope.theta,
                "yarn": dataclasses.asdict(rope.yarn) if rope.yarn else None, "attention": cfg.attention.kind,
                "sparse": plain(dataclasses.asdict(cfg.attention.sparse)) if cfg.attention.sparse else None,
                "max_position_embeddings": cfg.max_position_embeddings, "checkpoint_sha256": variables_hash(variables)}
    return {"settings": settings, "cells": cells, "by_length": by_length, "kv_cache": _cache_report(cfg, lengths),
            "seconds": round(time.perf_counter() - t0, 2)}


def write_niah(result: dict[str, Any], out: str | Path, plot: bool = True) -> list[Path]:
    """``niah.json`` (sorted keys; the timing kept out, so the same seed gives the same bytes) and, with
    ``plot``, ``niah.png``."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in result.items() if k != "seconds"}
    paths = [d / "niah.json"]
    paths[0].write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
    if plot:
        paths.append(plot_niah(result, d / "niah.png"))
    return paths


def plot_niah(result: dict[str, Any], path: str | Path | None = None, ax=None, title: str | None = None):
    """The length x depth heatmap of exact match (annotated cells, a dashed line at the training length), on
    ``ax`` or, without one, on a new figure saved to ``path`` (pyplot's state untouched). Returns ``path``."""
    from matplotlib.figure import Figure

    s = result["settings"]
    grid = np.zeros((len(s["depths"]), len(s["lengths"])))
    for c in result["cells"]:
        grid[s["depths"].index(c["depth"]), s["lengths"].index(c["length"])] = c["exact"]
    fig = None
    if ax is None:
        fig = Figure(figsize=(1.2 * len(s["lengths"]) + 2, 0.4 * len(s["depths"]) + 1.5))
        ax = fig.subplots()
    ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(s["lengths"])), s["lengths"])
    ax.set_yticks(range(len(s["depths"])), [f"{d:g}" for d in s["depths"]])
    ax.set_xlabel("context length (tokens)"), ax.set_ylabel("needle depth (%)")
    for (r, c), v in np.ndenumerate(grid):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7)
    if s.get("train_length") in s["lengths"]:
        ax.axvline(s["lengths"].index(s["train_length"]) + 0.5, color="k", ls="--", lw=1)
    ax.set_title(title or f"{s['task']} ({s['scoring']})")
    if fig is not None:
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    return Path(path) if path is not None else None


def document_windows(docs: Sequence[Sequence[int]], length: int, max_rows: int = 64) -> np.ndarray:
    """Up to ``max_rows`` windows ``[n, length]`` int32: the first ``length`` tokens of each document that has
    that many (held-out text for :func:`perplexity_by_position`); an error when no document is long enough."""
    rows = [np.asarray(d[:length], np.int32) for d in docs if len(d) >= length][:max_rows]
    if not rows:
        raise ValueError(f"no held-out document has {length} tokens; give longer documents or shorter --lengths")
    return np.stack(rows)


def perplexity_by_position(cfg: ModelConfig, variables: dict, rows: np.ndarray, bins: int = 8, batch: int = 8
                           ) -> dict[str, Any]:
    """Mean next-token NLL and perplexity per position bin over ``rows [N, L]`` (whole windows of held-out
    text): ``{"length", "bins": [{"start", "end", "nll", "ppl"}], "nll"}``."""
    fwd = _forward(cfg)
    v = tree.model_variables(variables)
    n, L = rows.shape
    total = np.zeros(L - 1)
    for chunk, m in _batches(rows, batch):
        logp = np.asarray(fwd(v, chunk)[1])[:m, :-1]
        total += -np.take_along_axis(logp, chunk[:m, 1:, None], -1)[..., 0].sum(0)
    nll = total / n
    edges = np.linspace(0, L - 1, bins + 1).astype(int)
    out = [{"start": int(a), "end": int(b), "nll": float(nll[a:b].mean()), "ppl": float(np.exp(nll[a:b].mean()))}
           for a, b in zip(edges, edges[1:]) if b > a]
    return {"length": int(L), "bins": out, "nll": float(nll.mean())}


def _bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="niah", unit="length", dynamic_ncols=True)
