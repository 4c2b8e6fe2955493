"""``metrics.jsonl``: appended to, never rewritten in place; read tolerating a torn last line.

On resume the records past the restored step are dropped by writing a new file beside the old one and
renaming it over (``os.replace`` is atomic), so a crash at any moment leaves either the old or the new
history, never an empty or half-written one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

__all__ = ["read_metrics", "append_metric", "truncate_metrics"]


def read_metrics(path: str | Path, log: Callable[[str], None] | None = None) -> list[dict]:
    """Every complete record. A torn LAST line (power loss, full disk) is skipped with a note; a malformed
    line elsewhere is an error naming the file and the line."""
    p = Path(path)
    if not p.exists():
        return []
    lines = p.read_text(encoding="utf-8", errors="replace").split("\n")
    out = []
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError as e:
            last = all(not x.strip() for x in lines[i:])
            if not last:
                raise ValueError(f"{p}:{i}: not a JSON record ({e.msg}); fix or remove that line") from None
            if log is not None:
                log(f"{p}:{i}: skipping a torn last record ({len(ln)} bytes, no complete JSON)")
    return out


def append_metric(path: str | Path, rec: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


def truncate_metrics(path: str | Path, step: int, log: Callable[[str], None] | None = None) -> None:
    """Keep the records with ``step <= step``: written to ``path.tmp``, flushed, renamed over ``path``."""
    p = Path(path)
    if not p.exists():
        return
    keep = [r for r in read_metrics(p, log) if r.get("step", 0) <= step]
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
