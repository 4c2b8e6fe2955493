"""Pipeline schedules and simulator (parallel/pipeline/): torch's published DualPipeV golden, a DualPipe golden
from an independent transcription, validation over a sweep, DeepSeek's bubble table from random costs,
activation peaks, the lock-step tick table and the stash slot allocation."""

import itertools
import json
import random
from pathlib import Path

import jax
import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax.parallel import pipeline as pl
from deepseek_jax.parallel.pipeline import simulator as sim
from deepseek_jax.parallel.pipeline.schedule import Action, Schedule

GOLDEN = Path(__file__).parent / "golden"


def test_dualpipev_equals_torchs_published_schedule():
    # pytorch/pytorch test/distributed/pipelining/artifacts/dualpipev_4rank_10mb.csv, verbatim
    golden = (GOLDEN / "torch_dualpipev_4rank_10mb.csv").read_text()
    assert pl.to_csv(pl.make_schedule("dualpipev", 4, 10)) == golden
    assert dsj.pipeline.schedule("dualpipev", 4, 10) == [row.split(",") for row in golden.splitlines()]


def test_dualpipe_equals_an_independent_transcription():
    # written from shared/reference/pipeline/pp_sim.py's dualpipe(8, 20) (a separate transcription of
    # deepseek-ai/DualPipe's DualPipe.step), direction-1 stage k renamed to id 8 + k
    golden = (GOLDEN / "dualpipe_8rank_20mb.csv").read_text()
    assert pl.to_csv(pl.make_schedule("dualpipe", 8, 20)) == golden


def _sweep():
    for name, p in itertools.product(pl.SCHEDULES, range(2, 17)):
        lo = {"dualpipe": 2 * p, "dualpipev": 2 * p, "interleaved_1f1b": p}.get(name, 1)
        for c in range(lo, 4 * p + 1):
            if (name == "dualpipe" and (p % 2 or c % 2)) or (name == "interleaved_1f1b" and c % p):
                continue
            yield name, p, c


def test_every_generator_validates_and_runs_without_deadlock_over_a_sweep():
    count = 0
    for name, p, c in _sweep():
        s = pl.make_schedule(name, p, c)  # validates
        out = sim.simulate(s)             # raises on a deadlock
        assert out["makespan"] > 0
        for row in s.ranks:               # the string form reads back
            assert [pl.parse_action(str(a)) for a in row] == list(row)
        count += 1
    assert count > 1500


@pytest.mark.parametrize("name,p,c,field", [
    ("dualpipe", 3, 12, "stages"), ("dualpipe", 4, 9, "microbatches"), ("dualpipe", 4, 6, "microbatches"),
    ("dualpipev", 4, 7, "microbatches"), ("interleaved_1f1b", 4, 6, "microbatches"), ("1f1b", 0, 4, "stages"),
    ("1f1b", 4, 0, "microbatches"), ("zigzag", 4, 8, "schedule"),
])
def test_invalid_requests_name_the_field(name, p, c, field):
    with pytest.raises(ValueError, match=f"pipeline {field}"):
        pl.make_schedule(name, p, c)


def test_validate_and_simulate_reject_broken_schedules():
    good = pl.make_schedule("zb_h1", 2, 2)
    r0, r1 = (list(r) for r in good.ranks)
    broken = [
        (r0[:-1], r1, "stage 0 micro-batch 1 runs"),                              # a W left queued
        ([Action("W", 0, 0)] + [a for a in r0 if a != Action("W", 0, 0)], r1, "expected F then B"),
        (r0 + [Action("F", 1, 0)], r1, "stage 1 appears on ranks"),
    ]
    for a, b, msg in broken:
        with pytest.raises(ValueError, match=msg):
            pl.validate(Schedule("x", (tuple(a), tuple(b)), 2, 2, 2))
    swapped = Schedule("x", ((Action("B", 0, 0), Action("F", 0, 0)), (Action("F", 1, 0), Action("B", 1, 0))),
                       2, 2, 1)
    with pytest.raises(ValueError, match="expected F then B"):
        pl.validate(swapped)
    # cross-rank order is the simulator's: rank 1 starts micro-batch 1, whose forward rank 0 runs only after
    # the backward of micro-batch 0, which needs rank 1
    cycle = Schedule("x", ((Action("F", 0, 0), Action("B", 0, 0), Action("F", 0, 1), Action("B", 0, 1)),
                           (Action("F", 1, 1), Action("B", 1, 1), Action("F", 1, 0), Action("B", 1, 0))), 2, 2, 2)
    pl.validate(cycle)
    with pytest.raises(RuntimeError, match="deadlocks"):
        sim.simulate(cycle)
    assert sim.simulate(pl.make_schedule("1f1b", 2, 1))["makespan"] == 1 + 1 + 2 + 2


