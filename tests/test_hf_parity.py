"""Parity with ``transformers`` (fp32) on tiny random checkpoints, through our Hugging Face loader."""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax.hf.mapping import hf_rules
from deepseek_jax.hf.safetensors_io import SafetensorsFile, write_safetensors

import hf_reference as R

TOL = 1e-4
TOKENS = np.random.RandomState(0).randint(0, 512, (2, 16))  # S >= 8 so YaRN's m^2 matters

CASES = {
    "v3_qlora_groups_yarn": R.V3_TINY,
    "v3_no_qlora": {**R.V3_TINY, "q_lora_rank": None},
    "v2_softmax_greedy": R.V2_TINY,
    "v2_group_limited": {**R.V2_TINY, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                         "q_lora_rank": 128, "routed_scaling_factor": 16.0},
    "llama_gqa": R.LLAMA_TINY,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    model = R.build(CASES[case])
    model.save_pretrained(tmp_path)  # transformers 5 writes the newer `rope_parameters` dialect
    cfg, variables = dsj.hf.load_checkpoint(tmp_path)
    ours = np.asarray(dsj.forward(cfg, variables, TOKENS))
    err = R.rel_err(ours, R.logits(model, TOKENS))
    print(f"parity {case}: max|dlogit|/max|logit| = {err:.2e}")
    assert err <= TOL


def _quantize_blocks(w: np.ndarray, block=128):
    """DeepSeek's 128x128 block quantiser (DeepGEMM per_block_cast_to_fp8): scale = amax / 448."""
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    pad = np.zeros((nb * block, kb * block), np.float32)
    pad[:n, :k] = w
    blocks = pad.reshape(nb, block, kb, block)
    amax = np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-4)
    scale = (amax / 448.0).astype(np.float32)
    q = (blocks / scale[:, None, :, None]).astype(ml_dtypes.float8_e4m3fn).reshape(nb * block, kb * block)[:n, :k]
    return q, scale


