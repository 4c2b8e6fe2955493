"""The lock-step SPMD pipeline executor (pipeline.md §5): one ``shard_map`` manual over the mesh axes (all, or
all but ``auto_axes``, which the compiler partitions inside from sharding constraints), a
``lax.scan`` over the program's ticks, one ``lax.switch`` per tick on the action kind, fixed-shape
``ppermute`` channels over ``stage`` after it, and a manual ``jax.vjp`` per backward action. Gradients come out
of it (nothing differentiates through it), accumulated in the scan carry and reduced once after the scan.

The model enters as three functions of per-device arrays (manual mode: collectives explicit)::

    embed_fn(shared, inputs) -> x                   before the first stage of a pipe (e.g. the embedding)
    stage_fn(w, shared, x, inputs) -> y | (y, extra_loss, stats)    one stage chunk (w: its parameters)
    loss_fn(shared, y, inputs) -> loss | (loss, stats)              after the last stage of a pipe

``extra_loss`` (e.g. a balance loss the stage's layers produce) joins the objective on every stage; ``stats``
(e.g. expert loads) are summed over forward actions only (never the backward's recompute: pitfall P9).

``x``/``y`` are the activations passed between stages (one shape for all stages); ``inputs`` one micro-batch's
inputs. Every rank evaluates ``embed_fn`` and ``loss_fn`` and keeps them only where its stage is first /
last (a ``where``, not a device-varying ``cond``: pitfall P5). ``w`` leaves
are ``[n_ranks, chunks, ...]``, rank ``r``'s chunk ``j`` being stage ``program.chunks[r][j]`` (see
:func:`stage_params`); ``shared`` (embedding, head, ...) is replicated over ``stage``.

VMA typing (pitfalls P1, P2): ``check_vma=True``; weights are made varying over the batch axes before any
vjp (else every backward action all-reduces over data), activations and stashes vary over the batch axes and
``stage``, cotangents are cast to their primal's type.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from deepseek_jax.kernels.backend import vary, vary_like
from deepseek_jax.parallel.pipeline.program import COLUMNS, Program

__all__ = ["make_executor", "stage_params", "merge_stage_grads"]

_C = {c: i for i, c in enumerate(COLUMNS)}
NOOP, F, B, I, W, FB = range(6)  # simulator.TICK_KINDS


def stage_params(program: Program, stacked):
    """Model stages ``[pipe_len, ...]`` -> the executor's ``[n_ranks, chunks, ...]`` (a stage held twice, as in
    DualPipe, is copied)."""
    plen = program.schedule.pipe_len
    idx = np.array([[s % plen for s in ch] for ch in program.chunks])
    return jax.tree.map(lambda a: a[idx], stacked)


def merge_stage_grads(program: Program, grads):
    """Inverse of :func:`stage_params` for gradients: the copies of a stage are summed."""
    plen = program.schedule.pipe_len
    idx = np.array([[s % plen for s in ch] for ch in program.chunks]).reshape(-1)

    def merge(g):
        flat = g.reshape((-1,) + g.shape[2:])
        return jnp.zeros((plen,) + g.shape[2:], g.dtype).at[idx].add(flat)
    return jax.tree.map(merge, grads)


def _split_stage(out):
    """``stage_fn``'s result as ``(y, extra loss, stats)``: it may return ``y`` alone."""
    return out if isinstance(out, tuple) else (out, 0.0, {})


def _split_loss(out):
    """``loss_fn``'s result as ``(loss, stats)``: it may return the loss alone."""
    return out if isinstance(out, tuple) else (out, {})


