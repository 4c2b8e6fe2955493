"""DeepSeek Sparse Attention's pure parts (kernels/dsa.py) against NumPy: the indexer's scores (and their
invariance under an orthogonal (Hadamard) rotation of queries and keys, which V3.2 applies), the top-k mask
against a brute force with the stated tie rule, and the KL loss against its formula, with its gradient
reaching the indexer only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import hadamard

from deepseek_jax.kernels import dsa


def _numpy_scores(q, k, w):
    b, t, h, _ = q.shape
    out = np.zeros((b, t, k.shape[1]))
    for bi in range(b):
        for ti in range(t):
            for s in range(k.shape[1]):
                out[bi, ti, s] = sum(w[bi, ti, j] * max(float(q[bi, ti, j] @ k[bi, s]), 0.0) for j in range(h))
    return out


def test_indexer_scores_equal_numpy_and_ignore_a_hadamard_rotation():
    rng = np.random.default_rng(0)
    q, k, w = rng.normal(size=(2, 9, 4, 16)), rng.normal(size=(2, 9, 16)), rng.normal(size=(2, 9, 4))
    got = np.asarray(dsa.indexer_scores(*(jnp.asarray(a, jnp.float32) for a in (q, k, w))))
    np.testing.assert_allclose(got, _numpy_scores(q, k, w), rtol=1e-5, atol=1e-5)
    hd = hadamard(16) / 4.0  # orthogonal
    rot = np.asarray(dsa.indexer_scores(jnp.asarray(q @ hd, jnp.float32), jnp.asarray(k @ hd, jnp.float32),
                                        jnp.asarray(w, jnp.float32)))
    np.testing.assert_allclose(rot, got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 6, 40])
def test_topk_mask_equals_a_brute_force_with_lower_index_ties(k):
    rng = np.random.default_rng(k)
    t = 13
    scores = rng.integers(0, 4, (2, t, t)).astype(np.float32)  # many ties
    seg = np.ones((2, t), np.int32)
    seg[1, 7:] = 2
    ok = np.asarray(dsa.visible(jnp.asarray(seg)))
    got = np.asarray(dsa.topk_mask(jnp.asarray(scores), jnp.asarray(ok), k))
    for b in range(2):
        for i in range(t):
            keys = [s for s in range(t) if s <= i and seg[b, s] == seg[b, i]]
            best = sorted(keys, key=lambda s: (-scores[b, i, s], s))[:k]
            assert set(np.flatnonzero(got[b, i])) == set(best), (b, i)


def test_indexer_kl_equals_its_formula_and_trains_the_indexer_only():
    rng = np.random.default_rng(1)
    b, n, t = 2, 3, 7
    probs = rng.uniform(size=(b, n, t, t))
    scores = rng.normal(size=(b, t, t))
    mask = np.asarray(dsa.topk_mask(jnp.asarray(scores), dsa.visible(jnp.zeros((b, t), jnp.int32)), 4))
    want = []
    for bi in range(b):
        for ti in range(t):
            m = mask[bi, ti]
            p = probs[bi, :, ti][:, m].sum(0)
            p = p / p.sum()
            logq = scores[bi, ti, m] - np.log(np.exp(scores[bi, ti, m]).sum())
            want.append(float((p * (np.log(p) - logq)).sum()))
    with jax.enable_x64(True):
        got = dsa.indexer_kl(jnp.asarray(probs), jnp.asarray(scores), jnp.asarray(mask))
        assert abs(float(got) - np.mean(want)) < 1e-12
        gp, gs = jax.grad(lambda p, s: dsa.indexer_kl(p, s, jnp.asarray(mask)), argnums=(0, 1))(
            jnp.asarray(probs), jnp.asarray(scores))
        assert float(jnp.abs(gp).max()) == 0.0  # the target is constant: the main attention gets nothing
        assert float(jnp.abs(gs).max()) > 0.0
        # the gradient wrt the scores is (softmax - p) / queries on the mask, 0 elsewhere
        q = np.where(mask, np.exp(scores - scores.max(-1, keepdims=True)), 0)
        q = q / q.sum(-1, keepdims=True)
        p = np.where(mask, probs.sum(1), 0)
        p = p / p.sum(-1, keepdims=True)
        np.testing.assert_allclose(np.asarray(gs), (q - p) / (b * t), atol=1e-12)


# ------------------------------------------------------------------------------------------------------------
# DSA inside MLA (attention.sparse.kind: dsa)

import optax  # noqa: E402

import deepseek_jax as dsj  # noqa: E402
from deepseek_jax.config import config_from_dict  # noqa: E402
from deepseek_jax.nn import tree  # noqa: E402

T = 37
MODEL = dict(vocab_size=64, d_model=32, n_layers=2, intermediate_size=64, max_position_embeddings=128,
             attention=dict(kind="mla", n_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                            qk_rope_head_dim=8, v_head_dim=8))


def _cfg(**sparse):
    d = {**MODEL, "attention": {**MODEL["attention"]}}
    if sparse:
        d["attention"]["sparse"] = {"kind": "dsa", "index_heads": 4, "index_head_dim": 16, **sparse}
    return config_from_dict(d)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 64, (2, T)).astype(np.int32)
    seg = np.ones((2, T), np.int32)
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (2, T)).copy()
    seg[1, 22:], pos[1, 22:] = 2, np.arange(T - 22)
    return jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg)


def _apply(cfg, variables, tokens, pos, seg, **kw):
    return dsj.Transformer(cfg).apply(variables, tokens, positions=pos, segment_ids=seg, **kw)


def _split(params):
    """(indexer subtrees zeroed elsewhere, everything else): which leaves are the indexer's."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(p): "'indexer'" in jax.tree_util.keystr(p) for p, _ in flat}


