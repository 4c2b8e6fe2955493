"""Pipeline simulator: run a :class:`~deepseek_jax.parallel.pipeline.schedule.Schedule` with per-action costs.

Each rank executes its list in order; an action starts when its rank is free and its inputs exist:
``F(s, m)`` needs ``F(s-1, m)`` (same pipe), ``B/I(s, m)`` need ``F(s, m)`` and the input gradient of
``(s+1, m)`` (from its ``B`` or ``I``), ``W(s, m)`` needs ``I(s, m)``. An input produced on another rank arrives
``latency`` later. An ``FB`` pair is one action of cost ``FB`` needing both halves' inputs.

Products: the makespan, per-rank busy time and bubble (makespan - busy), the peak number of live activation
stashes per rank (forward done, input gradient not yet), the peak of weight-gradient residual sets (forward
done, weight gradient not yet), the trace; and for the executor, the lock-step **tick table** (unit costs,
every action one tick) and a static **stash slot** allocation whose depth is the simulated peak.

The peaks depend only on each rank's own order, never on costs: every count changes only by that rank's
actions. An ``FB`` holds its forward's new stash while its backward still reads the old one, so it counts
one above the live count after it (DualPipe's ``PP + 1``).
"""

from __future__ import annotations

import numpy as np

from deepseek_jax.parallel.pipeline.schedule import Action, Schedule

__all__ = ["simulate", "default_costs", "tick_table", "stash_slots", "allocate_slots", "peaks", "TICK_KINDS",
           "UNIT_COSTS"]

TICK_KINDS = ("NOOP", "F", "B", "I", "W", "FB")  # codes 0..5 in the tick table
UNIT_COSTS = {"F": 1.0, "B": 1.0, "I": 1.0, "W": 1.0, "FB": 1.0}  # lock-step: every action one tick


def default_costs(costs: dict | None = None) -> dict[str, float]:
    """Complete a cost dict: ``F`` 1, ``B`` 2, ``W`` 1, ``I = B - W``, ``FB = F + B``, ``latency`` 0. Giving ``I``
    and ``W`` without ``B`` sets ``B = I + W``."""
    c = dict(costs or {})
    unknown = set(c) - {"F", "B", "I", "W", "FB", "latency"}
    if unknown:
        raise ValueError(f"pipeline costs: unknown keys {sorted(unknown)}; use F, B, I, W, FB, latency")
    c.setdefault("F", 1.0)
    c.setdefault("W", 1.0 if "B" not in c else c["B"] / 2)
    if "B" not in c:
        c["B"] = c["I"] + c["W"] if "I" in c else 2.0
    c.setdefault("I", c["B"] - c["W"])
    c.setdefault("FB", c["F"] + c["B"])
    c.setdefault("latency", 0.0)
    for k, v in c.items():
        if v < 0:
            raise ValueError(f"pipeline costs: {k} = {v} is negative")
    return c


def _needs(a: Action, pipe_len: int) -> list[tuple[str, int, int]]:
    """Events a single action waits for: ``("F", s, m)`` forward done, ``("I", s, m)`` input gradient done."""
    pos = a.stage % pipe_len
    if a.kind == "F":
        return [("F", a.stage - 1, a.mb)] if pos > 0 else []
    if a.kind in ("B", "I"):
        return [("F", a.stage, a.mb)] + ([("I", a.stage + 1, a.mb)] if pos < pipe_len - 1 else [])
    return [("I", a.stage, a.mb)]  # W


def _gives(a: Action) -> list[tuple[str, int, int]]:
    return {"F": [("F", a.stage, a.mb)], "I": [("I", a.stage, a.mb)], "W": [],
            "B": [("I", a.stage, a.mb)]}[a.kind]


def simulate(schedule: Schedule, costs: dict | None = None) -> dict:
    """Run ``schedule`` with ``costs`` (keys ``F, B, I, W, FB, latency``; :func:`default_costs`). Returns
    ``makespan``, per-rank ``busy``, ``bubble``, ``peak_activations``, ``peak_w_residuals``, and ``trace``
    (per rank: ``(start, end, action)``). Raises ``RuntimeError`` naming the stuck actions on a deadlock."""
    c = default_costs(costs)
    owner = schedule.stage_rank()
    done: dict[tuple[str, int, int], tuple[float, int]] = {}  # event -> (time, rank)
    free = [0.0] * schedule.n_ranks
    ptr = [0] * schedule.n_ranks
    trace: list[list[tuple[float, float, Action]]] = [[] for _ in schedule.ranks]
    progress = True
    while progress:
        progress = False
        for r, acts in enumerate(schedule.ranks):
            while ptr[r] < len(acts):
                act = acts[ptr[r]]
                needs = [e for a in act.parts() for e in _needs(a, schedule.pipe_len)]
                if not all(e in done for e in needs):
                    break
                start = max([free[r]] + [t + (c["latency"] if src != r else 0.0)
                                         for t, src in (done[e] for e in needs)])
                free[r] = start + c[act.kind]
                trace[r].append((start, free[r], act))
                for a in act.parts():
                    for e in _gives(a):
                        done[e] = (free[r], owner[a.stage])
                ptr[r] += 1
                progress = True
    if any(p < len(acts) for p, acts in zip(ptr, schedule.ranks)):
        stuck = {r: str(acts[p]) for r, (p, acts) in enumerate(zip(ptr, schedule.ranks)) if p < len(acts)}
        raise RuntimeError(f"pipeline schedule {schedule.name!r} deadlocks: next actions per rank {stuck}")
    busy = [sum(c[a.kind] for a in acts) for acts in schedule.ranks]
    makespan = max(free)
    act_peak, w_peak = peaks(schedule)
    return {"makespan": makespan, "busy": busy, "bubble": [makespan - b for b in busy],
            "peak_activations": act_peak, "peak_w_residuals": w_peak, "trace": trace, "costs": c}