class _Ranks:
    """The per-device body's pieces: one instance per trace of ``make_executor``'s ``per_device``. The scan
    carry is a dict: stashes ``x``/``g``, gradient sums ``gw`` (per chunk) and ``gsh``, the ``loss`` sum, and
    the forward-only statistics ``stats`` (per chunk, from ``stage_fn``) and ``head_stats`` (from ``loss_fn``)."""

    def __init__(self, program, fns, w, shared, inputs, batch_axes, stage_axis):
        self.program, (self.embed_fn, self.stage_fn, self.loss_fn) = program, fns
        self.batch_axes, self.stage_axis = batch_axes, stage_axis
        self.act_axes = batch_axes + (stage_axis,)
        self.w = jax.tree.map(lambda a: vary(a[0], batch_axes), w)          # [chunks, ...], P2
        self.shared = jax.tree.map(lambda a: vary(a, self.act_axes), shared)
        self.inputs = inputs
        act = self.act = jax.eval_shape(self.embed_fn, self.shared, self.micro(0))
        self.zero = vary(jnp.zeros(act.shape, act.dtype), self.act_axes)

    def micro(self, i):
        return jax.tree.map(lambda a: a[i], self.inputs)

    def chunk(self, j):
        return jax.tree.map(lambda a: a[j], self.w)

    def run(self, wj, sh, x, row, part):
        """One stage chunk on one micro-batch: ``(y, its share of the objective), (stage stats, head stats)``;
        the head's loss and statistics count only where the stage is its pipe's last (a ``where``)."""
        inp = self.micro(row[_C[f"{part}_in"]])
        first, last = row[_C[f"{part}_first"]] == 1, row[_C[f"{part}_last"]] == 1
        x = jnp.where(first, vary(self.embed_fn(sh, inp).astype(x.dtype), self.act_axes), x)
        y, extra, stats = _split_stage(self.stage_fn(wj, sh, x, inp))
        y = vary(y, self.act_axes)
        loss, head_stats = _split_loss(self.loss_fn(sh, y, inp))
        total = (extra + jnp.where(last, loss, 0.0)) / self.program.n_inputs
        head_stats = jax.tree.map(lambda v: jnp.where(last, v, jnp.zeros_like(v)), head_stats)
        return (y, vary(jnp.asarray(total, jnp.float32), self.act_axes)), (stats, head_stats)

    def forward(self, carry, row):
        x = carry["x"][jnp.maximum(row[_C["f_x"]], 0)]
        j = row[_C["f_chunk"]]
        (y, loss), (stats, head_stats) = self.run(self.chunk(j), self.shared, x, row, "f")
        carry = dict(carry, loss=carry["loss"] + loss,  # statistics from forwards only (P9)
                     stats=jax.tree.map(lambda acc, v: acc.at[j].add(vary_like(v, acc)), carry["stats"], stats),
                     head_stats=jax.tree.map(lambda acc, v: acc + vary_like(v, acc), carry["head_stats"], head_stats))
        return carry, y

    def backward(self, carry, row, want_w, want_x):
        """Recompute the chunk from its stashed input and take the vjp; ``I`` drops the weight cotangents and
        ``W`` the input cotangent (XLA removes the dead products)."""
        j = row[_C["b_chunk"]]
        x, g = carry["x"][jnp.maximum(row[_C["b_x"]], 0)], carry["g"][jnp.maximum(row[_C["b_g"]], 0)]
        (y, loss), vjp = jax.vjp(lambda wj, sh, x: self.run(wj, sh, x, row, "b")[0], self.chunk(j), self.shared, x)
        gy = vary_like(jnp.where(row[_C["b_last"]] == 1, 0.0, g).astype(y.dtype), y)
        dw, dsh, dx = vjp((gy, vary_like(jnp.ones((), loss.dtype), loss)))
        if want_w:
            carry = dict(carry, gw=jax.tree.map(lambda acc, d: acc.at[j].add(vary_like(d, acc)), carry["gw"], dw),
                         gsh=jax.tree.map(lambda acc, d: acc + vary_like(d, acc), carry["gsh"], dsh))
        return carry, (vary(dx, self.act_axes) if want_x else self.zero)

    def branch(self, kind):
        def body(carry, row):
            y, dx = self.zero, self.zero
            if kind in (F, FB):
                carry, y = self.forward(carry, row)
            if kind in (B, I, W, FB):
                carry, dx = self.backward(carry, row, want_w=kind != I, want_x=kind != W)
            return carry, y, dx
        return body

    def deliver(self, stash, payload, to, slot):
        """This tick's messages into ``stash``: one ``ppermute`` per channel offset (payload and a slot tag,
        -1 = nothing for you: P11), and the local turn (offset 0) as a plain write."""
        n = self.program.schedule.n_ranks
        for off in self.program.channels:
            perm = [(i, (i + off) % n) for i in range(n)]
            tag = jax.lax.ppermute(jnp.where(to == off, slot, -1), self.stage_axis, perm)
            got = jax.lax.ppermute(payload, self.stage_axis, perm)
            at = jnp.maximum(tag, 0)
            stash = stash.at[at].set(jnp.where(tag >= 0, got, stash[at]))
        here = jnp.maximum(jnp.where(to == 0, slot, 0), 0)
        return stash.at[here].set(jnp.where(to == 0, payload, stash[here]))

    def tick(self, carry, row):
        carry, y, dx = jax.lax.switch(row[_C["kind"]], [self.branch(k) for k in range(6)], carry, row)
        carry = dict(carry, x=self.deliver(carry["x"], y, row[_C["f_to"]], row[_C["f_slot"]]),
                     g=self.deliver(carry["g"], dx, row[_C["b_to"]], row[_C["b_slot"]]))
        return carry, None

    def initial_carry(self):
        stash = lambda depth: vary(jnp.zeros((depth,) + self.act.shape, self.act.dtype), self.act_axes)  # noqa: E731
        zeros = lambda tree: jax.tree.map(lambda v: vary(jnp.zeros(v.shape, v.dtype), self.act_axes), tree)  # noqa: E731
        row = jnp.asarray(self.program.table[0, 0])
        _, (stats, head_stats) = jax.eval_shape(lambda: self.run(self.chunk(0), self.shared, self.zero, row, "f"))
        k = len(self.program.chunks[0])
        return {"x": stash(self.program.x_depth), "g": stash(self.program.g_depth),
                "gw": jax.tree.map(jnp.zeros_like, self.w), "gsh": jax.tree.map(jnp.zeros_like, self.shared),
                "loss": vary(jnp.zeros((), jnp.float32), self.act_axes),
                "stats": zeros(jax.tree.map(lambda v: jax.ShapeDtypeStruct((k,) + v.shape, v.dtype), stats)),
                "head_stats": zeros(head_stats)}

    def mean_grad(self, g, spec, extra=()):
        """A gradient's one reduction: the mean over batch shards. A leaf split over a batch axis (experts over
        ``expert``) already holds the sum over that axis's shards (the dispatch's transpose brought it), so it
        is summed over the other batch axes only and divided by every shard."""
        owned = {a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)}
        over = tuple(a for a in self.batch_axes if a not in owned) + tuple(extra)
        shards = np.prod([jax.lax.axis_size(a) for a in self.batch_axes]) if self.batch_axes else 1
        return (jax.lax.psum(g, over) if over else g) / shards

    def __call__(self, table, w_specs, shared_specs):
        """Run this rank's row of the program; reduce once: mean over batch shards (sum for statistics), sum
        over stages for what every stage shares."""
        rank = jax.lax.axis_index(self.stage_axis)
        out, _ = jax.lax.scan(self.tick, self.initial_carry(), table[rank])
        mean = (lambda v: jax.lax.pmean(v, self.batch_axes)) if self.batch_axes else (lambda v: v)
        total = (lambda v: jax.lax.psum(v, self.batch_axes)) if self.batch_axes else (lambda v: v)
        gw = jax.tree.map(lambda g, s: self.mean_grad(g, s)[None], out["gw"], _spec_tree(w_specs, out["gw"]))
        gsh = jax.tree.map(lambda g, s: self.mean_grad(g, s, (self.stage_axis,)), out["gsh"],
                           _spec_tree(shared_specs, out["gsh"]))
        stats = jax.tree.map(lambda v: total(v)[None], out["stats"])
        head_stats = jax.tree.map(lambda v: total(jax.lax.psum(v, self.stage_axis)), out["head_stats"])
        return jax.lax.psum(mean(out["loss"]), self.stage_axis), (gw, gsh), (stats, head_stats)


