"""Synthetic long-context retrieval data (long-context.md §5; the needle tasks of NVIDIA's RULER).

A sample of exactly ``L`` tokens, on a word-level vocabulary (:func:`vocabulary`; one token per word, so
lengths and needle positions are exact)::

    <bos> w17 w3 ... KEY 4 1 VAL 9 0 2 ... w8   Q 4 1 VAL   9 0 2   <|endoftext|>
          '---- haystack with the needle(s) ---'  query     answer

Tasks: ``passkey`` (a 5-digit pass key: ``PASS d1..d5``, query ``Q PASS``); ``kv`` (one ``KEY k1 k2 VAL v1 v2
v3`` needle); ``multikey`` (the same plus 3 distractor needles with other keys); ``multivalue`` (4 needles with
the queried key, the answer is their values in order of position); ``multiquery`` (4 needles, the query asks
for two keys, the answer is both values). The first needle starts at token ``int(L * depth / 100)``, kept
inside the haystack (between the ``<bos>`` and the query); the others go at random free places. The loss
falls on the answer tokens only (``loss_mask``). Everything is a function of the seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

__all__ = ["TASKS", "NIAHConfig", "vocabulary", "tokenizer", "NeedleSample", "make_sample", "min_length",
           "needle_index", "niah_rows"]

TASKS = ("passkey", "kv", "multikey", "multivalue", "multiquery")
SPECIALS = ("<pad>", "<|endoftext|>", "<bos>", "KEY", "VAL", "PASS", "Q")
PAD, EOS, BOS, KEY, VAL, PASS, QUERY = range(len(SPECIALS))
DIGIT0 = len(SPECIALS)  # ids of "0".."9" follow the specials
_NEEDLES = {"passkey": 1, "kv": 1, "multikey": 4, "multivalue": 4, "multiquery": 4}


@dataclass(frozen=True)
class NIAHConfig:
    """The ``train.data.niah`` section (used when ``train.data.kind: synthetic_niah``).

    Attributes:
      task: one of :data:`TASKS`. filler_words: the haystack's vocabulary size (words ``w0..``).
      train_samples / val_samples: rows of the training and validation sets (padded).
      min_length: the shortest sample; lengths are uniform in ``[min_length, train.seq_len]``, depths uniform.
      pack: put consecutive samples into a row while they fit (segment ids 1, 2, ...; attention and positions
        never cross a sample), instead of one padded sample per row: 10-20% more samples per step at no cost.
    """

    task: str = "kv"
    filler_words: int = 64
    train_samples: int = 20_000
    val_samples: int = 256
    min_length: int = 32
    pack: bool = False

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"train.data.niah.task={self.task!r} must be one of {TASKS}")
        for n in ("filler_words", "train_samples", "val_samples", "min_length"):
            if not isinstance(getattr(self, n), int) or getattr(self, n) < 1:
                raise ValueError(f"train.data.niah.{n}={getattr(self, n)!r} must be a positive integer")


def vocabulary(filler_words: int) -> tuple[str, ...]:
    """The specials, the ten digits and the filler words ``w0 .. w{filler_words - 1}``."""
    return SPECIALS + tuple("0123456789") + tuple(f"w{i}" for i in range(filler_words))


def tokenizer(filler_words: int) -> Tokenizer:
    """A word-level ``tokenizers`` tokenizer over :func:`vocabulary` (whitespace-separated words; decode
    joins them with spaces), saved into run folders like any other."""
    vocab = vocabulary(filler_words)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens(list(SPECIALS[:3]))
    return tok


@dataclass
class NeedleSample:
    """One sample: ``tokens [L]`` int32 ending with EOS; the answer is ``tokens[answer_start:answer_start +
    answer_len]``; ``groups`` are the answer's value groups as (offset in the answer, length) for partial
    scores; ``needles`` the start index of every needle (the first is the one placed at the depth)."""

    tokens: np.ndarray
    answer_start: int
    answer_len: int
    groups: list[tuple[int, int]] = field(default_factory=list)
    needles: list[int] = field(default_factory=list)


def _digits(rng: np.random.Generator, n: int) -> list[int]:
    return (DIGIT0 + rng.integers(0, 10, n)).tolist()


def min_length(task: str) -> int:
    """The shortest sample of ``task``: the haystack at least twice the needles (room to place them apart)
    plus ``<bos>``, the query, the answer and the EOS."""
    needles, query, groups = _task(task, np.random.default_rng(0))
    return 1 + 2 * sum(len(x) for x in needles) + len(query) + sum(len(g) for g in groups) + 1


def needle_index(length: int, depth: float, needle_len: int, query_start: int) -> int:
    """Where the depth's needle starts: ``int(length * depth / 100)``, kept between the ``<bos>`` (index 0)
    and the query (the needle must end before ``query_start``)."""
    return min(max(int(length * depth / 100), 1), query_start - needle_len)


def _task(task: str, rng: np.random.Generator) -> tuple[list[list[int]], list[int], list[list[int]]]:
    """``(needles in placement order, query, answer value groups)``."""
    if task == "passkey":
        v = _digits(rng, 5)
        return [[PASS] + v], [QUERY, PASS], [v]
    n = _NEEDLES[task]
    keys: list[list[int]] = []
    while len(keys) < n:  # distinct keys
        k = _digits(rng, 2)
        if k not in keys:
            keys.append(k)
    if task == "multivalue":
        keys = [keys[0]] * n
    vals = [_digits(rng, 3) for _ in range(n)]
    needles = [[KEY] + k + [VAL] + v for k, v in zip(keys, vals)]
    if task == "multiquery":
        return needles, [QUERY] + keys[0] + [QUERY] + keys[1] + [VAL], [vals[0], vals[1]]
    return needles, [QUERY] + keys[0] + [VAL], vals if task == "multivalue" else [vals[0]]


def make_sample(task: str, length: int, depth: float, rng: np.random.Generator, filler_words: int = 64
                ) -> NeedleSample:
    """A sample of exactly ``length`` tokens with the first needle at ``depth`` percent (see the module
    docstring); an error when ``length`` cannot hold the needles, the query and the answer."""
    if length < min_length(task):
        raise ValueError(f"a {task} sample needs at least {min_length(task)} tokens; got length={length}")
    needles, query, groups = _task(task, rng)
    answer_len = sum(len(g) for g in groups)
    query_start = length - 1 - answer_len - len(query)
    toks = np.empty(length, np.int32)
    toks[0] = BOS
    toks[1:query_start] = DIGIT0 + 10 + rng.integers(0, filler_words, query_start - 1)
    taken = np.zeros(length, bool)
    starts = [needle_index(length, depth, len(needles[0]), query_start)]
    taken[starts[0]:starts[0] + len(needles[0])] = True
    for nd in needles[1:]:
        used = np.concatenate([[0], np.cumsum(taken)])
        first = np.arange(1, query_start - len(nd) + 1)
        free = first[used[first + len(nd)] == used[first]]  # starts whose span is untouched
        if not len(free):
            raise ValueError(f"length={length} has no room for the {task} task's {len(needles)} needles")
        s = int(free[rng.integers(len(free))])
        taken[s:s + len(nd)] = True
        starts.append(s)
    for s, nd in zip(starts, needles):
        toks[s:s + len(nd)] = nd
    if task == "multivalue":  # the answer lists the values in the order they appear
        groups = [nd[4:] for _, nd in sorted(zip(starts, needles))]
    answer = [t for g in groups for t in g]
    toks[query_start:query_start + len(query)] = query
    a0 = query_start + len(query)
    toks[a0:a0 + answer_len] = answer
    toks[-1] = EOS
    offsets = np.cumsum([0] + [len(g) for g in groups])[:-1]
    return NeedleSample(toks, a0, answer_len, [(int(o), len(g)) for o, g in zip(offsets, groups)], starts)


def niah_rows(cfg: NIAHConfig, n: int, seq_len: int, seed) -> dict[str, np.ndarray]:
    """``n`` training rows ``{"tokens", "segment_ids", "positions", "loss_mask"}`` ``[n, seq_len]`` int32: samples
    of lengths uniform in ``[min_length, seq_len]`` and depths uniform in [0, 100], one per row or, with
    ``cfg.pack``, as many consecutive ones as fit (the sample that does not fit starts the next row); padded;
    the loss mask covers the answer tokens."""
    if cfg.min_length > seq_len:
        raise ValueError(f"train.data.niah.min_length={cfg.min_length} exceeds train.seq_len={seq_len}")
    if cfg.min_length < min_length(cfg.task):
        raise ValueError(f"train.data.niah.min_length={cfg.min_length} is too short for the {cfg.task} task (at least "
                         f"{min_length(cfg.task)} tokens)")
    rng = np.random.default_rng(seed)
    out = {k: np.zeros((n, seq_len), np.int32) for k in ("tokens", "segment_ids", "positions", "loss_mask")}
    i, used, seg = 0, 0, 0
    while i < n:
        length = int(rng.integers(cfg.min_length, seq_len + 1))
        s = make_sample(cfg.task, length, float(rng.uniform(0, 100)), rng, cfg.filler_words)
        if used and (not cfg.pack or used + length > seq_len):
            i, used, seg = i + 1, 0, 0
            if i == n:
                break
        seg += 1
        out["tokens"][i, used:used + length] = s.tokens
        out["segment_ids"][i, used:used + length] = seg
        out["positions"][i, used:used + length] = np.arange(length)
        out["loss_mask"][i, used + s.answer_start:used + s.answer_start + s.answer_len] = 1
        used += length
    return out
