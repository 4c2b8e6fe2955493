"""Inference: the KV cache (latent/absorbed MLA, naive MLA, GQA, FP8) against full forwards, greedy and
speculative generation against argmax loops, and the samplers against their distributions."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax import infer as G
from deepseek_jax.nn.attention import CacheConfig

def _gqa_cfg(tiny_cfg):
    d = tiny_cfg.to_dict()
    d["attention"] = {"kind": "gqa", "n_heads": 4, "n_kv_heads": 2}
    d["mtp"] = {"depth": 0}
    d["rope"] = {"theta": 10000.0, "yarn": None}
    return dsj.ModelConfig.from_dict(d)


def _teacher_forced(cfg, variables, seqs, lengths, kind="latent", dtype=None, mesh=None):
    """Prefill each row's first ``lengths[i]`` tokens, then feed the rest one token per step through the
    cache; returns the logits ``[b, T, v]`` each position got (prefill positions from the prefill)."""
    b, t = seqs.shape
    size = t + 2
    cc = CacheConfig(size, kind, dtype or cfg.dtype)
    model = dsj.Transformer(cfg, cache=cc)

    @jax.jit
    def run(v, cache, tokens, positions):
        out, upd = model.apply({**v, "cache": cache}, tokens, positions, with_mtp=False, mutable=["cache"])
        return out.logits, upd["cache"]

    got = np.zeros((b, t, cfg.vocab_size), np.float32)
    with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
        v = dsj.sharding.shard_variables(cfg, variables, mesh) if mesh is not None else variables
        cache = G.init_cache(cfg, b, size, kind, dtype, mesh)
        width = int(lengths.max())
        prompt = np.where(np.arange(width)[None] < lengths[:, None], seqs[:, :width], 0).astype(np.int32)
        logits, cache = run(v, cache, jnp.asarray(prompt), jnp.asarray(np.broadcast_to(np.arange(width), (b, width))))
        logits = np.asarray(logits)
        for i in range(b):
            got[i, :lengths[i]] = logits[i, :lengths[i]]
        pos = lengths.copy()
        while (pos < t).any():
            tok = seqs[np.arange(b), np.minimum(pos, t - 1)][:, None]
            logits, cache = run(v, cache, jnp.asarray(tok), jnp.asarray(pos[:, None]))
            logits = np.asarray(logits)
            for i in range(b):
                if pos[i] < t:
                    got[i, pos[i]] = logits[i, 0]
            pos = pos + 1
    return got


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("arch", ["mla", "gqa"])
@pytest.mark.parametrize("layout", ["single", "mesh"])
def test_prefill_then_decode_equals_full_forward(arch, layout, tiny_cfg, tiny_vars):
    cfg = tiny_cfg if arch == "mla" else _gqa_cfg(tiny_cfg)
    variables = tiny_vars if arch == "mla" else dsj.init_variables(cfg, 1)
    rng = np.random.default_rng(0)
    seqs = rng.integers(0, cfg.vocab_size, (4, 14)).astype(np.int32)
    lengths = np.array([3, 9, 1, 6], np.int32)  # ragged prompts in one batch
    full = np.asarray(dsj.forward(cfg, variables, seqs))
    mesh = dsj.sharding.make_mesh({"data": 2, "expert": 2, "tensor": 2}) if layout == "mesh" else None
    got = _teacher_forced(cfg, variables, seqs, lengths, mesh=mesh)
    err = _rel(got, full)
    print(f"{arch} {layout}: cached decode vs full forward {err:.2e}")
    assert err <= 1e-5


def test_absorbed_latent_attention_equals_naive_cache(tiny_cfg, tiny_vars):
    rng = np.random.default_rng(1)
    seqs = rng.integers(0, tiny_cfg.vocab_size, (2, 12)).astype(np.int32)
    lengths = np.array([4, 7], np.int32)
    latent = _teacher_forced(tiny_cfg, tiny_vars, seqs, lengths, "latent")
    naive = _teacher_forced(tiny_cfg, tiny_vars, seqs, lengths, "naive")
    assert _rel(latent, naive) <= 1e-5


def test_cache_bytes_per_token_and_fp8_cache(tiny_cfg, tiny_vars):
    a = tiny_cfg.attention
    per_layer = a.kv_lora_rank + a.qk_rope_head_dim
    for dtype, nbytes in (("float32", 4), ("bfloat16", 2)):
        cache = G.init_cache(tiny_cfg, 3, 32, "latent", dtype)
        assert G.cache_bytes_per_token(cache) == per_layer * tiny_cfg.n_layers * nbytes
    naive = G.cache_bytes_per_token(G.init_cache(tiny_cfg, 3, 32, "naive", "bfloat16"))
    assert naive == a.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) * tiny_cfg.n_layers * 2
    fp8_bytes = G.cache_bytes_per_token(G.init_cache(tiny_cfg, 3, 32, "latent", "fp8"))
    bf16_bytes = per_layer * tiny_cfg.n_layers * 2
    # one byte per value plus one float32 scale per 1x128 tile
    assert fp8_bytes == (per_layer + 4 * -(-per_layer // 128)) * tiny_cfg.n_layers
    print(f"cache bytes/token: bf16 {bf16_bytes}, fp8 {fp8_bytes} ({fp8_bytes / bf16_bytes:.3f}x), naive bf16 {naive}")
    assert fp8_bytes / bf16_bytes <= 0.55
    rng = np.random.default_rng(2)
    seqs = rng.integers(0, tiny_cfg.vocab_size, (2, 12)).astype(np.int32)
    lengths = np.array([4, 7], np.int32)
    ref = _teacher_forced(tiny_cfg, tiny_vars, seqs, lengths, "latent")
    got = _teacher_forced(tiny_cfg, tiny_vars, seqs, lengths, "latent", "fp8")
    err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    print(f"FP8 latent cache: decode logits |d|/|logits| = {err:.4f}")
    # Bound: each cached value is rounded to E4M3 (RMS relative error 2^-4/sqrt(3) = 3.6%); the error enters
    # the attention of each of the 3 layers once: sqrt(3) x 3.6% = 6.2% on the logits at most in RMS, and
    # 10% leaves room. A wrong scale or slot would be O(100%).
    assert 0 < err < 0.10


def test_greedy_generate_equals_argmax_loop(tiny_cfg, tiny_vars):
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4]]
    out = dsj.generate(tiny_cfg, tiny_vars, prompts, 10)
    fwd = jax.jit(lambda v, t: dsj.Transformer(tiny_cfg).apply(v, t, with_mtp=False).logits)
    buf = np.zeros((1, 20), np.int32)  # one compiled shape; causal, so the padding after seq changes nothing
    for p, o in zip(prompts, out):
        seq = list(p)
        for _ in range(10):
            buf[0, :len(seq)] = seq
            seq.append(int(np.argmax(np.asarray(fwd(tiny_vars, buf))[0, len(seq) - 1])))
        assert o == seq[len(p):]
    assert dsj.generate(tiny_cfg, tiny_vars, prompts, 10, cache_kind="naive") == out
    # a row stops at EOS (not returned); the others go on
    eos = out[1][3]
    stopped = dsj.generate(tiny_cfg, tiny_vars, prompts, 10, eos_id=eos)
    assert stopped[1] == out[1][:3]


def test_clear_errors(tiny_cfg, tiny_vars):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        dsj.generate(tiny_cfg, tiny_vars, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="vocab_size=512"):
        dsj.generate(tiny_cfg, tiny_vars, [[1, 600]], 4)
    with pytest.raises(ValueError, match="max_len=8 is too small"):
        dsj.generate(tiny_cfg, tiny_vars, [[1] * 6], 4, max_len=8)
    with pytest.raises(ValueError, match="non-empty list"):
        dsj.generate(tiny_cfg, tiny_vars, "hello", 4)
    with pytest.raises(ValueError, match="MTP modules"):
        dsj.generate(tiny_cfg.replace(**{"mtp.depth": 0}), tiny_vars, [[1]], 4, speculative=True)
    with pytest.raises(ValueError, match="cache kind"):
        CacheConfig(8, "paged")


def _expected(logits, temperature, top_k=None, top_p=None):
    """The sampling distribution written out in NumPy."""
    x = np.asarray(logits, np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_k is not None:
        p[np.argsort(-p)[top_k:]] = 0
        p /= p.sum()
    if top_p is not None:
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        keep = np.zeros_like(p, bool)
        keep[order[: int(np.searchsorted(cum, top_p - 1e-12) + 1)]] = True
        p = np.where(keep, p, 0)
        p /= p.sum()
    return p


def _check_freq(samples, p, n_vocab):
    n = len(samples)
    freq = np.bincount(samples, minlength=n_vocab) / n
    sigma = np.sqrt(p * (1 - p) / n)
    assert np.all(freq[p == 0] == 0), "sampled a token outside the distribution"
    z = np.abs(freq - p) / np.maximum(sigma, 1e-12)
    assert np.all(z[p > 0] < 5), (freq, p)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.6, None, None), (1.0, 4, None),
                                                      (1.0, None, 0.7), (0.8, 6, 0.9)])
def test_samplers_draw_the_right_distribution(temperature, top_k, top_p):
    logits = jnp.asarray([2.0, 1.5, 1.4, 0.3, 0.0, -0.5, -1.0, 0.9, 1.1, -2.0])
    n = 40000
    keys = jax.random.split(jax.random.key(0), n)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: G.sample(logits, k, temperature, top_k, top_p)))(keys))
    _check_freq(draws, _expected(logits, temperature, top_k, top_p), 10)
    assert int(G.sample(logits, keys[0], 0.0)) == 0  # greedy


def test_speculative_sampling_rule_preserves_the_target_distribution():
    """Draft d ~ q, keep it with probability min(1, p(d)/q(d)), else resample from max(p - q, 0): the emitted
    token is distributed as p, for a q far from p."""
    p_logits = jnp.asarray([1.0, 0.2, -0.3, 2.0, 0.0, -1.0, 0.5, 0.1])
    q_logits = jnp.asarray([0.0, 2.0, 0.5, -1.0, 1.0, 0.0, -0.5, 0.3])
    n = 60000
    p_logp = jnp.broadcast_to(jax.nn.log_softmax(p_logits), (n, 8))
    q_logp = jnp.broadcast_to(jax.nn.log_softmax(q_logits), (n, 8))
    k1, k2 = jax.random.split(jax.random.key(3))
    draft = jax.random.categorical(k1, q_logp).astype(jnp.int32)
    accept, fallback = jax.jit(G.speculative_accept)(p_logp, q_logp, draft, k2)
    emitted = np.asarray(jnp.where(accept, draft, fallback))
    _check_freq(emitted, np.asarray(jax.nn.softmax(p_logits)), 8)
    overlap = float(jnp.minimum(jax.nn.softmax(p_logits), jax.nn.softmax(q_logits)).sum())
    assert abs(float(accept.mean()) - overlap) < 0.01  # acceptance rate = sum_x min(p, q)


@pytest.fixture(scope="module")
def trained_tiny(tiny_run):
    """The session's trained tiny model (MTP depth 1), loaded back from its run folder."""
    return dsj.load_run(str(tiny_run[0]))


