"""What a layout costs: per-parameter partition specs, bytes per device, and the memory and collectives
of a compiled step, read from its memory analysis and HLO. The training step itself is compiled by
:func:`deepseek_jax.train.step.step_layout_report` (this floor does not know the optimiser).

Nothing is allocated: parameters are ``jax.ShapeDtypeStruct`` with shardings, and the step is only
lowered and compiled. Bytes of a collective are the bytes of its result on one device (for an
all-gather the gathered tensor, for a reduce-scatter the shard, for an all-reduce the whole operand).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from deepseek_jax.config import ModelConfig
from deepseek_jax.nn import tree
from deepseek_jax.nn.placement import check_layout, logical_tree
from deepseek_jax.parallel.rules import logical_spec

__all__ = ["hlo_collectives", "collectives_by_axis", "layout_report", "format_report"]

_KINDS = ("ragged-all-to-all", "all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"=\s*(\([^()]*\)|\S+)\s+(" + "|".join(_KINDS) + r")(?:-start)?\(")
_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|f8e4m3fn|f8e5m2)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}


def _group_size(line: str) -> int | None:
    """Devices per replica group of a collective's HLO line (None when the format is not recognised):
    ``{{0,1},{2,3}}``, ``[groups,size]<=[n]`` or ``mesh['axis_0'=8,...] {'axis_0'}``."""
    if m := re.search(r"replica_groups=\{\{([^}]*)\}", line):
        return len(m.group(1).split(","))
    if m := re.search(r"replica_groups=\[\d+,(\d+)\]<=", line):
        return int(m.group(1))
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line):
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)))
    return None


def _collective_ops(hlo_text: str):
    """``(kind, bytes of the result on one device, the op's HLO line)`` of every collective moving data."""
    for m in _OP.finditer(hlo_text):
        line_end = hlo_text.find("\n", m.end())
        line = hlo_text[m.start(): line_end if line_end >= 0 else None]
        if _group_size(line) == 1:
            continue
        kind, result = m.group(2), m.group(1)
        shapes = _SHAPE.findall(result)
        if "-start(" in m.group(0) and len(shapes) > 1:
            shapes = shapes[len(shapes) // 2:]  # async start ops return (operands..., results...)
        yield kind, sum(_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in shapes), line


def hlo_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """``{kind: {"count": n, "bytes": b}}`` over the collectives in compiled HLO text (per device).
    Collectives whose replica groups hold one device each move nothing and are left out. A
    ``ragged-all-to-all`` counts its whole output buffer: an upper bound (the rows it moves are known only
    at run time)."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"count": 0, "bytes": 0})
    for kind, nbytes, _ in _collective_ops(hlo_text):
        out[kind]["count"] += 1
        out[kind]["bytes"] += nbytes
    return dict(out)


def _first_group(line: str) -> list[int] | None:
    """Device ids of a collective's first replica group (explicit ``{{0,1},...}`` or iota ``[g,s]<=[dims]T(perm)``
    form), or a collective-permute's first source/target pair; None when not recognised."""
    if re.search(r"replica_groups=\{\}", line):  # one group of every device
        return [-1]
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\], device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\) \{([^}]*)\}",
                      line):  # the collective's own mesh over device_ids (iota), over the named axes
        sizes = [(a, int(k)) for a, k in re.findall(r"'([^']+)'=(\d+)", m.group(1))]
        dims = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        over = set(re.findall(r"'([^']+)'", m.group(4)))
        ids = ids.reshape([k for _, k in sizes])
        return ids[tuple(slice(None) if a in over else 0 for a, _ in sizes)].reshape(-1).tolist()
    if m := re.search(r"(?:replica_groups|source_target_pairs)=\{\{([^}]*)\}", line):
        return [int(x) for x in m.group(1).split(",") if x.strip()]
    if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line):
        dims = [int(x) for x in m.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(4):
            ids = ids.transpose([int(x) for x in m.group(4).split(",")])
        return ids.reshape(int(m.group(1)), int(m.group(2)))[0].tolist()
    return None


def collectives_by_axis(hlo_text: str, mesh_shape: dict[str, int]) -> dict[str, dict[str, dict[str, int]]]:
    """``{kind: {axes: {"count", "bytes"}}}``: each collective attributed to the mesh axes its devices differ
    along (device ids are positions in the mesh's device array, axes in ``mesh_shape``'s order), e.g.
    ``"fsdp"`` or ``"data+fsdp"``; ``"?"`` where the groups' format is not recognised."""
    names, shape = list(mesh_shape), tuple(mesh_shape.values())
    out: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: {"count": 0, "bytes": 0}))
    for kind, nbytes, line in _collective_ops(hlo_text):
        group = _first_group(line)
        if group == [-1]:
            axes = "+".join(n for n, k in zip(names, shape) if k > 1) or "?"
        elif group is None or max(group) >= math.prod(shape):
            axes = "?"
        else:
            coords = np.array(np.unravel_index(group, shape)).T  # [group, axes]
            axes = "+".join(n for n, c in zip(names, coords.T) if len(set(c.tolist())) > 1) or "?"
        out[kind][axes]["count"] += 1
        out[kind][axes]["bytes"] += nbytes
    return {k: dict(v) for k, v in out.items()}


