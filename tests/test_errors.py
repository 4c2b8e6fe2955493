"""Bad input fails loudly, naming what is wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax.hf.safetensors_io import SafetensorsFile, write_safetensors


def test_token_ids_outside_vocab(tiny_cfg, tiny_vars):
    for bad in (tiny_cfg.vocab_size, -1):
        tokens = np.zeros((1, 4), np.int32)
        tokens[0, 2] = bad
        with pytest.raises(ValueError, match="vocab_size=512"):
            dsj.forward(tiny_cfg, tiny_vars, tokens)
        with pytest.raises(ValueError, match="vocab_size=512"):
            dsj.Transformer(tiny_cfg).apply(tiny_vars, tokens)
    with pytest.raises(ValueError, match="integer ids"):
        dsj.forward(tiny_cfg, tiny_vars, np.zeros((1, 4), np.float32))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_cfg, tiny_vars):
    path = tmp_path_factory.mktemp("ckpt")
    dsj.hf.save_checkpoint(tiny_cfg, tiny_vars, path)
    return path


def _rewrite(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    with SafetensorsFile(src / "model.safetensors") as f:
        tensors = {n: f.get(n) for n in f.names()}
    edit(tensors)
    write_safetensors(dst / "model.safetensors", tensors)
    return dst


def test_missing_tensor_is_named(saved, tmp_path):
    name = "model.layers.1.mlp.experts.7.down_proj.weight"
    path = _rewrite(saved, tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"missing 1 tensor.*{name}"):
        dsj.hf.load_checkpoint(path)


def test_wrong_shape_is_named(saved, tmp_path):
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    path = _rewrite(saved, tmp_path / "s", lambda t: t.__setitem__(name, t[name][:-1]))
    with pytest.raises(ValueError, match=f"{name} has shape \\(255, 128\\), expected \\(256, 128\\)"):
        dsj.hf.load_checkpoint(path)


def test_unknown_tensor_is_named(saved, tmp_path):
    path = _rewrite(saved, tmp_path / "u", lambda t: t.__setitem__("model.layers.0.self_attn.q_bias", np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match="does not use.*q_bias"):
        dsj.hf.load_checkpoint(path)


def test_fp8_without_scale_is_named(saved, tmp_path):
    import ml_dtypes

    name = "model.layers.0.mlp.up_proj.weight"
    path = _rewrite(saved, tmp_path / "f", lambda t: t.__setitem__(name, t[name].astype(ml_dtypes.float8_e4m3fn)))
    with pytest.raises(ValueError, match=f"FP8 tensor {name} has no {name}_scale_inv"):
        dsj.hf.load_checkpoint(path)


def test_inconsistent_hf_config(saved, tmp_path):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["n_routed_experts"] = 15
    with pytest.raises(ValueError, match="n_routed_experts=15 is not divisible by n_group=4"):
        dsj.hf.config_from_hf(cfg)


def test_mtp_layers_are_optional_when_absent(saved, tmp_path):
    path = _rewrite(saved, tmp_path / "nomtp", lambda t: [t.pop(n) for n in list(t) if n.startswith("model.layers.3.")])
    cfg, variables = dsj.hf.load_checkpoint(path)
    assert cfg.mtp.depth == 0 and "mtp_0" not in variables["params"]
    with pytest.raises(ValueError, match="missing.*model.layers.3"):
        dsj.hf.load_checkpoint(path, mtp=True)