def test_bubbles_reproduce_deepseeks_table_for_random_costs():
    """1F1B (P-1)(F+B) on every rank for any costs; interleaved 1F1B the same in per-chunk costs; ZB-H1
    (P-1)(F+B-2W) on every rank when W <= min(F, I); DualPipe and DualPipeV, worst rank, (PP/2-1)(F&B+B-3W)
    when I = F, W <= F and max(F, B) <= F&B <= F + B (outside that regime the formula is approximate)."""
    rng = random.Random(0)
    for _ in range(25):
        f, i = rng.uniform(0.2, 2), rng.uniform(0.2, 2)
        w = rng.uniform(0, min(f, i))
        b = i + w
        for p, c in [(2, 2), (4, 8), (8, 11), (8, 32)]:
            for name in ("1f1b", "interleaved_1f1b"):
                if c % p == 0 or name == "1f1b":
                    out = sim.simulate(pl.make_schedule(name, p, c), {"F": f, "B": b})
                    np.testing.assert_allclose(out["bubble"], (p - 1) * (f + b), atol=1e-9, err_msg=name)
            out = sim.simulate(pl.make_schedule("zb_h1", p, c), {"F": f, "I": i, "W": w})
            np.testing.assert_allclose(out["bubble"], (p - 1) * (f + b - 2 * w), atol=1e-9, err_msg="zb_h1")
        w = rng.uniform(0, f)
        b = f + w
        fb = rng.uniform(max(f, b), f + b)
        costs = {"F": f, "B": b, "W": w, "FB": fb}
        for pp, c in [(4, 8), (8, 16), (8, 22), (16, 32)]:
            for name, ranks in (("dualpipe", pp), ("dualpipev", pp // 2)):
                out = sim.simulate(pl.make_schedule(name, ranks, c), costs)
                assert abs(max(out["bubble"]) - (pp / 2 - 1) * (fb + b - 3 * w)) < 1e-9, (name, pp, c)


def test_outside_its_regime_the_zero_bubble_formula_does_not_hold():
    out = sim.simulate(pl.make_schedule("zb_h1", 4, 8), {"F": 0.5, "I": 1.0, "W": 1.5})
    assert max(out["bubble"]) > 3 * (0.5 + 2.5 - 3.0) + 0.5  # the formula says 0


def test_peak_activations_match_the_table_and_do_not_grow_with_microbatches():
    for p in (2, 4, 8):
        for c in (2 * p, 4 * p):
            one = sim.simulate(pl.make_schedule("1f1b", p, c))
            assert one["peak_activations"] == list(range(p, 0, -1))
            zb = sim.simulate(pl.make_schedule("zb_h1", p, c))
            assert zb["peak_activations"] == list(range(p, 0, -1)) and zb["peak_w_residuals"] == [p] * p
            for name, ranks in (("dualpipe", p), ("dualpipev", p // 2)):
                if ranks >= 1 and (name == "dualpipev" or p % 2 == 0):
                    out = sim.simulate(pl.make_schedule(name, ranks, c))
                    assert out["peak_activations"] == [p + 1] * ranks, (name, p, c)
            assert sim.simulate(pl.make_schedule("gpipe", p, c))["peak_activations"] == [c] * p


def _check_tick_table(s: Schedule) -> None:
    table = sim.tick_table(s)
    unit = sim.simulate(s, {k: 1.0 for k in ("F", "B", "I", "W", "FB")})
    assert table.shape[:2] == (s.n_ranks, unit["makespan"])
    np.testing.assert_array_equal((table[..., 0] == 0).sum(1), unit["bubble"])
    done: dict[tuple[str, int, int], int] = {}
    for t in range(table.shape[1]):  # replay tick by tick: inputs must come from earlier ticks
        now = {}
        for r in range(s.n_ranks):
            kind, sf, mf, sb, mb = (int(x) for x in table[r, t])
            name = sim.TICK_KINDS[kind]
            parts = Action(name, sf, mf, sb, mb).parts() if name == "FB" else (
                [] if name == "NOOP" else [Action(name, sf, mf) if name == "F" else Action(name, sb, mb)])
            for a in parts:
                pos = a.stage % s.pipe_len
                if a.kind == "F" and pos > 0:
                    assert done[("F", a.stage - 1, a.mb)] < t
                if a.kind in ("B", "I") and pos < s.pipe_len - 1:
                    assert done[("I", a.stage + 1, a.mb)] < t
                if a.kind in ("B", "I", "W"):
                    assert done[("F", a.stage, a.mb)] < t
                now[("I" if a.kind == "B" else a.kind, a.stage, a.mb)] = t
        done.update(now)
    assert len(done) == sum(len(a.parts()) for row in s.ranks for a in row)


@pytest.mark.parametrize("name,p,c", [("1f1b", 4, 8), ("zb_h1", 4, 8), ("interleaved_1f1b", 4, 8),
                                      ("dualpipev", 4, 10), ("dualpipe", 4, 8), ("gpipe", 2, 3)])
def test_tick_table_is_the_unit_cost_makespan_and_respects_dependencies(name, p, c):
    _check_tick_table(pl.make_schedule(name, p, c))


def test_slot_allocation_is_optimal_and_never_shares_a_live_slot():
    rng = random.Random(0)
    for _ in range(200):
        intervals = [(a, a + rng.randint(0, 6)) for a in (rng.randint(0, 20) for _ in range(rng.randint(1, 15)))]
        slots, depth = sim.allocate_slots(intervals)
        most = max(sum(a <= t <= b for a, b in intervals) for t in range(30))
        assert depth == most
        for (i, x), (j, y) in itertools.combinations(enumerate(intervals), 2):
            if x[0] <= y[1] and y[0] <= x[1]:
                assert slots[i] != slots[j]
    for name, p, c in [("1f1b", 4, 16), ("dualpipev", 4, 16), ("zb_h1", 8, 16), ("dualpipe", 8, 16)]:
        s = pl.make_schedule(name, p, c)
        act_peak, w_peak = sim.peaks(s)
        assert sim.stash_slots(s, "I")[1] == act_peak and sim.stash_slots(s, "W")[1] == w_peak


def test_info_reports_the_stage_split_bytes_and_bubble(capsys):
    from deepseek_jax.cli import main
    from deepseek_jax.nn import tree

    assert main(["info", "--config", "tiny", "--mesh", "stage=2", "--pipeline", "1f1b:4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    v = dsj.init_variables(dsj.load_config("configs/tiny.yaml"), 0)  # real arrays: an independent byte count
    moe = sum(a.nbytes for col in v.values() for a in jax.tree.leaves(col.get(tree.MOE_STACK, {})))
    total = sum(a.nbytes for a in jax.tree.leaves(v))
    assert r["stage_param_bytes"] == moe // 2 and r["shared_param_bytes"] == total - moe
    assert r["rank_param_bytes"] == [moe // 2 + total - moe] * 2
    assert r["bubble"] == [(2 - 1) * (1 + 2)] * 2 and r["peak_activations"] == [2, 1] and r["ticks"] == 10
    assert main(["info", "--config", "tiny", "--mesh", "stage=2", "--pipeline", "1f1b"]) == 2
    assert "SCHEDULE:MICROBATCHES" in capsys.readouterr().err
    assert r["moe_layers_per_stage"] == [1, 1]
    assert main(["info", "--config", "tiny", "--mesh", "stage=4", "--pipeline", "1f1b:4"]) == 2
    assert "2 MoE layers (n_layers - first_k_dense_replace) cannot fill 4 stages" in capsys.readouterr().err


def test_uneven_stage_splits_are_stated_and_padded():
    from deepseek_jax.analysis.pipeline import pipeline_report
    from deepseek_jax.nn.stages import stage_split

    cfg = dsj.load_config("configs/tiny.yaml", n_layers=8)  # 7 MoE layers
    assert stage_split(cfg, 4) == (1, 2, 2, 2)      # the extra layers: middle stages, then the last
    assert stage_split(cfg, 3) == (2, 3, 2)
    assert stage_split(cfg, 2) == (3, 4)
    assert stage_split(cfg, 7) == (1,) * 7
    assert stage_split(cfg, 2, [5, 2]) == (5, 2)
    for bad in ([5, 1], [7, 0], [3, 2, 2]):
        with pytest.raises(ValueError, match=r"pipeline.split=.* at least one layer and sum to the 7 MoE layers"):
            stage_split(cfg, 2, bad)
    r = pipeline_report(cfg, "1f1b", 2, 4, split=[5, 2])
    one = pipeline_report(dsj.load_config("configs/tiny.yaml", n_layers=2), "1f1b", 1, 1)["stage_param_bytes"]
    assert r["moe_layers_per_stage"] == [5, 2] and r["stage_param_bytes"] == 5 * one  # padded to the longest
