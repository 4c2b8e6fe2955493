"""The GRPO update through the project's train step (post-training.md U9): one update on a data=2 x expert=2
mesh equals one device for the ``grpo`` and ``dapo`` aggregations (a per-shard normaliser or a group split
across shards would differ), and the rollout layout puts the completion mask and sampler log-probs where
the training forward reads them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from deepseek_jax.nn import tree
from deepseek_jax.nn.placement import shard_variables
from deepseek_jax.parallel.mesh import make_mesh
from deepseek_jax.parallel.rules import batch_spec
from deepseek_jax.post_train.objectives import GRPO
from deepseek_jax.post_train.rollout import layout
from deepseek_jax.train.config import StepConfig
from deepseek_jax.train.loop import start_from
from deepseek_jax.train.step import hyper, make_train_fns, objective_loss


def _rollout_batch(cfg, n=8, width=32, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(2, cfg.vocab_size, rng.integers(3, 9)).tolist() for _ in range(n // 4)]
    prompts = [p for p in prompts for _ in range(4)]  # groups of 4, contiguous
    comps = [rng.integers(2, cfg.vocab_size, rng.integers(2, 14)).tolist() for _ in range(n)]
    b = layout(prompts, comps, width)
    del b["sample_logp"]
    b["advantages"] = rng.normal(size=n).astype(np.float32)
    b["old_logp"] = (np.log(rng.uniform(0.01, 1.0, (n, width))) * (rng.uniform(size=(n, width)) < 0.9)).astype(np.float32)
    return b


def _grads_and_step(cfg, variables, batch, objective, mesh):
    with jax.set_mesh(mesh):
        v = shard_variables(cfg, variables, mesh)
        sh = NamedSharding(mesh, batch_spec(1))
        b = {k: jax.device_put(jnp.asarray(x), sh) for k, x in batch.items()}
        hyp = hyper(0.0, 0.0)
        loss_fn = lambda p: objective_loss(cfg, "none", objective, p, v[tree.ROUTER], b, hyp)[0]  # noqa: E731
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(v[tree.PARAMS])
        fns = make_train_fns(cfg, StepConfig(batch_size=len(batch["tokens"]), seq_len=32, steps=3000), objective, mesh)
        state = fns.init(jax.random.key(0))
        state = start_from(state, v)  # copies: the step donates its state
        _, m = fns.step(state, b, hyp)
    return float(loss), jax.device_get(grads), jax.device_get(m)


@pytest.fixture(scope="module")
def small(tiny_cfg):
    """The tiny preset cut to one dense and one MoE layer without MTP (the same routing and sharding paths, a
    third of the compile time)."""
    import dataclasses

    import deepseek_jax as dsj

    cfg = dataclasses.replace(tiny_cfg, n_layers=2, mtp=dataclasses.replace(tiny_cfg.mtp, depth=0))
    return cfg, dsj.init_variables(cfg, 0)


@pytest.mark.parametrize("agg,beta", [("grpo", 0.0), ("dapo", 0.0), ("dapo", 0.04)])
def test_one_grpo_update_on_a_mesh_equals_one_device(small, agg, beta):
    """With beta > 0 the batch carries reference log-probs and the k3 penalty joins the loss."""
    tiny_cfg, tiny_vars = small
    batch = _rollout_batch(tiny_cfg)
    if beta:
        batch["ref_logp"] = batch["old_logp"] + np.float32(0.3) * np.random.default_rng(1).normal(
            size=batch["old_logp"].shape).astype(np.float32)
    objective = GRPO(agg=agg, eps_low=0.2, eps_high=0.28, beta=beta, balance_alpha=0.0)
    devices = jax.devices()
    one = _grads_and_step(tiny_cfg, tiny_vars, batch, objective, make_mesh({"data": 1}, devices[:1]))
    four = _grads_and_step(tiny_cfg, tiny_vars, batch, objective, make_mesh({"data": 2, "expert": 2}, devices[:4]))
    np.testing.assert_allclose(four[0], one[0], rtol=1e-5)
    flat1, flat4 = jax.tree.leaves(one[1]), jax.tree.leaves(four[1])
    worst = max(float(np.abs(a - b).max() / (np.abs(a).max() + 1e-30)) for a, b in zip(flat1, flat4))
    assert worst < 1e-5, worst
    for k in ("loss", "pg_loss", "grad_norm", "clip_frac_region", "entropy", "tokens") + (("kl", "kl_max") if beta else ()):
        np.testing.assert_allclose(four[2][k], one[2][k], rtol=1e-5, err_msg=k)
    if beta:
        assert one[2]["kl"] > 0 and one[2]["loss"] != one[2]["pg_loss"]
    assert one[2]["clip_frac_region"] > 0  # the old log-probs put some ratios outside the clip range


def test_rollout_layout_aligns_masks_and_sampler_logprobs():
    b = layout([[5, 6, 7], [8]], [[1, 2, 9], [3]], 8, logps=[[-0.1, -0.2, -0.3], [-0.4]], keep=[True, False])
    np.testing.assert_array_equal(b["tokens"], [[5, 6, 7, 1, 2, 9, 0, 0], [8, 3, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b["loss_mask"], [[0, 0, 0, 1, 1, 1, 0, 0], [0] * 8])
    np.testing.assert_array_equal(b["segment_ids"][1], [1, 1, 0, 0, 0, 0, 0, 0])
    # position j holds log p(token j + 1): the completion's first token is predicted at the prompt's last
    np.testing.assert_allclose(b["sample_logp"][0], [0, 0, -0.1, -0.2, -0.3, 0, 0, 0])
    with pytest.raises(ValueError, match="exceed train.seq_len=4"):
        layout([[1, 2, 3]], [[4, 5]], 4)