def _per_device_bytes(shape: tuple[int, ...], dtype: Any, spec: P, mesh: Mesh) -> int:
    n = math.prod(shape) * jnp.dtype(dtype).itemsize
    for axes in spec:
        for a in (axes,) if isinstance(axes, str) else (axes or ()):
            n //= mesh.shape[a]
    return n


def layout_report(cfg: ModelConfig, mesh: Mesh, batch: int, seq: int, compiled: Any = None) -> dict[str, Any]:
    """Partition specs and bytes per device of every variable; with ``compiled`` (a ``jax.stages.Compiled``
    step over ``batch x seq`` tokens) also its memory (``step_arguments``: the state and batch it takes,
    ``step_temp``: its scratch) and collectives per device."""
    check_layout(cfg, mesh, global_batch=batch)
    boxed = logical_tree(cfg)
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    params = []
    total = {"params": 0}
    for path, b in jax.tree_util.tree_flatten_with_path(boxed, is_leaf=is_box)[0]:
        spec = logical_spec(b.names)
        nbytes = _per_device_bytes(b.value.shape, b.value.dtype, spec, mesh)
        params.append({"name": jax.tree_util.keystr(path), "shape": tuple(b.value.shape), "logical": tuple(b.names),
                       "spec": str(spec), "bytes_per_device": nbytes})
        if tree.keys(path)[0] == tree.PARAMS:
            total["params"] += nbytes
    f32 = 4 / jnp.dtype(cfg.param_dtype).itemsize
    report: dict[str, Any] = {
        "mesh": {a: mesh.shape[a] for a in mesh.axis_names},
        "batch": batch, "seq": seq, "parameters": params,
        "bytes_per_device": {"params": total["params"], "grads_f32": int(total["params"] * f32),
                             "adam_f32": int(2 * total["params"] * f32)},
    }
    if compiled is not None:
        mem = compiled.memory_analysis()
        report["bytes_per_device"]["step_arguments"] = int(mem.argument_size_in_bytes)
        report["bytes_per_device"]["step_temp"] = int(mem.temp_size_in_bytes)
        report["collectives"] = hlo_collectives(compiled.as_text())
    return report


def format_report(report: dict[str, Any], max_params: int = 40) -> str:
    """Human-readable tables of :func:`layout_report`."""
    mesh = ", ".join(f"{k}={v}" for k, v in report["mesh"].items() if v > 1) or "single device"
    lines = [f"mesh {mesh}; step of {report['batch']}x{report['seq']} tokens", "", "parameters (per device):"]
    for p in report["parameters"][:max_params]:
        lines.append(f"  {p['name']:58s} {str(p['shape']):22s} {p['spec']:40s} {p['bytes_per_device']:>12,d} B")
    if len(report["parameters"]) > max_params:
        lines.append(f"  ... {len(report['parameters']) - max_params} more")
    lines += ["", "memory per device:"]
    for k, v in report["bytes_per_device"].items():
        lines.append(f"  {k:12s} {v / 2**20:12,.2f} MiB")
    if "collectives" in report:
        lines += ["", "collectives of one training step (per device):"]
        for k, v in sorted(report["collectives"].items()):
            lines.append(f"  {k:20s} x{v['count']:<5d} {v['bytes'] / 2**20:12,.3f} MiB")
    return "\n".join(lines)
