"""NSA inside the model (``attention.sparse``, nn/attention/sparse.py) on GQA and on MLA's absorbed form: with
one branch gated on and sizes that cover the sequence, the whole model equals the same model with dense
attention (the compressed keys rotated at their block's first position, the absorbed latent form, packing);
the model is causal and document-exact; every NSA parameter gets a finite gradient; the config's errors
name the field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax.config import config_from_dict
from deepseek_jax.infer.cache import init_cache
from deepseek_jax.nn.attention import CacheConfig

MODELS = {
    "gqa": dict(vocab_size=64, d_model=32, n_layers=2, intermediate_size=64, max_position_embeddings=128,
                attention=dict(kind="gqa", n_heads=4, n_kv_heads=2, head_dim=8)),
    "mla": dict(vocab_size=64, d_model=32, n_layers=2, intermediate_size=64, max_position_embeddings=128,
                attention=dict(kind="mla", n_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                               qk_rope_head_dim=8, v_head_dim=8)),
}
ON, OFF = 30.0, -30.0  # sigmoid(30) rounds to 1 in float32; sigmoid(-30) ~ 1e-13
T = 37  # no multiple of any block size


def _cfg(model, **sparse):
    d = {**MODELS[model], "attention": {**MODELS[model]["attention"]}}
    if sparse:
        d["attention"]["sparse"] = {"kind": "nsa", **sparse}
    return config_from_dict(d)


def _drop_nsa(tree):
    return {k: _drop_nsa(v) for k, v in tree.items() if k != "nsa"} if isinstance(tree, dict) else tree


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 64, (2, T)).astype(np.int32)
    seg = np.ones((2, T), np.int32)
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (2, T)).copy()
    seg[1, 22:], pos[1, 22:] = 2, np.arange(T - 22)  # a second document off every block boundary
    return jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg)


def _logits(cfg, variables, tokens, pos, seg):
    return jax.jit(lambda v, t, p, s: dsj.Transformer(cfg).apply(v, t, positions=p, segment_ids=s).logits)(
        variables, tokens, pos, seg)


LIMITS = {  # one branch on, sizes covering the sequence
    "cmp": dict(cmp_block=1, cmp_stride=1, slc_block=1, slc_count=3, window=1, compress="mean",
                gate_bias=[ON, OFF, OFF]),
    "slc": dict(cmp_block=4, cmp_stride=2, slc_block=8, slc_count=5, window=4, gate_bias=[OFF, ON, OFF]),
    "win": dict(cmp_block=4, cmp_stride=2, slc_block=8, slc_count=3, window=T, gate_bias=[OFF, OFF, ON]),
}


@pytest.mark.parametrize("branch", list(LIMITS))
@pytest.mark.parametrize("kind", list(MODELS))
def test_one_branch_covering_the_sequence_is_the_dense_model(kind, branch):
    impl = "dense" if branch == "slc" else "gather"
    sparse_cfg = _cfg(kind, impl=impl, chunk=16, **LIMITS[branch])
    dense_cfg = _cfg(kind)
    variables = dsj.init_variables(sparse_cfg, 0)
    batch = _batch()
    got = _logits(sparse_cfg, variables, *batch)
    want = _logits(dense_cfg, _drop_nsa(jax.tree.map(lambda x: x, dict(variables))), *batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


MIXED = dict(cmp_block=4, cmp_stride=2, slc_block=8, slc_count=3, window=6, chunk=8)


@pytest.mark.parametrize("kind", list(MODELS))
def test_the_model_is_causal_and_documents_are_exact(kind):
    cfg = _cfg(kind, **MIXED)
    variables = dsj.init_variables(cfg, 1)
    tokens, pos, seg = _batch(1)
    base = np.asarray(_logits(cfg, variables, tokens, pos, seg))
    cut = 15
    future = tokens.at[:, cut + 1:].set((tokens[:, cut + 1:] + 7) % 64)
    np.testing.assert_array_equal(np.asarray(_logits(cfg, variables, future, pos, seg))[:, :cut + 1],
                                  base[:, :cut + 1])
    other = tokens.at[1, :22].set((tokens[1, :22] + 5) % 64)  # the first document of row 1 changes
    np.testing.assert_array_equal(np.asarray(_logits(cfg, variables, other, pos, seg))[1, 22:], base[1, 22:])
    assert not np.array_equal(np.asarray(_logits(cfg, variables, other, pos, seg))[1, :22], base[1, :22])


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_nsa_parameter_gets_a_finite_gradient(kind):
    cfg = _cfg(kind, **MIXED)
    variables = dsj.init_variables(cfg, 2)
    tokens, pos, seg = _batch(2)

    def loss(params):
        out = dsj.Transformer(cfg).apply({**variables, "params": params}, tokens, positions=pos, segment_ids=seg)
        return jax.nn.log_softmax(out.logits).max(-1).mean()

    grads = jax.jit(jax.grad(loss))(variables["params"])
    flat = {jax.tree_util.keystr(p): g for p, g in jax.tree_util.tree_leaves_with_path(grads)}
    nsa = {k: g for k, g in flat.items() if "'nsa'" in k}
    names = {k.split("'")[-2] for k in nsa}
    want = {"w_gate", "b_gate", "phi_k_pos", "phi_k_w1", "phi_k_w2"} | (
        set() if kind == "mla" else {"phi_v_pos", "phi_v_w1", "phi_v_w2"})
    assert names == want, names
    for k, g in flat.items():
        g = np.asarray(g)
        assert np.isfinite(g).all(), k
    for k, g in nsa.items():
        assert np.abs(np.asarray(g)).max() > 0, k


@pytest.mark.parametrize("field,value,match", [
    ("cmp_stride", 3, "attention.sparse.cmp_stride=3 must divide"),
    ("slc_count", 2, "attention.sparse.slc_count=2 must be at least"),
    ("kind", "sparse", "attention.sparse.kind='sparse'"),
    ("compress", "max", "attention.sparse.compress='max' must be one of"),
    ("gate_bias", [1, 2], "attention.sparse.gate_bias"),
    ("chunk", 0, "attention.sparse.chunk=0 must be an integer >= 1"),
])
def test_config_errors_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match.replace("[", r"\[")):
        _cfg("mla", **{field: value})
    with pytest.raises(ValueError, match="unknown config key.*attention.sparse.block"):
        _cfg("gqa", block=3)


def test_a_sparse_config_round_trips_through_yaml(tmp_path):
    import yaml

    cfg = _cfg("mla", **MIXED, gate_bias=[-1, 0, 2])
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    again = dsj.load_config(str(path))
    assert again == cfg and again.attention.sparse.gate_bias == (-1.0, 0.0, 2.0)


def _cached(cfg, variables, seqs, lengths, size, chunk=1):
    """Prefill each row's first ``lengths[i]`` tokens (right-padded with token 0, as ``generate`` pads), then
    feed the rest ``chunk`` tokens per call through the cache: the logits every position got ``[b, T, v]``."""
    b, t = seqs.shape
    model = dsj.Transformer(cfg, cache=CacheConfig(size, "latent", "float32"))
    run = jax.jit(lambda v, c, tok, p: model.apply({**v, "cache": c}, tok, p, with_mtp=False, mutable=["cache"]))
    cache = init_cache(cfg, b, size)
    width = int(lengths.max())
    prompt = np.where(np.arange(width)[None] < lengths[:, None], seqs[:, :width], 0).astype(np.int32)
    out, upd = run(variables, cache, jnp.asarray(prompt), jnp.asarray(np.broadcast_to(np.arange(width), (b, width))))
    got = np.zeros((b, t, cfg.vocab_size), np.float32)
    logits = np.asarray(out.logits)
    for i in range(b):
        got[i, :lengths[i]] = logits[i, :lengths[i]]
    pos = lengths.copy()
    while (pos < t).any():
        p = np.minimum(pos[:, None] + np.arange(chunk), t - 1 + np.arange(chunk))  # finished rows run past T
        tok = seqs[np.arange(b)[:, None], np.minimum(p, t - 1)]
        out, upd = run(variables, upd["cache"], jnp.asarray(tok), jnp.asarray(p.astype(np.int32)))
        logits = np.asarray(out.logits)
        for i in range(b):
            for j in range(chunk):
                if p[i, j] < t and pos[i] < t:
                    got[i, p[i, j]] = logits[i, j]
        pos = pos + chunk
    return got


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("kind", list(MODELS))
def test_cached_decoding_equals_the_parallel_forward(kind, chunk):
    """Ragged, right-padded prompts, then 1 or 3 tokens per call across many compressed (d = 2) and selection
    (l' = 8) block boundaries, in a cache of 37 slots (no multiple of l')."""
    cfg = _cfg(kind, **MIXED)
    variables = dsj.init_variables(cfg, 3)
    rng = np.random.default_rng(3)
    seqs = rng.integers(0, 64, (4, 30)).astype(np.int32)
    lengths = np.array([3, 13, 1, 9], np.int32)
    full = np.asarray(_logits(cfg, variables, jnp.asarray(seqs), jnp.asarray(np.broadcast_to(np.arange(30), (4, 30))),
                              jnp.ones((4, 30), jnp.int32)))
    got = _cached(cfg, variables, seqs, lengths, size=37, chunk=chunk)
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(MODELS))
def test_greedy_generate_equals_greedy_over_whole_sequences(kind):
    cfg = _cfg(kind, **MIXED)
    variables = dsj.init_variables(cfg, 4)
    prompts = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 11, 2, 6, 13, 1]]
    assert dsj.generate(cfg, variables, prompts, 20) == greedy_reference(cfg, variables, prompts, 20)


def greedy_reference(cfg, variables, prompts, new):
    """Greedy decoding by whole-sequence forwards, no cache: the new tokens per prompt."""
    fwd = jax.jit(lambda v, t: dsj.Transformer(cfg).apply(v, t).logits)
    out = []
    for p in prompts:
        seq = list(p)
        for _ in range(new):  # one shape: the model is causal, so what follows position len - 1 changes nothing
            row = np.zeros((1, 32), np.int32)
            row[0, :len(seq)] = seq
            seq.append(int(np.argmax(np.asarray(fwd(variables, jnp.asarray(row)))[0, len(seq) - 1])))
        out.append(seq[len(p):])
    return out


@pytest.mark.parametrize("kind", list(MODELS))
def test_cache_bytes_and_decode_keys_in_info(kind):
    """The caches ``generate`` allocates hold what ``info`` states per token: dense entries, the unrotated
    rotary dims and one compressed block per d tokens (the first l - d tokens complete none); ``info`` lists
    the analytic keys per decode step beside the dense count."""
    from deepseek_jax.analysis.params import kv_cache_elements_per_token_per_layer, model_info
    from deepseek_jax.infer.cache import cache_bytes_per_token

    cfg = _cfg(kind, **MIXED)
    size = 256
    measured = cache_bytes_per_token(init_cache(cfg, 2, size, stacked=False))
    want = 4 * cfg.n_layers * kv_cache_elements_per_token_per_layer(cfg)
    width = 24 if kind == "mla" else 32  # one compressed block: (c + r), or k and v 2 g h
    short = (MIXED["cmp_block"] - MIXED["cmp_stride"]) // MIXED["cmp_stride"]  # blocks the cache has fewer
    assert measured == pytest.approx(want - 4 * cfg.n_layers * short * width / size, rel=1e-9)
    keys = model_info(cfg.replace(max_position_embeddings=8192))["decode_keys_per_step"]
    l, d, n, lp, w = 4, 2, 3, 8, 6
    assert keys == {n_: {"sparse": (n_ - l) // d + 1 + n * lp + w, "dense": n_} for n_ in (1024, 4096, 8192)}


@pytest.mark.parametrize("kind", list(MODELS))
def test_nsa_on_a_mesh_equals_one_device(kind):
    """Batch over data/fsdp, heads over tensor, phi and the gates sharded over fsdp: the forward and greedy
    decoding through the caches equal one device."""
    cfg = _cfg(kind, **MIXED)
    variables = dsj.init_variables(cfg, 5)
    mesh = dsj.sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 64, (4, T)), jnp.int32)
    one = np.asarray(dsj.forward(cfg, variables, tokens))
    np.testing.assert_allclose(np.asarray(dsj.forward(cfg, variables, tokens, mesh=mesh)), one, rtol=1e-5, atol=1e-5)
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9], [4], [10, 11]]
    mesh = dsj.sharding.make_mesh({"data": 2, "expert": 2, "tensor": 2})  # generate's mesh (as test_generate's)
    assert dsj.generate(cfg, variables, prompts, 6, mesh=mesh) == dsj.generate(cfg, variables, prompts, 6)
