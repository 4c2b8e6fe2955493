"""The training loop end to end on small runs: resume after SIGTERM gives the same losses, a corrupted
checkpoint is skipped, a non-finite loss stops the run naming the step, the bias update on a mesh equals
one device, and 2 processes x 4 devices train like 1 process x 8 devices."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import train as T
from multiproc import free_port, run_processes

SMALL = ["train.steps=8", "train.batch_size=8", "train.seq_len=64", "train.optim.warmup_steps=2",
         "train.optim.lr=0.003", "train.eval_every=4", "train.eval_batches=1", "train.checkpoint_every=3",
         "train.keep_checkpoints=3", "train.sample_tokens=0", "train.data.max_documents=12"]


def _losses(out: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


@pytest.mark.slow
def test_sigterm_resume_is_exact_and_corrupt_checkpoint_is_skipped(tmp_path, capfd):
    cfg, tcfg = T.load_run_config("tiny", SMALL)
    a = T.train(cfg, tcfg.replace(out=str(tmp_path / "a")), progress=False)
    assert a["step"] == 8 and a["val_loss"] < a["unigram_entropy"] + 1

    def kill_at_5(step, rec):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    b = T.train(cfg, tcfg.replace(out=str(tmp_path / "b")), progress=False, on_step=kill_at_5)
    assert b["stopped_by"] == "SIGTERM" and b["step"] == 5
    b2 = T.train(cfg, tcfg.replace(out=str(tmp_path / "b")), progress=False)
    assert b2["start_step"] == 5 and b2["step"] == 8
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(lb) == list(range(1, 9))
    assert all(la[s] == lb[s] for s in range(1, 9)), (la, lb)  # bit-identical on CPU

    # Corrupt the newest checkpoint (step 8): the run reports it, resumes from step 6 and redoes 7-8.
    ckpts = tmp_path / "b" / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [5, 6, 8]
    for f in (ckpts / "8").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    capfd.readouterr()
    c = T.train(cfg, tcfg.replace(out=str(tmp_path / "b")), progress=False)
    err = capfd.readouterr().err
    assert "checkpoint at step 8 is unreadable" in err and c["start_step"] == 6 and c["step"] == 8
    assert _losses(tmp_path / "b") == la


@pytest.mark.slow
def test_ema_is_checkpointed_and_resumed(tmp_path):
    """The host EMA equals the closed form over the trained parameters and survives a resume."""
    import orbax.checkpoint as ocp

    cfg, tcfg = T.load_run_config("tiny", SMALL + ["train.optim.ema_decay=0.5", "train.steps=3",
                                                   "train.checkpoint_every=1"])
    seen = []
    T.train(cfg, tcfg.replace(out=str(tmp_path / "e")), progress=False)
    mngr = ocp.CheckpointManager(tmp_path / "e" / "checkpoints")
    for step in (1, 2, 3):
        r = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), ema=ocp.args.StandardRestore()))
        seen.append((r["state"]["params"]["embed"], r["ema"]["embed"]))
    mngr.close()
    (p1, e1), (p2, e2), (p3, e3) = seen
    np.testing.assert_allclose(e2, 0.5 * e1 + 0.5 * p2, rtol=1e-6)
    np.testing.assert_allclose(e3, 0.5 * e2 + 0.5 * p3, rtol=1e-6)
    s = T.train(cfg, tcfg.replace(out=str(tmp_path / "e")), progress=False)  # restores state and EMA
    assert s["start_step"] == 3 and s["step"] == 3


@pytest.mark.slow
def test_non_finite_loss_stops_naming_the_step(tmp_path):
    cfg, tcfg = T.load_run_config("tiny", SMALL + ["train.optim.lr=1e30", "train.checkpoint_every=1"])
    with pytest.raises(T.TrainingDiverged, match=r"non-finite loss .* at step (\d+).*last good checkpoint is step"):
        T.train(cfg, tcfg.replace(out=str(tmp_path / "nan")), progress=False)


@pytest.mark.slow
def test_train_step_on_mesh_equals_single_device(tiny_cfg):
    """Losses, updated parameters and the router-bias update on data=2 x expert=2 x tensor=2 equal 1 device."""
    from deepseek_jax.sharding import make_mesh

    _, tcfg = T.load_run_config("tiny", SMALL)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 512, (8, 64)).astype(np.int32)
    seg = np.repeat(np.array([[1] * 40 + [2] * 24]), 8, 0).astype(np.int32)
    pos = np.concatenate([np.arange(40), np.arange(24)])[None].repeat(8, 0).astype(np.int32)
    results = []
    for mesh in (make_mesh({"data": 1}, jax.devices()[:1]), make_mesh({"data": 2, "expert": 2, "tensor": 2})):
        fns = T.make_train_fns(tiny_cfg, T.StepConfig.from_train(tcfg), T.Pretrain(tcfg.balance_alpha, tcfg.z_loss), mesh)
        state = fns.init(jax.random.key(0))
        batch = T.global_batch({"tokens": toks, "segment_ids": seg, "positions": pos}, fns.batch_sharding, 8)
        state, m = fns.step(state, batch, T.hyper(0.3, 0.01))
        first = (jax.device_get(state["router"]), jax.device_get(m), jax.device_get(state["params"]))
        state, m = fns.step(state, batch, T.hyper(0.3, 0.01))
        results.append((first, jax.device_get(state), jax.device_get(m)))
    ((r1, f1, p1), _, m1), ((r8, f8, p8), _, m8) = results
    # Step 1 starts from identical parameters: the global loads and the bias update are identical.
    np.testing.assert_array_equal(f8["expert_load"], f1["expert_load"])
    assert f1["expert_load"].sum() == 3 * 8 * 64 * 4  # 2 MoE layers + 1 MTP layer, every token of the batch
    b1 = r1["moe_layers"]["ffn"]["e_score_correction_bias"]
    assert np.abs(b1).max() > 0
    np.testing.assert_array_equal(r8["moe_layers"]["ffn"]["e_score_correction_bias"], b1)
    np.testing.assert_array_equal(r8["mtp_0"]["layer"]["ffn"]["e_score_correction_bias"],
                                  r1["mtp_0"]["layer"]["ffn"]["e_score_correction_bias"])
    # Adam divides by sqrt(v): a gradient entry near zero turns fp32 noise into up to ~lr of update, so
    # the parameter check allows a small fraction of lr=3e-3 in absolute terms.
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4)
    # Step 2: the losses agree to fp32 rounding (a near-tie may flip a routing choice or two).
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    assert np.abs(m8["expert_load"] - m1["expert_load"]).max() <= 2


def _run_two_processes(out: Path, extra: list[str]) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "deepseek_jax.cli", "train", "--config", "tiny", "--no-progress",
           "--coordinator", f"localhost:{free_port()}", "--num-processes", "2", "--mesh", "data=2,expert=2,tensor=2",
           "--out", str(out)]
    return run_processes([cmd + ["--process-id", str(i)] + SMALL + extra for i in range(2)], env)


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    extra = ["train.steps=20", "train.checkpoint_every=20", "train.eval_every=20"]
    _run_two_processes(tmp_path / "mp", extra)
    cfg, tcfg = T.load_run_config("tiny", SMALL + extra + ["train.mesh=data=2,expert=2,tensor=2"])
    T.train(cfg, tcfg.replace(out=str(tmp_path / "sp")), progress=False)
    lm, ls = _losses(tmp_path / "mp"), _losses(tmp_path / "sp")
    assert sorted(lm) == list(range(1, 21))
    np.testing.assert_allclose([lm[s] for s in range(1, 21)], [ls[s] for s in range(1, 21)], rtol=1e-5)
    assert (tmp_path / "mp" / "checkpoints" / "20").is_dir()
    logs = _run_two_processes(tmp_path / "mp", ["train.steps=22", "train.checkpoint_every=20", "train.eval_every=20"])
    assert "resumed from the checkpoint at step 20" in logs[0]
    assert sorted(_losses(tmp_path / "mp")) == list(range(1, 23))


@dataclasses.dataclass(frozen=True)
class EvenPositionsCE:
    """A second objective: next-token cross-entropy on even positions only (no MTP, no balance term)."""

    def __call__(self, out, intermediates, batch, hyper):
        tgt, mask = T.shifted_targets(batch["tokens"], batch["segment_ids"], 1)
        even = (jnp.arange(mask.shape[1]) % 2 == 0)[None]
        ce, n = T.cross_entropy(out.logits, tgt, mask & even)
        return ce, {"even_ce": ce, "tokens": n}


def _even_ce_reference(cfg, params, router, batch) -> float:
    """The even-position loss from a plain forward pass and NumPy."""
    import deepseek_jax as dsj

    variables = jax.tree.map(jnp.asarray, {"params": params, "router": router})
    out = dsj.Transformer(cfg).apply(variables, batch["tokens"],
                                     positions=batch["positions"], segment_ids=batch["segment_ids"])
    logp = np.asarray(jax.nn.log_softmax(out.logits.astype(jnp.float32)), np.float64)
    tok, seg = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
    nll = []
    for b in range(tok.shape[0]):
        for i in range(0, tok.shape[1] - 1, 2):
            if seg[b, i] > 0 and seg[b, i + 1] == seg[b, i]:
                nll.append(-logp[b, i, tok[b, i + 1]])
    return float(np.mean(nll))


@pytest.mark.slow
def test_a_second_objective_goes_through_the_same_step_and_loop(tiny_cfg, tmp_path):
    from deepseek_jax.sharding import make_mesh

    _, tcfg = T.load_run_config("tiny", SMALL + ["train.steps=3", "train.checkpoint_every=3", "train.eval_every=3"])
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 512, (8, 64)).astype(np.int32)
    seg = np.repeat(np.array([[1] * 40 + [2] * 20 + [0] * 4]), 8, 0).astype(np.int32)
    pos = np.concatenate([np.arange(40), np.arange(20), np.zeros(4, int)])[None].repeat(8, 0).astype(np.int32)
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    fns = T.make_train_fns(tiny_cfg, T.StepConfig.from_train(tcfg), EvenPositionsCE(), mesh)
    state = fns.init(jax.random.key(0))
    before = jax.device_get(state)
    batch = T.global_batch({"tokens": toks, "segment_ids": seg, "positions": pos}, fns.batch_sharding, 8)
    state, m = fns.step(state, batch, T.hyper(0.3, 0.01))
    want = _even_ce_reference(tiny_cfg, before["params"], before["router"], batch)
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)
    assert float(m["even_ce"]) == float(m["loss"]) and "mtp" not in m and "balance" not in m
    assert int(m["tokens"]) == 8 * (20 + 10)  # even positions whose target is in the same document
    state, _ = fns.step(state, batch, T.hyper(0.3, 0.01))  # step 0's warm-up learning rate is 0
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), jax.device_get(state["params"]),
                                           before["params"]))
    assert any(changed)  # the optimizer ran on this objective's gradient (MTP norms get none: unchanged)

    # the loop takes the objective too: metrics come from it, checkpoints and resume work as before
    s = T.train(tiny_cfg, tcfg.replace(out=str(tmp_path / "even")), progress=False, objective=EvenPositionsCE())
    recs = [json.loads(x) for x in (tmp_path / "even" / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3] and "ce" not in train_recs[0]
    assert s["step"] == 3 and (tmp_path / "even" / "checkpoints" / "3").is_dir()
    pre = T.train(tiny_cfg, tcfg.replace(out=str(tmp_path / "pre")), progress=False)
    assert abs(pre["last_loss"] - s["last_loss"]) > 1e-3  # another objective, another loss
