"""Meshes with the axes ``data, fsdp, expert, tensor, stage``."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

__all__ = ["MESH_AXES", "BATCH_AXES", "parse_mesh", "mesh_size", "make_mesh", "describe", "manual_axes"]

MESH_AXES = ("data", "fsdp", "expert", "tensor", "stage")
BATCH_AXES = ("data", "fsdp", "expert")  # the batch is split over all three


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,expert=2,tensor=2"`` -> ``{"data": 2, "expert": 2, "tensor": 2}``; sizes must be >= 1."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, size = part.partition("=")
        if not size.strip().isdigit():
            raise ValueError(f"mesh entry {part!r} must look like name=size, e.g. data=2")
        out[name.strip()] = int(size)
    _check_axes(out)
    return out


def _check_axes(axes: dict[str, int]) -> None:
    unknown = sorted(set(axes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axis {unknown}; mesh axes are {MESH_AXES}")
    bad = {k: v for k, v in axes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
    if bad:
        raise ValueError(f"mesh axis sizes must be positive integers, got {bad}")


def mesh_size(axes: dict[str, int] | str) -> int:
    """Devices a mesh of these axis sizes uses."""
    return math.prod((parse_mesh(axes) if isinstance(axes, str) else axes).values())


def describe(axes: dict[str, int]) -> str:
    """``"data=2 x tensor=4"`` (axes of size 1 left out)."""
    return " x ".join(f"{a}={axes[a]}" for a in MESH_AXES if axes.get(a, 1) > 1) or "single device"


def make_mesh(axes: dict[str, int] | str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with all five axes (unnamed ones have size 1) over ``devices`` (default ``jax.devices()``; any list,
    e.g. a TPU topology's compile-only devices); the sizes must multiply to the device count."""
    if isinstance(axes, str):
        axes = parse_mesh(axes)
    _check_axes(axes)
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(axes.get(a, 1) for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        desc = " x ".join(f"{a}={axes[a]}" for a in MESH_AXES if a in axes) or "(empty)"
        raise ValueError(f"mesh {desc} has {math.prod(shape)} devices but {len(devices)} are in use; "
                         "make the sizes multiply to the device count")
    types = (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        if devices[0].platform != "tpu":
            raise
    # TPU devices follow the physical torus: a logical axis may have to span (split) physical axes, e.g.
    # expert=32 on v5p:8x8x4, which jax.make_mesh allows on v5e only; core-level devices (a v4 topology lists
    # both cores of a chip) have no physical mapping at all: then the devices in the order given
    try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=types)


def manual_axes() -> frozenset[str]:
    """The axes of the current (abstract) mesh that are manual here, i.e. inside a ``shard_map`` over them
    (the pipeline executor): code there is per device along those axes. Empty outside ``shard_map``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return frozenset()
    return frozenset(a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Manual)