def _drop_indexer(t):
    return {k: _drop_indexer(v) for k, v in t.items() if k != "indexer"} if isinstance(t, dict) else t


def test_dsa_with_topk_covering_the_sequence_is_bitwise_dense_mla():
    cfg = _cfg(topk=T)
    variables = dsj.init_variables(cfg, 0)
    batch = _batch()
    got = jax.jit(lambda v: _apply(cfg, v, *batch).logits)(variables)
    dense = _cfg()
    want = jax.jit(lambda v: _apply(dense, v, *batch).logits)(_drop_indexer(dict(variables)))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_dsa_is_causal_and_documents_are_exact_and_the_mask_matters():
    cfg = _cfg(topk=4)
    variables = dsj.init_variables(cfg, 1)
    tokens, pos, seg = _batch(1)
    run = jax.jit(lambda t: _apply(cfg, variables, t, pos, seg).logits)
    base = np.asarray(run(tokens))
    cut = 15
    future = tokens.at[:, cut + 1:].set((tokens[:, cut + 1:] + 7) % 64)
    np.testing.assert_array_equal(np.asarray(run(future))[:, :cut + 1], base[:, :cut + 1])
    other = tokens.at[1, :22].set((tokens[1, :22] + 5) % 64)
    np.testing.assert_array_equal(np.asarray(run(other))[1, 22:], base[1, 22:])
    dense = np.asarray(jax.jit(lambda v: _apply(_cfg(), v, tokens, pos, seg).logits)(_drop_indexer(dict(variables))))
    assert np.abs(dense[:, :4] - base[:, :4]).max() < 1e-6  # up to k keys visible: nothing masked
    assert np.abs(dense[:, 8:] - base[:, 8:]).max() > 1e-4  # later: 4 keys of many


def test_the_lm_loss_never_reaches_the_indexer_and_the_kl_reaches_only_it():
    cfg = _cfg(topk=5)
    variables = dsj.init_variables(cfg, 2)
    tokens, pos, seg = _batch(2)

    def losses(params):
        out, inter = _apply(cfg, {**variables, "params": params}, tokens, pos, seg, mutable=["intermediates"])
        lm = -jax.nn.log_softmax(out.logits)[:, :-1].max(-1).mean()
        kl = sum(jnp.sum(x) for x in jax.tree.leaves(inter["intermediates"]))
        return lm, kl

    g_lm = jax.jit(jax.grad(lambda p: losses(p)[0]))(variables["params"])
    g_kl = jax.jit(jax.grad(lambda p: losses(p)[1]))(variables["params"])
    is_indexer = _split(variables["params"])
    flat_lm = {jax.tree_util.keystr(p): np.asarray(g) for p, g in jax.tree_util.tree_leaves_with_path(g_lm)}
    flat_kl = {jax.tree_util.keystr(p): np.asarray(g) for p, g in jax.tree_util.tree_leaves_with_path(g_kl)}
    assert any(is_indexer.values())
    for k, idx in is_indexer.items():
        if idx:
            assert not flat_lm[k].any(), k
            assert np.abs(flat_kl[k]).max() > 0, k
        else:
            assert not flat_kl[k].any(), k
    assert float(losses(variables["params"])[1]) > 0


