"""Faults injected as a demanding user would meet them (issue 13): each test reproduces one and asserts that
nothing is lost, nothing silently wrong, and the message names the file or field and the fix."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from deepseek_jax import train as T
from deepseek_jax.cli import main
from deepseek_jax.config_io import read_yaml
from deepseek_jax.infer.engine import generate
from deepseek_jax.train import data as D
from deepseek_jax.train import run_dir as R
from deepseek_jax.train.integrity import fingerprint
from deepseek_jax.train.lock import RunLock, RunLocked
from deepseek_jax.train.metrics_log import read_metrics, truncate_metrics

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["train.steps=4", "train.batch_size=8", "train.seq_len=64", "train.optim.warmup_steps=1",
         "train.eval_every=4", "train.eval_batches=1", "train.checkpoint_every=2", "train.keep_checkpoints=3",
         "train.sample_tokens=0", "train.data.max_documents=12"]


def _env_one_device() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A 4-step tiny run with checkpoints at steps 2 and 4: ``(cfg, tcfg, folder)``. Tests copy it."""
    cfg, tcfg = T.load_run_config("tiny", SMALL)
    out = tmp_path_factory.mktemp("small") / "run"
    T.train(cfg, tcfg.replace(out=str(out)), progress=False)
    return cfg, tcfg, out


def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


def _steps(run: Path) -> list[int]:
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


# 1. two writers on one run folder --------------------------------------------------------------------------

def test_second_writer_is_refused_naming_the_holder_and_the_lock_dies_with_its_process(small_run, tmp_path, capsys):
    cfg, tcfg, run = small_run
    out = _copy(run, tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom deepseek_jax.train.lock import RunLock\n"
                               f"RunLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(600)"],
                              env=_env_one_device(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = {p: p.read_bytes() for p in (out / "config.yaml", out / "metrics.jsonl")}
        with pytest.raises(RunLocked, match=f"pid {holder.pid} on .*choose another train.out"):
            T.train(cfg, tcfg.replace(out=str(out), steps=6), progress=False)
        assert main(["train", "--config", "tiny", "--out", str(out), "--no-progress", *SMALL]) == 2
        assert f"in use by another writer (pid {holder.pid}" in capsys.readouterr().err
        assert {p: p.read_bytes() for p in before} == before and _steps(out) == [2, 4]  # nothing touched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(out):  # the kernel released the dead holder's lock: no stale lock to clean up
        pass


# 2. metrics history: append-only, atomic truncation, torn tail ------------------------------------------------

def test_a_kill_during_metrics_truncation_leaves_the_old_or_the_new_history(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [{"step": i, "kind": "train", "loss": 1.0 / (i + 1), "pad": "x" * 200} for i in range(1, 150_001)]
    old = "".join(json.dumps(r) + "\n" for r in recs)
    new = "".join(json.dumps(r) + "\n" for r in recs if r["step"] <= 100_000)
    code = ("import sys\nfrom deepseek_jax.train.metrics_log import truncate_metrics\n"
            f"print('go', flush=True); truncate_metrics({str(path)!r}, 100000)")
    outcomes = set()
    for delay in (0.0, 0.03, 0.1, 0.2, 0.4, 0.8):
        path.write_text(old)
        p = subprocess.Popen([sys.executable, "-c", code], env=_env_one_device(), stdout=subprocess.PIPE, text=True)
        p.stdout.readline()
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        got = path.read_text()
        assert got in (old, new), f"kill after {delay} s left {len(got)} bytes"
        outcomes.add(got == new)
        (tmp_path / "metrics.jsonl.tmp").unlink(missing_ok=True)
    assert False in outcomes  # some kills landed before the rename (and found the old history intact)


def test_truncation_crashing_before_the_rename_loses_nothing(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": i}) + "\n" for i in range(10)))
    before = path.read_text()
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "injected")))
    with pytest.raises(OSError, match="injected"):
        truncate_metrics(path, 3)
    assert path.read_text() == before


def test_a_torn_last_metrics_line_is_skipped_on_resume_and_named(small_run, tmp_path, capfd):
    cfg, tcfg, run = small_run
    out = _copy(run, tmp_path / "run")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "kind": "tr')  # power loss mid-record
    notes = []
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl", notes.append)][-1] == 4
    assert "metrics.jsonl:" in notes[0] and "torn last record" in notes[0]
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"ste\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        read_metrics(out / "metrics.jsonl")


# 5, 10. flipped bytes: fingerprints, fall back in train and in generate ------------------------------------------

