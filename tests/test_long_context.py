"""Long-context evaluation (long-context.md §5, §7.8): the synthetic needle data (exact lengths, the needle at the
intended index for every depth, loss on the answer only, seeded), the scorers against hand-made predictions,
the Wilson interval against its formula, byte-identical ``niah.json`` for a seed, ``argmax`` = ``generate``
scoring, the cache bytes against the formula, YaRN overrides, and the errors that name the fix."""

import json

import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax.eval import long_context as lc
from deepseek_jax.train import synthetic as S
from deepseek_jax.train.config import load_run_config
from deepseek_jax.train.data import prepare_data

TASK_ANSWERS = {"passkey": [5], "kv": [3], "multikey": [3], "multivalue": [3, 3, 3, 3], "multiquery": [3, 3]}


@pytest.mark.parametrize("task", S.TASKS)
def test_samples_have_the_exact_length_and_the_needle_at_the_depth(task):
    rng = np.random.default_rng(0)
    for length in (S.min_length(task), 97, 256):
        for depth in (0.0, 10.0, 50.0, 90.0, 100.0):
            s = S.make_sample(task, length, depth, rng)
            t = s.tokens
            assert len(t) == length and t[0] == S.BOS and t[-1] == S.EOS
            needle_len = 6 if task == "passkey" else 7
            query_start = s.answer_start - (2 if task == "passkey" else 7 if task == "multiquery" else 4)
            want = min(max(int(length * depth / 100), 1), query_start - needle_len)
            assert s.needles[0] == want == S.needle_index(length, depth, needle_len, query_start)
            assert t[want] == (S.PASS if task == "passkey" else S.KEY)
            assert [n for _, n in s.groups] == TASK_ANSWERS[task]
            answer = t[s.answer_start:s.answer_start + s.answer_len]
            if task in ("kv", "multikey", "multiquery"):  # the answer is the value of the first queried key
                k = t[query_start + 1:query_start + 3]  # the (first) queried key
                at = [i for i in range(1, query_start) if t[i] == S.KEY and list(t[i + 1:i + 3]) == list(k)]
                assert len(at) == 1 and list(t[at[0] + 4:at[0] + 7]) == list(answer[:3])
            if task == "passkey":
                assert list(t[want + 1:want + 6]) == list(answer)
            if task == "multivalue":  # values in the order of their needles
                starts = sorted(s.needles)
                assert list(answer) == [x for st in starts for x in t[st + 4:st + 7]]


def test_training_rows_mask_the_answer_only_and_repeat_for_a_seed():
    _, tcfg = load_run_config("configs/niah-tiny.yaml", ["train.data.niah.task=kv", "train.data.niah.train_samples=64",
                                                         "train.data.niah.val_samples=8", "train.data.niah.pack=false",
                                                         "train.data.niah.min_length=32"])
    a = prepare_data(tcfg.data, 96, 256, seed=0)
    b = prepare_data(tcfg.data, 96, 256, seed=0)
    for k in a.train:
        np.testing.assert_array_equal(a.train[k], b.train[k])
    t, m, seg = a.train["tokens"], a.train["loss_mask"], a.train["segment_ids"]
    lengths = seg.sum(1)
    assert lengths.min() >= 32 and lengths.max() <= 256 and len(set(lengths.tolist())) > 10
    for i in range(len(t)):
        n = lengths[i]
        assert t[i, n - 1] == S.EOS and m[i].sum() == 3 and m[i, n - 4:n - 1].all()  # the 3 value tokens
        assert (t[i, m[i] > 0] >= S.DIGIT0).all() and (t[i, m[i] > 0] < S.DIGIT0 + 10).all()
    assert not np.array_equal(a.train["tokens"][:8], a.val["tokens"][:8])
    assert a.tokenizer.id_to_token(int(t[0, 0])) == "<bos>" and a.tokenizer.id_to_token(S.DIGIT0 + 10) == "w0"
    with pytest.raises(ValueError, match="vocab_size"):
        prepare_data(tcfg.data, 64, 256)


def test_packed_rows_hold_the_same_samples_back_to_back():
    """``pack: true`` puts consecutive samples into a row while they fit: read segment by segment, the rows hold
    exactly the samples of the unpacked rows, in order, each with its own positions and answer mask."""
    cfg = S.NIAHConfig(task="kv", min_length=24)
    plain = S.niah_rows(cfg, 200, 96, seed=3)
    packed = S.niah_rows(S.NIAHConfig(task="kv", min_length=24, pack=True), 60, 96, seed=3)
    segs = packed["segment_ids"]
    assert segs.max() >= 2 and (segs > 0).sum() > 1.1 * 60 * (24 + 96) / 2  # denser than one sample per row
    k = 0
    for i in range(60):
        for s in range(1, segs[i].max() + 1):
            at = segs[i] == s
            n = int(plain["segment_ids"][k].sum())
            for key in ("tokens", "positions", "loss_mask"):
                np.testing.assert_array_equal(packed[key][i, at], plain[key][k, :n], err_msg=key)
            k += 1
        assert (packed["loss_mask"][i, segs[i] == 0] == 0).all()


