"""Execute a jupytext notebook in a fresh kernel, as the tests that check notebooks do (not a test module)."""

from __future__ import annotations

import os
from pathlib import Path

# A cell's limit exists to catch a hung kernel, not to time it: the capability notebooks' training cells take
# 5-6 min on 2 uncontended cores and ~2.2x that in CI, where two test workers share them (notebook 08's
# sparse-attention cell passed 900 s there).
CELL_TIMEOUT = 2400


def run_notebook(path: Path, env: dict[str, str] | None = None):
    """Execute ``path`` top to bottom (cwd = its folder) with ``env`` added to the kernel's environment, which
    it inherits from this process; returns the executed notebook. A cell's error raises."""
    import jupytext
    from nbclient import NotebookClient

    old = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        nb = jupytext.read(path)
        NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        return nb
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