def _replay_greedy_speculation(cfg, variables, prompt, out):
    """(drafted, accepted) of greedy speculation that produced ``out`` after ``prompt``, replayed from ONE
    full forward of the final sequence: with ``S[i]`` the newest token, the draft for ``S[i+1]`` is MTP
    module 1's argmax at position ``i-1`` (it sees ``h_{i-1}`` and ``Emb(S[i])``); accepted, the step
    emits two tokens, else one. Causality makes the full forward's logits those the cached steps saw."""
    seq = np.asarray(prompt + out, np.int32)
    o = dsj.Transformer(cfg).apply(variables, jnp.asarray(seq[None]))
    mtp = np.asarray(jnp.argmax(o.mtp_logits[0, 0], -1))
    i, n, drafted, accepted = len(prompt), 1, 0, 0
    while n < len(out):
        ok = mtp[i - 1] == seq[i + 1]
        drafted, accepted = drafted + 1, accepted + int(ok)
        i, n = i + 1 + ok, n + 1 + ok
    return drafted, accepted


@pytest.mark.slow
def test_speculative_greedy_equals_plain_greedy_for_200_tokens(trained_tiny):
    cfg, variables, tok = trained_tiny
    prompts = [tok.encode(s).ids for s in ("def __init__(self", "import os\nimport sys\n", "class")]
    plain = dsj.generate(cfg, variables, prompts, 200, eos_id=-1)
    stats = {}
    spec = dsj.generate(cfg, variables, prompts, 200, eos_id=-1, speculative=True, stats=stats)
    print(f"speculative greedy: acceptance {stats['acceptance_rate']:.2f}, "
          f"{stats['tokens_per_forward']:.2f} tokens per main-model forward")
    assert spec == plain
    assert all(len(o) == 200 for o in spec)
    # the acceptances are those the MTP head's own predictions imply (how many depends on the trained
    # model: a 300-step model's greedy text can fall into loops its MTP head does not predict)
    replay = [_replay_greedy_speculation(cfg, variables, p, o) for p, o in zip(prompts, plain)]
    assert stats["drafted"] == sum(d for d, _ in replay)
    assert abs(stats["accepted"] - sum(a for _, a in replay)) <= 2  # argmax near-ties: cached vs full forward
    # sampling with the draft: runs, respects top-k, stops at the budget
    sampled = dsj.generate(cfg, variables, prompts, 30, temperature=0.8, top_k=20, speculative=True, eos_id=-1)
    assert [len(s) for s in sampled] == [30, 30, 30]


