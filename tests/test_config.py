"""Configs: presets, strict parsing, validation errors that name the field, golden model facts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import deepseek_jax as dsj
from deepseek_jax.config import CONFIG_DIR

GOLDEN = Path(__file__).parent / "golden"
PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_all_presets_present():
    assert {"tiny", "deepseek-v3-671b", "deepseek-v2-236b", "deepseek-v2-lite-16b", "deepseek-llm-7b",
            "deepseek-llm-67b"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_golden_snapshot(preset):
    """Resolved config and model facts of every preset, diffed against tests/golden/<preset>.json."""
    cfg = dsj.load_config(preset)
    info = dsj.model_info(cfg)
    info.pop("eval_shape_seconds")
    got = {"config": cfg.to_dict(), "info": info}
    path = GOLDEN / f"{preset}.json"
    if os.environ.get("UPDATE_GOLDEN") == "1":  # regenerate deliberately, review the diff, commit
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"regenerated {path}; review the diff and rerun without UPDATE_GOLDEN")
    assert path.exists(), f"no golden snapshot {path}; run with UPDATE_GOLDEN=1 and review it"
    assert json.loads(path.read_text()) == json.loads(json.dumps(got))


# Published figures (V3 report + README_WEIGHTS; V2 report; V2-Lite model card; DeepSeek LLM report).
PUBLISHED = {
    "deepseek-v3-671b": dict(total=671e9, active=36.7e9, mtp=11.5e9),
    "deepseek-v2-236b": dict(total=236e9, active=21e9),
    "deepseek-v2-lite-16b": dict(total=15.7e9, active=2.4e9),
    "deepseek-llm-7b": dict(total=6.9e9),
    "deepseek-llm-67b": dict(total=67.4e9),  # 67B in the title; 67.4B counts the 95-layer GQA model
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_parameter_counts_match_published(preset):
    info = dsj.model_info(dsj.load_config(preset))
    pub = PUBLISHED[preset]
    assert info["params_total"] == pytest.approx(pub["total"], rel=0.01)
    if "active" in pub:
        # V2-Lite's "2.4B" is rounded from 2.45B; the others agree within 1%
        assert info["params_active"] == pytest.approx(pub["active"], rel=0.025 if "lite" in preset else 0.01)
    if "mtp" in pub:
        assert info["params_mtp"] == pytest.approx(pub["mtp"], rel=0.015)


def test_kv_cache_bytes():
    assert dsj.model_info(dsj.load_config("deepseek-v3-671b"))["kv_cache_bytes_per_token"] == 70_272
    assert dsj.model_info(dsj.load_config("deepseek-v2-236b"))["kv_cache_bytes_per_token"] == 69_120
    assert dsj.model_info(dsj.load_config("deepseek-llm-67b"))["kv_cache_bytes_per_token"] == 389_120
    assert dsj.model_info(dsj.load_config("deepseek-llm-7b"))["kv_cache_bytes_per_token"] == 491_520


def test_softmax_scale_includes_yarn_mscale():
    assert dsj.load_config("deepseek-v3-671b").softmax_scale == pytest.approx(0.135234, abs=1e-6)
    assert dsj.load_config("deepseek-v2-236b").softmax_scale == pytest.approx(0.114721, abs=1e-6)


@pytest.mark.parametrize("override,message", [
    ({"moe.n_routed_experts": 12, "moe.router.n_group": 5}, "n_routed_experts=12 is not divisible by n_group=5"),
    ({"moe.experts_per_token": 20}, "experts_per_token=20"),
    ({"moe.router.topk_group": 1}, "topk_group=1"),  # 1 group of 4 experts < top-4? no: 4 >= 4 -> see below
    ({"attention.kind": "mqa"}, "attention.kind='mqa'"),
    ({"attention.qk_rope_head_dim": 31}, "qk_rope_head_dim=31"),
    ({"moe.router.topk_method": "greedy"}, "topk_method='greedy'"),
    ({"dtype": "float64"}, "dtype='float64'"),
    ({"mtp.depth": -1}, "mtp.depth=-1"),
    ({"moe.first_k_dense_replace": 9}, "first_k_dense_replace=9"),
])
def test_invalid_configs_name_the_field(override, message):
    if "topk_group" in str(override):
        override = {**override, "moe.experts_per_token": 5}  # 1 group x 4 experts cannot hold top-5
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        dsj.load_config("tiny", **override)


def test_unknown_keys_are_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown config key.*moe.n_experts"):
        dsj.load_config("tiny", **{"moe.n_experts": 4})
    p = tmp_path / "bad.yaml"
    p.write_text((CONFIG_DIR / "tiny.yaml").read_text() + "\nhidden_size: 7\n")
    with pytest.raises(ValueError, match="unknown config key.*hidden_size"):
        dsj.load_config(p)
    with pytest.raises(FileNotFoundError, match="presets:"):
        dsj.load_config("no-such-preset")


def test_from_hf_round_trips_every_mla_and_llama_preset():
    for preset in PRESETS:
        cfg = dsj.load_config(preset)
        if cfg.attention.sparse is not None:  # no transformers counterpart: refused, naming the field
            with pytest.raises(ValueError, match="attention.sparse"):
                dsj.hf.config_to_hf(cfg)
            continue
        back = dsj.hf.config_from_hf(dsj.hf.config_to_hf(cfg))
        assert back.replace(dtype=cfg.dtype, param_dtype=cfg.param_dtype, init_std=cfg.init_std) == cfg, preset


def test_from_hf_rejects_what_it_cannot_compute():
    base = dsj.hf.config_to_hf(dsj.load_config("deepseek-llm-7b"))
    with pytest.raises(ValueError, match="attention_bias=True"):
        dsj.hf.config_from_hf({**base, "attention_bias": True})
    with pytest.raises(ValueError, match="model_type='mistral'"):
        dsj.hf.config_from_hf({**base, "model_type": "mistral"})
    with pytest.raises(ValueError, match="rope_scaling type 'linear'"):
        dsj.hf.config_from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})


def test_info_cli_json():
    out = subprocess.run([sys.executable, "-m", "deepseek_jax.cli", "info", "--config", "deepseek-v3-671b", "--json"],
                         capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    assert {"params_total", "params_active", "params_mtp", "kv_cache_bytes_per_token"} <= set(info)
    assert info["kv_cache_bytes_per_token"] == 70_272
    bad = subprocess.run([sys.executable, "-m", "deepseek_jax.cli", "info", "--config", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not found" in bad.stderr
