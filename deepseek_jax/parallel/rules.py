"""The ONE table of logical axis names -> mesh axes, and the helpers that read it.

One table, :data:`RULES`, maps every logical axis name (parameters and activations) to mesh axes;
everything else derives from it. In the scaling-book notation (``A[I_X, J]``: dim I split over
mesh axis X):

* parameters: ``W_embed[V_tensor, D_fsdp]`` (vocabulary-parallel), attention ``Wq_b[Q_fsdp, N_tensor, H]``,
  ``Wo[N_tensor, V, D_fsdp]`` (head-parallel), ``W1[D_fsdp, F_tensor]``, experts ``W1[E_expert, D_fsdp,
  F_tensor]``; every weight matrix has one ``fsdp`` axis (``embed``, else the MLA latent rank); norm
  scales and router biases replicated (small);
* activations: ``x[B_(data,fsdp,expert), T, D]`` (attention and dense layers are batch-parallel over
  the expert axis too, so no device idles), heads and MLP hidden split over ``tensor``.

FSDP (ZeRO-3): parameters live split over ``fsdp``; each product gathers its weight inside a
``shard_map`` next to the matmul (:mod:`deepseek_jax.parallel.fsdp`), so the gradient leaves as one
reduce-scatter. Layers call :func:`constrain` on their activations;
it does nothing unless a mesh is set (``jax.set_mesh``), so single-device code is unchanged.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from deepseek_jax.parallel.mesh import BATCH_AXES, manual_axes

__all__ = ["RULES", "logical_spec", "named_sharding", "batch_spec", "constrain", "fsdp_gather"]

RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "qk_head": None,  # MLA query/key width per head, p + r
    "kv_head": None,  # MLA wkv_b output per head, p + v
    "v_head": None,  # MLA value width per head
    "q_lora": None,  # wq_a's output (and q_norm): the row of wq_a is sharded over embed already
    "kv_lora": None,
    # The input (LoRA rank) axis of the MLA up-projections wq_b [q, n, p+r] and wkv_b [c, n, p+v]: they
    # have no embed axis, so FSDP shards them here (V3: 6.8 GB of bf16 weights that stayed whole before).
    "q_latent": "fsdp",
    "kv_latent": "fsdp",
    "exp": "expert",
    "mlp_moe": "tensor",
    "mtp_concat": None,
    # NSA's compression MLP phi: its input (the l flattened tokens of a block) and hidden axes, and the key
    # features of its position encoding, over fsdp
    "nsa_in": "fsdp",
    "nsa_hidden": "fsdp",
    "nsa_feature": "fsdp",
    "norm": None,
    "layers": None,
    # activations
    "act_batch": BATCH_AXES,
    "act_length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    # KV caches (inference): the batch like activations, per-head K/V over tensor; the length is whole
    "cache_batch": BATCH_AXES,
    "cache_length": None,
    "cache_heads": "tensor",
    "cache_feature": None,
}


def logical_spec(names: Sequence[str | None]) -> P:
    """PartitionSpec of logical axis ``names`` under :data:`RULES` (``None`` = replicated dim)."""
    missing = [n for n in names if n is not None and n not in RULES]
    if missing:
        raise KeyError(f"logical axis {missing} has no entry in parallel.rules.RULES")
    return P(*(None if n is None else RULES[n] for n in names))


def named_sharding(mesh: jax.sharding.Mesh, names: Sequence[str | None]) -> NamedSharding:
    """``NamedSharding`` of logical axis ``names`` on ``mesh``."""
    return NamedSharding(mesh, logical_spec(names))


def batch_spec(ndim: int) -> P:
    """``[batch, ...]`` arrays (tokens, positions, per-row scalars): the batch split like activations."""
    return logical_spec(("act_batch",) + (None,) * (ndim - 1))


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """``with_sharding_constraint`` by logical names when a mesh is set, else ``x`` unchanged. Inside a
    ``shard_map`` (manual mode, e.g. the pipeline executor) the manual axes are dropped from the constraint:
    the code there is per device, and only axes left to the compiler can be constrained."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_spec(names)
    manual = manual_axes()
    if manual:
        spec = P(*(_without(e, manual) for e in spec))
        if all(e is None for e in spec):
            return x
    return jax.lax.with_sharding_constraint(x, spec)


def _without(entry, axes: set[str]):
    """A ``PartitionSpec`` entry (None, an axis, or a tuple of axes) with ``axes`` removed."""
    kept = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a not in axes)
    return None if not kept else kept[0] if len(kept) == 1 else kept


def fsdp_gather(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """FSDP (ZeRO-3): a parameter stored sharded over ``fsdp``, gathered whole where a layer uses it.

    ``W[D_fsdp, F] -> W[D, F]`` by an explicit ``all_gather`` over ``fsdp`` in ``jax.shard_map``. The
    result is replicated, so its gradient is all-reduced before the gather's transpose reduce-scatters it:
    products use :mod:`deepseek_jax.parallel.fsdp` instead; this serves other uses (FP8 weights, the
    absorbed-MLA decode). A no-op without a mesh, with ``fsdp = 1`` or where ``fsdp`` is manual (the pipeline
    executor gathers weights once per step).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or dict(mesh.shape).get("fsdp", 1) == 1 or "fsdp" in manual_axes():
        return x
    spec = logical_spec(names)
    dims = [i for i, s in enumerate(spec) if s == "fsdp"]
    if not dims:
        return x
    dim = dims[0]
    out = P(*(None if i == dim else s for i, s in enumerate(spec)))
    return jax.shard_map(lambda v: jax.lax.all_gather(v, "fsdp", axis=dim, tiled=True), mesh=mesh,
                         in_specs=spec, out_specs=out, check_vma=False)(x)
