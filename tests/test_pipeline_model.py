"""The DeepSeek model in the pipeline executor (train/pipeline.py, nn/stages.py): loss, every gradient and the
expert loads of a pipelined step equal ``jax.value_and_grad`` of the mean over micro-batches of the training
objective (MLA, DeepSeekMoE with the correction bias, MTP, the sequence-wise balance loss) for every schedule,
with data parallelism beside the stages; AdamW steps with pipelining follow the same losses."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax import train as T
from deepseek_jax.nn import tree
from deepseek_jax.parallel.mesh import make_mesh
from deepseek_jax.parallel.pipeline import make_schedule
from deepseek_jax.train.objectives import Pretrain
from deepseek_jax.train.pipeline import microbatches, pipeline_grad_fn
from deepseek_jax.train.step import hyper, objective_loss

SMALL = {"d_model": 64, "vocab_size": 128, "attention.q_lora_rank": 32, "attention.kv_lora_rank": 32,
         "attention.qk_nope_head_dim": 16, "attention.qk_rope_head_dim": 8, "attention.v_head_dim": 16,
         "intermediate_size": 96, "moe.moe_intermediate_size": 32}
OBJECTIVE = Pretrain(balance_alpha=0.01)
HYPER = hyper(0.3, 0.0)


def _setup(n_moe_layers, rows, seed=0):
    cfg = dsj.load_config("configs/tiny.yaml", **SMALL, n_layers=n_moe_layers + 1)
    v = dsj.init_variables(cfg, seed)
    # a non-zero correction bias, so that selection really uses it
    router = jax.tree.map(lambda b: b + 0.01 * jnp.arange(b.shape[-1], dtype=b.dtype), v[tree.ROUTER])
    rng = np.random.default_rng(seed)
    t = 16
    batch = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (rows, t)), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (rows, t)),
             "segment_ids": jnp.ones((rows, t), jnp.int32)}
    return cfg, v[tree.PARAMS], router, batch


def reference(cfg, params, router, batch, n, shards=1):
    """Mean over the ``n`` micro-batches, each split into ``shards`` batch shards, of the objective (no
    pipeline, no mesh; one piece vmapped over all); the summed loads; the objective's metrics averaged the same
    way (tokens summed)."""
    pieces = microbatches(batch, n * shards)

    def loss(params):
        losses, aux = jax.vmap(lambda b: objective_loss(cfg, "none", OBJECTIVE, params, router, b, HYPER))(pieces)
        metrics = {k: aux[k].sum(0) if k == "tokens" else aux[k].mean(0) for k in ("ce", "mtp", "balance", "tokens")}
        return losses.mean(), (aux["expert_load"].sum(0), metrics)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


MESHES = {"dp-tp": {"stage": 2, "data": 2, "tensor": 2}, "ep": {"stage": 4, "expert": 2},
          "fsdp-ep": {"stage": 2, "fsdp": 2, "expert": 2}, "pp8": {"stage": 8}}
# micro-batches per pipe, MoE layers (divisible by the pipe's stages) per (schedule, stage ranks)
SIZES = {("1f1b", 2): (4, 2), ("zb_h1", 2): (4, 2), ("dualpipev", 2): (4, 4), ("dualpipe", 2): (4, 2),
         ("1f1b", 4): (4, 4), ("zb_h1", 4): (4, 4), ("dualpipev", 4): (8, 8), ("dualpipe", 4): (8, 4),
         ("1f1b", 8): (8, 8), ("zb_h1", 8): (8, 8), ("dualpipev", 8): (16, 16), ("dualpipe", 8): (16, 8)}
# every schedule once and every mesh once (DeepSeek's DualPipeV twice), on the MoE model: each case compiles
# for about a minute, so the other (schedule, mesh) pairs run on the toy model of test_pipeline_executor.py
CASES = [("1f1b", "dp-tp"), ("dualpipe", "dp-tp"), ("dualpipev", "ep"), ("zb_h1", "fsdp-ep"), ("dualpipev", "pp8")]


def _check(name, axes, micro, layers, split=None):
    schedule = make_schedule(name, axes["stage"], micro)
    n_in = schedule.n_microbatches * (schedule.n_stages // schedule.pipe_len)
    shards = axes.get("data", 1) * axes.get("fsdp", 1) * axes.get("expert", 1)
    cfg, params, router, batch = _setup(layers, 2 * shards * n_in)
    mesh = make_mesh(axes, jax.devices()[:int(np.prod(list(axes.values())))])
    loss, grads, load, metrics = pipeline_grad_fn(cfg, mesh, schedule, OBJECTIVE, split=split)(
        params, router, batch, HYPER)
    (want, (want_load, want_metrics)), want_grads = reference(cfg, params, router, batch, n_in, shards)
    assert abs(float(loss) - float(want)) <= 1e-6 * abs(float(want))
    rel = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))), grads, want_grads)
    assert max(jax.tree.leaves(rel)) <= 1e-5, rel
    np.testing.assert_array_equal(load, want_load)  # counts: forwards only, every micro-batch once
    assert load.shape == (cfg.n_moe_layers + cfg.mtp.depth, cfg.moe.n_routed_experts)
    for k in ("ce", "mtp", "balance", "tokens"):  # averaged like the loss: per (micro-batch, batch shard)
        np.testing.assert_allclose(metrics[k], want_metrics[k], rtol=1e-5, err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("name,mesh", CASES)
def test_pipelined_model_equals_the_unpipelined_objective(name, mesh):
    """Tensor parallelism inside a stage (heads, MLP widths, vocabulary), expert parallelism (all-to-all
    dispatch inside the executor's branches), FSDP (gathered once per step, the batch split over it)."""
    axes = MESHES[mesh]
    _check(name, axes, *SIZES[name, axes["stage"]])


@pytest.mark.slow
@pytest.mark.parametrize("name,axes,micro,layers,split", [
    ("interleaved_1f1b", {"stage": 2, "data": 2}, 4, 4, None),
    ("dualpipev", {"stage": 2, "fsdp": 2, "expert": 2}, 4, 7, [1, 3, 2, 1]),  # uneven (padded slots), chosen
])  # stage = 1 (plain gradient accumulation) on the toy model: test_pipeline_executor.py
def test_interleaved_and_an_uneven_split(name, axes, micro, layers, split):
    _check(name, axes, micro, layers, split)


@pytest.mark.slow
def test_twenty_train_steps_with_pipelining_follow_the_same_losses(tiny_cfg):
    """The trainer's step (AdamW, clipping, the aux-loss-free bias update from the pipelined loads) with
    ``train.pipeline`` on, on stage=2 x data=2 x tensor=2, against the same step without a pipeline on one
    device. Every row is one whole document, so each (micro-batch, shard) piece counts the same targets and
    the mean of piece means is the batch mean: the losses must agree."""
    _, tcfg = T.load_run_config("tiny", ["train.batch_size=8", "train.seq_len=32", "train.steps=20",
                                         "train.optim.warmup_steps=2", "train.optim.lr=0.003"])
    rng = np.random.default_rng(0)
    local = {"tokens": rng.integers(0, tiny_cfg.vocab_size, (8, 32)).astype(np.int32),
             "segment_ids": np.ones((8, 32), np.int32), "positions": np.tile(np.arange(32, dtype=np.int32), (8, 1))}
    piped_cfg = tcfg.replace(mesh="stage=2,data=2,tensor=2", pipeline={"schedule": "1f1b", "microbatches": 2})
    runs = {}
    for name, tc, mesh in (("plain", tcfg, make_mesh({"data": 1}, jax.devices()[:1])),
                           ("piped", piped_cfg, make_mesh(piped_cfg.mesh))):
        fns = T.make_train_fns(tiny_cfg, T.StepConfig.from_train(tc), T.Pretrain(tc.balance_alpha), mesh)
        state, losses, ces = fns.init(jax.random.key(0)), [], []
        for step in range(20):
            batch = T.global_batch(jax.tree.map(lambda a: np.roll(a, step, 0), local), fns.batch_sharding, 8)
            state, m = fns.step(state, batch, T.hyper(0.3, 0.001))
            losses.append(float(m["loss"]))
            ces.append(float(m["ce"]))
        runs[name] = np.array(losses), np.array(ces), jax.device_get(state[tree.ROUTER])
        if name == "piped":  # each device stores one stage's MoE layers and their Adam moments
            stack = [a for a in jax.tree.leaves(state) if a.ndim and a.shape[0] == tiny_cfg.n_moe_layers]
            assert stack and all(a.addressable_shards[0].data.shape[0] == a.shape[0] // 2 for a in stack)
    (lp, cp, rp), (lq, cq, rq) = runs["plain"], runs["piped"]
    assert lp[-1] < lp[0] - 0.5
    np.testing.assert_allclose(lq, lp, rtol=1e-5)
    np.testing.assert_allclose(cq, cp, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(rq), jax.tree.leaves(rp)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_unsupported_layouts_are_refused_naming_the_fix():
    cfg, *_ = _setup(2, 8)
    with pytest.raises(ValueError, match=r"n_routed_experts=16 is not divisible by the mesh's expert=3"):
        pipeline_grad_fn(cfg, make_mesh({"stage": 2, "expert": 3}, jax.devices()[:6]), make_schedule("1f1b", 2, 2),
                         OBJECTIVE)
    with pytest.raises(ValueError, match=r"2 MoE layers \(n_layers - first_k_dense_replace\) cannot fill 4 stages"):
        pipeline_grad_fn(cfg, make_mesh({"stage": 4}, jax.devices()[:4]), make_schedule("1f1b", 4, 4), OBJECTIVE)
    with pytest.raises(ValueError, match="schedule has 2 ranks but the mesh has stage=4"):
        pipeline_grad_fn(cfg, make_mesh({"stage": 4}, jax.devices()[:4]), make_schedule("1f1b", 2, 2), OBJECTIVE)


def _device_groups(text):
    """Device-id groups of an HLO collective: explicit ``{{0,1},{2,3}}`` or iota ``[G,S]<=[dims]T(perm)``."""
    iota = re.fullmatch(r"\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if iota:
        g, n, dims, perm = iota.groups()
        ids = np.arange(int(g) * int(n)).reshape([int(d) for d in dims.split(",")])
        ids = ids.transpose([int(p) for p in perm.split(",")]) if perm else ids
        return {frozenset(int(i) for i in row) for row in ids.reshape(int(g), int(n))}
    return {frozenset(int(i) for i in grp.split(",")) for grp in re.findall(r"\{([\d,]+)\}", text)}


def _axis_groups(mesh, axes):
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    idx = [mesh.axis_names.index(a) for a in axes]
    moved = np.moveaxis(ids, idx, list(range(-len(idx), 0))).reshape(-1, int(np.prod([mesh.shape[a] for a in axes])))
    return {frozenset(int(i) for i in g) for g in moved}


@pytest.mark.slow
@pytest.mark.parametrize("mesh_text", ["stage=2,data=2,tensor=2", "stage=2,fsdp=2,expert=2"])
def test_compiled_train_step_communicates_as_designed(tiny_cfg, mesh_text):
    """The compiled trainer step with a pipeline: inside the executor's loop only the stage channels
    (collective-permutes between stage neighbours), the tensor-parallel sums and the expert all-to-alls;
    the data/fsdp gradient reductions only after the loop."""
    _, tcfg = T.load_run_config("tiny", ["train.batch_size=8", "train.seq_len=32", "train.optim.warmup_steps=2",
                                         f"train.mesh={mesh_text}", "train.pipeline.schedule=1f1b",
                                         "train.pipeline.microbatches=2"])
    mesh = make_mesh(tcfg.mesh)
    hlo = T.make_train_fns(tiny_cfg, T.StepConfig.from_train(tcfg), T.Pretrain(), mesh).compile_step().as_text()
    stage, tensor, expert = (_axis_groups(mesh, [a]) for a in ("stage", "tensor", "expert"))
    found = {}
    for line in hlo.splitlines():
        op = re.search(r" (all-reduce|all-to-all|collective-permute|all-gather|reduce-scatter)(?:-start)?\(", line)
        if not op:
            continue
        inside = "shard_map/while/body" in line
        groups = re.search(r"(?:replica_groups|source_target_pairs)=(\{[{}\d,]*\}|\[[^\s]*\)|\[[\d,]+\]<=\[[\d,]+\])",
                           line)  # the named-mesh form (outside the loop here) is left unparsed
        assert groups or not inside, line
        found.setdefault((op[1], inside), []).append(_device_groups(groups[1]) if groups else None)
    for groups in found.get(("collective-permute", True), []):  # pairs of stage neighbours
        assert all(any(pair <= g for g in stage) for pair in groups), groups
    assert found.get(("collective-permute", True)), "the stage channels"
    allowed = {"all-reduce": tensor if mesh.shape["tensor"] > 1 else set(), "all-to-all": expert}
    for (kind, inside), all_groups in found.items():
        if inside and kind != "collective-permute":
            assert kind in allowed and all(g == allowed[kind] for g in all_groups), (kind, all_groups)
    batch = _axis_groups(mesh, [a for a in ("data", "fsdp", "expert") if mesh.shape[a] > 1])
    after = [g for g in found.get(("all-reduce", False), []) if g == batch]
    assert after, "one gradient reduction over the batch shards after the loop"


@pytest.mark.slow
def test_training_with_pipelining_checkpoints_and_resumes_exactly(tmp_path):
    """``deepseek-jax train`` with ``train.mesh: stage=2,...`` and ``train.pipeline``: a run stopped by SIGTERM
    at step 3 and resumed gives the losses of an uninterrupted run, and it learns."""
    import json
    import os
    import signal

    cfg, tcfg = T.load_run_config("tiny", [
        "train.steps=6", "train.batch_size=8", "train.seq_len=64", "train.optim.warmup_steps=2",
        "train.optim.lr=0.003", "train.eval_every=6", "train.eval_batches=1", "train.checkpoint_every=2",
        "train.sample_tokens=0", "train.data.max_documents=12", "train.mesh=stage=2,data=2,tensor=2",
        "train.pipeline.schedule=1f1b", "train.pipeline.microbatches=2"])

    def losses(out):
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["loss"], r["ce"]) for r in recs if r["kind"] == "train"}

    a = T.train(cfg, tcfg.replace(out=str(tmp_path / "a")), progress=False)
    assert a["step"] == 6 and a["val_loss"] < a["unigram_entropy"] + 1

    def kill_at_3(step, rec):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    b = T.train(cfg, tcfg.replace(out=str(tmp_path / "b")), progress=False, on_step=kill_at_3)
    assert b["stopped_by"] == "SIGTERM" and b["step"] == 3
    b2 = T.train(cfg, tcfg.replace(out=str(tmp_path / "b")), progress=False)
    assert b2["start_step"] == 3 and b2["step"] == 6
    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # bit-identical on CPU
