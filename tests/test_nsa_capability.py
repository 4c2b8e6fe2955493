"""NSA trained natively on the synthetic pass-key task (configs/niah-tiny-nsa.yaml: the niah-tiny model, data and
training with every attention layer Native Sparse Attention) retrieves as well as dense MLA at the training
length. Floors from the calibration run in the README ("Sparse attention"), with margin; the dense model's
numbers are notebook 08's (tests/test_niah_capability.py)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

L = 64
AT_L, AT_HALF_L = 0.95, 0.90  # calibration: 1.00 and 0.96 (dense MLA: 1.00 and 0.98)


def _cli(*args):
    env = dict(os.environ)  # one CPU device: this process fakes 8, which would partition the small run for nothing
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    r = subprocess.run([sys.executable, "-m", "deepseek_jax.cli", *args], env=env, capture_output=True, text=True,
                       timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]


def test_nsa_trained_at_l_retrieves_like_dense_attention(tmp_path):
    run = tmp_path / "run"
    _cli("train", "--config", "niah-tiny-nsa", "--out", str(run), "--no-progress")
    _cli("eval", "niah", "--checkpoint", str(run), "--lengths", f"{L // 2},{L}", "--depths", "0:100:6",
         "--samples", "20", "--seed", "0", "--scoring", "argmax", "--out", str(tmp_path / "eval"), "--no-progress",
         "--no-plot")
    res = json.loads((tmp_path / "eval" / "niah.json").read_text())
    by = res["by_length"]
    assert by[str(L)] >= AT_L and by[str(L // 2)] >= AT_HALF_L, by
    assert res["settings"]["sparse"]["kind"] == "nsa"
