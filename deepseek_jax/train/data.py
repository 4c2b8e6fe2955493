"""Training data: corpus reading, deduplication, split, BPE tokenizer, packing, resumable batches.

Pipeline (``prepare_data``)::

    sources (files, folders, globs, JSONL)  ->  documents (one per file, or per JSONL record), read in
         blocks; binary files and non-string JSONL texts skipped (counted); documents longer than
         ``max_document_chars`` split into chunks (at a line break where possible)
      -> exact dedup (sha256 of the stripped text) -> near-dup removal (MinHash LSH, ``datasketch``)
      -> train / validation split by document (seeded)
      -> byte-level BPE (``tokenizers``, trained on <= ``tokenizer_sample_chars`` of the train split, cached)
         or a given tokenizer.json; documents encoded a batch at a time into one int32 stream
      -> packing into rows [N, t]: documents joined with EOS, cut into rows of t tokens;
         ``segment_ids`` number the document fragments of a row (1, 2, ...; 0 = padding) and
         ``positions`` restart at 0 at every fragment, so attention and RoPE never cross documents.

The default corpus is real text that needs no download: the top-level modules of the running Python's
standard library (~170 files, ~4.7 MB of code, docstrings and comments).

:class:`Batches` yields global batches in a seeded order that is a pure function of
``(seed, epoch, index)``; its ``state()`` goes into checkpoints, and each process slices out only its
rows of the global batch.

Memory: no stage holds more than one document's working set at once, and documents are at most
``max_document_chars`` long, so the peak is linear in the corpus and independent of how its text is cut
into documents: at most about 0.5 GB + 60 bytes per token (the text, 4 bytes per token of ids, 12 of
packed rows, one block of packing temporaries, allocator slack). Measured for one 200 MB document plus a
20 MB line of letters (160M tokens, 285 s on 2 cores; ``tests/test_reliability.py``): 3.6 GB peak RSS
in a fresh process, 7.5 GB when started from the end of the test suite; a 50 MB document took 10.7 GB
before.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepseek_jax.train import synthetic
from deepseek_jax.train.corpus import chunk_text, default_corpus, read_documents
from deepseek_jax.train.synthetic import NIAHConfig

__all__ = ["DataConfig", "default_corpus", "read_documents", "deduplicate", "split_documents", "train_tokenizer",
           "load_tokenizer", "chunk_text", "encode_documents", "pack_documents", "Batches", "unigram_entropy", "prepare_data", "synthetic_data", "PreparedData", "EOS"]

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is cleaned and tokenised.

    Attributes:
      kind: ``text`` (the sources below) or ``synthetic_niah`` (needle-in-a-haystack retrieval generated from
        the seed, :mod:`deepseek_jax.train.synthetic`, set by ``niah``; loss on the answer tokens only).
      sources: files, folders (searched recursively for text files), globs or ``.jsonl`` files
        (one document per record, in ``text_field``). Empty: the default corpus (Python's stdlib).
      val_fraction: share of documents held out for validation (at least one document).
      dedup: remove exact duplicates and near-duplicates (MinHash Jaccard >= ``near_dup_threshold``).
      tokenizer: a ``tokenizer.json`` (e.g. from a Hugging Face checkpoint); empty = train a byte-level
        BPE of the model's ``vocab_size`` on the train split (cached).
      max_documents: keep the first N documents (0 = all), for quick runs.
      max_document_chars: documents longer than this are split into chunks of at most this many
        characters (at the last line break, else the last space, before the limit), which then count as
        documents; this bounds the memory and time of deduplication, tokenizer training and encoding.
      tokenizer_sample_chars: the BPE is trained on at most this many characters of the train split
        (evenly spaced documents; all of it when smaller).
    """

    kind: str = "text"
    niah: NIAHConfig = field(default_factory=NIAHConfig)
    sources: tuple[str, ...] = ()
    text_field: str = "text"
    val_fraction: float = 0.05
    dedup: bool = True
    near_dup_threshold: float = 0.8
    tokenizer: str = ""
    max_documents: int = 0
    max_document_chars: int = 1_000_000
    tokenizer_sample_chars: int = 16_000_000

    def __post_init__(self):
        if self.kind not in ("text", "synthetic_niah"):
            raise ValueError(f"train.data.kind={self.kind!r} must be 'text' or 'synthetic_niah'")
        object.__setattr__(self, "sources", tuple(self.sources or ()))
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction={self.val_fraction!r} must be in (0, 1)")
        if not 0 < self.near_dup_threshold <= 1:
            raise ValueError(f"data.near_dup_threshold={self.near_dup_threshold!r} must be in (0, 1]")
        if self.max_documents < 0:
            raise ValueError(f"data.max_documents={self.max_documents!r} must be >= 0 (0 = all)")
        for name in ("max_document_chars", "tokenizer_sample_chars"):
            if getattr(self, name) < 1000:
                raise ValueError(f"data.{name}={getattr(self, name)!r} must be >= 1000")


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


