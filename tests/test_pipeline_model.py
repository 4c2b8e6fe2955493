"""The DeepSeek model in the pipeline executor (train/pipeline.py, nn/stages.py): loss, every gradient and the
expert loads of a pipelined step equal ``jax.value_and_grad`` of the mean over micro-batches of the training
objective (MLA, DeepSeekMoE with the correction bias, MTP, the sequence-wise balance loss) for every schedule,
with data parallelism beside the stages; AdamW steps with pipelining follow the same losses."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import deepseek_jax as dsj
from deepseek_jax.nn import tree
from deepseek_jax.parallel.mesh import make_mesh
from deepseek_jax.parallel.pipeline import make_schedule
from deepseek_jax.train.balance import update_router_bias
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


def reference(cfg, params, router, batch, n):
    """Mean over the ``n`` micro-batches of the objective (no pipeline, no mesh), and the summed loads."""
    mb = microbatches(batch, n)

    def loss(params):
        outs = [objective_loss(cfg, "none", OBJECTIVE, params, router, jax.tree.map(lambda a: a[i], mb), HYPER)
                for i in range(n)]
        return sum(o[0] for o in outs) / n, sum(o[1]["expert_load"] for o in outs)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


CASES = [  # schedule, stage ranks, data, micro-batches (per pipe), MoE layers (divisible by the stages)
    ("1f1b", 2, 2, 4, 2), ("zb_h1", 2, 2, 4, 2), ("dualpipev", 2, 2, 4, 4), ("dualpipe", 2, 2, 4, 2),
    ("interleaved_1f1b", 2, 2, 4, 4), ("1f1b", 4, 2, 4, 4), ("dualpipev", 4, 2, 8, 8),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,ranks,data,micro,layers", CASES)
def test_pipelined_model_equals_the_unpipelined_objective(name, ranks, data, micro, layers):
    schedule = make_schedule(name, ranks, micro)
    n_in = schedule.n_microbatches * (schedule.n_stages // schedule.pipe_len)
    cfg, params, router, batch = _setup(layers, 2 * data * n_in)
    mesh = make_mesh({"stage": ranks, "data": data}, jax.devices()[:ranks * data])
    loss, grads, load = pipeline_grad_fn(cfg, mesh, schedule, OBJECTIVE)(params, router, batch, HYPER)
    (want, want_load), want_grads = reference(cfg, params, router, batch, n_in)
    assert abs(float(loss) - float(want)) <= 1e-6 * abs(float(want))
    rel = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))), grads, want_grads)
    assert max(jax.tree.leaves(rel)) <= 1e-5, rel
    np.testing.assert_array_equal(load, want_load)  # counts: forwards only, every micro-batch once
    assert load.shape == (cfg.n_moe_layers + cfg.mtp.depth, cfg.moe.n_routed_experts)


@pytest.mark.slow
def test_twenty_adamw_steps_with_pipelining_follow_the_same_losses():
    """AdamW and the aux-loss-free bias update driven by pipelined gradients and loads (1F1B, stage=2 x
    data=2) against the same loop driven by ``value_and_grad``."""
    cfg, params, router, batch = _setup(2, 16)
    mesh = make_mesh({"stage": 2, "data": 2}, jax.devices()[:4])
    piped = pipeline_grad_fn(cfg, mesh, make_schedule("1f1b", 2, 4), OBJECTIVE)
    plain = jax.jit(lambda p, r, b: reference(cfg, p, r, b, 4))  # noqa: E731
    tx = optax.adamw(3e-3)

    def run(grad_fn):
        p, r, state, losses = params, router, tx.init(params), []
        for step in range(20):
            b = jax.tree.map(lambda a: jnp.roll(a, step, axis=0), batch)
            loss, grads, load = grad_fn(p, r, b)
            updates, state = tx.update(grads, state, p)
            p, r = optax.apply_updates(p, updates), update_router_bias(r, load, 0.01)
            losses.append(float(loss))
        return np.array(losses)

    got = run(lambda p, r, b: piped(p, r, b, HYPER))
    want = run(lambda p, r, b: (lambda out: (out[0][0], out[1], out[0][1]))(plain(p, r, b)))
    assert want[-1] < want[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_unsupported_layouts_are_refused_naming_the_fix():
    cfg, *_ = _setup(2, 8)
    with pytest.raises(ValueError, match=r"mesh axes \{'tensor': 2\} are not supported"):
        pipeline_grad_fn(cfg, make_mesh({"stage": 2, "tensor": 2}, jax.devices()[:4]), make_schedule("1f1b", 2, 2),
                         OBJECTIVE)
    with pytest.raises(ValueError, match="2 MoE layers .* do not split evenly over 4 stages"):
        pipeline_grad_fn(cfg, make_mesh({"stage": 4}, jax.devices()[:4]), make_schedule("1f1b", 4, 4), OBJECTIVE)
    with pytest.raises(ValueError, match="schedule has 2 ranks but the mesh has stage=4"):
        pipeline_grad_fn(cfg, make_mesh({"stage": 4}, jax.devices()[:4]), make_schedule("1f1b", 2, 2), OBJECTIVE)