def test_fingerprint_changes_with_any_value_or_order_and_nan_is_caught(tmp_path):
    x = {"a": jnp.arange(1000, dtype=jnp.float32), "b": jnp.ones((3, 4), jnp.bfloat16)}
    fp = fingerprint(x)
    assert fingerprint(jax.tree.map(lambda v: v + 0, x)) == fp
    flipped = np.asarray(x["a"]).copy()
    flipped.view(np.uint32)[417] ^= 1 << 3  # one bit
    assert fingerprint({**x, "a": jnp.asarray(flipped)}) != fp
    swapped = np.asarray(x["a"]).copy()
    swapped[[3, 7]] = swapped[[7, 3]]
    assert fingerprint({**x, "a": jnp.asarray(swapped)}) != fp
    meta = {"fingerprint": {"state": fp}}
    R.verify(4, {"state": x}, meta, tmp_path)
    with pytest.raises(R.CheckpointCorrupt, match="do not match the fingerprint"):
        R.verify(4, {"state": {**x, "a": jnp.asarray(flipped)}}, meta, tmp_path)
    with pytest.raises(R.CheckpointCorrupt, match=r"holds inf/NaN in 1 arrays, e.g. \['state'\]\['a'\]"):
        R.verify(4, {"state": {**x, "a": x["a"].at[5].set(jnp.nan)}}, {}, tmp_path)


