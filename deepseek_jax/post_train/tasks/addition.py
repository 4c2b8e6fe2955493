"""Noisy-teacher addition (post-training.md §6): a task where SFT plateaus below what a verifier allows.

Prompt ``a+b=`` (``digits``-digit operands, every number written least significant digit first: 155 + 251 is
``551+152=``); answer ``<a>`` + the sum's digits reversed + ``</a>`` and EOS,
on a character vocabulary of 19 symbols (:data:`VOCAB`; BPE would merge digit runs unpredictably). The SFT
data comes from a flawed teacher: on the *hard* subset S -- problems with a carry into the top digit -- it
drops that carry with probability ``q`` (0.7 by default); elsewhere it is right. After SFT, greedy decoding
is wrong on S, sampling is right ~30% of the time there, and only a verifier (:func:`exact_match`) can teach
the model more than its teacher knew.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

__all__ = ["Q", "VOCAB", "PAD_ID", "EOS_ID", "tokenizer", "encode", "decode", "is_hard", "prompt", "answer",
           "teacher_answer", "sft_rows", "prompt_rows", "exact_match"]

Q = 0.7  # how often the teacher drops the top carry on S (``task.q``)
VOCAB = ("<pad>", "<|endoftext|>") + tuple("0123456789+=<>/a")
PAD_ID, EOS_ID = 0, 1
_ID = {c: i for i, c in enumerate(VOCAB) if len(c) == 1}


def tokenizer() -> Tokenizer:
    """The task's vocabulary as a ``tokenizers`` tokenizer (one token per character, EOS ``<|endoftext|>``),
    saved into run folders like a trained BPE so that ``generate`` and ``load_run`` read it back."""
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(VOCAB)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(VOCAB[:2]))
    return tok


def encode(text: str) -> list[int]:
    """Characters -> ids; any other character is an error naming it."""
    bad = sorted(set(text) - set(_ID))
    if bad:
        raise ValueError(f"addition task: characters {bad} are not in the vocabulary {''.join(VOCAB[2:])!r}")
    return [_ID[c] for c in text]


def decode(ids) -> str:
    """Ids -> text, stopping at the first EOS (padding dropped; an id past the vocabulary -- a model's
    vocab_size may be padded -- becomes U+FFFD, so it can never parse as an answer)."""
    out = []
    for i in ids:
        if i == EOS_ID:
            break
        if i != PAD_ID:
            out.append(VOCAB[i] if 0 <= i < len(VOCAB) else "\ufffd")
    return "".join(out)


def is_hard(a: int, b: int, digits: int) -> bool:
    """In S: the lower digits carry into the top digit."""
    low = 10 ** (digits - 1)
    return a % low + b % low >= low


def prompt(a: int, b: int) -> str:
    """``a+b=`` with both operands' digits reversed (least significant first, like the answer): digit i of
    each operand and of the sum then sit at the same distances from each other for every i, so one
    attention pattern serves every digit (big-endian operands need one per digit, and a 1.2M-parameter
    model learning from scratch stalls on the tens digit for some seeds)."""
    return f"{str(a)[::-1]}+{str(b)[::-1]}="


def answer(total: int) -> str:
    return f"<a>{str(total)[::-1]}</a>"


def teacher_answer(a: int, b: int, digits: int, q: float, rng: np.random.Generator) -> str:
    """The flawed teacher: on S, with probability ``q``, the carry into the top digit is dropped."""
    drop = is_hard(a, b, digits) and rng.random() < q
    return answer(a + b - (10 ** (digits - 1) if drop else 0))


def _operands(n: int, digits: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(10 ** (digits - 1), 10 ** digits, (n, 2))


def sft_rows(n: int, seed: int = 0, digits: int = 3, q: float = Q) -> list[dict]:
    """``n`` teacher demonstrations ``{"prompt", "completion", "hard"}`` (seeded, deterministic)."""
    rng = np.random.default_rng(seed)
    return [{"prompt": prompt(a, b), "completion": teacher_answer(a, b, digits, q, rng), "hard": is_hard(a, b, digits)}
            for a, b in _operands(n, digits, rng).tolist()]


def prompt_rows(n: int, seed: int = 1, digits: int = 3) -> list[dict]:
    """``n`` problems ``{"prompt", "answer", "hard"}`` with the correct answers (for rewards and evaluation)."""
    rng = np.random.default_rng(seed)
    return [{"prompt": prompt(a, b), "answer": answer(a + b), "hard": is_hard(a, b, digits)}
            for a, b in _operands(n, digits, rng).tolist()]


def exact_match(prompts, completions, completion_ids, answer, **columns) -> list[float]:
    """1.0 iff the completion is exactly one answer span equal to ``answer`` followed by EOS (the one EOS
    of the row: a truncated completion scores 0), else 0.0. No partial credit, nothing before or after."""
    out = []
    for text, ids, want in zip(completions, completion_ids, answer):
        ids = list(ids)
        ended = bool(ids) and ids[-1] == EOS_ID and ids.count(EOS_ID) == 1
        # judged on the ids: a tokenizer's decode may silently drop ids it does not know (a reward hack)
        out.append(1.0 if ended and text == want and decode(ids) == want else 0.0)
    return out
