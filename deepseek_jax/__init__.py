"""deepseek_jax: DeepSeek LLM / V2 / V2-Lite / V3 in JAX + Flax Linen.

The public face (see the README and ``API.md``), imported lazily: ``import deepseek_jax`` loads nothing
heavy, and ``dsj.X`` imports X's home module on first use (so importing a leaf never imports training).

Layout, bottom up (imports point down only): ``config``/``config_io``, ``kernels/``, ``parallel/`` ->
``nn/`` -> ``infer/``, ``analysis/``, ``hf/`` -> ``train/`` -> ``post_train/``, ``eval/`` -> ``cli``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute or None for the module itself)
_EXPORTS: dict[str, tuple[str, str | None]] = {
    **{n: ("deepseek_jax.config", n) for n in ("ModelConfig", "AttentionConfig", "MoEConfig", "RouterConfig",
                                              "MTPConfig", "RopeConfig", "YarnConfig", "FP8Config", "load_config")},
    **{n: ("deepseek_jax.nn.transformer", n) for n in ("Transformer", "ModelOutput", "init_variables",
                                                       "abstract_variables")},
    "DecoderLayer": ("deepseek_jax.nn.block", "DecoderLayer"),
    "forward": ("deepseek_jax.infer.forward", "forward"),
    "generate": ("deepseek_jax.infer.engine", "generate"),
    "init_cache": ("deepseek_jax.infer.cache", "init_cache"),
    "model_info": ("deepseek_jax.analysis.params", "model_info"),
    "load_run": ("deepseek_jax.train.run_dir", "load_run"),
    # subpackages and faces
    "hf": ("deepseek_jax.hf", None),
    "sharding": ("deepseek_jax.sharding", None),
    "fp8": ("deepseek_jax.kernels.fp8", None),
    "train": ("deepseek_jax.train", None),
    "infer": ("deepseek_jax.infer", None),
    "nn": ("deepseek_jax.nn", None),
    "kernels": ("deepseek_jax.kernels", None),
    "parallel": ("deepseek_jax.parallel", None),
    "analysis": ("deepseek_jax.analysis", None),
    "pipeline": ("deepseek_jax.parallel.pipeline", None),
    "post_train": ("deepseek_jax.post_train", None),
    "eval": ("deepseek_jax.eval", None),
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deepseek_jax' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value  # cache: the next lookup does not come here
    return value


def __dir__() -> list[str]:
    return __all__
