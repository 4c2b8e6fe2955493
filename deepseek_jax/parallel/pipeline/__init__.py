"""Pipeline parallelism on the ``stage`` mesh axis (``shared/docs/pipeline.md``): schedules as data
(:mod:`.schedule`), a simulator that turns them into bubbles, activation peaks and the lock-step tick table
(:mod:`.simulator`). Nothing here imports the model.

The public face (``API.md``)::

    dsj.pipeline.schedule("dualpipev", 4, 10)      # per-rank action strings, torch's form
    dsj.pipeline.simulate(sched, {"F": 1, "B": 2, "W": 1})   # makespan, bubble, peak_activations, ...
"""

from __future__ import annotations

from deepseek_jax.parallel.pipeline import simulator as _sim
from deepseek_jax.parallel.pipeline.schedule import (SCHEDULES, Action, Schedule, from_csv, make_schedule,
                                                     parse_action, to_csv, validate)
from deepseek_jax.parallel.pipeline.simulator import (TICK_KINDS, allocate_slots, default_costs, peaks,
                                                     stash_slots, tick_table)

__all__ = ["schedule", "simulate", "make_schedule", "Schedule", "Action", "SCHEDULES", "validate", "parse_action",
           "to_csv", "from_csv", "tick_table", "stash_slots", "allocate_slots", "peaks", "default_costs",
           "TICK_KINDS"]


def schedule(name: str, n_ranks: int, n_microbatches: int, **options) -> list[list[str]]:
    """Per-rank action lists of the named schedule in ``torch.distributed.pipelining``'s string form
    (``"0F3"``, ``"3I2"``, ``"(0F7;7B3)OVERLAP_F_B"``); ``name`` in :data:`SCHEDULES`. Validated."""
    return make_schedule(name, n_ranks, n_microbatches, **options).strings()


def simulate(sched: Schedule | list[list[str]], costs: dict | None = None, *, pipe_len: int | None = None) -> dict:
    """Simulate a :class:`Schedule`, or per-rank action strings (one pipe through all stages unless
    ``pipe_len`` says otherwise: DualPipe's strings need ``pipe_len = n_ranks``). ``costs``: keys ``F, B, I, W,
    FB, latency``. Returns ``makespan``, ``bubble`` and ``peak_activations`` per rank, and more
    (:func:`deepseek_jax.parallel.pipeline.simulator.simulate`)."""
    if not isinstance(sched, Schedule):
        sched = from_csv("\n".join(",".join(row) for row in sched), pipe_len=pipe_len)
        validate(sched)
    return _sim.simulate(sched, costs)
