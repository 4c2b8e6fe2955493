"""Expert-parallel dispatch with ``ragged_all_to_all`` (the GPU/TPU exchange, :mod:`deepseek_jax.parallel.expert`)
on XLA:CPU, which cannot run it: the collective is replaced by an emulation written from its documented
semantics (checked here on the documentation's own example), and the ragged path must then give the dense
path's outputs and gradients exactly, dropless and with drops. That the real collective is what a TPU program
contains is checked by compiling for a TPU slice (``test_plan.py``)."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from deepseek_jax.parallel.expert import EXCHANGES, ep_routed_experts, exchange_impl
from deepseek_jax.parallel.mesh import make_mesh
from references import ragged_all_to_all_reference


def test_the_emulation_reproduces_the_documented_example():
    """jax.lax.ragged_all_to_all's docstring: two devices, results [1, 3, 0, 0] and [2, 2, 4, 0]."""
    mesh = make_mesh({"data": 2}, jax.devices()[:2])
    args = [np.array(a, np.int32) for a in ([[1, 2, 2], [3, 4, 0]], [[0] * 4] * 2, [[0, 1], [0, 1]], [[1, 2], [1, 1]],
                                            [[0, 0], [1, 2]], [[1, 1], [2, 1]])]
    fn = jax.shard_map(lambda *a: ragged_all_to_all_reference(*(x[0] for x in a), axis_name="data")[None],
                       mesh=mesh, in_specs=(P("data"),) * 6, out_specs=P("data"))
    np.testing.assert_array_equal(np.asarray(jax.jit(fn)(*args)), [[1, 3, 0, 0], [2, 2, 4, 0]])


def _problem(n=64, d=16, f=8, e=8, k=2, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (n, d))
    experts = jnp.argsort(jax.random.uniform(ks[1], (n, e)), -1)[:, :k].astype(jnp.int32)
    weights = jax.nn.softmax(jax.random.normal(ks[2], (n, k)), -1)
    w1, w3 = (jax.random.normal(kk, (e, d, f)) / d ** 0.5 for kk in ks[3:5])
    w2 = jax.random.normal(ks[0], (e, f, d)) / f ** 0.5
    return x, weights, experts, w1, w3, w2


@pytest.mark.parametrize("capacity_factor", [None, 0.5], ids=["dropless", "drops"])
@pytest.mark.parametrize("axes", [{"expert": 8}, {"data": 2, "expert": 4}, {"expert": 4, "tensor": 2}],
                         ids=lambda a: "x".join(f"{k}{v}" for k, v in a.items()))
def test_ragged_exchange_equals_the_dense_exchange(monkeypatch, axes, capacity_factor):
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", ragged_all_to_all_reference)
    mesh = make_mesh(axes)
    x, weights, experts, w1, w3, w2 = _problem()

    def run(exchange):
        def loss(x, w1, w3, w2):
            y, dropped, dispatched = ep_routed_experts(x, weights, experts, w1, w3, w2, mesh, capacity_factor,
                                                       exchange=exchange)
            return jnp.sum(y * jnp.cos(y)), (y, dropped, dispatched)
        with jax.set_mesh(mesh):
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(x, w1, w3, w2)

    (_, (y_d, drop_d, sent_d)), g_d = run("dense")
    (_, (y_r, drop_r, sent_r)), g_r = run("ragged")
    assert (int(drop_d) > 0) == (capacity_factor is not None) and int(drop_r) == int(drop_d)
    assert int(sent_r) == int(sent_d) > 0
    np.testing.assert_allclose(np.asarray(y_r), np.asarray(y_d), rtol=1e-6, atol=1e-6)
    for a, b in zip(g_r, g_d):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_the_exchange_follows_the_platform():
    assert exchange_impl("cpu") == "dense" and exchange_impl("tpu") == exchange_impl("gpu") == "ragged"
    assert exchange_impl() == "dense"  # this host
    with pytest.raises(ValueError, match="exchange='sparse' must be one of"):
        ep_routed_experts(*_problem(), make_mesh({"expert": 8}), exchange="sparse")
    assert EXCHANGES == ("dense", "ragged")
