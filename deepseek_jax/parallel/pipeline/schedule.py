"""Pipeline schedules as data: an action IR, the generators, a validator, and torch's string / CSV form.

A schedule is one ordered action list per rank (device index on the ``stage`` mesh axis). Stage ids are
global: a micro-batch runs through the stages of its *pipe* in order, ``pipe_len`` consecutive ids per pipe.
One pipe of ``n_ranks`` stages for GPipe, 1F1B and ZB-H1; one pipe of ``n_ranks * virtual`` stages for
interleaved 1F1B (rank ``r`` holds ``r, r + P, ...``); one pipe of ``2N`` stages for DualPipeV (rank ``r``
holds ``r`` and ``2N-1-r``: the "V"); two pipes of ``PP`` stages for DualPipe (direction 0 enters at rank 0,
direction 1 at rank ``PP-1``; rank ``r`` holds stage ``r`` of direction 0, id ``r``, and stage ``PP-1-r`` of
direction 1, id ``2PP-1-r``), each fed ``C/2`` micro-batches.

Action kinds (pipeline.md §1): ``F`` forward; ``B`` full backward; ``I`` input-gradient half and ``W``
weight-gradient half of a backward (zero-bubble); ``FB`` a forward and a backward of two micro-batches run as
one overlapped unit (DualPipe). String form, as ``torch.distributed.pipelining`` writes it: ``"0F3"`` (stage
0, forward, micro-batch 3), ``"3I2"``, ``"3W2"``, ``"3B2"``, ``"(0F7;7B3)OVERLAP_F_B"``.

The DualPipe and DualPipeV generators follow the eight phases of ``DualPipe.step`` / ``DualPipeV.step`` in
deepseek-ai/DualPipe; ``dualpipev(4, 10)`` equals torch's published ``dualpipev_4rank_10mb.csv`` action for
action (tested).
"""

from __future__ import annotations

import collections
import dataclasses
import re

__all__ = ["Action", "Schedule", "SCHEDULES", "make_schedule", "gpipe", "one_f_one_b", "interleaved_1f1b",
           "zb_h1", "dualpipe", "dualpipev", "validate", "parse_action", "to_csv", "from_csv"]

KINDS = ("F", "B", "I", "W", "FB")


@dataclasses.dataclass(frozen=True)
class Action:
    """One unit of work on one rank. For ``FB``, ``(stage, mb)`` is the forward and ``(stage_b, mb_b)`` the
    backward of the overlapped pair."""
    kind: str
    stage: int
    mb: int
    stage_b: int = -1
    mb_b: int = -1

    def __str__(self) -> str:
        if self.kind == "FB":
            return f"({self.stage}F{self.mb};{self.stage_b}B{self.mb_b})OVERLAP_F_B"
        return f"{self.stage}{self.kind}{self.mb}"

    def parts(self) -> tuple[Action, ...]:
        """The single actions: an ``FB`` is its ``F`` then its ``B``."""
        if self.kind == "FB":
            return Action("F", self.stage, self.mb), Action("B", self.stage_b, self.mb_b)
        return (self,)


_SINGLE = re.compile(r"^(\d+)([FBIW])(\d+)$")
_PAIR = re.compile(r"^\((\d+)F(\d+);(\d+)B(\d+)\)OVERLAP_F_B$")