@pytest.mark.slow
def test_generate_command_streams_text(trained_tiny, tiny_run, capsys):
    from deepseek_jax import cli

    rc = cli.main(["generate", "--checkpoint", str(tiny_run[0]), "--prompt", "def main(", "--max-new-tokens", "12",
                   "--speculative"])
    cap = capsys.readouterr()
    assert rc == 0 and cap.out.startswith("def main(") and len(cap.out) > len("def main(\n")
    assert "draft acceptance" in cap.err
    cfg, variables, tok = trained_tiny
    ids = dsj.generate(cfg, variables, [tok.encode("def main(").ids], 12,
                       eos_id=tok.token_to_id("<|endoftext|>"))[0]
    assert cap.out == "def main(" + tok.decode(ids) + "\n"  # the streamed text is the greedy continuation
    rc = cli.main(["generate", "--checkpoint", str(tiny_run[0] / "nope"), "--prompt", "x"])
    assert rc == 2 and "neither a training run folder" in capsys.readouterr().err


def test_generate_on_a_mesh_equals_one_device(tiny_cfg, tiny_vars):
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9], [4], [10, 11]]
    mesh = dsj.sharding.make_mesh({"data": 2, "expert": 2, "tensor": 2})
    one = dsj.generate(tiny_cfg, tiny_vars, prompts, 6)
    assert dsj.generate(tiny_cfg, tiny_vars, prompts, 6, mesh=mesh) == one
    assert dsj.generate(tiny_cfg, tiny_vars, prompts, 6, mesh=mesh, speculative=True) == one
    with pytest.raises(ValueError, match="global batch 3 is not divisible"):
        dsj.generate(tiny_cfg, tiny_vars, prompts[:3], 6, mesh=mesh)


