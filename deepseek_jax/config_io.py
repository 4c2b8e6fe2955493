"""Strict YAML <-> dataclass conversion, dotted overrides and preset lookup, for every ``*Config`` tree.

Knows no particular config: :mod:`deepseek_jax.config` (the model) and :mod:`deepseek_jax.train.config`
(the run) build on it. Unknown keys are errors that list the known ones; a file that does not parse is an
error naming the file and the line.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

__all__ = ["CONFIG_DIR", "from_dict", "merge", "parse_value", "parse_overrides", "resolve_config_path",
           "read_yaml", "strip_train_section", "plain", "POST_SECTIONS"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def from_dict(cls: type, d: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclass fields. ``where`` prefixes
    field names in errors (``"train."``). Unknown or missing keys raise ``ValueError``."""
    if not isinstance(d, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(where + str(k) for k in unknown)}; "
                         f"known keys at this level: {', '.join(sorted(names))}")
    kwargs = {}
    for k, v in d.items():
        sub = _dataclass_in(hints[k])
        recurse = sub is not None and v is not None and not isinstance(v, bool)  # ``fp8: true`` is allowed
        kwargs[k] = from_dict(sub, v, f"{where}{k}.") if recurse else _number(hints[k], v, f"{where}{k}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required fields
        raise ValueError(f"{where or 'config'}: {e}") from None


def _number(tp: Any, v: Any, name: str) -> Any:
    """A float field given as text (PyYAML reads ``1e-6`` without a dot as a string) becomes the number;
    text that is no number, for a numeric field, is an error naming the field."""
    if not isinstance(v, str) or tp not in (float, int, float | None, int | None):
        return v
    try:
        return float(v) if tp in (float, float | None) else int(v)
    except ValueError:
        raise ValueError(f"{name}={v!r} must be a number") from None


def _dataclass_in(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            if dataclasses.is_dataclass(a):
                return a
    return None


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` (nested dicts and/or dotted keys like ``moe.n_routed_experts``)."""
    out = dict(base)
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            value = {rest: value}
        if isinstance(value, dict) and isinstance(out.get(head), dict):
            out[head] = merge(out[head], value)
        else:
            out[head] = value
    return out


def parse_value(text: str) -> Any:
    """A YAML value; numbers YAML 1.1 reads as strings (``1e30``) become floats."""
    v = yaml.safe_load(text)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    return v


def parse_overrides(overrides: list[str] | tuple[str, ...] | dict[str, Any]) -> dict[str, Any]:
    """``["train.steps=50", "moe.n_routed_experts=8"]`` -> ``{"train.steps": 50, ...}`` (values are YAML)."""
    if isinstance(overrides, dict):
        return dict(overrides)
    items = {}
    for o in overrides:
        key, eq, val = o.partition("=")
        if not eq or not key:
            raise ValueError(f"override {o!r} must look like key=value (e.g. train.steps=50)")
        items[key.strip()] = parse_value(val)
    return items


def resolve_config_path(path: str | Path) -> Path:
    """``path`` itself if it exists, else the preset of that name in ``configs/`` (``"tiny"``)."""
    p = Path(path)
    if p.exists():
        return p
    cand = CONFIG_DIR / (p.name if p.suffix else p.name + ".yaml")
    if not cand.exists():
        known = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"config {str(path)!r} not found (presets: {known})")
    return cand


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file = ``{}``); errors name the file and line."""
    p = Path(path)
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{p}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ValueError(f"{p}: the top level must be a mapping of config keys, got a {type(d).__name__}")
    return d


# a preset's post-training sections (read by deepseek_jax.post_train.config; not model fields)
POST_SECTIONS = ("sft", "grpo", "distill", "reward", "task", "eval")


def strip_train_section(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a preset's dict into ``(model part, train: section)``, leaving out the post-training sections
    (:data:`POST_SECTIONS`); the input is not changed."""
    d = {k: v for k, v in d.items() if k not in POST_SECTIONS}
    train = d.pop("train", None) or {}
    return d, train


def plain(x: Any) -> Any:
    """Tuples to lists, recursively (so ``yaml.safe_dump`` writes plain YAML)."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x
