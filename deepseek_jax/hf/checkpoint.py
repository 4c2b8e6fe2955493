"""Load and save Hugging Face checkpoints (``deepseek_v3``, ``deepseek_v2``, ``llama``).

Loading streams: the result's leaves are allocated once (shapes from ``jax.eval_shape``), then each
checkpoint tensor is read from its memory-mapped file, dequantised if FP8, converted and written into
its slice, and dropped. Peak host memory is the result plus about one tensor (plus, for FP8, its
float32 dequantised copy). Every leaf is then handed to JAX one at a time.

FP8 weights (``float8_e4m3fn`` with ``weight_scale_inv [ceil(N/128), ceil(K/128)]``, the
dequantisation multiplier, partial edge blocks allowed) are dequantised as
``W[i, j] = W_fp8[i, j] * weight_scale_inv[i // 128, j // 128]`` in float32 -- or, with
``keep_fp8=True``, kept: the parameter leaf holds the FP8 values in our ``[in, out]`` layout and the
collection ``"fp8_scale"`` holds the same scales transposed (``[ceil(K/128), ceil(N/128)]`` per layer and
expert), and the model's FP8 path runs on them (see :func:`deepseek_jax.layers.param`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.hf.config import config_from_hf, config_to_hf
from deepseek_jax.hf.mapping import Rule, hf_rules, mtp_copies
from deepseek_jax.hf.safetensors_io import SafetensorsFile, write_safetensors
from deepseek_jax.nn import tree
from deepseek_jax.nn.transformer import abstract_variables

__all__ = ["load_checkpoint", "save_checkpoint", "dequantize_blockwise"]

log = logging.getLogger(__name__)
_IGNORED = re.compile(r"(rotary_emb\.inv_freq)$")
_FP8 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))


def dequantize_blockwise(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = (128, 128)) -> np.ndarray:
    """``w [N, K]`` (FP8) times its per-block multiplier ``scale_inv [ceil(N/bn), ceil(K/bk)]`` -> float32."""
    n, k = w.shape
    bn, bk = block
    want = (math.ceil(n / bn), math.ceil(k / bk))
    if scale_inv.shape != want:
        raise ValueError(f"weight_scale_inv has shape {scale_inv.shape}, expected {want} for weight {w.shape}")
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), bn, axis=0), bk, axis=1)[:n, :k]
    return w.astype(np.float32) * s


class _Checkpoint:
    """Name -> file lookup over a checkpoint directory (single file or sharded with an index)."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {path}")
        self.files = {f: SafetensorsFile(path / f) for f in files}
        self.where: dict[str, str] = {}
        for f, st in self.files.items():
            for name in st.names():
                self.where[name] = f
        if weight_map is not None:
            missing = sorted(n for n in weight_map if n not in self.where)
            if missing:
                raise ValueError(f"{index} lists tensors absent from their files: {missing[:5]}")

    def get(self, name: str) -> np.ndarray:
        return self.files[self.where[name]].get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[self.where[name]].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self.files[self.where[name]].dtype(name)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _leaf_key(rule: Rule) -> tuple[str, ...]:
    return (rule.collection,) + rule.path


def load_checkpoint(path: str | Path, dtype: Any = jnp.float32, mtp: bool | None = None,
                    keep_fp8: bool = False) -> tuple[ModelConfig, dict]:
    """Load a Hugging Face checkpoint directory into ``(ModelConfig, variables)``.

    ``dtype`` is the parameter and compute dtype of the result. ``mtp=None`` loads the MTP layers
    when the checkpoint has them (``transformers`` drops them on save); ``False`` skips them;
    ``True`` requires them. A missing tensor, a wrong shape or an unknown tensor raises
    ``ValueError`` naming it.

    ``keep_fp8=True`` keeps FP8 weights as FP8 (1 byte per value) with their ``weight_scale_inv``
    blocks in the ``"fp8_scale"`` collection, and returns a config with ``fp8`` on, so the weights run
    through the FP8 path (whose weight quantisation gives back exactly the stored blocks) instead of
    being dequantised at load. A weight is kept FP8 when every checkpoint tensor of its variable is FP8
    with 128x128 blocks (else it is dequantised, as without the option).
    """
    path = Path(path)
    cfg = config_from_hf(path)
    dt_name = jnp.dtype(dtype).name
    ckpt = _Checkpoint(path)
    try:
        present_mtp = any(_layer_of(n) is not None and _layer_of(n) >= cfg.n_layers for n in ckpt.where)
        if cfg.mtp.depth and mtp is None and not present_mtp:
            log.warning("%s declares %d MTP layer(s) but holds none; loading without MTP", path, cfg.mtp.depth)
        depth = cfg.mtp.depth if (mtp or (mtp is None and present_mtp)) else 0
        cfg = cfg.replace(dtype=dt_name, param_dtype=dt_name, **{"mtp.depth": depth})
        block = tuple(json.loads((path / "config.json").read_text()).get("quantization_config", {})
                      .get("weight_block_size", (128, 128)))
        variables = _read(cfg, ckpt, np.dtype(jnp.dtype(dtype)), block, keep_fp8)
        if tree.FP8_SCALE in variables and cfg.fp8 is None:
            cfg = cfg.replace(fp8=True)
    finally:
        ckpt.close()
    return cfg, variables


