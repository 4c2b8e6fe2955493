"""SFT (post-training.md U7): the loss counts completion targets only (against a NumPy log-softmax of the
model's logits), packed rows give the same loss as one sample per row, and the JSONL reader names bad lines."""

import json

import jax
import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax.nn import tree
from deepseek_jax.post_train.sft import pack_samples, read_pairs
from deepseek_jax.post_train.tasks import addition
from deepseek_jax.train.objectives import Pretrain
from deepseek_jax.train.step import hyper, objective_loss

SAMPLES = [([5, 9, 3], [7, 1, 2, 1]), ([11, 12], [4, 4, 1]), ([8, 8, 8, 8], [2, 1]), ([6], [3, 3, 3, 1])]


def _loss(cfg, variables, rows):
    batch = {k: jax.numpy.asarray(v) for k, v in rows.items()}
    _, m = objective_loss(cfg, "none", Pretrain(), variables[tree.PARAMS], variables.get(tree.ROUTER, {}), batch,
                          hyper(0.0, 0.0))
    return float(m["ce"]), float(m["tokens"])


def _numpy_ce(cfg, variables, samples):
    """Mean over completion targets of -log softmax(logits)[next token], one sample at a time, float64."""
    nll = []
    for p, c in samples:
        ids = np.array([p + c], np.int32)
        logits = np.asarray(dsj.forward(cfg, variables, ids), np.float64)[0]
        lsm = logits - logits.max(-1, keepdims=True)
        lsm -= np.log(np.exp(lsm).sum(-1, keepdims=True))
        for t in range(len(p), len(p) + len(c)):  # targets: the completion tokens (EOS included)
            nll.append(-lsm[t - 1, ids[0, t]])
    return float(np.mean(nll)), len(nll)


def test_sft_loss_counts_completion_targets_only_and_packing_changes_nothing(tiny_cfg, tiny_vars):
    packed = pack_samples(SAMPLES, 16)
    single = pack_samples(SAMPLES, 16, packing=False)
    assert packed["tokens"].shape == (2, 16) and single["tokens"].shape == (4, 16)
    np.testing.assert_array_equal(packed["segment_ids"], [[1] * 7 + [2] * 5 + [0] * 4, [1] * 6 + [2] * 5 + [0] * 5])
    want, n = _numpy_ce(tiny_cfg, tiny_vars, SAMPLES)
    for rows in (packed, single):
        got, count = _loss(tiny_cfg, tiny_vars, rows)
        assert count == n == 13
        np.testing.assert_allclose(got, want, rtol=2e-5)
    # a prompt token's own target (the token after it, inside the prompt) changes nothing once masked out:
    # only the prompt's last position predicts a counted (completion) target
    everything = pack_samples(SAMPLES, 16, loss_on="all")
    assert _loss(tiny_cfg, tiny_vars, everything)[1] == sum(len(p) + len(c) - 1 for p, c in SAMPLES)


def test_pack_samples_rejects_a_sample_longer_than_a_row():
    with pytest.raises(ValueError, match="SFT sample 1 has 9 tokens, more than train.seq_len=8"):
        pack_samples([([1, 2], [3]), ([1] * 5, [2] * 4)], 8)


def test_read_pairs_names_the_bad_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "1+1=", "completion": "<a>2</a>"}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2: not JSON"):
        read_pairs(f)
    f.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:1: the record has no string field 'completion'"):
        read_pairs(f)


def test_addition_tokenizer_round_trips_and_has_the_project_eos():
    from deepseek_jax.train.data import eos_id

    tok = addition.tokenizer()
    text = "123+45=<a>861</a>"
    assert tok.encode(text).ids == addition.encode(text) and tok.decode(addition.encode(text)) == text
    assert eos_id(tok) == addition.EOS_ID and tok.get_vocab_size() == len(addition.VOCAB)


def test_post_config_stage_train_sections_and_their_precedence():
    from deepseek_jax.post_train.config import load_post_config

    _, t, p = load_post_config("configs/r1-addition.yaml", stage="grpo")
    assert t.steps == 30 and t.out == "runs/add-grpo" and t.optim.lr == 1e-4 and t.batch_size == 32
    _, t, _ = load_post_config("configs/r1-addition.yaml", ["train.out=/x", "train.steps=7"], stage="grpo")
    assert t.out == "/x" and t.steps == 7  # command-line train.* beats the stage's own train:
    _, t, _ = load_post_config("configs/r1-addition.yaml", ["train.steps=7", "grpo.train.steps=9"], stage="grpo")
    assert t.steps == 9
    _, t, p = load_post_config("configs/r1-addition.yaml", ["grpo.beta=0.04"], stage="sft")
    assert t.steps == 1500 and t.out == "runs/add-sft" and p.grpo.beta == 0.04 and p.task.name == "addition"
    with pytest.raises(ValueError, match=r"grpo.train.stepz"):
        load_post_config("configs/r1-addition.yaml", ["grpo.train.stepz=1"], stage="sft")
    with pytest.raises(ValueError, match=r"grpo.num_generations=1"):
        load_post_config("configs/r1-addition.yaml", ["grpo.num_generations=1"])


def test_sft_starts_from_a_hugging_face_checkpoint_with_its_tokenizer(tmp_path, tiny_char_model):
    """``deepseek-jax sft --init <HF folder>``: the run starts from the checkpoint's weights (one step at a tiny
    learning rate ends next to them, far from the from-scratch initialisation) and encodes ``sft.data`` with the
    folder's ``tokenizer.json``."""
    from deepseek_jax.cli import main
    from deepseek_jax.hf.checkpoint import save_checkpoint
    from deepseek_jax.post_train.config import load_post_config
    from deepseek_jax.train.run_dir import load_run

    preset = tiny_char_model("train: {optim: {warmup_steps: 0}}\n")
    cfg, _, _ = load_post_config(preset, [], stage="sft")
    hf_vars = dsj.init_variables(cfg, 5)
    save_checkpoint(cfg, hf_vars, tmp_path / "hf")
    addition.tokenizer().save(str(tmp_path / "hf" / "tokenizer.json"))
    rows = addition.sft_rows(64, seed=0)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["sft", "--config", str(preset), "--init", str(tmp_path / "hf"), "--out", str(out),
                 "--no-progress", f"sft.data={tmp_path / 'd.jsonl'}", "train.steps=1", "train.batch_size=8",
                 "train.seq_len=32",
                 "train.optim.lr=1e-9", "train.optim.warmup_steps=0", "train.optim.schedule=constant",
                 "train.eval_every=100"]) == 0
    _, got, tok = load_run(out)
    assert tok.get_vocab() == addition.tokenizer().get_vocab()
    gap = lambda a, b: max(float(np.abs(np.asarray(x) - np.asarray(y)).max())  # noqa: E731
                           for x, y in zip(jax.tree.leaves(a[tree.PARAMS]), jax.tree.leaves(b[tree.PARAMS])))
    assert gap(got, hf_vars) < 1e-5
    assert gap(got, dsj.init_variables(cfg, 0)) > 1e-2
