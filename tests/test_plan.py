"""Planning at scale (``deepseek-jax plan``): the real training step compiled for a TPU slice on this CPU host
(deviceless, ``libtpu`` from the ``tpu-plan`` extra), checked against analytic models: argument bytes = the
sharded state + batch, compiler FLOPs = the model's 6N + attention (plus the compiler's static accounting of
the ragged weight gradient and the expert-parallel buffers), the TPU kernels chosen by the mesh's platform,
collectives attributed to mesh axes, a layout over the HBM budget reported as not fitting."""

import importlib.util
import json

import jax
import numpy as np
import pytest

from deepseek_jax.analysis.chips import CHIPS, parse_topology, roofline
from deepseek_jax.analysis.layout import collectives_by_axis
from deepseek_jax.kernels.backend import current_platform, has_fast_kernels
from deepseek_jax.parallel.mesh import make_mesh

needs_tpu_compiler = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                        reason="the TPU compiler (libtpu, extra 'tpu-plan') is not installed")


def test_topologies_and_their_errors():
    assert parse_topology("v5p:4x4x4")[1:] == (CHIPS["v5p"], 64)
    assert parse_topology("v5e:16x16")[2] == 256 and parse_topology("h100:256")[2] == 256
    with pytest.raises(ValueError, match="v5p:4x4x4"):
        parse_topology("tpu7:2x2")


def test_roofline_bounds_and_mfu():
    chip = CHIPS["v5p"]
    r = roofline(chip, flops=459e12, hbm_bytes=2765e9 / 2, collective_bytes=1200e9 / 4, model_flops=459e12 * 0.75)
    assert r["compute_s"] == pytest.approx(1.0) and r["memory_s"] == pytest.approx(0.5)
    assert r["collective_s"] == pytest.approx(0.25) and r["bound"] == "compute"
    assert r["step_s_overlapped"] == pytest.approx(1.0) and r["step_s_serial"] == pytest.approx(1.75)
    assert r["mfu_overlapped"] == pytest.approx(0.75) and r["mfu_serial"] == pytest.approx(0.75 / 1.75)


def test_collectives_are_attributed_to_the_mesh_axes_their_groups_span():
    """Device ids are positions in the mesh's device array (axes in order data, fsdp, expert): explicit groups,
    the iota form with a transpose, and a collective-permute's pairs."""
    shape = {"data": 2, "fsdp": 2, "expert": 2}
    hlo = "\n".join([
        "%a = f32[8,4]{1,0} all-gather(f32[4,4]{1,0} %x), replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}",
        "%b = f32[16]{0} all-reduce(f32[16]{0} %y), replica_groups=[2,4]<=[8], to_apply=%add",
        "%c = bf16[2,8]{1,0} all-to-all(bf16[2,8]{1,0} %z), replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}",
        "%d = f32[4]{0} collective-permute(f32[4]{0} %w), source_target_pairs={{0,4},{4,0}}",
        # the TPU compiler's own form: a local mesh over iota device ids, the named local axes
        "%e = f32[3]{0} all-reduce(f32[3]{0} %v), replica_groups=mesh['axis_0'=4,'axis_1'=2], "
        "device_ids=([2,4]T(1,0)) {'axis_0'}, use_global_device_ids=true",
    ])
    got = collectives_by_axis(hlo, shape)
    assert got["all-gather"] == {"expert": {"count": 1, "bytes": 8 * 4 * 4}}
    # [2,4]T(1,0) as a 4 x 2 mesh: axis_0 runs over ids 0, 1, 2, 3 (fsdp and expert); the iota form too
    assert got["all-reduce"] == {"fsdp+expert": {"count": 2, "bytes": 64 + 12}}
    # [4,2]<=[2,4]T(1,0): groups {0,4},{1,5},...: ids 4 apart differ in data only
    assert got["all-to-all"] == {"data": {"count": 1, "bytes": 32}}
    assert got["collective-permute"] == {"data": {"count": 1, "bytes": 16}}


def test_kernels_follow_the_mesh_platform_not_the_host():
    assert current_platform() == "cpu" and not has_fast_kernels()
    with jax.set_mesh(make_mesh({"data": 2}, jax.devices()[:2])):
        assert current_platform() == "cpu"


