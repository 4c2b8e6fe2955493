"""Accelerator chips for planning: peak FLOP/s, HBM capacity and bandwidth, interconnect bandwidth, and the
roofline of a training step from a compiled program's per-chip FLOPs, HBM traffic and collective bytes.

Numbers are the vendors' published per-chip figures (Cloud TPU system-architecture pages; NVIDIA's SXM
datasheets, dense i.e. without 2:4 sparsity). ``ici`` is the bidirectional chip-to-chip bandwidth of one chip
(TPU ICI, NVLink), the bandwidth a collective on one mesh axis is assumed to get: a roofline, not a simulation.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Chip", "CHIPS", "parse_topology", "roofline"]

GB, GIB = 1e9, 2 ** 30


@dataclass(frozen=True)
class Chip:
    """One accelerator chip: ``bf16`` and ``fp8`` dense FLOP/s (``fp8`` = ``bf16`` where FP8 runs at the bf16
    rate, as on v5p), HBM bytes and bytes/s, bidirectional interconnect bytes/s, and whether a deviceless
    compile for it exists here (TPU: ``jax.experimental.topologies``; GPU: none)."""

    name: str
    bf16: float
    fp8: float
    hbm: float
    hbm_bw: float
    ici: float
    compilable: bool


CHIPS = {
    "v4": Chip("TPU v4", 275e12, 275e12, 32 * GIB, 1200 * GB, 300 * GB, True),
    "v5e": Chip("TPU v5e", 197e12, 394e12, 16 * GIB, 819 * GB, 400 * GB, True),
    "v5p": Chip("TPU v5p", 459e12, 459e12, 95 * GIB, 2765 * GB, 1200 * GB, True),
    "v6e": Chip("TPU v6e", 918e12, 1836e12, 32 * GIB, 1638 * GB, 800 * GB, True),
    "h100": Chip("NVIDIA H100 SXM", 989e12, 1979e12, 80 * GB, 3350 * GB, 900 * GB, False),
    "h800": Chip("NVIDIA H800 SXM", 989e12, 1979e12, 80 * GB, 3350 * GB, 400 * GB, False),
    "h200": Chip("NVIDIA H200 SXM", 989e12, 1979e12, 141 * GB, 4800 * GB, 900 * GB, False),
    "b200": Chip("NVIDIA B200", 2250e12, 4500e12, 180 * GB, 8000 * GB, 1800 * GB, False),
}


def parse_topology(topology: str) -> tuple[str, Chip, int]:
    """``"v5p:4x4x4"`` -> ``("v5p", chip, 64)``; GPUs as ``"h100:256"`` (a chip count). Errors name the known
    chips and the form."""
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", topology.strip().lower())
    if not m or m.group(1) not in CHIPS:
        raise ValueError(f"--topology {topology!r}: expected <chip>:<AxBxC> with chip one of {sorted(CHIPS)} "
                         "(e.g. v5p:4x4x4, v5e:16x16, h100:256)")
    return m.group(1), CHIPS[m.group(1)], math.prod(int(x) for x in m.group(2).split("x"))


def roofline(chip: Chip, flops: float, hbm_bytes: float, collective_bytes: float, model_flops: float,
             fp8: bool = False) -> dict[str, Any]:
    """Step-time bounds of one chip's program: compute ``flops / peak``, memory ``hbm_bytes / hbm_bw`` and
    communication ``collective_bytes / ici``; the step takes at least the largest (perfect overlap) and at
    most their sum (none). MFU = ``model_flops`` (the model's useful FLOPs per chip, no recomputation) over
    peak x step time, for both bounds."""
    peak = chip.fp8 if fp8 else chip.bf16
    t = {"compute_s": flops / peak, "memory_s": hbm_bytes / chip.hbm_bw, "collective_s": collective_bytes / chip.ici}
    best, worst = max(t.values()), sum(t.values())
    return {**{k: float(v) for k, v in t.items()}, "step_s_overlapped": best, "step_s_serial": worst,
            "bound": max(t, key=t.get).removesuffix("_s"),
            "mfu_overlapped": model_flops / (peak * best) if best else 0.0,
            "mfu_serial": model_flops / (peak * worst) if worst else 0.0,
            "peak_flops": peak, "chip": asdict(chip),
            "assumptions": "per-chip roofline: compute at the dense peak, every HBM byte XLA's cost analysis counts "
                           "read once at the HBM bandwidth, every collective byte over one chip's bidirectional "
                           "interconnect bandwidth; overlapped = max of the three, serial = their sum"}
