"""The lock-step SPMD pipeline executor (pipeline.md §5): one ``shard_map`` manual over every mesh axis, a
``lax.scan`` over the program's ticks, one ``lax.switch`` per tick on the action kind, fixed-shape
``ppermute`` channels over ``stage`` after it, and a manual ``jax.vjp`` per backward action. Gradients come out
of it (nothing differentiates through it), accumulated in the scan carry and reduced once after the scan.

The model enters as three functions of per-device arrays (manual mode: collectives explicit)::

    embed_fn(shared, inputs) -> x                   before the first stage of a pipe (e.g. the embedding)
    stage_fn(w, shared, x, inputs) -> y             one stage chunk: w is that chunk's parameters
    loss_fn(shared, y, inputs) -> scalar            after the last stage of a pipe: the micro-batch's loss

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


def _vary(x, axes):
    """``x`` made varying over those of ``axes`` it is not yet varying over."""
    missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _like(x, ref):
    return _vary(x, tuple(jax.typeof(ref).manual_axis_type.varying))


class _Ranks:
    """The per-device body's pieces: one instance per trace of ``make_executor``'s ``per_device``."""

    def __init__(self, program, fns, w, shared, inputs, batch_axes, stage_axis):
        self.program, (self.embed_fn, self.stage_fn, self.loss_fn) = program, fns
        self.batch_axes, self.stage_axis = batch_axes, stage_axis
        self.act_axes = batch_axes + (stage_axis,)
        self.w = jax.tree.map(lambda a: _vary(a[0], batch_axes), w)          # [chunks, ...], P2
        self.shared = jax.tree.map(lambda a: _vary(a, self.act_axes), shared)
        self.inputs = inputs
        act = self.act = jax.eval_shape(self.embed_fn, self.shared, self.micro(0))
        self.zero = _vary(jnp.zeros(act.shape, act.dtype), self.act_axes)

    def micro(self, i):
        return jax.tree.map(lambda a: a[i], self.inputs)

    def chunk(self, j):
        return jax.tree.map(lambda a: a[j], self.w)

    def run(self, wj, sh, x, row, part):
        """One stage chunk on one micro-batch: ``(y, this micro-batch's share of the loss or 0)``."""
        inp = self.micro(row[_C[f"{part}_in"]])
        first, last = row[_C[f"{part}_first"]] == 1, row[_C[f"{part}_last"]] == 1
        x = jnp.where(first, _vary(self.embed_fn(sh, inp).astype(x.dtype), self.act_axes), x)
        y = _vary(self.stage_fn(wj, sh, x, inp), self.act_axes)
        loss = jnp.where(last, self.loss_fn(sh, y, inp) / self.program.n_inputs, 0.0)
        return y, _vary(loss.astype(jnp.float32), self.act_axes)

    def forward(self, carry, row):
        x = carry[0][jnp.maximum(row[_C["f_x"]], 0)]
        y, loss = self.run(self.chunk(row[_C["f_chunk"]]), self.shared, x, row, "f")
        return carry[:4] + (carry[4] + loss,), y

    def backward(self, carry, row, want_w, want_x):
        """Recompute the chunk from its stashed input and take the vjp; ``I`` drops the weight cotangents and
        ``W`` the input cotangent (XLA removes the dead products)."""
        xs, gs, gw, gsh, lsum = carry
        j = row[_C["b_chunk"]]
        x, g = xs[jnp.maximum(row[_C["b_x"]], 0)], gs[jnp.maximum(row[_C["b_g"]], 0)]
        (y, loss), vjp = jax.vjp(lambda wj, sh, x: self.run(wj, sh, x, row, "b"), self.chunk(j), self.shared, x)
        gy = _like(jnp.where(row[_C["b_last"]] == 1, 0.0, g).astype(y.dtype), y)
        dw, dsh, dx = vjp((gy, _like(jnp.ones((), loss.dtype), loss)))
        if want_w:
            gw = jax.tree.map(lambda acc, d: acc.at[j].add(_like(d, acc)), gw, dw)
            gsh = jax.tree.map(lambda acc, d: acc + _like(d, acc), gsh, dsh)
        return (xs, gs, gw, gsh, lsum), (_vary(dx, self.act_axes) if want_x else self.zero)

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
        xs, gs, gw, gsh, lsum = carry
        xs = self.deliver(xs, y, row[_C["f_to"]], row[_C["f_slot"]])
        gs = self.deliver(gs, dx, row[_C["b_to"]], row[_C["b_slot"]])
        return (xs, gs, gw, gsh, lsum), None

    def __call__(self, table):
        """Run this rank's row of the program; reduce once: mean over batch shards, sum over stages for what
        every stage shares."""
        stash = lambda depth: _vary(jnp.zeros((depth,) + self.act.shape, self.act.dtype), self.act_axes)  # noqa: E731
        carry = (stash(self.program.x_depth), stash(self.program.g_depth), jax.tree.map(jnp.zeros_like, self.w),
                 jax.tree.map(jnp.zeros_like, self.shared), _vary(jnp.zeros((), jnp.float32), self.act_axes))
        rank = jax.lax.axis_index(self.stage_axis)
        (_, _, gw, gsh, lsum), _ = jax.lax.scan(self.tick, carry, table[rank])
        mean = (lambda v: jax.lax.pmean(v, self.batch_axes)) if self.batch_axes else (lambda v: v)
        gw = jax.tree.map(lambda g: mean(g)[None], gw)
        gsh = jax.tree.map(lambda g: mean(jax.lax.psum(g, self.stage_axis)), gsh)
        return jax.lax.psum(mean(lsum), self.stage_axis), (gw, gsh)


def make_executor(program: Program, mesh, embed_fn: Callable, stage_fn: Callable, loss_fn: Callable, *, w_specs,
                  shared_specs=None, input_specs=None, batch_axes=("data", "fsdp", "expert"), stage_axis="stage"):
    """A jitted ``(w, shared, inputs) -> (loss, (w_grads, shared_grads))`` running ``program`` on ``mesh``.

    ``w_specs``/``shared_specs``: ``PartitionSpec`` trees of the global ``w`` (leading dims ``stage, None``)
    and ``shared``; ``inputs`` leaves are ``[n_inputs, batch, ...]``, the batch split over ``batch_axes``
    unless ``input_specs`` says otherwise. The loss is the mean over micro-batches (and batch shards) of
    ``loss_fn``; gradients are those of that mean, ``w_grads`` in the ``[n_ranks, chunks, ...]`` layout."""
    table = jnp.asarray(program.table)
    batch_axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    shared_specs = P() if shared_specs is None else shared_specs

    def per_device(w, shared, inputs):
        return _Ranks(program, (embed_fn, stage_fn, loss_fn), w, shared, inputs, batch_axes, stage_axis)(table)

    in_specs = (w_specs, shared_specs, P(None, batch_axes) if input_specs is None else input_specs)
    fn = jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=(P(), (w_specs, shared_specs)),
                       check_vma=True)
    return jax.jit(fn)
