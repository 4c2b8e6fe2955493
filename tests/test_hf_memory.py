"""Loading streams tensor by tensor: host peak ~ the result plus about one tensor, not twice the model."""

from __future__ import annotations

import tracemalloc

import numpy as np

import deepseek_jax as dsj
from deepseek_jax.hf.mapping import hf_rules


def test_load_peak_host_memory_is_result_plus_one_tensor(tmp_path):
    # many small expert tensors: the result is large compared with any single tensor
    cfg = dsj.load_config("tiny", **{"moe.n_routed_experts": 64, "moe.router.n_group": 4, "mtp.depth": 0})
    variables = dsj.init_variables(cfg, 0)
    dsj.hf.save_checkpoint(cfg, variables, tmp_path)
    result_bytes = sum(np.asarray(x).nbytes for x in __import__("jax").tree_util.tree_leaves(variables))
    largest = max(np.prod(r.hf_shape) * 4 for r in hf_rules(cfg))
    assert result_bytes > 40 * largest  # the test can tell streaming from load-everything

    tracemalloc.start()
    try:
        dsj.hf.load_checkpoint(tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"result {result_bytes / 2**20:.1f} MiB, largest tensor {largest / 2**20:.2f} MiB, "
          f"peak host {peak / 2**20:.1f} MiB")
    assert peak < result_bytes + 4 * largest + (4 << 20)