def test_a_dense_warm_up_of_the_indexer_lowers_its_kl():
    """Stage 1 in miniature: k >= length (dense attention), only the indexer trained, on the KL alone. Weights
    drawn wide (std 0.3) so that attention is far from uniform (at std 0.006 both distributions are)."""
    cfg = _cfg(topk=T).replace(init_std=0.3)
    variables = dsj.init_variables(cfg, 3)
    tokens, pos, seg = _batch(3)
    is_indexer = _split(variables["params"])
    labels = jax.tree_util.tree_map_with_path(
        lambda p, _: "train" if is_indexer[jax.tree_util.keystr(p)] else "freeze", variables["params"])
    opt = optax.multi_transform({"train": optax.adam(1e-2), "freeze": optax.set_to_zero()}, labels)

    def kl(params):
        _, inter = _apply(cfg, {**variables, "params": params}, tokens, pos, seg, mutable=["intermediates"])
        return sum(jnp.sum(x) for x in jax.tree.leaves(inter["intermediates"]))

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(kl)(params)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, loss

    params, state = variables["params"], opt.init(variables["params"])
    seen = []
    for _ in range(60):
        params, state, loss = step(params, state)
        seen.append(float(loss))
    print(seen[0], seen[-1])
    assert seen[0] > 0.05 and seen[-1] < 0.5 * seen[0]
    frozen = [(a, b) for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(variables["params"]),
                                          jax.tree.leaves(params)) if not is_indexer[jax.tree_util.keystr(p)]]
    assert all(np.array_equal(a, b) for a, b in frozen)


@pytest.mark.parametrize("chunk, query_chunk", [(1, 64), (3, 64), (3, 4)])
def test_dsa_cached_decoding_equals_the_parallel_forward(chunk, query_chunk):
    """``chunk`` tokens per decoding call; ``query_chunk`` 4: the 13-token prefill gathers its top-k latent rows
    4 queries at a time (``attention.sparse.chunk``)."""
    from test_nsa_model import _cached

    cfg = _cfg(topk=5, chunk=query_chunk)
    variables = dsj.init_variables(cfg, 4)
    rng = np.random.default_rng(4)
    seqs = rng.integers(0, 64, (4, 30)).astype(np.int32)
    full = np.asarray(_apply(cfg, variables, jnp.asarray(seqs), jnp.asarray(np.broadcast_to(np.arange(30), (4, 30))),
                             jnp.ones((4, 30), jnp.int32)).logits)
    got = _cached(cfg, variables, seqs, np.array([3, 13, 1, 9], np.int32), size=37, chunk=chunk)
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change,match", [
    (dict(attention=dict(kind="gqa", n_heads=4, n_kv_heads=2, head_dim=8, sparse=dict(kind="dsa"))),
     "attention.sparse.kind='dsa' needs attention.kind='mla'"),
    (dict(attention={**MODEL["attention"], "q_lora_rank": 0, "sparse": dict(kind="dsa")}),
     "attention.q_lora_rank=0 must be positive with attention.sparse.kind='dsa'"),
    (dict(attention={**MODEL["attention"], "sparse": dict(kind="dsa", index_head_dim=8)}),
     "attention.sparse.index_head_dim=8 must exceed qk_rope_head_dim=8"),
    (dict(attention={**MODEL["attention"], "sparse": dict(kind="dsa", topk=0)}),
     "attention.sparse.topk=0 must be an integer >= 1"),
])
def test_dsa_config_errors_name_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict({**MODEL, **change})


def test_dsa_greedy_generate_equals_greedy_over_whole_sequences():
    cfg = _cfg(topk=5)
    variables = dsj.init_variables(cfg, 5)
    prompts = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 11, 2, 6, 13, 1]]
    from test_nsa_model import greedy_reference

    assert dsj.generate(cfg, variables, prompts, 20) == greedy_reference(cfg, variables, prompts, 20)


def test_dsa_on_a_mesh_equals_one_device():
    cfg = _cfg(topk=5)
    variables = dsj.init_variables(cfg, 6)
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, 64, (4, T)), jnp.int32)
    mesh = dsj.sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    np.testing.assert_allclose(np.asarray(dsj.forward(cfg, variables, tokens, mesh=mesh)),
                               np.asarray(dsj.forward(cfg, variables, tokens)), rtol=1e-5, atol=1e-5)
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9], [4], [10, 11]]
    mesh = dsj.sharding.make_mesh({"data": 2, "expert": 2, "tensor": 2})
    assert dsj.generate(cfg, variables, prompts, 6, mesh=mesh) == dsj.generate(cfg, variables, prompts, 6)


