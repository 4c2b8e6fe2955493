"""Hugging Face interop: ``load_checkpoint``, ``save_checkpoint``, ``config_from_hf``, ``config_to_hf``."""

from deepseek_jax.hf.checkpoint import dequantize_blockwise, load_checkpoint, save_checkpoint
from deepseek_jax.hf.config import config_from_hf, config_to_hf, hf_model_type

__all__ = ["load_checkpoint", "save_checkpoint", "config_from_hf", "config_to_hf", "hf_model_type",
           "dequantize_blockwise"]
