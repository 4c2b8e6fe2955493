"""Training data: corpus reading, deduplication, split, BPE tokenizer, packing, resumable batches.

Pipeline (``prepare_data``)::

    sources (files, folders, globs, JSONL)  ->  documents (one per file, or per JSONL record)
      -> exact dedup (sha256 of the stripped text) -> near-dup removal (MinHash LSH, ``datasketch``)
      -> train / validation split by document (seeded)
      -> byte-level BPE (``tokenizers``, trained on the train split and cached) or a given tokenizer.json
      -> packing into rows [N, t]: documents joined with EOS, cut into rows of t tokens;
         ``segment_ids`` number the document fragments of a row (1, 2, ...; 0 = padding) and
         ``positions`` restart at 0 at every fragment, so attention and RoPE never cross documents.

The default corpus is real text that needs no download: the top-level modules of the running Python's
standard library (~170 files, ~4.7 MB of code, docstrings and comments).

:class:`Batches` yields global batches in a seeded order that is a pure function of
``(seed, epoch, index)``; its ``state()`` goes into checkpoints, and each process slices out only its
rows of the global batch.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

__all__ = ["DataConfig", "default_corpus", "read_documents", "deduplicate", "split_documents", "train_tokenizer",
           "load_tokenizer", "pack_documents", "Batches", "unigram_entropy", "prepare_data", "PreparedData", "EOS"]

EOS = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl", ".json", ".c", ".h", ".html", ".tex")


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is cleaned and tokenised.

    Attributes:
      sources: files, folders (searched recursively for text files), globs or ``.jsonl`` files
        (one document per record, in ``text_field``). Empty: the default corpus (Python's stdlib).
      val_fraction: share of documents held out for validation (at least one document).
      dedup: remove exact duplicates and near-duplicates (MinHash Jaccard >= ``near_dup_threshold``).
      tokenizer: a ``tokenizer.json`` (e.g. from a Hugging Face checkpoint); empty = train a byte-level
        BPE of the model's ``vocab_size`` on the train split (cached).
      max_documents: keep the first N documents (0 = all), for quick runs.
    """

    sources: tuple[str, ...] = ()
    text_field: str = "text"
    val_fraction: float = 0.05
    dedup: bool = True
    near_dup_threshold: float = 0.8
    tokenizer: str = ""
    max_documents: int = 0

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources or ()))
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction={self.val_fraction!r} must be in (0, 1)")
        if not 0 < self.near_dup_threshold <= 1:
            raise ValueError(f"data.near_dup_threshold={self.near_dup_threshold!r} must be in (0, 1]")
        if self.max_documents < 0:
            raise ValueError(f"data.max_documents={self.max_documents!r} must be >= 0 (0 = all)")


def default_corpus() -> list[Path]:
    """The top-level ``*.py`` modules of this Python's standard library, sorted by name."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def _expand(source: str) -> list[Path]:
    p = Path(source).expanduser()
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in TEXT_SUFFIXES)
    if p.is_file():
        return [p]
    matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
    if not matches:
        raise FileNotFoundError(f"data.sources: {source!r} is not a file, a folder or a glob that matches files")
    return matches


def read_documents(sources: Iterable[str] = (), text_field: str = "text") -> list[str]:
    """Documents from ``sources`` (see :class:`DataConfig`); the default corpus when empty."""
    paths = [q for s in sources for q in _expand(s)] if sources else default_corpus()
    docs: list[str] = []
    for path in paths:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                    if text_field not in rec:
                        raise ValueError(f"{path}:{i}: record has no {text_field!r} field (data.text_field); "
                                         f"its keys are {sorted(rec)}")
                    docs.append(str(rec[text_field]))
        else:
            docs.append(path.read_text(encoding="utf-8", errors="replace"))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"data.sources={list(sources)!r}: the corpus is empty (no non-blank documents)")
    return docs


def _shingles(text: str, n: int = 5) -> set[bytes]:
    words = text.split()
    return {" ".join(words[i:i + n]).encode() for i in range(max(len(words) - n + 1, 1))}


def deduplicate(docs: list[str], threshold: float = 0.8, num_perm: int = 128) -> tuple[list[str], dict[str, int]]:
    """Drop exact duplicates (same stripped text), then near-duplicates: a document whose MinHash
    estimate of word-5-gram Jaccard similarity with an earlier kept document is >= ``threshold``.

    Returns ``(kept, {"documents", "exact_duplicates", "near_duplicates", "kept"})``; order is kept.
    """
    from datasketch import MinHash, MinHashLSH

    seen: set[str] = set()
    exact: list[str] = []
    for d in docs:
        h = hashlib.sha256(d.strip().encode()).hexdigest()
        if h not in seen:
            seen.add(h)
            exact.append(d)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept: list[str] = []
    for i, d in enumerate(exact):
        mh = MinHash(num_perm=num_perm, seed=1)
        mh.update_batch(_shingles(d))
        if lsh.query(mh):
            continue
        lsh.insert(str(i), mh)
        kept.append(d)
    stats = {"documents": len(docs), "exact_duplicates": len(docs) - len(exact),
             "near_duplicates": len(exact) - len(kept), "kept": len(kept)}
    return kept, stats


def split_documents(docs: list[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Seeded split by document: ``(train, val)``, at least one document in each."""
    if len(docs) < 2:
        raise ValueError(f"the corpus has {len(docs)} document(s) after deduplication; a train/validation split "
                         "needs at least 2 (add text to data.sources)")
    order = np.random.default_rng(seed).permutation(len(docs))
    n_val = min(max(1, round(val_fraction * len(docs))), len(docs) - 1)
    val = sorted(order[:n_val].tolist())
    val_set = set(val)
    return [d for i, d in enumerate(docs) if i not in val_set], [docs[i] for i in val]