def _sample(docs: list[str], max_chars: int) -> list[str]:
    """Every k-th document, k chosen so that about ``max_chars`` characters remain (all when fewer)."""
    total = sum(len(d) for d in docs)
    return docs if total <= max_chars else docs[:: -(-total // max_chars)]


def train_tokenizer(docs: list[str], vocab_size: int, cache: bool = True, sample_chars: int = 16_000_000):
    """A byte-level BPE (``tokenizers``) with ``vocab_size`` entries, ``<|endoftext|>`` as id 0, trained on
    at most ``sample_chars`` characters of ``docs`` (evenly spaced documents).

    During training, pre-tokens (runs of letters, of punctuation, ...) longer than 256 characters are cut
    (the trainer's time grows with the square of a pre-token's length: a 2 MB line of letters took over 5
    minutes); no merge can be that long at these vocabulary sizes, so the result is the same BPE.
    Cached under ``$DEEPSEEK_JAX_CACHE`` (default ``~/.cache/deepseek_jax``) by a hash of the texts and size.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE (needs >= 258: 256 bytes, "
                         "EOS and at least one merge)")
    docs = _sample(docs, sample_chars)
    h = hashlib.sha256(str(vocab_size).encode())
    for d in docs:
        h.update(hashlib.sha256(d.encode()).digest())
    path = _cache_dir() / "tokenizers" / f"bpe-{vocab_size}-{h.hexdigest()[:16]}.json"
    if cache and path.exists():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([byte_level, pre_tokenizers.Split(Regex(r"[\s\S]{1,256}"), "isolated")])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer, length=len(docs))
    tok.pre_tokenizer = byte_level
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
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # noqa: BLE001 - the Rust library raises a bare Exception
        raise ValueError(f"{p}: not a readable tokenizer.json ({e}); restore it or point data.tokenizer at "
                         "another") from None


def eos_id(tokenizer) -> int:
    """The end-of-document id: ``<|endoftext|>``, or a Hugging Face checkpoint's ``</s>`` /
    ``<｜end▁of▁sentence｜>``."""
    for name in (EOS, "<｜end▁of▁sentence｜>", "</s>", "<|end_of_text|>"):
        i = tokenizer.token_to_id(name)
        if i is not None:
            return int(i)
    raise ValueError("the tokenizer has no end-of-document token (<|endoftext|>, </s>, ...); add one")


def pack_documents(docs: list[np.ndarray], seq_len: int, eos: int, consume: bool = False) -> dict[str, np.ndarray]:
    """Pack token arrays into rows: ``{"tokens", "segment_ids", "positions"}``, each ``[N, seq_len]`` int32.

    Documents are joined with ``eos`` after each one and cut every ``seq_len`` tokens; a document cut
    at a row boundary continues in the next row as a new fragment (positions restart at 0). The last
    row is padded with ``eos`` under segment id 0 (masked out of every loss). Works in int32 with
    temporaries of one block of rows besides the 12 bytes per token of the result; ``consume=True`` empties
    the list ``docs`` as it goes, freeing each array once copied.
    """
    if not docs:
        raise ValueError("nothing to pack: no documents")
    lens = np.fromiter((len(d) + 1 for d in docs), np.int64, len(docs))
    ends = np.cumsum(lens)
    total = int(ends[-1])
    n = -(-total // seq_len)
    if n * seq_len >= 2**31:
        raise ValueError(f"{total:,} tokens do not fit int32 positions; use fewer documents")
    stream = np.full(n * seq_len, eos, np.int32)
    for i, end in enumerate(ends):
        d = docs[i]
        stream[end - len(d) - 1: end - 1] = d
        if consume:
            docs[i] = None
    if consume:
        docs.clear()
    seg, positions = _fragments(ends, total, n, seq_len)
    return {"tokens": stream.reshape(n, seq_len), "segment_ids": seg, "positions": positions}


def _fragments(ends: np.ndarray, total: int, n: int, seq_len: int, block_rows: int = 1 << 14):
    """``(segment_ids, positions)`` ``[n, seq_len]`` for documents ending at token offsets ``ends`` (the
    last one at ``total``), computed a block of rows at a time (every row starts a fragment, so blocks are
    independent): a fragment begins at a row, a document or the padding."""
    seg = np.empty((n, seq_len), np.int32)
    positions = np.empty((n, seq_len), np.int32)
    starts = ends[:-1]
    for r0 in range(0, n, block_rows):
        lo, hi = r0 * seq_len, min(n, r0 + block_rows) * seq_len
        start = np.zeros(hi - lo, bool)
        start[::seq_len] = True
        start[starts[np.searchsorted(starts, lo):np.searchsorted(starts, hi)] - lo] = True
        if lo <= total < hi:
            start[total - lo] = True
        frag = np.arange(hi - lo, dtype=np.int32)
        pos = frag.copy()
        frag *= start  # the index where a fragment begins, else 0; then carried forward
        np.maximum.accumulate(frag, out=frag)
        pos -= frag
        blk = slice(r0, r0 + (hi - lo) // seq_len)
        positions[blk] = pos.reshape(-1, seq_len)
        seg[blk] = np.cumsum(start.reshape(-1, seq_len), axis=1, dtype=np.int32)
    seg.reshape(-1)[total:] = 0
    positions.reshape(-1)[total:] = 0
    return seg, positions


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the token frequency distribution: the loss of the best context-free model."""
    return _entropy(np.bincount(np.asarray(tokens).reshape(-1), minlength=vocab_size))


def _entropy(counts: np.ndarray) -> float:
    p = counts.astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def encode_documents(tok, docs: list[str], vocab_size: int, batch_chars: int = 2_000_000) -> tuple[list[np.ndarray], np.ndarray]:
    """``(ids per document (int32), token counts [vocab_size])``, encoding ``batch_chars`` at a time (a
    ``tokenizers`` Encoding holds ~50 bytes per token; only one batch of them is alive)."""
    out: list[np.ndarray] = []
    counts = np.zeros(vocab_size, np.int64)
    i = 0
    while i < len(docs):
        j, size = i, 0
        while j < len(docs) and (j == i or size + len(docs[j]) <= batch_chars):
            size += len(docs[j])
            j += 1
        for e in tok.encode_batch(docs[i:j]):
            ids = np.asarray(e.ids, np.int32)
            counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
            out.append(ids)
        i = j
    return out, counts


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
    """Read, deduplicate, split, tokenise and pack (see the module docstring). Fails fast on bad input.
    ``kind: synthetic_niah`` generates the rows instead (:func:`synthetic_data`)."""
    if cfg.kind == "synthetic_niah":
        return synthetic_data(cfg.niah, vocab_size, seq_len, seed)
    read: dict[str, int] = {}
    docs = read_documents(cfg.sources, cfg.text_field, cfg.max_document_chars, read)
    if cfg.max_documents:
        docs = docs[: cfg.max_documents]
    stats: dict[str, Any] = {"documents": len(docs), "exact_duplicates": 0, "near_duplicates": 0, **read}
    if cfg.dedup:
        docs, d = deduplicate(docs, cfg.near_dup_threshold)
        stats.update(d)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, seed)
    del docs
    tok = (load_tokenizer(cfg.tokenizer) if cfg.tokenizer
           else train_tokenizer(train_docs, vocab_size, sample_chars=cfg.tokenizer_sample_chars))
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"the tokenizer has {tok.get_vocab_size()} entries but the model's vocab_size is "
                         f"{vocab_size}: raise vocab_size or use a smaller tokenizer")
    eos = eos_id(tok)
    stats.update(train_documents=len(train_docs), val_documents=len(val_docs),
                 train_bytes=int(sum(len(d.encode()) for d in train_docs)))
    train_ids, counts = encode_documents(tok, train_docs, vocab_size)
    del train_docs
    val_ids, _ = encode_documents(tok, val_docs, vocab_size)
    stats.update(train_tokens=int(sum(len(x) + 1 for x in train_ids)), val_tokens=int(sum(len(x) + 1 for x in val_ids)),
                 unigram_entropy=_entropy(counts))
    train = pack_documents(train_ids, seq_len, eos, consume=True)
    val = pack_documents(val_ids, seq_len, eos, consume=True)
    return PreparedData(train=train, val=val, tokenizer=tok, eos_id=eos, stats=stats)


