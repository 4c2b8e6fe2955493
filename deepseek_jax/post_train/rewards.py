"""Reward functions as plug-ins (post-training.md §3): ``module:function`` or ``path/to/file.py:function``,
each with TRL's signature without trainer internals::

    fn(prompts: list[str], completions: list[str], completion_ids: list[list[int]], **columns) -> list[float | None]

``columns`` are the prompt set's extra fields (e.g. the reference answer), one value per row. ``None`` means
"does not apply to this row". :class:`Rewards` combines weighted functions: a row's reward is the weighted
sum over the functions that apply to it, NaN where none does (its advantage is then 0). A function that
raises stops the run with an error naming the function, the prompt and the completion.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

__all__ = ["RewardFn", "RewardError", "load_reward", "Rewards", "parse_keep"]

RewardFn = Callable[..., Sequence[float | None]]


class RewardError(RuntimeError):
    """A reward function raised or returned something unusable; the message names the row."""


def load_reward(spec: str) -> RewardFn:
    """The function named by ``spec``: ``package.module:function`` or ``path/to/file.py:function``."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(f"reward {spec!r} must look like module:function or path/to/file.py:function")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"reward {spec!r}: no file {path}")
        loader = importlib.util.spec_from_file_location(f"_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"reward {spec!r}: cannot import {where!r} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {where!r} has no function {name!r}")
    return fn


@dataclass(frozen=True)
class Rewards:
    """Weighted reward functions: ``Rewards([(fn, weight), ...])`` or :meth:`from_specs`."""

    functions: tuple[tuple[RewardFn, float], ...]

    @classmethod
    def from_specs(cls, specs: Sequence[dict]) -> "Rewards":
        """From the YAML ``reward:`` list: ``[{fn: "module:function", weight: 1.0}, ...]``."""
        out = []
        for i, s in enumerate(specs):
            unknown = set(s) - {"fn", "weight"}
            if "fn" not in s or unknown:
                raise ValueError(f"reward[{i}]={s!r} must have the keys fn (and optionally weight)")
            out.append((load_reward(s["fn"]), float(s.get("weight", 1.0))))
        return cls(tuple(out))

    def __call__(self, prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                 **columns) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(reward [N] float64, NaN where no function applies; per-function rewards [N])``."""
        n = len(prompts)
        total, applied, per_fn = np.zeros(n), np.zeros(n, bool), {}
        for fn, weight in self.functions:
            values = self._call(fn, prompts, completions, completion_ids, columns)
            got = np.array([np.nan if v is None else float(v) for v in values])
            per_fn[getattr(fn, "__name__", repr(fn))] = got
            ok = ~np.isnan(got)
            total[ok] += weight * got[ok]
            applied |= ok
        return np.where(applied, total, np.nan), per_fn

    @staticmethod
    def _call(fn, prompts, completions, completion_ids, columns) -> list:
        name = getattr(fn, "__name__", repr(fn))
        try:
            values = list(fn(prompts, completions, completion_ids, **columns))
        except Exception as batch_error:  # find the row: call the rows one by one
            for i in range(len(prompts)):
                try:
                    fn(prompts[i:i + 1], completions[i:i + 1], completion_ids[i:i + 1],
                       **{k: v[i:i + 1] for k, v in columns.items()})
                except Exception as e:
                    raise RewardError(f"reward {name} failed on prompt {prompts[i]!r}, completion "
                                      f"{completions[i]!r}: {type(e).__name__}: {e}") from e
            raise RewardError(f"reward {name} failed on the batch: {batch_error}") from batch_error
        if len(values) != len(prompts):
            raise RewardError(f"reward {name} returned {len(values)} values for {len(prompts)} completions")
        for i, v in enumerate(values):
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise RewardError(f"reward {name} returned {v!r} (not a finite number or None) for prompt "
                                  f"{prompts[i]!r}, completion {completions[i]!r}")
        return values


_KEEP = re.compile(r"^\s*reward\s*(==|>=|>|<=|<)\s*(-?[0-9.eE+-]+)\s*$")


def parse_keep(text: str | None, what: str = "--keep"):
    """``"reward==1"`` / ``"reward>=0.5"`` -> a predicate on a reward (None: keep everything); ``what`` names
    the setting in the error."""
    if not text:
        return None
    m = _KEEP.match(text)
    if not m:
        raise ValueError(f"{what}: {text!r} must look like reward==1 or reward>=0.5")
    op, v = m.group(1), float(m.group(2))
    return {"==": lambda r: r == v, ">=": lambda r: r >= v, ">": lambda r: r > v, "<=": lambda r: r <= v,
            "<": lambda r: r < v}[op]
