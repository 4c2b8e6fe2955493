"""Expert parallelism: routed experts split over the mesh axis ``expert``, tokens dispatched with explicit
collectives inside ``jax.shard_map`` (DeepSeek-V3 §3.2.2).

Per device (tokens ``x[N_batch, D]`` local, experts ``W[E_expert, D, F_tensor]``)::

    1. for each destination shard s, the tokens that chose at least one expert on s, each sent ONCE with
       its k expert slots (local id, gate weight; empty slots marked) -- node-limited routing (router
       groups = expert shards) bounds a token's destinations by ``topk_group``;
    2. all_to_all over ``expert``: every shard receives the rows meant for its experts;
    3. grouped GEMM over the received (row, slot) pairs (only the blocks in use: the buffers are sized for
       the worst case), combined per row with the gate weights;
       ``F`` split over ``tensor`` gives partial sums, all-reduced over ``tensor``;
    4. all_to_all back, and each token sums the rows returned by its destinations.

The buffers are ``[shards, capacity, d]``: shard s's rows start at ``s * capacity``. Dropless (the default)
sizes ``capacity`` = local tokens, so nothing can overflow; ``moe.capacity_factor`` sizes it to ``factor *
tokens * min(k, shards) / shards`` and drops the overflow explicitly, counting it. How the buffers cross
the ``expert`` axis follows the platform (:func:`exchange_impl`): on GPU/TPU ``ragged_all_to_all`` moves only
the rows in use (each source's rows land at ``source * capacity`` on the receiver, the layout the dense
exchange gives, so everything around the exchange is the same program); XLA:CPU has no
``ragged_all_to_all`` and sends the whole buffers with ``all_to_all``, padding included.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax.kernels.backend import has_fast_kernels
from deepseek_jax.kernels.grouped_gemm import grouped_gemm_impl, routed_experts
from deepseek_jax.parallel.mesh import BATCH_AXES, manual_axes

__all__ = ["ep_routed_experts", "dispatch_capacity", "local_expert_shards", "exchange_impl", "EXCHANGES"]

EXCHANGES = ("dense", "ragged")


def exchange_impl(backend: str | None = None) -> str:
    """``"ragged"`` (``ragged_all_to_all``: only the rows in use cross the axis) where the platform has it
    (GPU, TPU; the mesh's platform, see :func:`~deepseek_jax.kernels.backend.current_platform`), else
    ``"dense"`` (``all_to_all`` of the whole capacity-padded buffers)."""
    return "ragged" if has_fast_kernels(backend) else "dense"


def local_expert_shards() -> int:
    """How many shards the routed experts are split into *here*: the ``expert`` axis size inside a region
    manual over it (the pipeline executor, where each device holds ``e / expert`` experts), else 1 (the
    weights are global arrays, sharded or not)."""
    return jax.lax.axis_size("expert") if "expert" in manual_axes() else 1


def dispatch_capacity(n_local: int, k: int, shards: int, capacity_factor: float | None) -> int:
    """Rows per destination shard in the send buffer (``n_local`` = dropless)."""
    if capacity_factor is None:
        return n_local
    return max(1, min(n_local, math.ceil(capacity_factor * n_local * min(k, shards) / shards)))


def _exchanges(counts: jax.Array, cap: int, impl: str):
    """``(there, back)``: functions ``(buffer [ep * cap, ...], fill) -> buffer`` moving buffers over ``expert``
    and returning the results; ``counts[s]`` = rows this device sends to shard s (they start at ``s * cap``).
    Rows received from source j sit at ``j * cap`` either way; with ``"ragged"``, rows nobody sent are
    ``fill`` (the dense exchange carries the sender's padding, which holds the same values)."""
    ep = counts.shape[0]

    def dense(a, fill):
        return jax.lax.all_to_all(a.reshape((ep, cap) + a.shape[1:]), "expert", 0, 0).reshape(a.shape)

    if impl == "dense":
        return dense, dense
    starts = jnp.arange(ep, dtype=jnp.int32) * cap
    mine = jnp.full((ep,), jax.lax.axis_index("expert") * cap, jnp.int32)  # where my rows land on every peer
    recv = jax.lax.all_to_all(counts, "expert", 0, 0, tiled=True)  # rows each source sends me

    def ragged(sizes_out, sizes_in):
        def move(a, fill):
            out = jnp.full_like(a, fill)
            return jax.lax.ragged_all_to_all(a, out, starts, sizes_out, mine, sizes_in, axis_name="expert")
        return move
    return ragged(counts, recv), ragged(recv, counts)


def _local(x, weights, experts, w1, w3, w2, *, capacity_factor, tensor, fp8=None, fsdp=False, exchange="dense"):
    """Body run on every device; see module docstring. Returns (y [n, d], dropped rows, dispatched rows).
    ``fsdp``: the weights arrive split over ``fsdp`` on their ``D`` dim and are gathered here, so their
    gradients leave as a reduce-scatter (:mod:`deepseek_jax.parallel.fsdp`)."""
    if fsdp:
        w1, w3 = (jax.lax.all_gather(w, "fsdp", axis=1, tiled=True) for w in (w1, w3))
        w2 = jax.lax.all_gather(w2, "fsdp", axis=2, tiled=True)
    ep = jax.lax.axis_size("expert")
    n, d = x.shape
    if ep == 1:  # every expert is local: no dispatch collectives at all
        y = routed_experts(x, weights, experts, w1, w3, w2, fp8=fp8)
        y = jax.lax.psum(y, "tensor") if tensor > 1 else y
        return y, jnp.zeros((), jnp.int32), jax.lax.psum(jnp.int32(n), BATCH_AXES)
    k = experts.shape[1]
    e_local = w1.shape[0]
    shard = experts // e_local  # [n, k] destination shard of each slot
    here = shard[:, None, :] == jnp.arange(ep)[None, :, None]  # [n, ep, k]
    needs = here.any(-1)  # [n, ep] token i has an expert on shard s
    cap = dispatch_capacity(n, k, ep, capacity_factor)
    pos = jnp.cumsum(needs, axis=0) - 1
    keep = needs & (pos < cap)
    slot = jnp.where(keep, jnp.arange(ep)[None] * cap + pos, ep * cap).reshape(-1)  # ep*cap = dropped
    token_of_slot = jnp.full((ep * cap,), n, jnp.int32).at[slot].set(
        jnp.repeat(jnp.arange(n, dtype=jnp.int32), ep), mode="drop")
    ids = jnp.where(here, experts[:, None, :] % e_local, e_local).reshape(n * ep, k)  # e_local = empty slot
    gate = jnp.where(here, weights[:, None, :], 0).reshape(n * ep, k).astype(x.dtype)
    send_x = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])[token_of_slot]
    send_ids = jnp.full((ep * cap, k), e_local, jnp.int32).at[slot].set(ids, mode="drop")
    send_gate = jnp.zeros((ep * cap, k), x.dtype).at[slot].set(gate, mode="drop")

    there, back_to = _exchanges(keep.sum(0, dtype=jnp.int32), cap, exchange)
    rx, rids, rgate = there(send_x, 0), there(send_ids, e_local), there(send_gate, 0)
    # empty slots carry id e_local ("no expert"); the buffers are sized for the worst case and mostly
    # empty, so on block kernels only the blocks in use are computed
    impl = "ragged" if grouped_gemm_impl() == "ragged" else "blocks_dynamic"
    y = routed_experts(rx, rgate, rids, w1, w3, w2, impl=impl, fp8=fp8)
    if tensor > 1:
        y = jax.lax.psum(y, "tensor")
    back = back_to(y, 0)
    out = jnp.zeros((n + 1, d), y.dtype).at[token_of_slot].add(back)[:n]
    axes = BATCH_AXES
    dropped = jax.lax.psum((needs & ~keep).sum(), axes)
    dispatched = jax.lax.psum(keep.sum(), axes)
    return out, dropped, dispatched