@pytest.mark.parametrize("stage", ["dense_warmup", "sparse"])
def test_the_training_stages(stage):
    """``train.dsa_stage``: the dense warm-up updates the indexer only and lowers its KL (attention dense: the
    same logits as dense MLA); the sparse stage trains everything, the indexer on its KL over the kept keys."""
    from deepseek_jax.train import Pretrain, StepConfig, hyper, make_train_fns
    from deepseek_jax.train.optim import OptimConfig

    cfg = _cfg(topk=5).replace(init_std=0.3)
    mesh = dsj.sharding.make_mesh({"data": 2}, devices=jax.devices()[:2])
    sc = StepConfig(batch_size=2, seq_len=T, steps=40, optim=OptimConfig(lr=3e-3, warmup_steps=1), dsa_stage=stage)
    fns = make_train_fns(cfg, sc, Pretrain(indexer_kl=1.0), mesh)
    state = fns.init(jax.random.key(0))
    first = jax.tree.map(np.asarray, state["params"])
    tokens, pos, seg = _batch(7)
    batch = jax.device_put({"tokens": tokens, "positions": pos, "segment_ids": seg}, fns.batch_sharding)
    kls = []
    for _ in range(40):
        state, m = fns.step(state, batch, hyper(0.0, 0.0))
        kls.append(float(m["indexer_kl"]))
    print(stage, kls[0], kls[-1])
    assert kls[-1] < 0.5 * kls[0]
    is_indexer = _split(first)
    after = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state["params"])}
    for p, x in jax.tree_util.tree_leaves_with_path(first):
        k = jax.tree_util.keystr(p)
        moved = not np.array_equal(x, after[k])
        assert moved == (is_indexer[k] or stage == "sparse"), k


def test_a_dense_checkpoint_starts_a_dsa_run_with_a_fresh_indexer():
    """V3.2 adds the indexer to a trained dense model: ``start_from`` copies every dense parameter and keeps the
    indexer's initialisation; any other missing or extra parameter is refused, naming it."""
    from deepseek_jax.train import Pretrain, StepConfig, make_train_fns
    from deepseek_jax.train.loop import start_from
    from deepseek_jax.train.optim import OptimConfig

    cfg = _cfg(topk=5)
    mesh = dsj.sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    fns = make_train_fns(cfg, StepConfig(batch_size=2, seq_len=T, steps=10, optim=OptimConfig(warmup_steps=1)), Pretrain(), mesh)
    state = fns.init(jax.random.key(0))
    fresh = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state["params"])}
    dense = jax.tree.map(np.asarray, dsj.init_variables(_cfg(), 1))
    got = start_from(state, dense)["params"]
    want = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(dense["params"])}
    n_indexer = 0
    for p, x in jax.tree_util.tree_leaves_with_path(got):
        k = jax.tree_util.keystr(p)
        n_indexer += "'indexer'" in k
        np.testing.assert_array_equal(np.asarray(x), fresh[k] if "'indexer'" in k else want[k], err_msg=k)
    assert n_indexer > 0 and len(want) + n_indexer == len(fresh)
    no_norm = jax.tree.map(lambda x: x, dense)
    del no_norm["params"][tree.FINAL_NORM]
    with pytest.raises(ValueError, match=tree.FINAL_NORM):
        start_from(state, no_norm)
    dense_fns = make_train_fns(_cfg(), StepConfig(batch_size=2, seq_len=T, steps=10, optim=OptimConfig(warmup_steps=1)), Pretrain(), mesh)
    with pytest.raises(ValueError, match="indexer"):  # the reverse: a DSA checkpoint into the dense model
        start_from(dense_fns.init(jax.random.key(0)), jax.tree.map(np.asarray, dict(state)))


def test_dsa_cache_bytes_and_decode_keys_in_info():
    from deepseek_jax.analysis.params import kv_cache_elements_per_token_per_layer, model_info
    from deepseek_jax.infer.cache import cache_bytes_per_token, init_cache

    cfg = _cfg(topk=5)
    assert kv_cache_elements_per_token_per_layer(cfg) == 16 + 8 + 16  # latent, rope key, indexer key
    assert cache_bytes_per_token(init_cache(cfg, 2, 64, stacked=False)) == 4 * 2 * 40
    keys = model_info(cfg.replace(max_position_embeddings=4096))["decode_keys_per_step"]
    assert keys == {1024: {"sparse": 5, "dense": 1024, "indexer": 1024}, 4096: {"sparse": 5, "dense": 4096, "indexer": 4096}}
