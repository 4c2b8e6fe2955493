"""Provenance for benchmark JSON: git SHA, package versions, machine."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib import metadata


def provenance() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(__file__)).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=os.path.dirname(__file__)).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        sha, dirty = "unknown", None
    import jax

    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {"git_sha": sha, "git_dirty": dirty, "versions": versions, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()][:2], "machine": platform.machine(),
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def time_fn(fn, *args, warmup: int = 2, iters: int = 10) -> float:
    """Median seconds per call of a jitted ``fn`` (blocks on the result)."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]
