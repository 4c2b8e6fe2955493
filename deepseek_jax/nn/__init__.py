"""Flax Linen modules of the DeepSeek family, and what places their variables on a mesh.

Imports only :mod:`deepseek_jax.config`, :mod:`deepseek_jax.kernels` and :mod:`deepseek_jax.parallel`."""