def _plan_json(capsys, *args):
    from deepseek_jax.cli import main

    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def tiny_ep():
    """``tiny`` (MoE, MLA, MTP) on v5p:2x2x2 as data=2 x expert=4, no remat (layer stacks unrolled: XLA's cost
    analysis counts a rolled loop's body once), 8 x 256 tokens."""
    from deepseek_jax.config import load_config
    from deepseek_jax.train.plan import plan

    return plan(load_config("tiny"), "v5p:2x2x2", "data=2,expert=4", batch=8, seq=256, remat="none")


@needs_tpu_compiler
def test_argument_bytes_equal_the_sharded_state_and_batch(tiny_ep):
    """The compiler's per-chip argument bytes against the sum over every state leaf of its shard's bytes (params,
    AdamW moments, router biases, step) plus the batch; TPU pads small arrays to its tiles, hence 1%."""
    got, want = tiny_ep["per_chip_bytes"]["arguments"], tiny_ep["analytic_bytes"]
    assert got == pytest.approx(want["total"], rel=0.01), (got, want)
    assert want["opt_state"] == pytest.approx(2 * want["params"], rel=0.01)  # float32 moments like float32 params


@needs_tpu_compiler
def test_info_lays_out_over_a_topologys_devices(tiny_ep, capsys):
    """``info --mesh ... --topology``: the layout report's step compiled for the slice's devices is the plan's
    program (the same argument bytes) and dispatches experts with the TPU's ragged all-to-all."""
    from deepseek_jax.cli import main

    assert main(["info", "--config", "tiny", "--mesh", "data=2,expert=4", "--topology", "v5p:2x2x2",
                 "--batch", "8", "--seq", "256", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["bytes_per_device"]["step_arguments"] == tiny_ep["per_chip_bytes"]["arguments"]
    assert r["collectives"]["ragged-all-to-all"]["count"] > 0


@needs_tpu_compiler
def test_compiler_flops_match_the_analytic_model(tiny_ep):
    r = tiny_ep
    assert r["flops_per_chip"] == pytest.approx(r["expected_compiler_flops_per_device"], rel=0.10), r
    assert r["expected_compiler_flops_per_device"] > r["model_flops_per_device"]  # the static ragged accounting


@needs_tpu_compiler
def test_the_tpu_program_has_tpu_kernels_and_expert_all_to_all(tiny_ep):
    k, c = tiny_ep["kernels"], tiny_ep["collectives"]
    assert k["ragged-dot"] > 0 and k["ragged_dot (StableHLO)"] > 0  # not the CPU capacity kernel
    # the dispatch moves its rows with ragged all-to-alls (there and back, per MoE layer and in the backward),
    # over the expert axis only; the plain all-to-alls left carry the row counts
    assert k["ragged-all-to-all"] >= 2 and set(c["ragged-all-to-all"]) == {"expert"}
    assert set(c["all-to-all"]) == {"expert"} and k["all-to-all"] == c["all-to-all"]["expert"]["count"]
    assert tiny_ep["fits"] and 0 < tiny_ep["per_chip_bytes"]["peak"] < tiny_ep["per_chip_bytes"]["capacity"]
    rf = tiny_ep["roofline"]
    assert rf["step_s_overlapped"] == max(rf["compute_s"], rf["memory_s"], rf["collective_s"])


@needs_tpu_compiler
def test_a_dense_model_through_the_command_line(capsys):
    """niah-tiny (dense MLA) on v4:2x2x1 (8 devices: two per chip) all fsdp: FLOPs = 6N + attention within
    10%, HBM per device half a v4 chip's, the JSON the API promises."""
    r = _plan_json(capsys, "--config", "niah-tiny", "--topology", "v4:2x2x1", "--batch", "8", "--seq", "64",
                   "--remat", "none")
    assert {"fits", "per_chip_bytes", "flops_per_chip", "collectives", "kernels"} <= set(r)
    assert set(r["per_chip_bytes"]) >= {"arguments", "temp", "peak", "capacity"}
    assert r["per_chip_bytes"]["capacity"] == pytest.approx(CHIPS["v4"].hbm / 2)
    assert r["flops_per_chip"] == pytest.approx(r["model_flops_per_device"], rel=0.10)
    assert set(r["collectives"]["all-gather"]) == {"fsdp"}


@needs_tpu_compiler
def test_a_layout_over_the_hbm_budget_is_reported_not_raised():
    """The TPU compiler refuses a program over HBM (RESOURCE_EXHAUSTED): the plan says it does not fit."""
    from deepseek_jax.config import load_config
    from deepseek_jax.train.plan import plan

    cfg = load_config("deepseek-llm-67b").replace(n_layers=1)  # 2.5B parameters, replicated: 25 GB of state
    r = plan(cfg, "v5e:2x2", "data=4", batch=4, seq=512, remat="none")
    b = r["per_chip_bytes"]  # the compiler's numbers: what it needs, and the HBM it can use (less than 16 GiB)
    assert r["fits"] is False and "RESOURCE_EXHAUSTED" in r["error"] and b["peak"] > b["capacity"]
    assert 0.9 * CHIPS["v5e"].hbm < b["capacity"] <= CHIPS["v5e"].hbm


@needs_tpu_compiler
def test_a_mesh_over_a_tpu_slice_may_split_physical_axes():
    from deepseek_jax.train.plan import topology_devices

    devices = topology_devices("v5p:4x4x4")
    mesh = make_mesh({"fsdp": 2, "expert": 32}, devices)
    assert mesh.shape["expert"] == 32 and sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
    assert len({d.id for d in np.asarray(mesh.devices).flat}) == 64


def test_a_gpu_target_gets_the_analytic_part_only():
    """No deviceless GPU compiler: the state bytes per chip by the rules table (params + float32 gradients + two
    AdamW moments) and the compute bound, with ``fits`` unknown."""
    from deepseek_jax.analysis.params import flops_per_token
    from deepseek_jax.config import load_config
    from deepseek_jax.train.plan import plan

    cfg = load_config("tiny")
    r = plan(cfg, "h100:8", "fsdp=4,expert=2", batch=8, seq=256, moments="bfloat16")
    b = r["per_chip_bytes"]
    assert r["fits"] is None and r["compiled"] is False and "no deviceless compiler" in r["note"]
    assert b["grads"] == b["params"] and b["optimizer"] == b["params"]  # float32 params: bf16 moments = 2 x 2 B
    assert b["state"] == b["params"] + b["grads"] + b["optimizer"] and b["capacity"] == CHIPS["h100"].hbm
    model = flops_per_token(cfg, 256) * 8 * 256 / 8
    assert r["model_flops_per_device"] == pytest.approx(model)
    assert r["roofline"]["compute_s"] == pytest.approx(model * 8 / 6 / CHIPS["h100"].bf16)  # remat full


def test_candidate_layouts_are_every_valid_factorisation():
    """The candidates are exactly the data x fsdp x expert x tensor products of 8 (a brute force) that the layout
    check accepts for tiny and a batch of 8, and shrink with the batch (data x fsdp x expert must divide it)."""
    from jax.sharding import AbstractMesh, AxisType

    from deepseek_jax.config import load_config
    from deepseek_jax.nn.placement import check_layout
    from deepseek_jax.parallel.mesh import MESH_AXES
    from deepseek_jax.train.plan import candidate_layouts

    cfg = load_config("tiny")

    def ok(axes, batch):
        try:
            check_layout(cfg, AbstractMesh(tuple(axes.get(a, 1) for a in MESH_AXES), MESH_AXES,
                                           axis_types=(AxisType.Auto,) * 5), global_batch=batch)
            return True
        except ValueError:
            return False
    full = [{"data": d, "fsdp": f, "expert": e, "tensor": t} for d in (1, 2, 4, 8) for f in (1, 2, 4, 8)
            for e in (1, 2, 4, 8) for t in (1, 2, 4, 8) if d * f * e * t == 8]
    for batch in (8, 2):
        want = sorted(str({k: v for k, v in a.items() if v > 1}) for a in full if ok(a, batch))
        got = candidate_layouts(cfg, 8, batch=batch)
        assert sorted(map(str, got)) == want and len(want) < len(full), batch
    assert len(candidate_layouts(cfg, 8, batch=2)) < len(candidate_layouts(cfg, 8, batch=8))


@needs_tpu_compiler
def test_search_estimates_every_layout_and_compiles_the_most_promising(capsys):
    from deepseek_jax.cli import main

    assert main(["plan", "--config", "niah-tiny", "--topology", "v5p:2x2x1", "--batch", "8", "--seq", "64",
                 "--search", "--max-compiles", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["candidates"] == len(r["estimated"]) > 1 and len(r["compiled"]) == 1
    best = r["estimated"][0]
    assert best["fits_estimate"] and r["compiled"][0]["mesh"] == best["mesh"] and r["compiled"][0]["fits"]
    assert [x["step_s"] for x in r["estimated"] if x["fits_estimate"]] == sorted(
        x["step_s"] for x in r["estimated"] if x["fits_estimate"])


@needs_tpu_compiler
def test_search_with_pipelines_adds_every_stage_layout_and_micro_batch_count(monkeypatch):
    """``pipelines``: stage factorisations x schedules x the micro-batch counts the batch allows (tiny: 2 MoE
    layers, so stage = 2 only; 8 rows over data x fsdp x expert shards), each estimated with the schedule's bubble
    -- GPipe and 1F1B idle (p - 1) / (m + p - 1) of the step -- and the chosen ones compiled with their
    schedule and count (``plan`` recorded, not run: a pipelined compile takes a minute here)."""
    from deepseek_jax.analysis.params import flops_per_token
    from deepseek_jax.config import load_config
    from deepseek_jax.train import plan as plan_mod

    calls = []

    def fake_plan(cfg, topology, axes, **kw):
        calls.append((axes, kw["remat"], kw["pipeline"], kw["microbatches"]))
        return {"fits": True, "mesh": str(axes)}
    monkeypatch.setattr(plan_mod, "plan", fake_plan)
    cfg = load_config("tiny")
    r = plan_mod.search(cfg, "v5p:2x2x2", batch=8, seq=64, remats=("full",), max_compiles=3,
                        pipelines=("1f1b", "gpipe:2"))
    piped = [x for x in r["estimated"] if x["pipeline"] != "none"]
    by_layout = {}
    for x in piped:
        assert x["axes"]["stage"] == 2
        by_layout.setdefault(x["mesh"], set()).add((x["pipeline"], x["microbatches"]))
    shards = {"data=4 x stage=2": 4, "data=2 x tensor=2 x stage=2": 2, "expert=4 x stage=2": 4,
              "fsdp=2 x tensor=2 x stage=2": 2}
    for mesh, n in shards.items():
        rows = 8 // n
        want = {("1f1b", m) for m in (1, 2, 4, 8) if rows % m == 0} | ({("gpipe", 2)} if rows % 2 == 0 else set())
        assert by_layout[mesh] == want, (mesh, by_layout[mesh])
    assert len([x for x in r["estimated"] if x["pipeline"] == "none"]) == len(plan_mod.candidate_layouts(cfg, 8, 8))
    ideal = flops_per_token(cfg, 64) * 8 * 64 / 8 * 8 / 6 / CHIPS["v5p"].bf16  # remat full: one more forward
    for x in piped:
        m = x["microbatches"]
        assert x["bubble_fraction"] == pytest.approx(1 / (m + 1))  # p = 2
        assert x["compute_s"] == pytest.approx(ideal * (m + 1) / m)
    assert [(c[0], c[2], c[3]) for c in calls] == [(x["axes"], x["pipeline"], x["microbatches"])
                                                   for x in r["estimated"][:len(calls)]]
    with pytest.raises(ValueError, match="1f1bx"):
        plan_mod.search(cfg, "v5p:2x2x2", batch=8, pipelines=("1f1bx",))


@needs_tpu_compiler
def test_search_compiles_in_parallel_processes_and_reads_its_cache(tmp_path):
    """``jobs=2``: the two best estimates compiled at once in spawned processes, the best one's memory and FLOPs
    those of the same plan compiled in this process; the same search again, one job, reads both from the cache
    the workers wrote."""
    from deepseek_jax.config import load_config
    from deepseek_jax.train.plan import plan, search

    cfg, kw = load_config("niah-tiny"), dict(batch=8, seq=64, max_compiles=2, cache=tmp_path)
    r = search(cfg, "v5p:2x2x1", jobs=2, **kw)
    top = [(x["mesh"], x["remat"]) for x in r["estimated"][:2]]
    assert sorted((p["mesh"], p["remat"]) for p in r["compiled"]) == sorted(top)
    assert all(p["fits"] for p in r["compiled"])
    best = r["estimated"][0]
    with jax.default_matmul_precision(None):  # as in the workers, which do not inherit conftest's "highest"
        direct = plan(cfg, "v5p:2x2x1", best["axes"], batch=8, seq=64, remat=best["remat"])  # in this process
    got = next(p for p in r["compiled"] if (p["mesh"], p["remat"]) == top[0])
    assert (got["per_chip_bytes"], got["flops_per_chip"]) == (direct["per_chip_bytes"], direct["flops_per_chip"])
    again = search(cfg, "v5p:2x2x1", jobs=1, **kw)
    assert all(p.get("cached") for p in again["compiled"])
    assert [p["per_chip_bytes"] for p in again["compiled"]] == [p["per_chip_bytes"] for p in r["compiled"]]


def test_cached_plans_compile_once_per_distinct_question(monkeypatch, tmp_path):
    """``cached_plan``: a second search asking the same (model, slice, layout, options) reads the stored plan;
    any other option, layout or model field compiles anew (``plan`` counted, not run)."""
    from deepseek_jax.config import load_config
    from deepseek_jax.train import plan as plan_mod

    calls = []

    def fake_plan(cfg, topology, axes, **kw):
        calls.append(1)
        return {"fits": True, "n": len(calls)}

    def ask(c=None, axes=None, **kw):
        return plan_mod.cached_plan(tmp_path, c or cfg, "v5p:2x2x2", axes or {"fsdp": 8},
                                    **{"batch": 8, "remat": "full", **kw})
    monkeypatch.setattr(plan_mod, "plan", fake_plan)
    cfg = load_config("tiny")
    assert ask() == {"fits": True, "n": 1} and ask() == {"fits": True, "n": 1, "cached": True}
    assert ask(remat="none")["n"] == 2 and ask(axes={"data": 8})["n"] == 3
    assert ask(c=cfg.replace(moe={"capacity_factor": 1.5}))["n"] == 4 and len(calls) == 4
    assert plan_mod.cached_plan(None, cfg, "v5p:2x2x2", {"fsdp": 8}, batch=8)["n"] == 5  # no folder: no cache


def test_a_rolled_layer_loop_gets_the_analytic_roofline():
    """XLA counts a rolled loop's body once, so a plan with rolled layer stacks (any remat) takes its roofline's
    compute and collectives from the analytic model; an unrolled one (remat none, <= 8 layers) keeps the
    compiler's. No compile needed: a plan's fields suffice."""
    from deepseek_jax.analysis.chips import CHIPS
    from deepseek_jax.config import load_config
    from deepseek_jax.train.plan import rolled_roofline

    cfg = load_config("tiny")
    r = {"topology": "v5p:2x2x2", "fits": True, "remat": "full", "batch": 8, "seq": 256, "devices": 8, "fp8": False,
         "mesh_axes": {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1, "stage": 1}, "hbm_bytes_per_chip": 1e9,
         "expected_flops_per_device": 4e12, "model_flops_per_device": 3e12, "roofline": {"compiler": True}}
    out = rolled_roofline(cfg, r)
    assert out["rolled_loops"] and out["roofline_compiler"] == {"compiler": True}
    rf = out["roofline"]
    assert rf["compute_s"] == pytest.approx(4e12 / CHIPS["v5p"].bf16) and rf["collective_s"] > 0
    assert rf["mfu_overlapped"] == pytest.approx(3e12 / (CHIPS["v5p"].bf16 * rf["step_s_overlapped"]))
    assert rolled_roofline(cfg, out) is out
    assert rolled_roofline(cfg, {**r, "remat": "none"})["roofline"] == r["roofline"]


@needs_tpu_compiler
def test_a_pipelined_layout_through_the_command_line(capsys):
    """``--pipeline 1f1b:2`` over ``stage=2``: the pipeline executor's program compiles for the TPU slice, its
    stage transfers are collective-permutes, and the MoE inside the stages keeps the ragged kernels."""
    r = _plan_json(capsys, "--config", "tiny", "--topology", "v5p:2x2x2", "--mesh", "stage=2,data=2,expert=2",
                   "--batch", "8", "--seq", "64", "--pipeline", "1f1b:2")
    assert (r["pipeline"], r["microbatches"], r["mesh_axes"]["stage"]) == ("1f1b", 2, 2) and r["fits"]
    assert r["kernels"]["collective-permute"] > 0 and r["kernels"]["ragged-all-to-all"] > 0
