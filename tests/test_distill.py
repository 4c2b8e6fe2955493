"""Distillation losses (post-training.md U8) against NumPy in float64: zero loss and gradient when the student
equals the teacher; the temperature-scaled masked forward KL; the generalised JSD's endpoints (beta = 0 forward,
beta = 1 reverse KL) and its mixture form in between; a top-k teacher differs from the full one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.post_train.distill import check_vocabularies, forward_kl, generalized_jsd, teacher_logprobs


def _lsm(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl(lp, lq):
    """sum p (log p - log q) over the support of p (0 log 0 = 0)."""
    p = np.exp(lp)
    keep = p > 0
    return np.where(keep, p * (np.where(keep, lp, 0) - np.where(keep, lq, 0)), 0).sum(-1)


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(2, 5, 7)) * 2, rng.normal(size=(2, 5, 7)) * 2
    mask = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], np.float64)
    return t, s, mask


def test_forward_kl_with_temperature_and_mask_equals_numpy(logits):
    t, s, mask = logits
    tau = 2.0
    want = tau ** 2 * (_kl(_lsm(t / tau), _lsm(s / tau)) * mask).sum() / mask.sum()
    with jax.enable_x64(True):
        got = forward_kl(teacher_logprobs(jnp.asarray(t), tau), jnp.asarray(s), jnp.asarray(mask), tau)
        np.testing.assert_allclose(float(got), want, rtol=1e-10)
        # student = teacher: zero loss and zero gradient
        f = lambda x: forward_kl(teacher_logprobs(jnp.asarray(t), tau), x, jnp.asarray(mask), tau)  # noqa: E731
        assert abs(float(f(jnp.asarray(t)))) < 1e-12
        assert float(jnp.abs(jax.grad(f)(jnp.asarray(t))).max()) < 1e-12


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_generalized_jsd_equals_numpy_and_its_endpoints_are_the_two_kls(logits, beta):
    t, s, mask = logits
    lp, lq = _lsm(t), _lsm(s)
    if beta == 0:
        per = _kl(lp, lq)
    elif beta == 1:
        per = _kl(lq, lp)
    else:
        lm = np.log(beta * np.exp(lp) + (1 - beta) * np.exp(lq))
        per = beta * _kl(lp, lm) + (1 - beta) * _kl(lq, lm)
    want = (per * mask).sum() / mask.sum()
    with jax.enable_x64(True):
        tl = teacher_logprobs(jnp.asarray(t))
        got = float(generalized_jsd(tl, jnp.asarray(s), jnp.asarray(mask), beta))
        np.testing.assert_allclose(got, want, rtol=1e-10)
        same = generalized_jsd(tl, jnp.asarray(t), jnp.asarray(mask), beta)
        g = jax.grad(lambda x: generalized_jsd(tl, x, jnp.asarray(mask), beta))(jnp.asarray(t))
        assert abs(float(same)) < 1e-12 and float(jnp.abs(g).max()) < 1e-12
    # the endpoints are the plain KLs (and differ from each other)
    fwd, rev = ((_kl(lp, lq) * mask).sum() / mask.sum(), (_kl(lq, lp) * mask).sum() / mask.sum())
    assert abs(fwd - rev) > 1e-3
    if beta in (0.0, 1.0):
        np.testing.assert_allclose(got, fwd if beta == 0 else rev, rtol=1e-10)


def test_top_k_teacher_is_renormalised_and_differs_from_the_full_one(logits):
    t, s, mask = logits
    with jax.enable_x64(True):
        top = np.asarray(teacher_logprobs(jnp.asarray(t), 1.0, top_k=3))
        np.testing.assert_allclose(np.exp(top).sum(-1), 1.0, rtol=1e-12)
        assert np.all(np.isinf(top).sum(-1) == 4)
        full = float(forward_kl(teacher_logprobs(jnp.asarray(t)), jnp.asarray(s), jnp.asarray(mask)))
        k3 = float(forward_kl(jnp.asarray(top), jnp.asarray(s), jnp.asarray(mask)))
        want = (_kl(top, _lsm(s)) * mask).sum() / mask.sum()
        np.testing.assert_allclose(k3, want, rtol=1e-10)
        assert abs(full - k3) > 1e-3
        g = jax.grad(lambda x: forward_kl(jnp.asarray(top), x, jnp.asarray(mask)))(jnp.asarray(s))
        assert np.all(np.isfinite(np.asarray(g)))


def test_logit_distillation_needs_one_vocabulary(tiny_cfg):
    import dataclasses

    other = dataclasses.replace(tiny_cfg, vocab_size=tiny_cfg.vocab_size + 1)
    check_vocabularies(tiny_cfg, other, None, None, "seq")
    with pytest.raises(ValueError, match="distill.mode='logit' compares distributions token by token"):
        check_vocabularies(tiny_cfg, other, None, None, "logit")
