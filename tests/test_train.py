"""Training pieces: schedules, AdamW masks, bf16 moments, EMA, losses, packing independence, balancing,
recomputation policies, FLOPs, and fast failures on bad input."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import deepseek_jax as dsj
from deepseek_jax import train as T
from deepseek_jax.train import step as step_module
from deepseek_jax.train import optim
from deepseek_jax.nn.moe import route, sequence_balance


# --------------------------------------------------------------------------------------------- schedules
def test_multistep_schedule_boundaries():
    s = optim.lr_schedule(optim.OptimConfig(lr=1.0, schedule="multistep", warmup_steps=100), 1000)
    vals = {t: float(s(t)) for t in (0, 50, 100, 799, 800, 899, 900, 999)}
    assert vals == pytest.approx({0: 0.0, 50: 0.5, 100: 1.0, 799: 1.0, 800: 0.316, 899: 0.316, 900: 0.1, 999: 0.1},
                                 abs=1e-7)


def test_v3_schedule_boundaries():
    n = 14800  # one step per 1B tokens: the published boundaries fall on whole steps
    s = optim.lr_schedule(optim.OptimConfig(lr=2.2e-4, schedule="v3", warmup_steps=2000), n)
    assert float(s(0)) == 0.0 and float(s(1000)) == pytest.approx(1.1e-4)
    assert float(s(2000)) == pytest.approx(2.2e-4) and float(s(9999)) == pytest.approx(2.2e-4)
    assert float(s(10000)) == pytest.approx(2.2e-4)  # cosine starts at the peak
    mid = 10000 + 4300 // 2
    assert float(s(mid)) == pytest.approx(2.2e-5 + (2.2e-4 - 2.2e-5) * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-5)
    assert float(s(14300)) == pytest.approx(2.2e-5, rel=1e-6) and float(s(14632)) == pytest.approx(2.2e-5, rel=1e-6)
    assert float(s(14633)) == pytest.approx(7.3e-6, rel=1e-6) and float(s(14799)) == pytest.approx(7.3e-6, rel=1e-6)


def test_cosine_and_errors():
    s = optim.lr_schedule(optim.OptimConfig(lr=1.0, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1), 110)
    assert float(s(10)) == pytest.approx(1.0) and float(s(110)) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="optim.schedule"):
        optim.OptimConfig(schedule="linear")
    with pytest.raises(ValueError, match="warmup_steps=50 exceeds train.steps=20"):
        T.TrainConfig(steps=20, optim=optim.OptimConfig(warmup_steps=50))


# --------------------------------------------------------------------------------------------- AdamW
def test_weight_decay_skips_norms(tiny_vars):
    params = tiny_vars["params"]
    mask = optim.decay_mask(params)
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    skipped = {k for k, m in flat.items() if not m}
    # 4 norms per layer (attn, ffn, q, kv) x 2 stacks, the final norm, and MTP's enorm/hnorm/final + 4.
    assert skipped == {k for k in flat if k.endswith("['scale']")} and len(skipped) == 16
    assert flat["['embed']"] and flat["['moe_layers']['ffn']['w1']"]
    # Functional: with zero gradients, decayed weights shrink by lr*wd*w and norm scales stay put.
    tx, _ = optim.make_optimizer(optim.OptimConfig(lr=0.5, schedule="constant", warmup_steps=0, weight_decay=0.1), 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    upd, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, upd)
    np.testing.assert_allclose(new["embed"], params["embed"] * (1 - 0.05), rtol=1e-6)
    np.testing.assert_array_equal(new["final_norm"]["scale"], params["final_norm"]["scale"])


def test_bf16_moments_dtypes_and_update():
    p = {"w": jnp.linspace(-1, 1, 64).reshape(8, 8)}
    g = {"w": jnp.cos(jnp.arange(64.0)).reshape(8, 8)}
    lo = optim.scale_by_adam_lowp(0.9, 0.95, 1e-8)
    ref = optax.scale_by_adam(0.9, 0.95, 1e-8)
    s_lo, s_ref = lo.init(p), ref.init(p)
    assert s_lo.mu["w"].dtype == jnp.bfloat16 and s_lo.nu["w"].dtype == jnp.bfloat16
    for _ in range(5):
        u_lo, s_lo = lo.update(g, s_lo)
        u_ref, s_ref = ref.update(g, s_ref)
        assert u_lo["w"].dtype == jnp.float32
        np.testing.assert_allclose(u_lo["w"], u_ref["w"], rtol=2e-2)
    assert s_lo.nu["w"].dtype == jnp.bfloat16


def test_float32_moments_are_float32_for_bfloat16_parameters():
    """``moments_dtype: float32`` with bf16 parameters (the large presets): both moments float32, and AdamW's
    updates those of the same parameters held in float32 (optax's Adam alone kept the moments in bf16 and computed
    them in bf16). Without weight decay, whose ``0.1 x params`` is bf16 arithmetic for bf16 parameters."""
    cfg = optim.OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0, weight_decay=0.0)
    p32 = {"w": jnp.linspace(-1, 1, 64).reshape(8, 8), "final_norm": {"scale": jnp.ones(8)}}
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
    p32 = jax.tree.map(lambda x: x.astype(jnp.float32), p16)  # the same values
    tx, _ = optim.make_optimizer(cfg, 10)
    s16, s32 = tx.init(p16), tx.init(p32)
    assert {x.dtype for x in jax.tree.leaves((s16[1].mu, s16[1].nu))} == {jnp.dtype(jnp.float32)}
    for k in range(4):
        g16 = jax.tree.map(lambda x: (jnp.cos(x * (k + 3)) * 1e-3).astype(jnp.bfloat16), p16)
        u16, s16 = tx.update(g16, s16, p16)
        u32, s32 = tx.update(jax.tree.map(lambda x: x.astype(jnp.float32), g16), s32, p32)
        for a, b in zip(jax.tree.leaves(u16), jax.tree.leaves(u32)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("background", [False, True])
def test_ema_closed_form(background):
    d = 0.9
    thetas = [np.full((3,), float(j), np.float32) for j in range(6)]
    ema = optim.HostEMA({"w": thetas[0]}, d, background=background)
    for th in thetas[1:]:
        ema.update({"w": jnp.asarray(th)})
    k = len(thetas) - 1
    want = d ** k * thetas[0] + sum((1 - d) * d ** (k - j) * thetas[j] for j in range(1, k + 1))
    np.testing.assert_allclose(ema.value()["w"], want, rtol=1e-6)


# --------------------------------------------------------------------------------------------- losses
def _packed_row(tokens_a, tokens_b, tokens_c):
    toks = np.concatenate([tokens_a, tokens_b, tokens_c])[None]
    seg = np.concatenate([np.full(len(tokens_a), 1), np.full(len(tokens_b), 2), np.full(len(tokens_c), 3)])[None]
    pos = np.concatenate([np.arange(len(tokens_a)), np.arange(len(tokens_b)), np.arange(len(tokens_c))])[None]
    return {"tokens": jnp.asarray(toks, jnp.int32), "segment_ids": jnp.asarray(seg, jnp.int32),
            "positions": jnp.asarray(pos, jnp.int32)}


def _token_terms(cfg, variables, batch):
    """Per-position main and MTP negative log-likelihoods (masked terms set to 0)."""
    out = dsj.Transformer(cfg).apply(variables, batch["tokens"], positions=batch["positions"],
                                     segment_ids=batch["segment_ids"])
    terms = []
    for k, logits in [(1, out.logits)] + [(j + 2, out.mtp_logits[j]) for j in range(cfg.mtp.depth)]:
        tgt, mask = T.shifted_targets(batch["tokens"], batch["segment_ids"], k)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[..., None], -1)[..., 0]
        terms.append(np.asarray(jnp.where(mask, nll, 0.0)))
    return terms


def test_packing_never_leaks_between_documents(tiny_cfg, tiny_vars):
    rng = np.random.default_rng(0)
    a, b, c = rng.integers(1, 512, 11), rng.integers(1, 512, 9), rng.integers(1, 512, 12)
    b2 = rng.integers(1, 512, 9)
    before = _token_terms(tiny_cfg, tiny_vars, _packed_row(a, b, c))
    after = _token_terms(tiny_cfg, tiny_vars, _packed_row(a, b2, c))
    keep = np.r_[0:11, 20:32]
    for x, y in zip(before, after):
        # Equal up to float rounding: with another document's tokens changed, the experts' loads change,
        # so a token of document a or c may move between the MoE kernel's batched part and its overflow
        # loop (another matmul shape, another summation order: ~1e-7). Information from document b would
        # show at the scale of b's own change (>1e-2).
        np.testing.assert_allclose(x[0, keep], y[0, keep], rtol=1e-6, atol=0)
        assert np.abs(x[0, 11:19] - y[0, 11:19]).max() > 1e-2
    # The mask drops exactly the cross-document targets: main loss, last position of each document.
    _, m1 = T.shifted_targets(*[_packed_row(a, b, c)[k] for k in ("tokens", "segment_ids")], 1)
    assert np.flatnonzero(~np.asarray(m1[0])).tolist() == [10, 19, 31]


def test_loss_fn_parts_match_formulas(tiny_cfg, tiny_vars):
    rng = np.random.default_rng(1)
    batch = _packed_row(rng.integers(0, 512, 20), rng.integers(0, 512, 14), rng.integers(0, 512, 30))
    total, aux = T.objective_loss(tiny_cfg, "none", T.Pretrain(1e-4, 1e-3), tiny_vars["params"], tiny_vars["router"],
                                  batch, {"mtp_lambda": 0.3})
    terms = _token_terms(tiny_cfg, tiny_vars, batch)
    n_main = 61  # 64 positions minus the 3 document ends
    np.testing.assert_allclose(aux["ce"], terms[0].sum() / n_main, rtol=1e-6)
    np.testing.assert_allclose(aux["mtp"][0], terms[1].sum() / (64 - 6), rtol=1e-6)
    # The balance term: sum over MoE layers (2 main + 1 MTP) of f.P, here ~1 each.
    assert 2.0 < float(aux["balance"]) < 5.0
    want = aux["ce"] + 0.3 * aux["mtp"][0] + 1e-4 * aux["balance"] + 1e-3 * aux["z"]
    np.testing.assert_allclose(total, want, rtol=1e-6)


def test_sequence_balance_naive():
    rng = np.random.default_rng(2)
    b, t, e, k = 2, 7, 8, 2
    logits = rng.normal(size=(b, t, e)).astype(np.float32)
    moe = dsj.MoEConfig(n_routed_experts=e, experts_per_token=k, moe_intermediate_size=4)
    experts = np.argsort(-logits, -1)[..., :k]
    got = float(sequence_balance(jnp.asarray(logits), jnp.asarray(experts), moe))
    want = []
    for i in range(b):
        s = 1 / (1 + np.exp(-logits[i]))
        s = s / s.sum(-1, keepdims=True)
        f = np.array([(experts[i] == j).any(-1).sum() * e / (k * t) for j in range(e)])
        want.append((f * s.mean(0)).sum())
    assert got == pytest.approx(np.mean(want), rel=1e-6)


# --------------------------------------------------------------------------------------------- balancing
def _bias_delta_reference(load, gamma):
    return gamma * np.sign(load.mean(-1, keepdims=True) - load)


def test_bias_update_rule(tiny_vars):
    router = tiny_vars["router"]
    load = np.array([[5, 1, 1, 1] * 4, [2] * 16, [0, 8] * 8], np.float32)
    new = T.update_router_bias(router, jnp.asarray(load), 0.01)
    d = _bias_delta_reference(load, 0.01)
    np.testing.assert_allclose(new["moe_layers"]["ffn"]["e_score_correction_bias"], d[:2], rtol=1e-6)
    np.testing.assert_allclose(new["mtp_0"]["layer"]["ffn"]["e_score_correction_bias"], d[2], rtol=1e-6)
    assert not np.any(np.asarray(new["moe_layers"]["ffn"]["e_score_correction_bias"])[1])  # balanced: no-op
    c = T.update_router_bias(router, jnp.asarray(load), 0.01, center=True)
    np.testing.assert_allclose(np.asarray(c["moe_layers"]["ffn"]["e_score_correction_bias"]).sum(-1), 0, atol=1e-7)


@pytest.mark.parametrize("gamma", [0.0, 0.002])
def test_loss_free_balancing_converges_from_a_skewed_router(gamma):
    """Fixed token features, a router with per-expert logit offsets (initial MaxVio >> 1); only the bias moves."""
    cfg = dsj.load_config("tiny")
    rng = np.random.default_rng(0)
    e = cfg.moe.n_routed_experts
    logits = jnp.asarray(rng.normal(size=(2048, e)) * 0.5 + np.linspace(-2, 2, e), jnp.float32)
    bias = jnp.zeros((e,), jnp.float32)

    @jax.jit
    def step(bias):
        _, experts = route(logits, bias, cfg.moe)
        load = jnp.bincount(experts.reshape(-1), length=e).astype(jnp.float32)
        return bias + gamma * jnp.sign(load.mean() - load), T.max_violation(load)

    vios = []
    for _ in range(300):
        bias, v = step(bias)
        vios.append(float(v))
    print(f"gamma={gamma}: MaxVio {vios[0]:.2f} -> {np.mean(vios[-20:]):.3f}")
    assert vios[0] > 1.5
    if gamma:
        assert np.mean(vios[-20:]) < 0.3
    else:
        assert min(vios) > 1.5


# --------------------------------------------------------------------------------------------- recompute
def test_remat_policies_same_numbers_less_memory(tiny_cfg, tiny_vars):
    rng = np.random.default_rng(3)
    toks = jnp.asarray(rng.integers(0, 512, (4, 128)), jnp.int32)
    batch = {"tokens": toks, "segment_ids": jnp.ones_like(toks), "positions": jnp.broadcast_to(jnp.arange(128), toks.shape)}
    res, mem = {}, {}
    for policy in ("none", "full", "deepseek"):
        def f(p, policy=policy):
            return T.objective_loss(tiny_cfg, policy, T.Pretrain(1e-4), p, tiny_vars["router"], batch,
                                    {"mtp_lambda": 0.3})[0]

        g = jax.jit(jax.value_and_grad(f))
        res[policy] = g(tiny_vars["params"])
        mem[policy] = g.lower(tiny_vars["params"]).compile().memory_analysis().temp_size_in_bytes
    print("compiled temp bytes:", mem)
    for policy in ("full", "deepseek"):
        np.testing.assert_allclose(res[policy][0], res["none"][0], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(res[policy][1]), jax.tree.leaves(res["none"][1])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert mem["deepseek"] < mem["none"] and mem["full"] < mem["deepseek"]


def test_deepseek_policy_saves_the_named_values_only(tiny_cfg, tiny_vars):
    """T5.1: inside the layers only the named keeps are saved (no RMSNorm output, no up-projection)."""
    import contextlib
    import io

    from deepseek_jax.nn.block import DEEPSEEK_SAVED

    toks = jnp.zeros((1, 16), jnp.int32)
    batch = {"tokens": toks, "segment_ids": jnp.ones_like(toks), "positions": jnp.broadcast_to(jnp.arange(16), toks.shape)}
    lines = {}
    for policy in ("none", "deepseek"):
        def f(p, policy=policy):
            return T.objective_loss(tiny_cfg, policy, T.Pretrain(1e-4), p, tiny_vars["router"], batch,
                                    {"mtp_lambda": 0.3})[0]

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            jax.ad_checkpoint.print_saved_residuals(f, tiny_vars["params"])
        lines[policy] = buf.getvalue().splitlines()
    named = [ln for ln in lines["deepseek"] if "named '" in ln]
    for kept in ("c_q", "c_kv", "attn_out", "swiglu_in", "mlp_in", "expert_out"):
        assert any(f"named '{kept}'" in ln for ln in named), kept
    assert all(ln.split("named '")[1].split("'")[0] in DEEPSEEK_SAVED for ln in named)
    assert "rsqrt" in " ".join(lines["none"]) and len(lines["deepseek"]) < len(lines["none"])


# --------------------------------------------------------------------------------------------- FLOPs
def test_flops_per_token_formula():
    """6 x the matmul parameters a token uses, written out from the config (not from the parameter walk),
    plus the attention term."""
    for depth in (0, 1):
        cfg = dsj.load_config("tiny", **{"mtp.depth": depth})
        a, m, d = cfg.attention, cfg.moe, cfg.d_model
        n, p, r, v = a.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        attn = d * a.q_lora_rank + a.q_lora_rank * n * (p + r) + d * (a.kv_lora_rank + r) \
            + a.kv_lora_rank * n * (p + v) + n * v * d
        dense_mlp = 3 * d * cfg.intermediate_size
        moe = d * m.n_routed_experts + 3 * d * m.moe_intermediate_size * (m.experts_per_token + m.n_shared_experts)
        head = d * cfg.vocab_size
        main = cfg.n_dense_layers * (attn + dense_mlp) + cfg.n_moe_layers * (attn + moe) + head
        mtp = depth * (2 * d * d + attn + moe + head)  # eh_proj, one MoE layer, the shared head once more
        want = 6 * (main + mtp) + 6 * (cfg.n_layers + depth) * n * (p + r + v) * 256
        assert T.flops_per_token(cfg, 256) == pytest.approx(want, rel=1e-9), depth


# --------------------------------------------------------------------------------------------- bad input
def test_bad_input_fails_before_compiling(tmp_path, monkeypatch):
    def no_compile(*a, **k):
        raise AssertionError("compiled despite bad input")

    monkeypatch.setattr(step_module, "_make_train_fns", no_compile)
    cfg, tcfg = T.load_run_config("tiny", ["train.steps=2", "train.optim.warmup_steps=1", f"train.out={tmp_path}/run"])
    with pytest.raises(FileNotFoundError, match="data.sources"):
        T.train(cfg, tcfg.replace(**{"data.sources": [str(tmp_path / "missing")]}), progress=False)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="corpus is empty"):
        T.train(cfg, tcfg.replace(**{"data.sources": [str(tmp_path / "empty.txt")]}), progress=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="train.out=.*not a writable folder"):
        T.train(cfg, tcfg.replace(out=str(tmp_path / "afile" / "run")), progress=False)
    with pytest.raises(ValueError, match="train.mesh='data=3' has 3 devices but 8"):
        T.train(cfg, tcfg.replace(mesh="data=3"), progress=False)
    with pytest.raises(ValueError, match="not divisible by data"):
        T.train(cfg, tcfg.replace(mesh="data=8", batch_size=4), progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.yaml").write_text("vocab_size: 1024\n")
    with pytest.raises(ValueError, match="holds a run of a different model"):
        T.train(cfg, tcfg.replace(out=str(tmp_path / "other")), progress=False)
    with pytest.raises(ValueError, match="unknown config key.*train.stepz"):
        T.load_run_config("tiny", ["train.stepz=3"])
    with pytest.raises(ValueError, match="train.remat"):
        T.load_run_config("tiny", ["train.remat=some"])
    with pytest.raises(ValueError, match="key=value"):
        T.load_run_config("tiny", ["steps"])