def _layer_of(name: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _keeps_blocks(rule: Rule, block: tuple[int, int]) -> bool:
    """Whether ``rule`` maps each 128x128 block of the checkpoint weight onto one block of ours (its RoPE
    row permutation, if any, stays inside blocks), so the released scales stay valid."""
    if block != (128, 128) or rule.rows is None:
        return block == (128, 128)
    return bool(np.all(rule.rows // 128 == np.arange(len(rule.rows)) // 128))


def _read(cfg: ModelConfig, ckpt: _Checkpoint, np_dtype: np.dtype, block: tuple[int, int],
          keep_fp8: bool = False) -> dict:
    rules = hf_rules(cfg)
    by_name = {r.hf_name: r for r in rules}
    copies = mtp_copies(cfg)
    names = set(ckpt.where)
    missing = [r.hf_name for r in rules if r.hf_name not in names]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:5]}")
    def unused(n: str) -> bool:
        if n in by_name or n in copies or n.endswith("_scale_inv") or _IGNORED.search(n):
            return False
        layer = _layer_of(n)  # MTP layers are skipped when loading without MTP
        return not (cfg.mtp.depth == 0 and layer is not None and layer >= cfg.n_layers)

    extra = sorted(filter(unused, names))
    if extra:
        raise ValueError(f"checkpoint has {len(extra)} tensor(s) this config does not use, e.g. {extra[:5]}")

    template = nn.meta.unbox(abstract_variables(cfg))
    flat = {tuple(k.key for k in kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(template)[0]}
    fp8_keys: set = set()
    if keep_fp8:
        by_key: dict = {}
        for r in rules:
            by_key.setdefault(_leaf_key(r), []).append(r)
        fp8_keys = {key for key, rs in by_key.items() if rs[0].n_in is not None and all(
            ckpt.dtype(r.hf_name) in _FP8 and r.hf_name + "_scale_inv" in ckpt.where and _keeps_blocks(r, block)
            for r in rs)}
    leaves = {key: np.empty(s.shape, ml_dtypes.float8_e4m3fn if key in fp8_keys else np_dtype)
              for key, s in flat.items()}
    scales = {}
    for key in fp8_keys:
        rule = by_key[key][0]
        lead = flat[key].shape[:len(rule.index)]
        fan_in = math.prod(flat[key].shape[len(rule.index):len(rule.index) + rule.n_in])
        fan_out = flat[key].size // math.prod(lead) // fan_in
        scales[key] = np.empty(lead + (math.ceil(fan_in / 128), math.ceil(fan_out / 128)), np.float32)
    filled = {key: 0 for key in flat}
    for rule in sorted(rules, key=lambda r: ckpt.where[r.hf_name]):  # one file at a time
        key = _leaf_key(rule)
        if key in fp8_keys:
            w = ckpt.get(rule.hf_name).astype(ml_dtypes.float8_e4m3fn)
            scales[key][rule.index] = ckpt.get(rule.hf_name + "_scale_inv").astype(np.float32).T
        else:
            w = _tensor(ckpt, rule.hf_name, block)
        if w.shape != rule.hf_shape:
            raise ValueError(f"tensor {rule.hf_name} has shape {w.shape}, expected {rule.hf_shape}")
        leaves[key][rule.index] = rule.to_ours(w)
        filled[key] += w.size
        del w
    for mtp_name, main_name in copies.items():  # must equal the shared tensor they duplicate
        if mtp_name in names and not np.array_equal(_tensor(ckpt, mtp_name, block), _tensor(ckpt, main_name, block)):
            log.warning("%s differs from %s; the shared %s is used", mtp_name, main_name, main_name)
    unfilled = [k for k in flat if filled[k] != leaves[k].size]
    assert not unfilled, f"internal: variables not covered by the name map: {unfilled}"

    out: dict = {}
    for key in list(leaves):
        node = out
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = jnp.asarray(leaves.pop(key))  # one leaf at a time
    for key, sc in scales.items():
        node = out.setdefault(tree.FP8_SCALE, {})
        for part in key[1:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = jnp.asarray(sc)
    return out


def _tensor(ckpt: _Checkpoint, name: str, block: tuple[int, int]) -> np.ndarray:
    w = ckpt.get(name)
    if w.dtype in _FP8:
        scale_name = name + "_scale_inv"
        if scale_name not in ckpt.where:
            raise ValueError(f"FP8 tensor {name} has no {scale_name}")
        return dequantize_blockwise(w, ckpt.get(scale_name), block)
    return w.astype(np.float32)


def save_checkpoint(cfg: ModelConfig, variables: dict, path: str | Path, max_shard_bytes: int = 4 << 30,
                    dtype: Any = None) -> Path:
    """Write ``variables`` as a Hugging Face checkpoint directory that ``transformers`` loads.

    Tensors are written in ``dtype`` (default: the variables' own), sharded into files of at most
    ``max_shard_bytes`` with ``model.safetensors.index.json`` when more than one. Each file is written
    to a temporary name and renamed, so a crash never leaves a truncated file under a final name.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    variables = nn.meta.unbox(variables)
    rules = hf_rules(cfg)
    by_name = {r.hf_name: r for r in rules}
    names = [r.hf_name for r in rules] + list(mtp_copies(cfg))

    def tensor(name: str) -> np.ndarray:
        rule = by_name[mtp_copies(cfg).get(name, name)]
        node = variables[rule.collection]
        for part in rule.path:
            node = node[part]
        x = np.asarray(node[rule.index] if rule.index else node)
        out = rule.to_hf(x)
        return out.astype(np.dtype(jnp.dtype(dtype)) if dtype is not None else x.dtype)

    itemsize = np.dtype(jnp.dtype(dtype)).itemsize if dtype is not None else 4
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = math.prod(by_name[mtp_copies(cfg).get(name, name)].hf_shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(path / fname, ((n, tensor(n)) for n in shard), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    if len(shards) > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    hf_cfg = config_to_hf(cfg)
    if dtype is not None:
        hf_cfg["torch_dtype"] = jnp.dtype(dtype).name
    (path / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    return path