def _flip_bytes(ckpt: Path) -> Path:
    """Flip bytes in the middle of the largest array file of a checkpoint's state."""
    f = max((p for p in (ckpt / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(f.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 64, 8):
        raw[i] ^= 0x5A
    f.write_bytes(bytes(raw))
    return f


@pytest.mark.slow
def test_flipped_bytes_fall_back_to_the_previous_checkpoint_in_generate_and_in_train(small_run, tmp_path, capfd):
    """The run was written by 8 devices; ``generate`` runs in a fresh 1-device process (as users do)."""
    cfg, tcfg, run = small_run
    out = _copy(run, tmp_path / "run")
    _flip_bytes(out / "checkpoints" / "4")
    r = subprocess.run([sys.executable, "-m", "deepseek_jax.cli", "generate", "--checkpoint", str(out), "--prompt",
                        "def", "--max-new-tokens", "3"], env=_env_one_device(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint at step 4 is unreadable (CheckpointCorrupt" in r.stderr and "do not match the fingerprint" in r.stderr
    assert "moved the unreadable checkpoint 4" in r.stderr and "[3 tokens in" in r.stderr and _steps(out) == [2]
    # train resumes from step 2 too, and redoes 3-4 with the same losses as the uninterrupted run
    out2 = _copy(run, tmp_path / "run2")
    _flip_bytes(out2 / "checkpoints" / "4")
    capfd.readouterr()
    s = T.train(cfg, tcfg.replace(out=str(out2)), progress=False)
    assert "do not match the fingerprint" in capfd.readouterr().err and s["start_step"] == 2
    losses = [{r["step"]: r["loss"] for r in read_metrics(o / "metrics.jsonl") if r["kind"] == "train"}
              for o in (run, out2)]
    assert losses[0] == losses[1]


def test_generate_with_only_damaged_checkpoints_says_so_and_exits_2(small_run, tmp_path, capsys):
    out = _copy(small_run[2], tmp_path / "run")
    for s in _steps(out):
        shutil.rmtree(out / "checkpoints" / str(s) / "state")
    assert main(["generate", "--checkpoint", str(out), "--prompt", "def"]) == 2
    err = capsys.readouterr().err
    assert "no readable checkpoint in" in err and "step 4:" in err and "step 2:" in err and "Traceback" not in err


# 11. config.yaml that does not match the checkpoint ---------------------------------------------------------------

def test_generate_with_a_mismatched_config_yaml_names_it(small_run, tmp_path, capsys):
    out = _copy(small_run[2], tmp_path / "run")
    d = read_yaml(out / "config.yaml")
    d["intermediate_size"] = 512
    (out / "config.yaml").write_text(yaml.safe_dump(d))
    assert main(["generate", "--checkpoint", str(out), "--prompt", "def"]) == 2
    err = capsys.readouterr().err
    assert "config.yaml does not describe the checkpoint at step 4" in err and "checkpoint (1, 256, 384), config.yaml makes (1, 256, 512)" in err, err


# 6, 7. generation limits and sampler arguments -----------------------------------------------------------------

def test_generation_past_the_position_limit_and_nan_temperature_are_refused(small_run, tmp_path, capsys):
    cfg = small_run[0]
    assert cfg.max_position_embeddings == 2048
    with pytest.raises(ValueError, match="2049 positions, past the model's limit max_position_embeddings=2048"):
        generate(cfg, {}, [[1]], 2048)
    with pytest.raises(ValueError, match="temperature=nan must be a finite number"):
        generate(cfg, {}, [[1]], 4, temperature=float("nan"))
    out = _copy(small_run[2], tmp_path / "run")
    assert main(["generate", "--checkpoint", str(out), "--prompt", "def", "--temperature", "nan"]) == 2
    assert "temperature=nan" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(out), "--prompt", "def", "--max-new-tokens", "2048"]) == 2
    assert "max_position_embeddings=2048" in capsys.readouterr().err


# 8. full disk and other write failures --------------------------------------------------------------------------

def _small_state():
    return {"w": jnp.arange(50_000, dtype=jnp.float32), "step": jnp.int32(0)}


def test_a_full_disk_fails_at_that_save_in_one_line_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    ck = R.Checkpoints(R.RunDir(tmp_path), keep=3)
    ck.save(1, _small_state(), {"data": {}}, wait=True)
    monkeypatch.setattr(R, "_free_bytes", lambda path: 100_000)  # less than the 200 kB the state needs
    with pytest.raises(R.CheckpointWriteError) as e:
        ck.save(2, _small_state(), {"data": {}})
    msg = str(e.value)
    assert "\n" not in msg and f"step 2 to {tmp_path / 'checkpoints'} (0.1 MB free)" in msg and "needs about 0.2 MB" in msg
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]


def test_a_write_error_inside_orbax_is_one_line_and_the_partial_folder_is_removed(tmp_path, monkeypatch):
    ck = R.Checkpoints(R.RunDir(tmp_path), keep=3)
    ck.save(1, _small_state(), {"data": {}}, wait=True)
    real = type(ck.mngr).save

    def failing(self, step, *a, **k):  # the write starts, leaves a partial temp folder, then the disk fills
        (tmp_path / "checkpoints" / f"{step}.orbax-checkpoint-tmp-123").mkdir()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(ck.mngr), "save", failing)
    with pytest.raises(R.CheckpointWriteError, match=r"step 2 .* free\): OSError: \[Errno 28\] No space left on device;"
                       r" removed its partial files \['2.orbax-checkpoint-tmp-123'\]"):
        ck.save(2, _small_state(), {"data": {}})
    monkeypatch.setattr(type(ck.mngr), "save", real)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
    restored = ck.restore_newest(jax.eval_shape(_small_state), None, print)
    assert restored[0] == 1 and np.array_equal(restored[1]["w"], _small_state()["w"])
    ck.close()


@pytest.mark.slow
def test_train_on_a_full_disk_exits_2_with_one_line(small_run, tmp_path, monkeypatch, capsys):
    out = _copy(small_run[2], tmp_path / "run")
    monkeypatch.setattr(R, "_free_bytes", lambda path: 1000)
    assert main(["train", "--config", "tiny", "--out", str(out), "--no-progress", *SMALL, "train.steps=6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("deepseek-jax train: error: could not write the checkpoint of step 6 to") and "free" in err
    assert _steps(out) == [2, 4] and not list((out / "checkpoints").glob("*tmp*"))


# 3, 4, 9, 13. data ------------------------------------------------------------------------------------------------

def test_binary_files_and_non_string_jsonl_texts_are_skipped_and_counted(tmp_path):
    (tmp_path / "good.txt").write_text("real text " * 50)
    (tmp_path / "noise.txt").write_bytes(np.random.default_rng(0).bytes(200_000))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 10 + b"plain ascii " * 200)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"text": "kept"}, {"text": None}, {"text": {"a": 17}}, {"text": 5}, {"text": "also kept"})))
    stats = {}
    docs = D.read_documents([str(tmp_path)], stats=stats)
    assert "kept" in docs and "also kept" in docs and not any(d in ("None", "{'a': 17}", "5") for d in docs)
    assert len(docs) == 4 and stats["skipped_binary_files"] == 1 and stats["skipped_non_string_records"] == 3
    assert stats["invalid_utf8_files"] == 1 and stats["invalid_utf8_bytes"] == 10
    assert any(d.startswith("caf\ufffd ") for d in docs)
    (tmp_path / "good.txt").unlink()
    (tmp_path / "latin1.txt").unlink()
    (tmp_path / "d.jsonl").unlink()
    with pytest.raises(ValueError, match="corpus is empty.*skipped 1 binary files"):
        D.read_documents([str(tmp_path)])


