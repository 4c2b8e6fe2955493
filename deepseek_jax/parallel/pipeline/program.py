"""The static program the lock-step executor runs: per rank and tick, which action, on which local chunk and
micro-batch, which stash slots it reads, and where its outputs go.

Built from a :class:`~deepseek_jax.parallel.pipeline.schedule.Schedule` by a unit-cost simulation (every action
one tick; an action uses only what earlier ticks produced). Stage ``s`` runs on ``owner(s)``; its forward
output goes to ``owner(s + 1)`` and its input gradient to ``owner(s - 1)`` (same pipe). A message travels on
the *channel* of its rank offset ``(to - from) mod n``: one ``ppermute`` per distinct non-zero offset each
tick, offset 0 (DualPipeV's turn) a local write.

Stashes (per rank, static slots, pipeline.md §4-5): ``x`` holds a stage input from its arrival until its
last use (the ``B``, or the ``W`` of a split backward: stage-boundary recompute needs it); ``g`` holds an
output gradient from its arrival until its last use. A slot written at the end of tick ``t`` may be read by
another interval at tick ``t``; lifetimes are colour-allocated (:func:`allocate_slots`), so the depth is the
largest number alive at once, not the micro-batch count.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from deepseek_jax.parallel.pipeline.schedule import Action, Schedule
from deepseek_jax.parallel.pipeline.simulator import TICK_KINDS, UNIT_COSTS, allocate_slots, simulate

__all__ = ["Program", "build_program", "COLUMNS"]

# columns of Program.table; "f" for the forward part (F, FB), "b" for the backward part (B, I, W, FB);
# *_in: the row of the step's micro-batch inputs; *_x / *_g: stash slots (-1: none, first / last stage);
# *_to: channel offset of the output message (-1: none), *_slot: the slot it lands in on the receiver
COLUMNS = ("kind", "f_chunk", "f_in", "f_x", "f_first", "f_last", "f_to", "f_slot",
           "b_chunk", "b_in", "b_x", "b_g", "b_first", "b_last", "b_to", "b_slot")
_COL = {c: i for i, c in enumerate(COLUMNS)}


@dataclasses.dataclass(frozen=True)
class Program:
    """``table [n_ranks, T, len(COLUMNS)]`` int32; ``chunks[r]``: global stage ids of rank ``r``'s local chunks
    (chunk ``j`` of every rank has the same parameter structure); ``channels``: the non-zero rank offsets
    messages use; ``x_depth``/``g_depth``: stash slots (max over ranks; per rank in ``x_depths``/``g_depths``);
    ``n_inputs``: micro-batch input rows (``n_pipes * n_microbatches``)."""
    schedule: Schedule
    table: np.ndarray
    chunks: tuple[tuple[int, ...], ...]
    channels: tuple[int, ...]
    x_depths: tuple[int, ...]
    g_depths: tuple[int, ...]
    n_inputs: int

    @property
    def ticks(self) -> int:
        return self.table.shape[1]

    @property
    def x_depth(self) -> int:
        return max(max(self.x_depths), 1)

    @property
    def g_depth(self) -> int:
        return max(max(self.g_depths), 1)

    def idle_ticks(self) -> list[int]:
        return [int(n) for n in (self.table[..., 0] == 0).sum(1)]


def _ticks(schedule: Schedule) -> dict[tuple[str, int, int], tuple[int, int]]:
    """``("F" | "I" | "W", stage, mb) -> (tick, rank)`` of a unit-cost run; a full ``B`` gives both I and W."""
    sim = simulate(schedule, UNIT_COSTS)
    owner = schedule.stage_rank()
    at: dict[tuple[str, int, int], tuple[int, int]] = {}
    for events in sim["trace"]:
        for start, _, act in events:
            for a in act.parts():
                t = int(round(start))
                for kind in ("I", "W") if a.kind == "B" else (a.kind,):
                    at[kind, a.stage, a.mb] = (t, owner[a.stage])
    return at


def _slots(schedule: Schedule, at) -> tuple[list[dict], list[dict], list[int], list[int]]:
    """Per rank: ``(stage, mb) -> slot`` for the x and g stashes, and their depths. Times are doubled: reads at
    ``2t``, the end-of-tick writes at ``2t + 1``."""
    n, plen = schedule.n_ranks, schedule.pipe_len
    spans_x: list[dict] = [{} for _ in range(n)]
    spans_g: list[dict] = [{} for _ in range(n)]
    for (kind, s, m), (t, r) in at.items():
        if kind != "W":
            continue
        last = 2 * t  # the W (or the full B) is the last reader of both
        if s % plen:
            spans_x[r][s, m] = (2 * at["F", s - 1, m][0] + 1, last)
        if s % plen != plen - 1:
            spans_g[r][s, m] = (2 * at["I", s + 1, m][0] + 1, last)
    maps_x, maps_g, dx, dg = [], [], [], []
    for spans, maps, depths in ((spans_x, maps_x, dx), (spans_g, maps_g, dg)):
        for r in range(n):
            keys = sorted(spans[r])
            slots, depth = allocate_slots([spans[r][k] for k in keys])
            maps.append(dict(zip(keys, slots)))
            depths.append(depth)
    return maps_x, maps_g, dx, dg


def build_program(schedule: Schedule) -> Program:
    """The executor's tables for ``schedule`` (module docstring)."""
    n, plen, c = schedule.n_ranks, schedule.pipe_len, schedule.n_microbatches
    owner = schedule.stage_rank()
    chunks = tuple(schedule.rank_stages(r) for r in range(n))
    if len({len(ch) for ch in chunks}) != 1:
        raise ValueError(f"pipeline schedule {schedule.name!r}: ranks hold different numbers of stages {chunks}")
    local = {s: (r, j) for r, ch in enumerate(chunks) for j, s in enumerate(ch)}
    at = _ticks(schedule)
    x_slot, g_slot, x_depths, g_depths = _slots(schedule, at)
    ticks = 1 + max(t for t, _ in at.values())
    table = np.full((n, ticks, len(COLUMNS)), -1, np.int32)
    table[..., 0] = 0
    channels: set[int] = set()

    def fill(r: int, t: int, part: str, a: Action) -> None:
        s, m = a.stage, a.mb
        first, last = s % plen == 0, s % plen == plen - 1
        row = table[r, t]
        row[_COL[f"{part}_chunk"]] = local[s][1]
        row[_COL[f"{part}_in"]] = (s // plen) * c + m
        row[_COL[f"{part}_x"]] = -1 if first else x_slot[r][s, m]
        row[_COL[f"{part}_first"]], row[_COL[f"{part}_last"]] = first, last
        if part == "b":
            row[_COL["b_g"]] = -1 if last else g_slot[r][s, m]
        to = None
        if a.kind == "F" and not last:
            to, slot = owner[s + 1], x_slot[owner[s + 1]][s + 1, m]
        elif a.kind in ("B", "I") and not first:
            to, slot = owner[s - 1], g_slot[owner[s - 1]][s - 1, m]
        if to is not None:
            row[_COL[f"{part}_to"]], row[_COL[f"{part}_slot"]] = (to - r) % n, slot
            channels.add((to - r) % n)

    for r, acts in enumerate(schedule.ranks):
        for act in acts:
            parts = act.parts()
            t = at["F" if parts[0].kind == "F" else ("I" if parts[0].kind in ("B", "I") else "W"),
                   parts[0].stage, parts[0].mb][0]
            table[r, t, 0] = TICK_KINDS.index(act.kind)
            for a in parts:
                fill(r, t, "f" if a.kind == "F" else "b", a)
    channels.discard(0)
    return Program(schedule, table, chunks, tuple(sorted(channels)), tuple(x_depths), tuple(g_depths),
                   len({s // plen for s in range(schedule.n_stages)}) * c)