def _host_loop_generate(cfg, variables, prompts, max_new, temperature=0.0, top_k=None, top_p=None, seed=0,
                        speculative=False, eos_id=-1, mesh=None):
    """Reference: the Python decode loop ``generate`` had before decoding moved on device, transcribed: one
    jitted step per token (or per speculative step) dispatched from the host, tokens pulled back after each,
    the same key schedule. Returns ``(tokens per row, stats)``."""
    from deepseek_jax.infer import engine as E

    b = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    size = E._cache_size(cfg, int(lengths.max()), max_new, speculative, None)
    fns = E._steps(cfg, G.cache_config(cfg, size), float(temperature), top_k, top_p)
    width = -(-int(lengths.max()) // 16) * 16
    tokens = np.zeros((b, width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    emit, st = E._Emitter(b, max_new, eos_id), {"steps": 0, "drafted": 0, "accepted": 0}
    with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
        v = E._decode_layout(cfg, dsj.sharding.shard_variables(cfg, variables, mesh) if mesh is not None else variables)
        put = E._placer(mesh)
        cache = G.init_cache(cfg, b, size, mesh=mesh, stacked=False)
        key, k0 = jax.random.split(jax.random.key(seed))
        tok, _, hidden, cache = fns.prefill(v, cache, put(tokens), put(lengths), k0)
        first = np.asarray(tok)
        emit([[int(t)] for t in first])
        if not speculative:
            tok_np, pos = first, lengths.copy()
            while not emit.done.all():
                key, k = jax.random.split(key)
                tok, _, cache = fns.step(v, cache, put(tok_np[:, None]), put(pos[:, None]), k)
                tok_np, pos, st["steps"] = np.asarray(tok), pos + 1, st["steps"] + 1
                emit([[int(t)] for t in tok_np])
            return emit.out, st
        nxt = np.zeros((b, width), np.int32)
        nxt[:, :-1] = tokens[:, 1:]
        nxt[np.arange(b), lengths - 1] = first
        key, k = jax.random.split(key)
        cache, drafted, q_logp, h_prev = fns.spec_start(v, cache, hidden, put(nxt), put(lengths), k)
        last, pos = put(first), put(lengths.copy())
        while not emit.done.all():
            key, k = jax.random.split(key)
            old = drafted
            cache, accept, bonus, drafted, pos, h_prev, q_logp = fns.spec_step(v, cache, last, drafted, pos, h_prev,
                                                                               q_logp, k)
            last = bonus
            acc, bon, dr = (np.asarray(a) for a in (accept, bonus, old))
            active = ~emit.done
            st["steps"] += 1
            st["drafted"] += int(active.sum())
            st["accepted"] += int((acc & active).sum())
            emit([[int(dr[i]), int(bon[i])] if acc[i] else [int(bon[i])] for i in range(b)])
    return emit.out, st


GREEDY, SAMPLED = {}, {"temperature": 0.9, "top_k": 50, "top_p": 0.9, "seed": 3}
SPEC_GREEDY, SPEC_SAMPLED = {"speculative": True}, {"speculative": True, "temperature": 0.8, "seed": 5}


@pytest.mark.parametrize("layout,variants", [("single", (GREEDY, SAMPLED, SPEC_GREEDY, SPEC_SAMPLED)),
                                             ("mesh", (GREEDY, SPEC_SAMPLED))])
def test_on_device_decode_equals_the_host_loop(layout, variants, tiny_cfg, tiny_vars):
    """Greedy, sampled with a seed (top-k and top-p) and speculative (greedy and sampled), with EOS stops and
    ragged prompts: the on-device loop (one call, and streamed in chunks) gives the host loop's tokens and
    step counts."""
    mesh = dsj.sharding.make_mesh({"data": 2, "expert": 2, "tensor": 2}) if layout == "mesh" else None
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [10, 11]]
    n = 19  # more than two streaming chunks
    for kw in variants:
        ref, ref_st = _host_loop_generate(tiny_cfg, tiny_vars, prompts, n, mesh=mesh, **kw)
        eos = ref[1][5]  # a token that stops row 1 early (and maybe others)
        ref_eos, _ = _host_loop_generate(tiny_cfg, tiny_vars, prompts, n, mesh=mesh, eos_id=eos, **kw)
        assert ref_eos[1] == ref[1][:ref[1].index(eos)]
        st = {}
        assert dsj.generate(tiny_cfg, tiny_vars, prompts, n, mesh=mesh, eos_id=-1, stats=st, **kw) == ref, kw
        assert {k: st[k] for k in ref_st} == ref_st, kw
        assert dsj.generate(tiny_cfg, tiny_vars, prompts, n, mesh=mesh, eos_id=eos, **kw) == ref_eos, kw
        if kw in (GREEDY, SPEC_SAMPLED):  # streaming: calls of STREAM_CHUNK steps
            streamed = []
            got = dsj.generate(tiny_cfg, tiny_vars, prompts, n, mesh=mesh, eos_id=-1, on_tokens=streamed.append, **kw)
            assert got == ref and len(streamed) >= 3, kw
            assert [sum((c[i] for c in streamed), []) for i in range(len(prompts))] == ref


def test_details_append_eos_and_say_which_rows_ended(tiny_cfg, tiny_vars):
    """``details=True``: a row that stops at EOS returns it (a post-training batch must teach stopping) and
    says ``ended``; a row that runs out of tokens is ``ended=False``; without details the EOS is dropped."""
    prompts = [[5, 9, 3], [7, 1, 2, 8, 4]]
    plain = dsj.generate(tiny_cfg, tiny_vars, prompts, 6, eos_id=-1)
    eos = plain[0][2]
    assert eos not in plain[0][:2]
    got = dsj.generate(tiny_cfg, tiny_vars, prompts, 6, eos_id=eos, details=True)
    cut = plain[1].index(eos) + 1 if eos in plain[1] else None
    assert got.tokens[0] == plain[0][:3] and got.ended[0]
    assert got.tokens[1] == (plain[1][:cut] if cut else plain[1]) and got.ended[1] == bool(cut)
    assert dsj.generate(tiny_cfg, tiny_vars, prompts, 6, eos_id=eos)[0] == plain[0][:2]
    assert got.logprobs is None
    with pytest.raises(ValueError, match="logprobs=True needs details=True"):
        dsj.generate(tiny_cfg, tiny_vars, prompts, 6, logprobs=True)


def test_sampling_logprobs_equal_the_training_forward(tiny_cfg, tiny_vars):
    """post-training.md U5: at temperature 1 without top-k/top-p, the sampler's log-probability of each
    emitted token (absorbed MLA, latent cache, one token at a time) equals ``per_token_logps`` of the
    training forward over prompt + completion (EOS included; prompt and padding out), to 1e-4 -- unless
    group-limited routing flips near a tie, which the assertion message would report."""
    from deepseek_jax.post_train import per_token_logps

    prompts = [[5, 9, 3], [7, 1, 2, 8, 4], [11, 12]]
    out = dsj.generate(tiny_cfg, tiny_vars, prompts, 10, temperature=1.0, seed=3, eos_id=17, details=True,
                       logprobs=True)
    width = 16
    rows = [p + c for p, c in zip(prompts, out.tokens)]
    tokens = np.zeros((3, width), np.int32)
    seg = np.zeros((3, width), np.int32)
    pos = np.zeros((3, width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], seg[i, :len(r)], pos[i, :len(r)] = r, 1, np.arange(len(r))
    logp, valid = per_token_logps(tiny_cfg, tiny_vars, jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos), 1.0)
    logp, valid = np.asarray(logp), np.asarray(valid)
    for i, (p, lp) in enumerate(zip(prompts, out.logprobs)):
        assert len(lp) == len(out.tokens[i]) and np.all(valid[i, len(p) - 1:len(rows[i]) - 1])
        train = logp[i, len(p) - 1:len(rows[i]) - 1]
        diff = np.abs(train - np.asarray(lp))
        assert diff.max() < 1e-4, f"row {i}: |sampler - training| up to {diff.max():.2e} at {diff.argmax()}"
