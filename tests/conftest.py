"""Shared fixtures. Fakes 8 CPU devices before JAX is imported, and enables float32 matmuls at full precision."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_cfg():
    import deepseek_jax as dsj

    return dsj.load_config("tiny")


@pytest.fixture(scope="session")
def tiny_vars(tiny_cfg):
    import deepseek_jax as dsj

    return dsj.init_variables(tiny_cfg, 0)


@pytest.fixture(scope="session")
def jit_apply():
    """``jit_apply(cfg)(variables, tokens, positions=None, segment_ids=None) -> ModelOutput``, compiled once per cfg."""
    import functools

    import deepseek_jax as dsj

    @functools.lru_cache(maxsize=None)
    def make(cfg):
        return jax.jit(lambda v, t, positions=None, segment_ids=None:
                       dsj.Transformer(cfg).apply(v, t, positions=positions, segment_ids=segment_ids))

    return make
