"""Reading a corpus into documents: files, folders, globs and JSONL, read a block at a time.

Binary files (a NUL byte, or more than 1% invalid UTF-8 in the first 8 kB) and JSONL records whose text
is not a string are skipped and counted; other invalid UTF-8 is replaced by U+FFFD and counted; documents
longer than ``max_document_chars`` are split into chunks at line breaks (:func:`chunk_text`), so no later
stage ever holds a document larger than that.
"""

from __future__ import annotations

import codecs
import glob
import json
import re
import sysconfig
from pathlib import Path
from typing import Iterable

__all__ = ["TEXT_SUFFIXES", "default_corpus", "chunk_text", "read_documents"]

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl", ".json", ".c", ".h", ".html", ".tex")


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


_BLOCK = 1 << 20  # characters read at a time
_HEAD = 8000  # bytes looked at to tell a binary file (as git does)
_ESCAPED = re.compile("[\udc80-\udcff]")  # invalid UTF-8 bytes, as decoded with errors="surrogateescape"


def _count(stats: dict, key: str, n: int = 1) -> None:
    stats[key] = stats.get(key, 0) + int(n)


def _is_binary(head: bytes) -> bool:
    """A NUL byte, or more than 1% of the characters not valid UTF-8 (a cut last character is allowed)."""
    if b"\0" in head:
        return True
    text = codecs.getincrementaldecoder("utf-8")("surrogateescape").decode(head)
    return len(_ESCAPED.findall(text)) > 0.01 * max(len(text), 1)


def chunk_text(text: str, limit: int) -> list[str]:
    """``text`` cut into pieces of at most ``limit`` characters, each ending at its last line break (else
    its last space) when one lies in the second half of the piece; ``"".join(pieces) == text``."""
    out, pos, n = [], 0, len(text)
    while n - pos > limit:
        end = pos + limit
        cut = text.rfind("\n", pos + limit // 2, end) + 1 or text.rfind(" ", pos + limit // 2, end) + 1 or end
        out.append(text[pos:cut])
        pos = cut
    out.append(text[pos:])
    return out


def _read_text(path: Path, limit: int, stats: dict) -> list[str]:
    """A text file as chunks of at most ``limit`` characters, read a block at a time; [] for a binary file.
    Invalid UTF-8 is replaced by U+FFFD and counted."""
    with open(path, "rb") as f:
        if _is_binary(f.read(_HEAD)):
            _count(stats, "skipped_binary_files")
            return []
    out, buf, bad = [], "", 0
    with open(path, encoding="utf-8", errors="surrogateescape") as f:  # universal newlines, as read_text
        while block := f.read(_BLOCK):
            block, k = _ESCAPED.subn("\ufffd", block)
            bad += k
            pieces = chunk_text(buf + block, limit)
            buf = pieces.pop()
            out += pieces
    out.append(buf)
    _count(stats, "split_documents", len(out) > 1)
    if bad:
        _count(stats, "invalid_utf8_files")
        _count(stats, "invalid_utf8_bytes", bad)
    return out


def _jsonl_documents(path: Path, text_field: str, limit: int, stats: dict) -> list[str]:
    """The ``text_field`` strings of a JSONL file; records whose text is not a string are skipped (counted)."""
    docs = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not a JSON record ({e.msg} at column {e.colno}); fix or remove "
                                 "that line") from None
            if not isinstance(rec, dict) or text_field not in rec:
                keys = sorted(rec) if isinstance(rec, dict) else f"a {type(rec).__name__}, not an object"
                raise ValueError(f"{path}:{i}: record has no {text_field!r} field (data.text_field); "
                                 f"its keys are {keys}")
            text = rec[text_field]
            if not isinstance(text, str):
                _count(stats, "skipped_non_string_records")
                continue
            chunks = chunk_text(text, limit)
            _count(stats, "split_documents", len(chunks) > 1)
            docs += chunks
    return docs


def read_documents(sources: Iterable[str] = (), text_field: str = "text", max_document_chars: int = 1_000_000,
                   stats: dict | None = None) -> list[str]:
    """Documents from ``sources`` (see :class:`DataConfig`); the default corpus when empty.

    ``stats`` (if given) receives counts of what was skipped or changed: ``skipped_binary_files``,
    ``skipped_non_string_records``, ``invalid_utf8_files`` / ``invalid_utf8_bytes`` (replaced by U+FFFD)
    and ``split_documents`` (documents longer than ``max_document_chars``, split into chunks).
    """
    stats = {} if stats is None else stats
    paths = [q for s in sources for q in _expand(s)] if sources else default_corpus()
    docs: list[str] = []
    for path in paths:
        got = (_jsonl_documents(path, text_field, max_document_chars, stats) if path.suffix == ".jsonl"
               else _read_text(path, max_document_chars, stats))
        docs += got
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"data.sources={list(sources)!r}: the corpus is empty (no non-blank text documents"
                         + (f"; skipped {stats['skipped_binary_files']} binary files" if stats.get("skipped_binary_files")
                            else "") + ")")
    return docs
