"""Every notebook (jupytext percent ``.py``) executes top to bottom on CPU. ``07_r1_pipeline`` and
``08_long_context`` run in ``test_r1_pipeline.py`` and ``test_niah_capability.py``, which check their results
(executing them twice would cost ~25 minutes of CI)."""

from __future__ import annotations

from pathlib import Path

import pytest
from notebook_run import run_notebook

EXECUTED_ELSEWHERE = {"07_r1_pipeline", "08_long_context"}  # by test_r1_pipeline.py, test_niah_capability.py
NOTEBOOKS = sorted(p for p in (Path(__file__).parent.parent / "notebooks").glob("[0-9]*.py")
                   if p.stem not in EXECUTED_ELSEWHERE)


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path):
    nb = run_notebook(path)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