def _cache_dir() -> Path:
    return Path(os.environ.get("DEEPSEEK_JAX_CACHE", Path.home() / ".cache" / "deepseek_jax"))


def train_tokenizer(docs: list[str], vocab_size: int, cache: bool = True):
    """A byte-level BPE (``tokenizers``) with ``vocab_size`` entries, ``<|endoftext|>`` as id 0.

    Cached under ``$DEEPSEEK_JAX_CACHE`` (default ``~/.cache/deepseek_jax``) by a hash of the texts and size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE (needs >= 258: 256 bytes, "
                         "EOS and at least one merge)")
    h = hashlib.sha256(str(vocab_size).encode())
    for d in docs:
        h.update(hashlib.sha256(d.encode()).digest())
    path = _cache_dir() / "tokenizers" / f"bpe-{vocab_size}-{h.hexdigest()[:16]}.json"
    if cache and path.exists():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer, length=len(docs))
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tok.save(str(tmp))
        os.replace(tmp, path)
    return tok


def load_tokenizer(path: str | Path):
    """A ``tokenizer.json`` (a file, or a folder that holds one)."""
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"data.tokenizer: no tokenizer.json at {str(path)!r}")
    return Tokenizer.from_file(str(p))


def eos_id(tokenizer) -> int:
    """The end-of-document id: ``<|endoftext|>``, or a Hugging Face checkpoint's ``</s>`` /
    ``<｜end▁of▁sentence｜>``."""
    for name in (EOS, "<｜end▁of▁sentence｜>", "</s>", "<|end_of_text|>"):
        i = tokenizer.token_to_id(name)
        if i is not None:
            return int(i)
    raise ValueError("the tokenizer has no end-of-document token (<|endoftext|>, </s>, ...); add one")


def pack_documents(docs: list[np.ndarray], seq_len: int, eos: int) -> dict[str, np.ndarray]:
    """Pack token arrays into rows: ``{"tokens", "segment_ids", "positions"}``, each ``[N, seq_len]`` int32.

    Documents are joined with ``eos`` after each one and cut every ``seq_len`` tokens; a document cut
    at a row boundary continues in the next row as a new fragment (positions restart at 0). The last
    row is padded with ``eos`` under segment id 0 (masked out of every loss).
    """
    if not docs:
        raise ValueError("nothing to pack: no documents")
    lens = np.array([len(d) + 1 for d in docs])
    stream = np.concatenate([np.append(np.asarray(d, np.int32), eos) for d in docs]).astype(np.int32)
    doc = np.repeat(np.arange(len(docs)), lens)
    n = -(-len(stream) // seq_len)
    pad = n * seq_len - len(stream)
    stream = np.concatenate([stream, np.full(pad, eos, np.int32)])
    doc = np.concatenate([doc, np.full(pad, -1)])
    idx = np.arange(n * seq_len)
    start = (idx % seq_len == 0) | np.concatenate([[True], doc[1:] != doc[:-1]])  # a fragment begins
    frag_start = np.maximum.accumulate(np.where(start, idx, 0))
    positions = (idx - frag_start).astype(np.int32)
    seg = np.cumsum(start.reshape(n, seq_len), axis=1).astype(np.int32)
    seg[doc.reshape(n, seq_len) < 0] = 0
    positions[doc < 0] = 0
    return {"tokens": stream.reshape(n, seq_len), "segment_ids": seg, "positions": positions.reshape(n, seq_len)}


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the token frequency distribution: the loss of the best context-free model."""
    p = np.bincount(np.asarray(tokens).reshape(-1), minlength=vocab_size).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


