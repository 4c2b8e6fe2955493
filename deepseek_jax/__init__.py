"""deepseek_jax: DeepSeek LLM / V2 / V2-Lite / V3 in JAX + Flax Linen.

Public API (see README): ``ModelConfig``, ``load_config``, ``Transformer``, ``ModelOutput``,
``forward``, ``init_variables``, the ``hf`` module (``hf.load_checkpoint``, ``hf.save_checkpoint``), and
``train`` / ``data`` / ``optim`` (the training job behind ``deepseek-jax train``).
"""

from deepseek_jax import attention, data, expert_parallel, fp8, generate as generation, hf, layers, layout, losses, moe, optim, rope, sharding, train
from deepseek_jax.config import (AttentionConfig, MoEConfig, MTPConfig, ModelConfig, RopeConfig, RouterConfig,
                                 YarnConfig, load_config)
from deepseek_jax.generate import generate, init_cache, load_run
from deepseek_jax.info import model_info
from deepseek_jax.model import DecoderLayer, ModelOutput, Transformer, abstract_variables, forward, init_variables

__version__ = "0.1.0"

__all__ = [
    "ModelConfig", "AttentionConfig", "MoEConfig", "RouterConfig", "MTPConfig", "RopeConfig", "YarnConfig",
    "load_config", "Transformer", "ModelOutput", "forward", "init_variables", "abstract_variables",
    "model_info", "generate", "generation", "init_cache", "load_run", "hf", "train", "data", "optim", "fp8", "sharding", "expert_parallel", "layout", "losses", "moe", "attention", "layers", "rope", "DecoderLayer", "__version__",
]
