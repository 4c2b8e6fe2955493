"""Rollouts (post-training.md §4): ``G`` completions per prompt from one ``generate`` call, laid out as a
training batch of fixed width, so the update step compiles once.

Row ``i`` = ``prompt + completion`` (the completion ends with EOS where it ended), right-padded to ``width``:
``segment_ids`` 1 on real tokens and 0 on padding, ``positions`` 0.., ``loss_mask`` 1 on the completion
tokens (EOS included; the whole row 0 where a truncated completion is masked out), and ``sample_logp`` the
sampler's log-probability of each completion token at the position that predicts it (position ``j`` holds
``log p(token j + 1)``, the layout of :func:`~deepseek_jax.post_train.logprobs.per_token_logps`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.infer.engine import generate

__all__ = ["Rollout", "rollout", "layout"]


@dataclass
class Rollout:
    """``N = len(prompts) * G`` rows (groups contiguous). Arrays ``[N, width]`` int32 unless noted."""

    tokens: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    loss_mask: np.ndarray
    sample_logp: np.ndarray  # float32, aligned like per_token_logps
    completions: list[list[int]]  # the completion ids (EOS included where ended)
    ended: np.ndarray  # [N] bool: stopped at EOS (else truncated at max_new_tokens)

    def batch(self) -> dict[str, np.ndarray]:
        """The training batch's token arrays."""
        return {"tokens": self.tokens, "segment_ids": self.segment_ids, "positions": self.positions,
                "loss_mask": self.loss_mask}


def layout(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], width: int,
           logps: Sequence[Sequence[float]] | None = None, keep: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
    """The arrays of :class:`Rollout` for ``prompts[i] + completions[i]`` (``keep[i]`` False: loss mask 0)."""
    n = len(prompts)
    out = {k: np.zeros((n, width), np.int32) for k in ("tokens", "segment_ids", "positions", "loss_mask")}
    out["sample_logp"] = np.zeros((n, width), np.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        m = len(p) + len(c)
        if m > width:
            raise ValueError(f"a prompt of {len(p)} tokens plus {len(c)} completion tokens exceed train.seq_len="
                             f"{width}; raise train.seq_len or lower grpo.max_completion_tokens")
        out["tokens"][i, :m] = list(p) + list(c)
        out["segment_ids"][i, :m] = 1
        out["positions"][i, :m] = np.arange(m)
        if keep is None or keep[i]:
            out["loss_mask"][i, len(p):m] = 1
        if logps is not None:
            out["sample_logp"][i, len(p) - 1:m - 1] = logps[i]
    return out


def rollout(cfg: ModelConfig, variables: dict, prompts: Sequence[Sequence[int]], group_size: int, width: int,
            max_new_tokens: int, *, temperature: float = 1.0, seed: int = 0, eos_id: int | None = None,
            mask_truncated: bool = False, mesh=None) -> Rollout:
    """Sample ``group_size`` completions of every prompt in one ``generate`` call (rows sample independently
    from one key) and lay them out at ``width`` tokens (see the module docstring)."""
    rows = [list(p) for p in prompts for _ in range(group_size)]
    gen = generate(cfg, variables, rows, max_new_tokens, temperature=temperature, seed=seed, eos_id=eos_id,
                   details=True, logprobs=True, mesh=mesh)
    ended = np.asarray(gen.ended, bool)
    arrays = layout(rows, gen.tokens, width, gen.logprobs, keep=ended if mask_truncated else None)
    return Rollout(**arrays, completions=gen.tokens, ended=ended)
