"""GRPO's pure pieces (post_train/grpo.py) against NumPy transcriptions of the formulas (post-training.md §1,
TRL's ``_compute_loss``), in float64: advantages (U1), loss and gradient of every aggregation with ragged
lengths, ratios clipped on both sides and both signs of A (U2), the on-policy gradient (U3), and the KL
estimators' values and expected gradients on an exact categorical (U4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax.post_train import group_advantages, grpo_loss, kl_estimate


def np_advantages(r, g, scale, eps=1e-4):
    r = r.reshape(-1, g)
    out = r - r.mean(1, keepdims=True)
    if scale == "group":
        out = out / (r.std(1, ddof=1, keepdims=True) + eps)
    elif scale == "batch":
        out = out / (r.reshape(-1).std(ddof=1) + eps)
    return out.reshape(-1)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_numpy(scale):
    rng = np.random.default_rng(0)
    r = rng.normal(size=24)
    r[8:16] = 0.5  # a group with one reward: no signal
    with jax.enable_x64(True):
        got = np.asarray(group_advantages(jnp.asarray(r), 8, scale))
    np.testing.assert_allclose(got, np_advantages(r, 8, scale), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got.reshape(3, 8).sum(1), 0, atol=1e-12)
    assert np.all(got[8:16] == 0)


def test_rows_without_reward_get_zero_advantage_and_bad_settings_name_the_field():
    r = jnp.array([1.0, 0.0, jnp.nan, 1.0, jnp.nan, jnp.nan, jnp.nan, jnp.nan])
    a = np.asarray(group_advantages(r, 4))
    valid = np.array([1.0, 0.0, 1.0])
    want = (valid - valid.mean()) / (valid.std(ddof=1) + 1e-4)
    np.testing.assert_allclose(a[[0, 1, 3]], want, rtol=1e-6)
    assert a[2] == 0 and np.all(a[4:] == 0)
    with pytest.raises(ValueError, match="grpo.scale_rewards='std'"):
        group_advantages(r, 4, "std")
    with pytest.raises(ValueError, match="grpo.num_generations=3"):
        group_advantages(r, 3)
    with pytest.raises(ValueError, match="grpo.loss_agg='mean'"):
        grpo_loss(r[None], r[None], None, r[:1], r[None], agg="mean")
    with pytest.raises(ValueError, match="grpo.kl_estimator='k4'"):
        kl_estimate(r, r, "k4")


def np_loss(logp, old, ref, adv, mask, agg, el, eh, beta, kl, max_len, delta):
    """The per-token loss and aggregation written out in NumPy (TRL ``_compute_loss``; verl's dual clip)."""
    rho = np.exp(logp - old)
    a = adv[:, None]
    per = -np.minimum(rho * a, np.clip(rho, 1 - el, 1 + eh) * a)
    if delta is not None:
        per = np.where(a < 0, np.minimum(per, -delta * a), per)
    x = ref - logp
    d = {"k1": -x, "k2": x * x / 2, "k3": np.exp(x) - x - 1}[kl]
    per = per + beta * d
    if agg == "grpo":
        return np.mean((per * mask).sum(1) / mask.sum(1))
    if agg in ("bnpo", "dapo"):
        return (per * mask).sum() / mask.sum()
    return (per * mask).sum() / (mask.shape[0] * max_len)


def np_grad(logp, *args, h=1e-6):
    """Central differences of :func:`np_loss` in every logp entry."""
    g = np.zeros_like(logp)
    for idx in np.ndindex(logp.shape):
        up, dn = logp.copy(), logp.copy()
        up[idx] += h
        dn[idx] -= h
        g[idx] = (np_loss(up, *args) - np_loss(dn, *args)) / (2 * h)
    return g


@pytest.mark.parametrize("agg", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("kl,beta,delta", [("k3", 0.04, None), ("k2", 0.1, 3.0), ("k1", 0.0, None)])
def test_loss_and_gradient_equal_numpy(agg, kl, beta, delta):
    rng = np.random.default_rng(1)
    n, t = 6, 7
    logp = -rng.uniform(0.1, 3.0, (n, t))
    old = logp + rng.normal(0, 0.4, (n, t))  # ratios well outside [0.8, 1.28] on both sides
    ref = logp + rng.normal(0, 0.3, (n, t))
    adv = np.array([1.5, -0.7, 0.3, -2.0, 0.9, -0.1])
    mask = (np.arange(t)[None] < np.array([7, 3, 5, 1, 6, 4])[:, None]).astype(np.float64)  # ragged
    args = (old, ref, adv, mask, agg, 0.2, 0.28, beta, kl, 9, delta)
    rho = np.exp(logp - old)
    assert (rho < 0.8).any() and (rho > 1.28).any()
    with jax.enable_x64(True):
        def f(lp):
            return grpo_loss(lp, jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv), jnp.asarray(mask), agg=agg,
                             eps_low=0.2, eps_high=0.28, beta=beta, kl=kl, max_len=9, delta=delta)[0]
        loss, grad = jax.value_and_grad(f)(jnp.asarray(logp))
    np.testing.assert_allclose(float(loss), np_loss(logp, *args), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(grad), np_grad(logp, *args), rtol=1e-6, atol=1e-9)
    assert np.all(np.asarray(grad)[mask == 0] == 0)


def test_on_policy_gradient_is_the_advantage_weighted_score():
    """mu = 1, old = stop_gradient(logp), beta = 0: d loss / d logp_{i,t} = -A_i / (G |o_i|) for ``grpo``
    (and -A_i / sum|o| for ``dapo``); no clipping; equal rewards give an exactly zero gradient."""
    rng = np.random.default_rng(2)
    logp = jnp.asarray(-rng.uniform(0.1, 2.0, (4, 5)))
    mask = jnp.asarray((np.arange(5)[None] < np.array([5, 2, 4, 3])[:, None]).astype(np.float32))
    adv = jnp.array([1.0, -1.0, 0.5, -0.5])

    def grad(agg, a):
        f = lambda lp: grpo_loss(lp, jax.lax.stop_gradient(lp), None, a, mask, agg=agg)  # noqa: E731
        (_, m), g = jax.value_and_grad(f, has_aux=True)(logp)
        assert float(m["clip_frac_region"]) == 0 and float(m["ratio_max"]) == 1
        return np.asarray(g)
    lens = np.asarray(mask.sum(1))
    np.testing.assert_allclose(grad("grpo", adv), -np.asarray(adv)[:, None] / (4 * lens[:, None]) * mask, rtol=1e-6)
    np.testing.assert_allclose(grad("dapo", adv), -np.asarray(adv)[:, None] / lens.sum() * mask, rtol=1e-6)
    flat = group_advantages(jnp.ones(4), 4)
    assert np.all(grad("grpo", flat) == 0)


def test_kl_estimators_on_an_exact_categorical():
    """E_pi[k3] = KL(pi || ref); E[grad k3] = grad KL(ref || pi); E[grad k2] = grad KL(pi || ref); E[grad k1] = 0
    (expectations over the sampled token, the sampling distribution held fixed); k3 >= 0, 0 iff equal; a
    Monte-Carlo k3 mean within 3 sigma of the KL."""
    with jax.enable_x64(True):
        theta = jnp.array([0.3, -1.2, 0.8, 0.1, -0.4])
        ref = jax.nn.log_softmax(jnp.array([-0.2, 0.5, 0.4, -1.0, 0.3]))
        pi = lambda th: jax.nn.log_softmax(th)  # noqa: E731
        p = jnp.exp(pi(theta))

        def expected(kind, th):  # sum_i p_i(fixed) k(logpi_i(th), ref_i)
            return jnp.sum(jax.lax.stop_gradient(p) * kl_estimate(pi(th), ref, kind))
        kl_pi_ref = lambda th: jnp.sum(jnp.exp(pi(th)) * (pi(th) - ref))  # noqa: E731
        kl_ref_pi = lambda th: jnp.sum(jnp.exp(ref) * (ref - pi(th)))  # noqa: E731
        np.testing.assert_allclose(expected("k3", theta), kl_pi_ref(theta), rtol=1e-12)
        np.testing.assert_allclose(expected("k1", theta), kl_pi_ref(theta), rtol=1e-12)
        np.testing.assert_allclose(jax.grad(lambda t: expected("k3", t))(theta), jax.grad(kl_ref_pi)(theta),
                                   rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(jax.grad(lambda t: expected("k2", t))(theta), jax.grad(kl_pi_ref)(theta),
                                   rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(jax.grad(lambda t: expected("k1", t))(theta), 0, atol=1e-14)
        np.testing.assert_allclose(jax.grad(lambda t: expected("k3+", t))(theta), jax.grad(kl_pi_ref)(theta),
                                   rtol=1e-10, atol=1e-14)
        assert np.all(np.asarray(kl_estimate(pi(theta), ref)) >= 0) and float(kl_estimate(ref, ref).max()) == 0
        draws = jax.random.categorical(jax.random.key(0), pi(theta), shape=(200_000,))
        k3 = np.asarray(kl_estimate(pi(theta)[draws], ref[draws]))
        assert abs(k3.mean() - float(kl_pi_ref(theta))) <= 3 * k3.std() / np.sqrt(k3.size)


def test_public_names():
    assert dsj.post_train.group_advantages is group_advantages and dsj.post_train.grpo_loss is grpo_loss


def test_per_token_logps_pick_the_next_token_from_a_numpy_log_softmax(tiny_cfg, tiny_vars):
    """Against a float64 NumPy log-softmax of the model's logits (``dsj.forward``), with two packed documents and
    padding: the next token's log-probability at temperature 0.7, zero where the next token is another
    document's or padding."""
    from deepseek_jax.post_train.logprobs import per_token_logps

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, tiny_cfg.vocab_size, (2, 12)).astype(np.int32)
    seg = np.array([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3], np.int32)
    pos = np.array([list(range(5)) + list(range(7)), list(range(9)) + [0] * 3], np.int32)
    logp, valid = per_token_logps(tiny_cfg, tiny_vars, jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos), 0.7)
    # row 1 is one document (padding after it never reaches it: causal); row 0 is compared per document
    want_valid = np.zeros((2, 12), bool)
    want_valid[0, :4] = want_valid[0, 5:11] = want_valid[1, :8] = True
    np.testing.assert_array_equal(np.asarray(valid), want_valid)
    for row, lo, hi in ((0, 0, 5), (0, 5, 12), (1, 0, 9)):
        logits = np.asarray(dsj.forward(tiny_cfg, tiny_vars, tokens[row:row + 1, lo:hi]), np.float64)[0] / 0.7
        lsm = logits - logits.max(-1, keepdims=True)
        lsm = lsm - np.log(np.exp(lsm).sum(-1, keepdims=True))
        want = lsm[np.arange(hi - lo - 1), tokens[row, lo + 1:hi]]
        np.testing.assert_allclose(np.asarray(logp)[row, lo:hi - 1], want, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(logp)[~want_valid] == 0)