def test_scorers_count_exact_and_value_groups():
    s = S.make_sample("multivalue", 90, 30.0, np.random.default_rng(1))
    ans = s.tokens[s.answer_start:s.answer_start + s.answer_len].copy()
    assert lc._judge(ans, s) == (1.0, 1.0)
    bad = ans.copy()
    bad[4] = -1  # one digit of the second value group
    assert lc._judge(bad, s) == (0.0, 0.75)
    bad[0] = bad[7] = bad[10] = -1
    assert lc._judge(bad, s) == (0.0, 0.0)


def test_wilson_interval_matches_the_formula():
    z = 1.959963984540054
    for k, n in ((0, 20), (7, 20), (20, 20), (50, 100)):
        p = k / n
        c = (p + z * z / (2 * n)) / (1 + z * z / n)
        h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        lo, hi = lc.wilson(k, n)
        assert lo == pytest.approx(max(0, c - h)) and hi == pytest.approx(min(1, c + h))
    assert lc.wilson(0, 20)[0] == 0 and lc.wilson(20, 20)[1] == pytest.approx(1.0)
    assert lc.parse_depths("0:100:11") == [float(x) for x in range(0, 101, 10)]
    assert lc.parse_depths("5,50") == [5.0, 50.0]


@pytest.fixture(scope="module")
def small():
    cfg, _ = load_run_config("configs/niah-tiny.yaml", ["n_layers=1", "max_position_embeddings=256"])
    return cfg, dsj.init_variables(cfg, 0)


def test_the_grid_is_deterministic_and_argmax_equals_generate(small, tmp_path):
    """A random model's greedy continuation equals its teacher-forced argmax as long as both agree on the
    prefix, so the two scorers give the same exact/partial scores on every sample of the grid."""
    cfg, v = small
    kw = dict(task="kv", lengths=[48, 96], depths=[0.0, 50.0, 100.0], samples=3, seed=7, batch=4)
    a = lc.niah_eval(cfg, v, **kw)
    g = lc.niah_eval(cfg, v, scoring="generate", **kw)
    assert [c["exact"] for c in a["cells"]] == [c["exact"] for c in g["cells"]]
    assert [c["partial"] for c in a["cells"]] == [c["partial"] for c in g["cells"]]
    lc.write_niah(a, tmp_path / "one", plot=True)
    lc.write_niah(lc.niah_eval(cfg, v, **kw), tmp_path / "two", plot=False)
    assert (tmp_path / "one" / "niah.json").read_bytes() == (tmp_path / "two" / "niah.json").read_bytes()
    assert (tmp_path / "one" / "niah.png").stat().st_size > 1000
    body = json.loads((tmp_path / "one" / "niah.json").read_text())
    assert len(body["cells"]) == 6 and set(body["cells"][0]) >= {"length", "depth", "n", "exact"}
    assert body["settings"]["checkpoint_sha256"] == lc.variables_hash(v)
    # the latent cache: (kv_lora_rank + qk_rope_head_dim) floats per token and layer, at every length
    want = (cfg.attention.kv_lora_rank + cfg.attention.qk_rope_head_dim) * 4 * cfg.n_layers
    assert body["kv_cache"]["formula_bytes_per_token"] == want
    assert body["kv_cache"]["measured_bytes_per_token"] == {"48": want, "96": want}


def test_teacher_forced_scoring_reads_the_answer_positions():
    """Predictions that are every next token score 1; one wrong digit makes it partial."""
    samples = [S.make_sample("multiquery", 80, d, np.random.default_rng(i)) for i, d in enumerate((0, 40, 100))]

    rows = np.stack([s.tokens for s in samples])
    pred = np.concatenate([rows[:, 1:], rows[:, :1]], 1)  # pred[t] = token t + 1
    scores = [lc._judge(pred[i, s.answer_start - 1:], s) for i, s in enumerate(samples)]
    assert scores == [(1.0, 1.0)] * 3
    pred[0, samples[0].answer_start - 1 + 4] = -1  # a digit of the second group
    assert lc._judge(pred[0, samples[0].answer_start - 1:], samples[0]) == (0.0, 0.5)


def test_yarn_override_and_lengths_beyond_the_model_are_refused(small):
    cfg, v = small
    with pytest.raises(ValueError, match="max_position_embeddings=256.*--yarn-factor"):
        lc.niah_eval(cfg, v, lengths=[512], depths=[50.0], samples=1)
    y = lc.with_yarn(cfg, 4.0, 256)
    assert y.rope.yarn.factor == 4.0 and y.rope.yarn.original_max_position_embeddings == 256
    assert y.max_position_embeddings == 1024 and cfg.rope.yarn is None


