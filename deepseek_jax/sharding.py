"""``dsj.sharding``: the public face of the SPMD layout (API.md), re-exported from its homes.

The mesh lives in :mod:`deepseek_jax.parallel.mesh`, the one rules table in :mod:`deepseek_jax.parallel.rules`,
and the placement of the model's variables in :mod:`deepseek_jax.nn.placement`.
"""

from deepseek_jax.nn.placement import check_layout, init_sharded, param_shardings, shard_variables
from deepseek_jax.parallel.mesh import BATCH_AXES, MESH_AXES, make_mesh, mesh_size, parse_mesh
from deepseek_jax.parallel.rules import RULES, constrain, fsdp_gather, logical_spec

__all__ = ["MESH_AXES", "BATCH_AXES", "RULES", "make_mesh", "parse_mesh", "mesh_size", "logical_spec", "constrain",
           "fsdp_gather", "param_shardings", "check_layout", "shard_variables", "init_sharded"]