class Batches:
    """Global batches of packed rows in a seeded, resumable order.

    Epoch ``e`` visits the rows in ``default_rng([seed, e]).permutation(N)``, ``global_batch`` at a time
    (the tail that does not fill a batch is skipped that epoch). ``state()`` / ``restore(state)`` carry
    ``{"epoch", "index"}``. ``local_rows`` (positions within the global batch) are the rows this process
    feeds to its devices; only those are read. ``process_index/process_count`` is a shorthand for a
    contiguous share.
    """

    def __init__(self, rows: dict[str, np.ndarray], global_batch: int, seed: int = 0, process_index: int = 0,
                 process_count: int = 1, local_rows: Any = None):
        n = len(rows["tokens"])
        if global_batch % process_count:
            raise ValueError(f"batch_size={global_batch} is not divisible by the process count {process_count}")
        if n < global_batch:
            raise ValueError(f"the corpus packs into {n} rows, fewer than batch_size={global_batch}: "
                             "lower batch_size or seq_len, or add text")
        self.rows, self.global_batch, self.seed = rows, global_batch, seed
        if local_rows is None:
            local = global_batch // process_count
            local_rows = range(process_index * local, (process_index + 1) * local)
        self.local_rows = np.asarray(list(local_rows), np.int64)
        self.epoch, self.index = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows["tokens"]))

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._perm(self.epoch)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index + self.global_batch > len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._perm(self.epoch)
        ids = self._order[self.index: self.index + self.global_batch][self.local_rows]
        self.index += self.global_batch
        return {k: v[ids] for k, v in self.rows.items()}


@dataclass
class PreparedData:
    """Packed train/validation rows, the tokenizer, and what was done to the corpus."""

    train: dict[str, np.ndarray]
    val: dict[str, np.ndarray]
    tokenizer: Any
    eos_id: int
    stats: dict[str, Any] = field(default_factory=dict)


def prepare_data(cfg: DataConfig, vocab_size: int, seq_len: int, seed: int = 0) -> PreparedData:
    """Read, deduplicate, split, tokenise and pack (see the module docstring). Fails fast on bad input."""
    docs = read_documents(cfg.sources, cfg.text_field)
    if cfg.max_documents:
        docs = docs[: cfg.max_documents]
    stats: dict[str, Any] = {"documents": len(docs), "exact_duplicates": 0, "near_duplicates": 0}
    if cfg.dedup:
        docs, d = deduplicate(docs, cfg.near_dup_threshold)
        stats.update(d)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, seed)
    tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else train_tokenizer(train_docs, vocab_size)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"the tokenizer has {tok.get_vocab_size()} entries but the model's vocab_size is "
                         f"{vocab_size}: raise vocab_size or use a smaller tokenizer")
    eos = eos_id(tok)

    def encode(ds):
        return [np.asarray(e.ids, np.int32) for e in tok.encode_batch(ds)]

    train_ids, val_ids = encode(train_docs), encode(val_docs)
    stats.update(train_documents=len(train_docs), val_documents=len(val_docs),
                 train_tokens=int(sum(len(x) + 1 for x in train_ids)), val_tokens=int(sum(len(x) + 1 for x in val_ids)),
                 train_bytes=int(sum(len(d.encode()) for d in train_docs)))
    train = pack_documents(train_ids, seq_len, eos)
    val = pack_documents(val_ids, seq_len, eos)
    stats["unigram_entropy"] = unigram_entropy(np.concatenate(train_ids), vocab_size)
    return PreparedData(train=train, val=val, tokenizer=tok, eos_id=eos, stats=stats)
