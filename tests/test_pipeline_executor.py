"""The lock-step pipeline executor (parallel/pipeline/executor.py) on 8 fake devices: loss and every gradient of
a pipelined step equal ``jax.value_and_grad`` of the same model run stage after stage without a pipeline, for
every schedule, on meshes combining ``stage`` with data, fsdp, expert and tensor parallelism; the executed
ticks and idle ticks equal the simulator's; stash depth does not grow with the micro-batch count; the compiled
program reduces gradients once, after the loop."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.parallel.mesh import make_mesh
from deepseek_jax.parallel.pipeline import make_schedule, simulator
from deepseek_jax.parallel.pipeline.executor import make_executor, merge_stage_grads, stage_params
from deepseek_jax.parallel.pipeline import toy
from deepseek_jax.parallel.pipeline.program import build_program

D = toy.D


def run_pipelined(name, mesh_axes, microbatches):
    mesh = make_mesh(mesh_axes, jax.devices()[:int(np.prod(list(mesh_axes.values())))])
    schedule = make_schedule(name, mesh_axes["stage"], microbatches)
    program = build_program(schedule)
    stacked, shared, inputs = toy.problem(schedule)
    step = make_executor(program, mesh, toy.embed, toy.stage, toy.loss, w_specs=toy.W_SPECS)
    loss_value, (gw, gshared), _ = step(stage_params(program, stacked), shared, inputs)
    return program, step, (stacked, shared, inputs), loss_value, merge_stage_grads(program, gw), gshared


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


CASES = [
    ("1f1b", {"stage": 2, "data": 2, "tensor": 2}, 4),
    ("zb_h1", {"stage": 2, "data": 2, "tensor": 2}, 4),
    ("dualpipev", {"stage": 2, "data": 2, "tensor": 2}, 4),
    ("dualpipe", {"stage": 2, "data": 2, "tensor": 2}, 4),
    ("1f1b", {"stage": 4, "expert": 2}, 8),
    ("zb_h1", {"stage": 4, "expert": 2}, 6),
    ("dualpipev", {"stage": 4, "expert": 2}, 8),
    ("dualpipe", {"stage": 4, "expert": 2}, 8),
    ("interleaved_1f1b", {"stage": 4, "tensor": 2}, 8),
    ("gpipe", {"stage": 2, "fsdp": 2, "expert": 2}, 3),
    ("dualpipev", {"stage": 2, "fsdp": 2, "expert": 2}, 6),
    ("zb_h1", {"stage": 8}, 8),
    ("dualpipev", {"stage": 8}, 16),
    ("1f1b", {"stage": 1, "data": 2, "tensor": 2}, 3),  # stage = 1: plain gradient accumulation
]


@pytest.mark.slow
@pytest.mark.parametrize("name,mesh_axes,microbatches", CASES, ids=lambda v: str(v))
def test_pipelined_step_equals_the_unpipelined_gradients(name, mesh_axes, microbatches):
    program, _, (stacked, shared, inputs), got_loss, got_w, got_shared = run_pipelined(name, mesh_axes, microbatches)
    want_loss, (want_w, want_shared) = jax.value_and_grad(toy.reference_loss, (0, 1))(stacked, shared, inputs)
    assert abs(float(got_loss) - float(want_loss)) <= 1e-6 * abs(float(want_loss))
    for key in want_w:
        assert _rel(got_w[key], want_w[key]) <= 1e-5, key
    for key in want_shared:
        assert _rel(got_shared[key], want_shared[key]) <= 1e-5, key
    # the executed program is the simulator's unit-cost run: ticks = makespan, idle ticks = bubble
    unit = simulator.simulate(program.schedule, {k: 1.0 for k in ("F", "B", "I", "W", "FB")})
    assert program.ticks == unit["makespan"] and program.idle_ticks() == unit["bubble"]


def test_stash_depth_stays_flat_as_microbatches_double():
    """The stashes hold a stage input from its arrival to its last use (the W of a split backward), so a rank's
    depth is its simulated peak plus at most the one input that arrived before its forward could run."""
    for name, n in (("1f1b", 4), ("dualpipev", 4), ("zb_h1", 4), ("dualpipe", 4), ("interleaved_1f1b", 4)):
        programs = [build_program(make_schedule(name, n, c)) for c in (2 * n, 4 * n, 8 * n)]
        assert len({(p.x_depths, p.g_depths) for p in programs}) == 1, name
        _, w_peak = simulator.peaks(programs[0].schedule)
        assert all(d <= p + 1 for d, p in zip(programs[0].x_depths, w_peak)), (name, programs[0].x_depths, w_peak)
        assert programs[0].x_depth <= max(w_peak) + 1
    assert [build_program(make_schedule("1f1b", 4, c)).x_depths for c in (8, 16)] == [(0, 4, 3, 2)] * 2
    gpipe = [build_program(make_schedule("gpipe", 4, c)).x_depth for c in (8, 16)]
    assert gpipe == [8, 16]


def _groups(mesh, axis):
    """Replica groups of a collective over one mesh axis, as a set of device-id sets."""
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    moved = np.moveaxis(ids, mesh.axis_names.index(axis), -1).reshape(-1, mesh.shape[axis])
    return {frozenset(int(i) for i in g) for g in moved}


def _all_reduces(hlo):
    """``(inside the while loop, replica groups, result shapes)`` of every all-reduce in compiled HLO text."""
    out = []
    for line in hlo.splitlines():
        if " all-reduce(" not in line:
            continue
        groups = re.search(r"replica_groups=\{(\{[\d,]+\}(?:,\{[\d,]+\})*)\}", line)[1]
        sets = {frozenset(int(i) for i in g.split(",")) for g in re.findall(r"\{([\d,]+)\}", groups)}
        out.append(("/while/" in line, sets, line.split(" all-reduce(")[0]))
    return out


@pytest.mark.slow
def test_one_gradient_reduction_after_the_loop_and_memory_flat_in_microbatches():
    mesh = make_mesh({"stage": 2, "data": 2, "tensor": 2})
    temps, hlo = {}, ""
    for name, c in (("1f1b", 4), ("1f1b", 8), ("dualpipev", 4), ("dualpipev", 8), ("gpipe", 4), ("gpipe", 8)):
        program = build_program(make_schedule(name, 2, c))
        stacked, shared, inputs = toy.problem(program.schedule, batch=64)
        step = make_executor(program, mesh, toy.embed, toy.stage, toy.loss, w_specs=toy.W_SPECS)
        compiled = step.lower(stage_params(program, stacked), shared, inputs).compile()
        temps[name, c] = (compiled.memory_analysis().temp_size_in_bytes, program.table[0].nbytes)
        hlo = hlo or compiled.as_text()
    act = 32 * D * 4  # one micro-batch's activation on one device: batch 64 over data=2, float32
    (t4, table4), (t8, table8) = temps["1f1b", 4], temps["1f1b", 8]
    assert t8 - t4 <= table8 - table4, temps  # only the (longer) tick table grows
    (v4, vtable4), (v8, vtable8) = temps["dualpipev", 4], temps["dualpipev", 8]
    assert v8 - v4 <= vtable8 - vtable4, temps
    (g4, _), (g8, _) = temps["gpipe", 4], temps["gpipe", 8]
    assert g8 - g4 >= 4 * act, temps         # GPipe stashes every micro-batch
    reduces = _all_reduces(hlo)
    tensor, data = _groups(mesh, "tensor"), _groups(mesh, "data")
    assert any(inside for inside, _, _ in reduces), "the layers' tensor-parallel sums should be in the loop"
    assert all(groups == tensor for inside, groups, _ in reduces if inside), "a non-tensor all-reduce in the loop"
    after = [shapes for inside, groups, shapes in reduces if not inside and groups == data]
    assert len(after) == 1 and after[0].count("f32[1,2,8,8]") == 2, after  # w1 and w2 grads, once
    assert "collective-permute(" in hlo