def test_parse_errors_name_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:4: not a JSON record"):
        D.read_documents([str(bad)])
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"version": "1.0", "model": {')
    with pytest.raises(ValueError, match=r"tokenizer.json: not a readable tokenizer.json"):
        D.load_tokenizer(tok)
    y = tmp_path / "c.yaml"
    y.write_text("vocab_size: 512\nattention: [kind: mla\n")
    assert main(["info", "--config", str(y)]) == 2
    assert f"{y}: not valid YAML at line" in capsys.readouterr().err
    y.write_text((ROOT / "configs" / "tiny.yaml").read_text().replace("rms_norm_eps: 1.0e-6", "rms_norm_eps: 1e-6"))
    assert main(["info", "--config", str(y)]) == 0  # PyYAML reads 1e-6 as text; a float field takes it
    y.write_text("- vocab_size: 512\n")
    assert main(["info", "--config", str(y)]) == 2
    assert "top level must be a mapping" in capsys.readouterr().err


def test_chunking_keeps_the_text_and_cuts_at_line_breaks():
    text = "".join(f"line {i} " + "w" * (i % 37) + "\n" for i in range(5000))
    pieces = D.chunk_text(text, 1000)
    assert "".join(pieces) == text and max(map(len, pieces)) <= 1000 and all(p.endswith("\n") for p in pieces[:-1])
    letters = "x" * 2500  # no break anywhere: hard cuts
    assert [len(p) for p in D.chunk_text(letters, 1000)] == [1000, 1000, 500]


@pytest.mark.slow
def test_a_200_mb_single_document_is_prepared_within_a_stated_memory_bound(tmp_path):
    """One 200 MB line-broken document (random words) plus a 20 MB line of letters, prepared in a fresh
    process: split into chunks, deduplicated, tokenizer trained on a sample, encoded and packed.
    Calibration (2 cores): 3.58 GB peak RSS for 160M tokens, 284 s, run alone; 7.47 GB when run at the end
    of the whole suite with the suite's environment (cause not found; the process now gets a clean one).
    Before this issue a 50 MB document took 10.7 GB. The stated bound (``train/data.py``): 0.5 GB + 60
    bytes per token."""
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(30_000)]
    with open(tmp_path / "big.txt", "w") as f:
        size = 0
        while size < 200 * 2**20:
            line = " ".join(rng.choices(words, k=4096)).replace(" ", "\n", 16) + "\n"
            f.write(line)
            size += len(line)
    (tmp_path / "letters.txt").write_text("".join(rng.choices(string.ascii_letters, k=20 * 2**20)))
    code = (
        "import json, resource, time\nfrom deepseek_jax.train.data import DataConfig, prepare_data\n"
        "t = time.time()\n"
        f"d = prepare_data(DataConfig(sources=({str(tmp_path)!r},), val_fraction=0.01), 512, 256)\n"
        "print(json.dumps({'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 's': time.time() - t,"
        " 'rows': len(d.train['tokens']), **d.stats}))")
    env = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}  # clean: nothing the suite set
    env |= {"PYTHONPATH": str(ROOT), "DEEPSEEK_JAX_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    print(got)
    assert got["split_documents"] == 2 and got["documents"] >= 220
    assert got["train_tokens"] > 50e6 and got["rows"] * 256 >= got["train_tokens"]
    bound_mb = 500 + 60 * got["train_tokens"] / 2**20  # 9.7 GB here; calibration 3.58 GB alone, 7.47 in the suite
    assert got["rss_mb"] < bound_mb, (got, bound_mb)


# 14. zero sizes, and a mesh given in the YAML ----------------------------------------------------------------------

def test_zero_sizes_are_clear_errors(capsys):
    assert main(["info", "--config", "tiny", "--mesh", "data=0"]) == 2
    assert "mesh axis sizes must be positive integers, got {'data': 0}" in capsys.readouterr().err
    for flag in ("--batch", "--seq"):
        with pytest.raises(SystemExit) as e:
            main(["info", "--config", "tiny", "--mesh", "data=2", flag, "0"])
        assert e.value.code == 2 and f"argument {flag}: 0 must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_a_mesh_in_the_yaml_fakes_the_cpu_devices_like_the_flag(tmp_path):
    preset = (ROOT / "configs" / "tiny.yaml").read_text()
    y = tmp_path / "meshed.yaml"
    y.write_text(preset.replace("train:\n", "train:\n  mesh: data=2,expert=2\n", 1))
    cmd = [sys.executable, "-m", "deepseek_jax.cli", "train", "--config", str(y), "--out", str(tmp_path / "run"),
           "--no-progress", "--json", *SMALL, "train.steps=1", "train.checkpoint_every=1", "train.eval_every=1"]
    r = subprocess.run(cmd, env=_env_one_device(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout[r.stdout.index("{"):])["step"] == 1
    assert read_yaml(tmp_path / "run" / "config.yaml")["train"]["mesh"] == "data=2,expert=2"