def _released_checkpoint(tmp_path):
    """A released-layout V3 checkpoint: legacy config dialect, FP8 weights + weight_scale_inv (partial edge
    blocks: 192- and 160-row weights), MTP layer present, split across two shards with an index."""
    hf_cfg = {**R.V3_TINY, "num_nextn_predict_layers": 1}
    model = R.build(hf_cfg)
    model.save_pretrained(tmp_path / "hf")
    with SafetensorsFile(tmp_path / "hf" / "model.safetensors") as f:
        tensors = {n: f.get(n) for n in f.names()}
    rng = np.random.RandomState(1)
    cfg_mtp = dsj.hf.config_from_hf({**hf_cfg, "num_nextn_predict_layers": 1})
    for rule in hf_rules(cfg_mtp):  # an MTP layer, as in the released checkpoint (layer n_layers)
        if rule.hf_name.startswith("model.layers.3."):
            tensors[rule.hf_name] = (rng.randn(*rule.hf_shape) * 0.02).astype(np.float32)
    tensors["model.layers.3.embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
    tensors["model.layers.3.shared_head.head.weight"] = tensors["lm_head.weight"]

    fp8_kinds = ("_proj.weight",)
    released, dequantized = {}, {}
    for name, w in tensors.items():
        if name.endswith(fp8_kinds) and w.ndim == 2 and "eh_proj" not in name:
            q, s = _quantize_blocks(w.astype(np.float32))
            released[name], released[name + "_scale_inv"] = q, s
            dequantized[name] = dsj.hf.dequantize_blockwise(q, s)
        else:
            released[name] = w.astype(ml_dtypes.bfloat16) if "norm" in name else w
            dequantized[name] = released[name].astype(np.float32)
    assert released["model.layers.0.self_attn.q_b_proj.weight_scale_inv"].shape == (2, 1)  # 192 rows: partial block

    ckpt = tmp_path / "released"
    ckpt.mkdir()
    names = sorted(released)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, part in shards.items():
        write_safetensors(ckpt / fname, {n: released[n] for n in part})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}))
    legacy = {k: v for k, v in hf_cfg.items()}
    legacy["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (ckpt / "config.json").write_text(json.dumps(legacy))

    return ckpt, hf_cfg, released, dequantized


def test_released_v3_fp8_layout_matches_transformers_on_dequantized_weights(tmp_path):
    ckpt, hf_cfg, released, dequantized = _released_checkpoint(tmp_path)
    cfg, variables = dsj.hf.load_checkpoint(ckpt)
    assert cfg.mtp.depth == 1 and cfg.rope.yarn.factor == 4.0

    import torch

    with torch.no_grad():  # reference: transformers on the dequantised weights (MTP layer not in HF)
        sd = {k: torch.from_numpy(v) for k, v in dequantized.items() if not k.startswith("model.layers.3.")}
        ref_dir = tmp_path / "deq"
        ref_dir.mkdir()
        write_safetensors(ref_dir / "model.safetensors", {k: v.numpy() for k, v in sd.items()})
        (ref_dir / "config.json").write_text(json.dumps({**hf_cfg, "architectures": ["DeepseekV3ForCausalLM"]}))
        import transformers

        ref_model = transformers.DeepseekV3ForCausalLM.from_pretrained(ref_dir, torch_dtype=torch.float32).eval()
    out = dsj.Transformer(cfg).apply(variables, TOKENS)
    err = R.rel_err(np.asarray(out.logits), R.logits(ref_model, TOKENS))
    print(f"parity released-V3 FP8 layout: {err:.2e}")
    assert err <= TOL
    assert out.mtp_logits.shape == (1, 2, 16, 512)
    # the loaded MTP eh_proj equals the checkpoint tensor, transposed to [in, out]
    np.testing.assert_array_equal(np.asarray(variables["params"]["mtp_0"]["eh_proj"]),
                                  released["model.layers.3.eh_proj.weight"].T)


def test_released_fp8_checkpoint_kept_in_fp8(tmp_path):
    """``keep_fp8=True``: the FP8 weights stay FP8 (half of bf16's bytes), the FP8 path re-quantises them to
    exactly the stored blocks, and the logits match the dequantised load within the FP8 activation error."""
    import jax

    from deepseek_jax.kernels import fp8

    ckpt, _, released, _ = _released_checkpoint(tmp_path)
    cfg, deq = dsj.hf.load_checkpoint(ckpt)
    cfg8, kept = dsj.hf.load_checkpoint(ckpt, keep_fp8=True)
    assert cfg.fp8 is None and cfg8.fp8 is not None
    wq_b = kept["params"]["dense_layers"]["attn"]["wq_b"]
    assert wq_b.dtype == jnp.float8_e4m3fn and kept["fp8_scale"]["dense_layers"]["attn"]["wq_b"].shape == (1, 1, 2)
    # the stored scales are the checkpoint's, transposed to our [in, out] layout
    np.testing.assert_array_equal(np.asarray(kept["fp8_scale"]["moe_layers"]["ffn"]["w2"][1, 3]),
                                  released["model.layers.2.mlp.experts.3.down_proj.weight_scale_inv"].T)
    # re-quantising a kept weight (as the FP8 path does) gives back its own FP8 values, bit for bit
    w = np.asarray(deq["params"]["moe_layers"]["ffn"]["w1"][0, 5])
    q, _ = fp8.quantize(jnp.asarray(w), (128, 128))
    np.testing.assert_array_equal(np.asarray(q.astype(jnp.float32)),
                                  np.asarray(kept["params"]["moe_layers"]["ffn"]["w1"][0, 5].astype(jnp.float32)))

    fp8_leaves = [x for x in jax.tree_util.tree_leaves(kept["params"]) if x.dtype == jnp.float8_e4m3fn]
    n_fp8 = sum(x.size for x in fp8_leaves)
    n_expected = sum(v.size for k, v in released.items() if v.dtype == ml_dtypes.float8_e4m3fn
                     and not k.startswith("model.layers.3."))  # the MTP layer's weights count below
    n_expected += sum(v.size for k, v in released.items() if k.startswith("model.layers.3.") and v.dtype ==
                      ml_dtypes.float8_e4m3fn)
    assert n_fp8 == n_expected
    bytes_fp8 = fp8.weight_bytes(fp8_leaves)
    bytes_bf16 = 2 * n_fp8
    bytes_scales = fp8.weight_bytes(kept["fp8_scale"])
    print(f"FP8-held weights: {bytes_fp8} B vs {bytes_bf16} B in bf16 (+{bytes_scales} B of scales)")
    assert bytes_fp8 * 2 == bytes_bf16

    # decoding reads the kept FP8 weights through their scales too: the same tokens as the dequantised load
    prompts = [[1, 2, 3], [4, 5]]
    assert dsj.generate(cfg8, kept, prompts, 6, eos_id=-1) == dsj.generate(cfg8, deq, prompts, 6, eos_id=-1)
    out_kept = dsj.Transformer(cfg8).apply(kept, TOKENS)
    out_same_path = dsj.Transformer(cfg8).apply(deq, TOKENS)  # FP8 path on the dequantised weights
    out_deq = dsj.Transformer(cfg).apply(deq, TOKENS)  # plain float32 on the dequantised weights
    np.testing.assert_allclose(np.asarray(out_kept.logits), np.asarray(out_same_path.logits), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out_kept.mtp_logits), np.asarray(out_same_path.mtp_logits), rtol=0, atol=1e-6)
    a, b = np.asarray(out_kept.logits), np.asarray(out_deq.logits)
    err = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    print(f"keep_fp8 logits vs dequantised load: |d|/|logits| = {err:.3f}, max|d|/max|logit| = {R.rel_err(a, b):.3f}")
    # Only the activations differ: E4M3 rounds each to at most 2^-4 relative (RMS ~2^-4/sqrt(3) = 3.6%), and
    # a token's path crosses ~12 FP8 GEMMs in a row (3 layers x q_a, q_b, kv_a, kv_b, o, w1/w3, w2 + MTP-free
    # head path): sqrt(12) x 3.6% = 12.5% expected at random init; a wrong scale layout errs by O(100%).
    assert 1e-4 < err < 0.2