def ep_routed_experts(x, weights, experts, w1, w3, w2, mesh, capacity_factor: float | None = None, fp8=None,
                      fsdp: bool = False, exchange: str | None = None):
    """Routed experts on a mesh: ``x[N_batch, D]``, ``weights/experts[N_batch, K]``, ``w1,w3[E_expert, D, F_tensor]``,
    ``w2[E_expert, F_tensor, D]`` -> ``(y[N_batch, D], dropped, dispatched)`` (row counts, global).
    ``fsdp=True``: the weights are passed as stored, ``D`` split over ``fsdp``, and gathered per device.
    ``exchange``: one of :data:`EXCHANGES` (default :func:`exchange_impl`)."""
    exchange = exchange or exchange_impl()
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange={exchange!r} must be one of {EXCHANGES}")
    tensor = mesh.shape["tensor"]
    manual = manual_axes()
    if "expert" in manual:  # already per device over the batch axes (the pipeline executor): run the body
        # here, no nested shard_map (pipeline.md P3). A tensor axis left to the compiler must not split F here:
        # resharding the kernel's [w1 | w3] concatenation takes collective-permutes, which deadlock inside
        # the executor's per-stage branches on XLA:CPU (the pipeline keeps routed experts whole over tensor).
        if "tensor" not in manual and tensor > 1:  # whole over tensor, also if the compiler would rather split
            w1, w3, w2 = (jax.lax.with_sharding_constraint(w, P()) for w in (w1, w3, w2))
            tensor = 1
        return _local(x, weights, experts, w1, w3, w2, capacity_factor=capacity_factor, tensor=tensor, fp8=fp8,
                      fsdp=fsdp and "fsdp" not in manual, exchange=exchange)
    tok = P(BATCH_AXES, None)
    d = "fsdp" if fsdp else None
    fn = jax.shard_map(
        lambda *a: _local(*a, capacity_factor=capacity_factor, tensor=tensor, fp8=fp8, fsdp=fsdp, exchange=exchange),
        mesh=mesh,
        in_specs=(tok, tok, tok, P("expert", d, "tensor"), P("expert", d, "tensor"), P("expert", "tensor", d)),
        out_specs=(tok, P(), P()), check_vma=False)
    return fn(x, weights, experts, w1, w3, w2)