def synthetic_data(cfg: NIAHConfig, vocab_size: int, seq_len: int, seed: int = 0) -> PreparedData:
    """Needle-in-a-haystack rows (:func:`deepseek_jax.train.synthetic.niah_rows`) with the task's word-level
    tokenizer; training and validation rows come from disjoint seed streams."""
    tok = synthetic.tokenizer(cfg.filler_words)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"the synthetic_niah vocabulary has {tok.get_vocab_size()} words but the model's vocab_size "
                         f"is {vocab_size}: raise vocab_size or lower train.data.niah.filler_words")
    train = synthetic.niah_rows(cfg, cfg.train_samples, seq_len, [seed, 0])
    val = synthetic.niah_rows(cfg, cfg.val_samples, seq_len, [seed, 1])
    n_train, n_val = (int(rows["segment_ids"].max(1).sum()) for rows in (train, val))  # samples (packed or not)
    stats = {"documents": n_train + n_val, "exact_duplicates": 0, "near_duplicates": 0,
             "train_documents": n_train, "val_documents": n_val,
             "train_tokens": int((train["segment_ids"] > 0).sum()), "val_tokens": int((val["segment_ids"] > 0).sum()),
             "unigram_entropy": float("nan"), "answer_tokens": int(train["loss_mask"].sum())}
    return PreparedData(train=train, val=val, tokenizer=tok, eos_id=synthetic.EOS, stats=stats)