def peaks(schedule: Schedule) -> tuple[list[int], list[int]]:
    """Per rank: peak live activation stashes (``F`` done, ``B``/``I`` not) and peak weight-gradient residual
    sets (``F`` done, ``B``/``W`` not), in rank order."""
    act_peak, w_peak = [], []
    for acts in schedule.ranks:
        live = [0, 0]
        top = [0, 0]
        for act in acts:
            for a in act.parts():
                live[0] += {"F": 1, "B": -1, "I": -1}.get(a.kind, 0)
                live[1] += {"F": 1, "B": -1, "W": -1}.get(a.kind, 0)
            extra = 1 if act.kind == "FB" else 0  # the pair's new stash exists while its backward reads the old
            top = [max(top[0], live[0] + extra), max(top[1], live[1] + extra)]
        act_peak.append(top[0])
        w_peak.append(top[1])
    return act_peak, w_peak


def tick_table(schedule: Schedule) -> np.ndarray:
    """The lock-step program: ``[n_ranks, T, 5]`` int32 rows ``(kind, stage_f, mb_f, stage_b, mb_b)`` with kind
    a :data:`TICK_KINDS` code. Every action takes one tick and may use what other ranks produced in earlier
    ticks (a unit-cost, zero-latency simulation), so ``T`` is the unit-cost makespan and a rank's NOOP rows are
    its unit-cost bubble. ``F`` fills the ``_f`` columns, ``B``/``I``/``W`` the ``_b`` columns, ``FB`` both;
    unused columns hold -1."""
    sim = simulate(schedule, UNIT_COSTS)
    ticks = int(round(sim["makespan"]))
    table = np.full((schedule.n_ranks, ticks, 5), -1, np.int32)
    table[..., 0] = 0
    for r, events in enumerate(sim["trace"]):
        for start, _, a in events:
            t = int(round(start))
            table[r, t, 0] = TICK_KINDS.index(a.kind)
            if a.kind == "F":
                table[r, t, 1:3] = a.stage, a.mb
            elif a.kind == "FB":
                table[r, t, 1:] = a.stage, a.mb, a.stage_b, a.mb_b
            else:
                table[r, t, 3:5] = a.stage, a.mb
    return table


def allocate_slots(intervals: list[tuple[int, int]]) -> tuple[list[int], int]:
    """Interval colouring: closed ``[first, last]`` lifetimes -> a slot per interval such that no two
    overlapping intervals share one, and the slot count. Greedy by start is optimal for intervals: the count
    equals the largest number alive at once."""
    order = sorted(range(len(intervals)), key=lambda i: intervals[i])
    slot = [0] * len(intervals)
    free: list[int] = []
    busy: list[tuple[int, int]] = []  # (last, slot)
    count = 0
    for i in order:
        first, last = intervals[i]
        for end, s in sorted(busy):
            if end < first:
                free.append(s)
        busy = [(e, s) for e, s in busy if e >= first]
        if free:
            free.sort()
            slot[i] = free.pop(0)
        else:
            slot[i], count = count, count + 1
        busy.append((last, slot[i]))
    return slot, count


def stash_slots(schedule: Schedule, release: str = "I") -> tuple[list[dict[tuple[int, int], int]], list[int]]:
    """Static stash slots per rank: ``(stage, mb) -> slot`` and the depth, for stashes written by the ``F`` and
    released by the input-gradient half (``release="I"``: ``B`` or ``I``) or by the weight half (``"W"``: ``B``
    or ``W``). Lifetimes are positions in the rank's action list (closed), so the depth is :func:`peaks`'s."""
    ends = {"I": ("B", "I"), "W": ("B", "W")}[release]
    maps, depths = [], []
    for acts in schedule.ranks:
        first: dict[tuple[int, int], int] = {}
        spans: dict[tuple[int, int], tuple[int, int]] = {}
        for i, act in enumerate(acts):
            for a in act.parts():
                if a.kind == "F":
                    first[a.stage, a.mb] = i
                elif a.kind in ends:
                    spans[a.stage, a.mb] = (first[a.stage, a.mb], i)
        keys = list(spans)
        slots, depth = allocate_slots([spans[k] for k in keys])
        maps.append(dict(zip(keys, slots)))
        depths.append(depth)
    return maps, depths