def _randomize_norms(variables, seed=0):
    import jax

    rng = np.random.RandomState(seed)

    def f(path, x):
        keys = [getattr(k, "key", "") for k in path]
        if keys[-1] == "scale":
            return np.asarray(rng.uniform(0.8, 1.2, x.shape), np.float32)
        if keys[-1] == "e_score_correction_bias":
            return np.asarray(rng.uniform(-0.05, 0.05, x.shape), np.float32)
        return x

    return jax.tree_util.tree_map_with_path(f, variables)


@pytest.mark.parametrize("preset", ["tiny", "llama"])
def test_save_checkpoint_round_trip_through_transformers(preset, tmp_path):
    import transformers
    import torch

    if preset == "tiny":
        cfg = dsj.load_config("tiny")
    else:
        cfg = dsj.hf.config_from_hf(R.LLAMA_TINY)
    variables = _randomize_norms(dsj.init_variables(cfg, 3))
    dsj.hf.save_checkpoint(cfg, variables, tmp_path, max_shard_bytes=2 << 20)  # forces several shards
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    err = R.rel_err(np.asarray(dsj.forward(cfg, variables, TOKENS)), R.logits(model, TOKENS))
    print(f"save round trip {preset}: {err:.2e}")
    assert err <= TOL
    cfg2, variables2 = dsj.hf.load_checkpoint(tmp_path)  # and back: identical variables, MTP included
    assert cfg2.mtp.depth == cfg.mtp.depth
    import jax

    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           variables, variables2)