def parse_action(text: str) -> Action:
    """Inverse of ``str(action)``: ``"0F3"``, ``"3W2"``, ``"(0F7;7B3)OVERLAP_F_B"``."""
    text = text.strip()
    if m := _SINGLE.match(text):
        return Action(m[2], int(m[1]), int(m[3]))
    if m := _PAIR.match(text):
        return Action("FB", int(m[1]), int(m[2]), int(m[3]), int(m[4]))
    raise ValueError(f"{text!r} is not a pipeline action: expected e.g. '0F3', '3I2' or '(0F7;7B3)OVERLAP_F_B'")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-rank action lists plus the facts needed to check and run them.

    ``ranks[r]``: rank ``r``'s actions in order. ``n_stages`` global stage ids, ``pipe_len`` stages per pipe
    (``n_stages // pipe_len`` pipes), ``n_microbatches`` micro-batches per pipe."""
    name: str
    ranks: tuple[tuple[Action, ...], ...]
    n_stages: int
    pipe_len: int
    n_microbatches: int

    @property
    def n_ranks(self) -> int:
        return len(self.ranks)

    def strings(self) -> list[list[str]]:
        return [[str(a) for a in acts] for acts in self.ranks]

    def stage_rank(self) -> dict[int, int]:
        """Which rank holds each stage (validated: exactly one)."""
        return {a.stage: r for r, acts in enumerate(self.ranks) for act in acts for a in act.parts()}

    def rank_stages(self, rank: int) -> tuple[int, ...]:
        """The stages on ``rank``, in order of their first action."""
        return tuple(dict.fromkeys(a.stage for act in self.ranks[rank] for a in act.parts()))


def to_csv(schedule: Schedule) -> str:
    """One comma-separated row per rank, torch's artifact format."""
    return "".join(",".join(row) + "\n" for row in schedule.strings())


def from_csv(text: str, *, name: str = "csv", pipe_len: int | None = None) -> Schedule:
    """Read :func:`to_csv`'s form. ``pipe_len`` defaults to all stages in one pipe."""
    ranks = tuple(tuple(parse_action(s) for s in line.split(",")) for line in text.strip().splitlines())
    stages = {a.stage for acts in ranks for act in acts for a in act.parts()}
    n_stages = max(stages) + 1
    pipe_len = pipe_len or n_stages
    n_mb = len({a.mb for acts in ranks for act in acts for a in act.parts() if a.stage == 0})
    return Schedule(name, ranks, n_stages, pipe_len, n_mb)


# ----------------------------------------------------------------------------------------------- generators

def _need(cond: bool, field: str, why: str) -> None:
    if not cond:
        raise ValueError(f"pipeline {field}: {why}")


def _check_sizes(n_ranks: int, n_microbatches: int) -> None:
    _need(n_ranks >= 1, "stages (n_ranks)", f"needs at least one rank, got {n_ranks}")
    _need(n_microbatches >= 1, "microbatches", f"needs at least one micro-batch, got {n_microbatches}")


def gpipe(n_ranks: int, n_microbatches: int) -> Schedule:
    """All forwards, then all backwards (Huang et al. 2019): peak activations ``C`` on every rank."""
    _check_sizes(n_ranks, n_microbatches)
    c = n_microbatches
    ranks = tuple(tuple([Action("F", r, m) for m in range(c)] + [Action("B", r, m) for m in range(c)])
                  for r in range(n_ranks))
    return Schedule("gpipe", ranks, n_ranks, n_ranks, c)


def one_f_one_b(n_ranks: int, n_microbatches: int) -> Schedule:
    """1F1B (PipeDream-flush): rank ``r`` warms up with ``P-1-r`` forwards, then alternates one forward and one
    backward, then drains: peak activations ``P - r``."""
    _check_sizes(n_ranks, n_microbatches)
    p, c = n_ranks, n_microbatches
    ranks = []
    for r in range(p):
        warm = min(p - 1 - r, c)
        acts = [Action("F", r, m) for m in range(warm)]
        for m in range(warm, c):
            acts += [Action("F", r, m), Action("B", r, m - warm)]
        acts += [Action("B", r, m) for m in range(c - warm, c)]
        ranks.append(tuple(acts))
    return Schedule("1f1b", tuple(ranks), p, p, c)


def interleaved_1f1b(n_ranks: int, n_microbatches: int, virtual: int = 2) -> Schedule:
    """Interleaved 1F1B (Narayanan et al. 2021, Megatron-LM): rank ``r`` holds ``virtual`` chunks, stages
    ``r + j P``; micro-batches go in groups of ``P``. Bubble ``(P-1)(F+B)`` in per-chunk costs, i.e. ``1/v``
    of 1F1B's for the same model. Needs ``C % P == 0``."""
    _check_sizes(n_ranks, n_microbatches)
    p, c, v = n_ranks, n_microbatches, virtual
    _need(v >= 1, "virtual", f"needs at least one chunk per rank, got {v}")
    _need(c % p == 0, "microbatches", f"interleaved_1f1b needs a multiple of the {p} ranks, got {c}")
    total = c * v

    def chunk_mb(k: int, backward: bool) -> tuple[int, int]:
        j = (k // p) % v
        return (v - 1 - j if backward else j), (k // (p * v)) * p + k % p

    ranks = []
    for r in range(p):
        warm = min((p - 1 - r) * 2 + (v - 1) * p, total)
        order = [("F", k) for k in range(warm)]
        for i in range(total - warm):
            order += [("F", warm + i), ("B", i)]
        order += [("B", k) for k in range(total - warm, total)]
        acts = []
        for kind, k in order:
            j, m = chunk_mb(k, kind == "B")
            acts.append(Action(kind, r + j * p, m))
        ranks.append(tuple(acts))
    return Schedule(f"interleaved_1f1b(v={v})", tuple(ranks), p * v, p * v, c)


def zb_h1(n_ranks: int, n_microbatches: int) -> Schedule:
    """ZB-H1 (Qi et al. 2024, "zero bubble"): 1F1B with every backward split into ``I`` then a deferred ``W``;
    rank ``r`` lets ``r`` weight-gradient halves wait (torch's ``num_1f1b_microbatches = rank``) and runs them
    to fill the cooldown. Bubble ``(P-1)(F+B-2W)``, activations as 1F1B."""
    _check_sizes(n_ranks, n_microbatches)
    p, c = n_ranks, n_microbatches
    ranks = []
    for r in range(p):
        warm = min(p - 1 - r, c)
        acts, w = [Action("F", r, m) for m in range(warm)], 0
        for step, i in enumerate(range(c)):
            if warm + step < c:
                acts.append(Action("F", r, warm + step))
            acts.append(Action("I", r, i))
            if step >= r:  # the first r weight halves wait for the cooldown
                acts.append(Action("W", r, w))
                w += 1
        acts += [Action("W", r, m) for m in range(w, c)]
        ranks.append(tuple(acts))
    return Schedule("zb_h1", tuple(ranks), p, p, c)


class _DualRank:
    """One rank's action list in DualPipe's phase vocabulary: ``phase`` 0/1 picks the rank's two stages;
    counters give each phase's next micro-batch; zero-bubble backwards queue their ``W``."""

    def __init__(self, stage_of_phase: tuple[int, int]):
        self.stage = stage_of_phase
        self.next = {"F": [0, 0], "B": [0, 0]}
        self.w_queue: collections.deque[Action] = collections.deque()
        self.acts: list[Action] = []

    def _take(self, kind: str, phase: int) -> int:
        mb = self.next[kind][phase]
        self.next[kind][phase] += 1
        return mb

    def f(self, phase: int) -> None:
        self.acts.append(Action("F", self.stage[phase], self._take("F", phase)))

    def b(self, phase: int, split: bool = False) -> None:
        mb = self._take("B", phase)
        if split:
            self.w_queue.append(Action("W", self.stage[phase], mb))
        self.acts.append(Action("I" if split else "B", self.stage[phase], mb))

    def w(self) -> None:
        self.acts.append(self.w_queue.popleft())

    def fb(self, f_phase: int, b_phase: int) -> None:
        mf, mb = self._take("F", f_phase), self._take("B", b_phase)
        self.acts.append(Action("FB", self.stage[f_phase], mf, self.stage[b_phase], mb))


def _dual_phases(rank: _DualRank, h: int, half: int, per_pipe: int) -> tuple[Action, ...]:
    """The eight phases of ``DualPipe.step`` for a rank at depth ``h`` (distance from the nearer end; DualPipeV:
    the rank index) of ``half`` (PP/2; DualPipeV: N), ``per_pipe`` micro-batches per pipe."""
    inner = h == half - 1  # middle ranks (DualPipe) / the turning rank (DualPipeV)
    for _ in range((half - h - 1) * 2):          # 1: forwards of phase 0
        rank.f(0)
    for _ in range(h + 1):                       # 2: forward pairs
        rank.f(0)
        rank.f(1)
    for _ in range(half - h - 1):                # 3: zero-bubble backward, its W, a forward
        rank.b(1, split=True)
        rank.w()
        rank.f(1)
    for i in range(per_pipe - 2 * half + h + 1):  # 4: the overlapped steady state
        if i == 0 and inner:
            rank.f(0)
            rank.b(1)
        else:
            rank.fb(0, 1)
        rank.fb(1, 0)
    for _ in range(half - h - 1):                # 5: backward, overlapped pair
        rank.b(1)
        rank.fb(1, 0)
    split = False
    for i in range(h + 1):                       # 6: backward pairs, switching to split halves midway
        split = split or (i == (h + 1) // 2 and h % 2 == 1)
        rank.b(1, split)
        split = split or (i == (h + 1) // 2 and h % 2 == 0)
        rank.b(0, split)
    for _ in range(half - h - 1):                # 7: weight halves and split backwards
        rank.w()
        rank.b(0, split=True)
    for _ in range(h + 1):                       # 8: drain the weight queue
        rank.w()
    assert not rank.w_queue
    return tuple(rank.acts)


def dualpipe(n_ranks: int, n_microbatches: int) -> Schedule:
    """DualPipe (DeepSeek-V3 §3.2.1): two pipes fed from both ends, ``C/2`` micro-batches each; every rank holds
    one stage of each (two copies of the model's stages over the ranks). Needs even ``PP``, even ``C``,
    ``C >= 2 PP``."""
    _check_sizes(n_ranks, n_microbatches)
    pp, c = n_ranks, n_microbatches
    _need(pp % 2 == 0, "stages (n_ranks)", f"dualpipe needs an even number of ranks, got {pp}")
    _need(c % 2 == 0, "microbatches", f"dualpipe needs an even count (half per direction), got {c}")
    _need(c >= 2 * pp, "microbatches", f"dualpipe needs at least 2 x {pp} ranks = {2 * pp}, got {c}")
    ranks = []
    for r in range(pp):
        stages = (r, 2 * pp - 1 - r)   # (direction 0 stage r, direction 1 stage PP-1-r)
        if r >= pp // 2:               # the second half starts with direction 1
            stages = stages[::-1]
        ranks.append(_dual_phases(_DualRank(stages), min(r, pp - 1 - r), pp // 2, c // 2))
    return Schedule("dualpipe", tuple(ranks), 2 * pp, pp, c // 2)


def dualpipev(n_ranks: int, n_microbatches: int) -> Schedule:
    """DualPipeV ("cut-in-half" DualPipe): ``N`` ranks, ``2N`` stages in a V (rank ``r`` holds ``r`` and
    ``2N-1-r``), so rank 0 holds both the embedding and the head. Needs ``C >= 2N``."""
    _check_sizes(n_ranks, n_microbatches)
    n, c = n_ranks, n_microbatches
    _need(c >= 2 * n, "microbatches", f"dualpipev needs at least 2 x {n} ranks = {2 * n}, got {c}")
    ranks = tuple(_dual_phases(_DualRank((r, 2 * n - 1 - r)), r, n, c) for r in range(n))
    return Schedule("dualpipev", ranks, 2 * n, 2 * n, c)


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "interleaved_1f1b": interleaved_1f1b, "zb_h1": zb_h1,
             "dualpipe": dualpipe, "dualpipev": dualpipev}


def make_schedule(name: str, n_ranks: int, n_microbatches: int, **options) -> Schedule:
    """The named schedule, validated. ``options``: ``virtual`` for ``interleaved_1f1b``."""
    if name not in SCHEDULES:
        raise ValueError(f"pipeline schedule: unknown {name!r}; choose one of {sorted(SCHEDULES)}")
    schedule = SCHEDULES[name](n_ranks, n_microbatches, **options)
    validate(schedule)
    return schedule


# ----------------------------------------------------------------------------------------------- validation

def validate(schedule: Schedule) -> None:
    """Raise ``ValueError`` unless: every stage lives on one rank; every (stage, micro-batch) has one ``F`` and
    either one ``B`` or one ``I`` and one ``W``; on its rank the ``F`` precedes the ``B``/``I``, the ``I``
    precedes the ``W`` (no weight half left queued). Cross-rank order (deadlock freedom) is the simulator's
    check: :func:`deepseek_jax.parallel.pipeline.simulator.simulate` raises on a deadlock."""
    owner: dict[int, int] = {}
    seen: dict[tuple[int, int], list[str]] = collections.defaultdict(list)
    for r, acts in enumerate(schedule.ranks):
        for act in acts:
            _need(act.kind in KINDS, "schedule", f"rank {r}: unknown action kind {act.kind!r}")
            for a in act.parts():
                if owner.setdefault(a.stage, r) != r:
                    raise ValueError(f"pipeline schedule: stage {a.stage} appears on ranks {owner[a.stage]} and {r}")
                if not (0 <= a.stage < schedule.n_stages and 0 <= a.mb < schedule.n_microbatches):
                    raise ValueError(f"pipeline schedule: rank {r}: {a} is outside {schedule.n_stages} stages x "
                                     f"{schedule.n_microbatches} micro-batches")
                seen[a.stage, a.mb].append(a.kind)
    _need(len(owner) == schedule.n_stages, "schedule", f"stages {sorted(set(range(schedule.n_stages)) - set(owner))} "
          "have no actions")
    for s in range(schedule.n_stages):
        for m in range(schedule.n_microbatches):
            kinds = seen.get((s, m), [])
            if kinds not in (["F", "B"], ["F", "I", "W"]):
                raise ValueError(f"pipeline schedule: stage {s} micro-batch {m} runs {kinds or 'nothing'} in rank "
                                 "order; expected F then B, or F then I then W")
