"""What a layout costs: per-parameter partition specs, bytes per device, and the collectives of the
compiled forward+backward, read from its HLO.

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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deepseek_jax.config import ModelConfig
from deepseek_jax.nn import tree
from deepseek_jax.nn.placement import check_layout, logical_tree
from deepseek_jax.nn.transformer import Transformer
from deepseek_jax.parallel.rules import logical_spec, named_sharding

__all__ = ["hlo_collectives", "layout_report", "format_report"]

_KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"=\s*(\([^()]*\)|\S+)\s+(" + "|".join(_KINDS) + r")(?:-start)?\(")
_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|f8e4m3fn|f8e5m2)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}


def hlo_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """``{kind: {"count": n, "bytes": b}}`` over the collectives in compiled HLO text (per device)."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"count": 0, "bytes": 0})
    for m in _OP.finditer(hlo_text):
        kind, result = m.group(2), m.group(1)
        shapes = _SHAPE.findall(result)
        if "-start(" in m.group(0) and len(shapes) > 1:
            shapes = shapes[len(shapes) // 2:]  # async start ops return (operands..., results...)
        nbytes = sum(_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in shapes)
        out[kind]["count"] += 1
        out[kind]["bytes"] += nbytes
    return dict(out)


def _per_device_bytes(shape: tuple[int, ...], dtype: Any, spec: P, mesh: Mesh) -> int:
    n = math.prod(shape) * jnp.dtype(dtype).itemsize
    for axes in spec:
        for a in (axes,) if isinstance(axes, str) else (axes or ()):
            n //= mesh.shape[a]
    return n


def layout_report(cfg: ModelConfig, mesh: Mesh, batch: int, seq: int, step: bool = True) -> dict[str, Any]:
    """Partition specs, bytes per device and (``step=True``) the compiled step's memory and collectives.

    ``batch x seq`` tokens are the global batch of the step (forward + backward of a mean-squared-logit
    loss, the same collectives as a cross-entropy step).
    """
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
    if step:
        shardings = jax.tree_util.tree_map(lambda b: NamedSharding(mesh, logical_spec(b.names)), boxed, is_leaf=is_box)
        abstract = jax.tree_util.tree_map(lambda b, s: jax.ShapeDtypeStruct(b.value.shape, b.value.dtype, sharding=s),
                                          boxed, shardings, is_leaf=is_box)
        tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=named_sharding(mesh, ("act_batch", None)))

        def loss(v, t):
            return jnp.mean(Transformer(cfg).apply(v, t).logits ** 2)

        with jax.set_mesh(mesh):
            compiled = jax.jit(jax.grad(loss)).lower(abstract, tokens).compile()
        mem = compiled.memory_analysis()
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
        lines += ["", "collectives of one forward+backward (per device):"]
        for k, v in sorted(report["collectives"].items()):
            lines.append(f"  {k:20s} x{v['count']:<5d} {v['bytes'] / 2**20:12,.3f} MiB")
    return "\n".join(lines)