def test_perplexity_by_position_and_the_answer_nll_equal_a_numpy_reference(small):
    cfg, v = small
    rng = np.random.default_rng(0)
    rows = rng.integers(3, 90, (5, 40)).astype(np.int32)
    got = lc.perplexity_by_position(cfg, v, rows, bins=4, batch=2)
    out = dsj.Transformer(cfg).apply(v, rows, positions=np.broadcast_to(np.arange(40), rows.shape),
                                     segment_ids=np.ones_like(rows), with_mtp=False)
    logits = np.asarray(out.logits, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    nll = -np.take_along_axis(logp[:, :-1], rows[:, 1:, None], -1)[..., 0].mean(0)
    assert got["nll"] == pytest.approx(nll.mean(), rel=1e-5)
    edges = np.linspace(0, 39, 5).astype(int)
    for b, (lo, hi) in zip(got["bins"], zip(edges, edges[1:])):
        assert b["nll"] == pytest.approx(nll[lo:hi].mean(), rel=1e-5)
    with pytest.raises(ValueError, match="no held-out document has 50 tokens"):
        lc.document_windows([[1] * 10], 50)
    # the answer's NLL: the same log-probabilities at the answer positions only
    samples = [S.make_sample("passkey", 40, d, rng) for d in (0.0, 50.0, 100.0)]
    rows = np.stack([s.tokens for s in samples])
    out = dsj.Transformer(cfg).apply(v, rows, positions=np.broadcast_to(np.arange(40), rows.shape),
                                     segment_ids=np.ones_like(rows), with_mtp=False)
    logits = np.asarray(out.logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = [-np.mean([logp[i, t - 1, s.tokens[t]] for t in range(s.answer_start, s.answer_start + 5)])
            for i, s in enumerate(samples)]
    np.testing.assert_allclose(lc.answer_nll(cfg, v, samples, batch=2), want, rtol=1e-5)


def test_context_extension_starts_from_the_run_folder_under_a_yarn_rope(tmp_path, capsys):
    """``train --init RUN`` with the YaRN preset: the same weights (one step at a tiny learning rate ends next
    to them), YaRN in the new run's config, the synthetic data at the longer length."""
    from deepseek_jax.cli import main
    from deepseek_jax.nn import tree
    from deepseek_jax.train.run_dir import load_run

    small = ["n_layers=1", "train.batch_size=8", "train.data.niah.train_samples=64", "train.data.niah.val_samples=8",
             "train.eval_every=100", "train.checkpoint_every=100"]
    assert main(["train", "--config", "configs/niah-tiny.yaml", "--out", str(tmp_path / "base"), "--steps", "3",
                 "--no-progress", *small, "train.optim.warmup_steps=0"]) == 0
    assert main(["train", "--config", "configs/niah-tiny-yarn.yaml", "--init", str(tmp_path / "base"), "--out",
                 str(tmp_path / "ext"), "--steps", "1", "--no-progress", *small, "train.optim.warmup_steps=0",
                 "train.optim.lr=1e-9"]) == 0
    base_cfg, base, _ = load_run(tmp_path / "base")
    ext_cfg, ext, tok = load_run(tmp_path / "ext")
    assert base_cfg.rope.yarn is None and ext_cfg.rope.yarn.factor == 4.0 and tok.get_vocab_size() == 81
    import jax

    gap = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(jax.tree.leaves(base[tree.PARAMS]), jax.tree.leaves(ext[tree.PARAMS])))
    assert gap < 1e-5
    # the evaluation commands on the extended run
    assert main(["eval", "niah", "--checkpoint", str(tmp_path / "ext"), "--lengths", "48,96", "--depths", "0,100",
                 "--samples", "2", "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    body = json.loads((tmp_path / "ev" / "niah.json").read_text())
    assert [(c["length"], c["depth"]) for c in body["cells"]] == [(48, 0.0), (48, 100.0), (96, 0.0), (96, 100.0)]
    assert body["settings"]["yarn"]["factor"] == 4.0 and body["settings"]["train_length"] == 128
    assert (tmp_path / "ev" / "niah.png").exists()
    (tmp_path / "held.txt").write_text(" ".join(f"w{i % 60}" for i in range(400)))
    assert main(["eval", "ppl", "--checkpoint", str(tmp_path / "ext"), "--lengths", "64,128", "--data",
                 str(tmp_path / "held.txt"), "--bins", "2", "--out", str(tmp_path / "ppl"), "--no-progress"]) == 0
    ppl = json.loads((tmp_path / "ppl" / "ppl.json").read_text())
    assert set(ppl) == {"64", "128"} and len(ppl["128"]["bins"]) == 2 and np.isfinite(ppl["128"]["nll"])
    capsys.readouterr()
    assert main(["train", "--config", "configs/niah-tiny.yaml", "--init", str(tmp_path / "base"), "--out",
                 str(tmp_path / "bad"), "--steps", "1", "--no-progress", *small, "n_layers=2",
                 "train.optim.warmup_steps=0"]) == 2  # a different architecture cannot start from this run
    assert "do not fit the model config" in capsys.readouterr().err