def _spec_tree(specs, like):
    """``specs`` as a tree shaped like ``like`` (one ``PartitionSpec`` may stand for a whole tree)."""
    return jax.tree.map(lambda _: specs, like) if isinstance(specs, P) else specs


def make_executor(program: Program, mesh, embed_fn: Callable, stage_fn: Callable, loss_fn: Callable, *, w_specs,
                  shared_specs=None, input_specs=None, batch_axes=("data", "fsdp", "expert"), stage_axis="stage",
                  auto_axes=()):
    """A jitted ``(w, shared, inputs) -> (loss, (w_grads, shared_grads), (stats, head_stats))`` running
    ``program`` on ``mesh``.

    ``w_specs``/``shared_specs``: ``PartitionSpec`` trees of the global ``w`` (leading dims ``stage, None``)
    and ``shared``; ``inputs`` leaves are ``[n_inputs, batch, ...]``, the batch split over ``batch_axes``
    unless ``input_specs`` says otherwise. The loss is the mean over micro-batches (and batch shards) of
    ``loss_fn`` plus ``stage_fn``'s extra losses; gradients are those of that mean, ``w_grads`` and ``stats`` in
    the ``[n_ranks, chunks, ...]`` layout. Statistics (e.g. expert loads) are summed over the forwards of all
    micro-batches and batch shards.

    ``auto_axes``: mesh axes left to the compiler inside (e.g. ``tensor`` for a model whose tensor parallelism
    is written as sharding constraints): the specs name only the other axes, and the functions see those
    axes' global shapes. A leaf split over a batch axis in ``w_specs``/``shared_specs`` (experts over
    ``expert``) must come out of the vjp summed over that axis (an all-to-all's transpose does that)."""
    batch_axes = tuple(a for a in batch_axes if a in mesh.axis_names and a not in auto_axes)
    shared_specs = P() if shared_specs is None else shared_specs

    def per_device(w, shared, inputs):
        return _Ranks(program, (embed_fn, stage_fn, loss_fn), w, shared, inputs, batch_axes, stage_axis)(
            jnp.asarray(program.table), w_specs, shared_specs)  # the table: a constant of this trace

    in_specs = (w_specs, shared_specs, P(None, batch_axes) if input_specs is None else input_specs)
    manual = {a for a in mesh.axis_names if a not in auto_axes}
    fn = jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, axis_names=manual,
                       out_specs=(P(), (w_specs, shared_specs), (P(stage_axis), P())), check_vma=True)
    return jax.jit(fn)
