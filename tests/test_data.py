"""Data pipeline: reading, deduplication, split, tokenizer, packing (against a naive packer), batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepseek_jax.train import data as D
from references import naive_pack


def _words(rng, n):
    vocab = [f"w{i}" for i in range(500)]
    return " ".join(rng.choice(vocab, n))


def test_read_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha doc")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta doc")
    (tmp_path / "blank.txt").write_text("   \n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n\n" + json.dumps({"text": "delta"}) + "\n")
    assert D.read_documents([str(tmp_path)]) == ["alpha doc", "gamma", "delta", "beta doc"]
    assert D.read_documents([str(tmp_path / "*.txt")]) == ["alpha doc"]
    assert D.read_documents([str(tmp_path / "c.jsonl")]) == ["gamma", "delta"]
    with pytest.raises(FileNotFoundError, match="data.sources.*nope"):
        D.read_documents([str(tmp_path / "nope")])
    with pytest.raises(ValueError, match="empty"):
        D.read_documents([str(tmp_path / "blank.txt")])
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="no 'text' field"):
        D.read_documents([str(tmp_path / "bad.jsonl")])


def test_default_corpus_is_real_text():
    paths = D.default_corpus()
    assert len(paths) > 50 and sum(p.stat().st_size for p in paths) > 1_000_000


def test_deduplicate_counts():
    rng = np.random.default_rng(0)
    docs = [_words(rng, 300) for _ in range(20)]
    near = docs[3].split()
    near[10] = "CHANGED"
    corpus = docs + [docs[5], "  " + docs[7] + "\n", " ".join(near)]
    kept, stats = D.deduplicate(corpus, threshold=0.8)
    assert stats == {"documents": 23, "exact_duplicates": 2, "near_duplicates": 1, "kept": 20}
    assert kept == docs


def test_split_by_document_is_seeded_and_disjoint():
    docs = [f"doc {i}" for i in range(40)]
    tr, va = D.split_documents(docs, 0.1, seed=3)
    assert len(va) == 4 and sorted(tr + va) == sorted(docs) and not set(tr) & set(va)
    assert (tr, va) == D.split_documents(docs, 0.1, seed=3)
    with pytest.raises(ValueError, match="at least 2"):
        D.split_documents(["one"], 0.1)


def test_tokenizer_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSEEK_JAX_CACHE", str(tmp_path))
    docs = [p.read_text() for p in D.default_corpus()[:10]]
    tok = D.train_tokenizer(docs, 300)
    assert tok.get_vocab_size() <= 300 and D.eos_id(tok) == 0
    text = "def f(x):\n    return x ** 2  # ünïcode ✓\n"
    assert tok.decode(tok.encode(text).ids) == text
    assert len(tok.encode(docs[0]).ids) < len(docs[0].encode())  # merges compress
    assert list(tmp_path.rglob("bpe-300-*.json"))  # cached
    assert D.train_tokenizer(docs, 300).to_str() == tok.to_str()





@pytest.mark.parametrize("t", [4, 7, 16])
def test_pack_matches_naive(t):
    rng = np.random.default_rng(t)
    docs = [rng.integers(1, 50, rng.integers(1, 20)).tolist() for _ in range(9)]
    got = D.pack_documents([np.array(d) for d in docs], t, eos=0)
    want = naive_pack(docs, t, 0)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_batches_resume_and_process_split():
    rows = {"tokens": np.arange(50)[:, None] * np.ones((1, 3), int)}
    a = D.Batches(rows, 8, seed=1)
    seen = [next(a)["tokens"][:, 0] for _ in range(5)]  # 5 of the epoch's 6 batches: 40 distinct rows, no repeats
    assert a.epoch == 0 and len(set(np.concatenate(seen).tolist())) == 40
    st = a.state()
    more = [next(a)["tokens"][:, 0] for _ in range(4)]
    b = D.Batches(rows, 8, seed=1)
    b.restore(st)
    np.testing.assert_array_equal(np.stack(more), np.stack([next(b)["tokens"][:, 0] for _ in range(4)]))
    g = D.Batches(rows, 8, seed=1)
    p0, p1 = D.Batches(rows, 8, 1, 0, 2), D.Batches(rows, 8, 1, 1, 2)
    for _ in range(7):
        np.testing.assert_array_equal(next(g)["tokens"], np.concatenate([next(p0)["tokens"], next(p1)["tokens"]]))
    with pytest.raises(ValueError, match="fewer than batch_size"):
        D.Batches(rows, 64)


def test_unigram_entropy_formula():
    toks = np.array([0, 0, 1, 2])
    assert D.unigram_entropy(toks, 4) == pytest.approx(-(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25)))


def test_fragments_computed_a_block_of_rows_at_a_time_equal_one_block():
    """Packing works in blocks of rows (bounded temporaries); any block size gives the same arrays."""
    rng = np.random.default_rng(3)
    lens = rng.integers(1, 60, 40)
    ends = np.cumsum(lens)
    total, t = int(ends[-1]), 16
    n = -(-total // t)
    whole = D._fragments(ends, total, n, t, block_rows=n)
    for rows in (1, 2, 7):
        assert all(np.array_equal(a, b) for a, b in zip(D._fragments(ends, total, n, t, block_rows=rows), whole))
