"""Small building blocks shared by the attention, MoE and model modules.

Every parameter is created through :func:`param` with *logical axis names* (one per dimension);
:data:`deepseek_jax.parallel.rules.RULES` maps those names to mesh axes. Logical names of parameters:
``vocab, embed, mlp, heads, kv_heads, head_dim, qk_head, kv_head, v_head, q_lora, kv_lora, q_latent,
kv_latent, exp, mlp_moe, mtp_concat, norm``
(``layers`` is prepended by ``nn.scan``).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax.config import ModelConfig
from deepseek_jax.kernels import fp8 as fp8_ops
from deepseek_jax.nn import tree
from deepseek_jax.parallel.fsdp import fsdp_active, fsdp_matmul, fsdp_take
from deepseek_jax.parallel.rules import constrain, fsdp_gather

__all__ = ["param", "Weight", "linear", "take", "RMSNorm", "MLP"]


class Weight(NamedTuple):
    """A parameter as stored (split over ``fsdp`` on a mesh) with its logical axis names: :func:`linear` and
    :func:`take` gather it inside the product that uses it, so its gradient is one reduce-scatter
    (:mod:`deepseek_jax.parallel.fsdp`). ``gathered()`` is the whole array, for any other use."""

    value: jax.Array
    names: tuple[str, ...]

    def gathered(self) -> jax.Array:
        return fsdp_gather(self.value, self.names)

    def astype(self, dtype) -> "Weight":
        return Weight(self.value.astype(dtype), self.names)

    @property
    def T(self) -> "Weight":  # noqa: N802 - like jax.Array.T
        return Weight(self.value.T, self.names[::-1])


def param(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str], std: float | None,
          dtype: jnp.dtype, n_in: int = 1, gather: bool = True) -> jax.Array | Weight:
    """A parameter with logical axes ``axes``; normal(std) init, or ones when ``std is None`` (norms).
    ``gather=False`` returns it as stored, a :class:`Weight` for :func:`linear` / :func:`take`; otherwise
    it is gathered whole where it is read (:func:`~deepseek_jax.parallel.rules.fsdp_gather`).

    A weight stored as FP8 (``hf.load_checkpoint(..., keep_fp8=True)``) comes with its 128x128 block
    scales in the ``"fp8_scale"`` collection (``[..., ceil(K/128), ceil(N/128)]`` over the flattened
    ``[in, out]`` matrix, ``n_in`` leading dims being inputs, one grid per leading index such as an
    expert); it is returned as ``q * scale`` in ``dtype``, which the FP8 path re-quantises to exactly
    ``q`` and ``scale``.
    """
    assert len(shape) == len(axes), (name, shape, axes)
    init = nn.initializers.ones if std is None else nn.initializers.normal(std)
    value = module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)
    if jnp.dtype(value.dtype).itemsize == 1 and jnp.issubdtype(value.dtype, jnp.floating):
        value = _dequantize_param(module, name, value, n_in, dtype)
    if not gather:
        return Weight(value, tuple(axes))
    return fsdp_gather(value, axes)  # ZeRO-3: stored sharded over fsdp, used whole


def _dequantize_param(module: nn.Module, name: str, q: jax.Array, n_in: int, dtype) -> jax.Array:
    if not module.has_variable(tree.FP8_SCALE, name):
        raise ValueError(f"parameter {module.path}/{name} is FP8 ({q.dtype}) but has no 'fp8_scale' entry; "
                         "load FP8 checkpoints with hf.load_checkpoint(..., keep_fp8=True)")
    scale = module.get_variable(tree.FP8_SCALE, name)
    lead = q.shape[:scale.ndim - 2]  # one block grid per leading index (e.g. per expert)
    k = math.prod(q.shape[len(lead):len(lead) + n_in])
    return fp8_ops.dequantize(q.reshape(lead + (k, -1)), scale, (128, 128)).reshape(q.shape).astype(dtype)


def linear(x: jax.Array, w: jax.Array | Weight, n_in: int = 1, fp8=None) -> jax.Array:
    """Contract the last ``n_in`` dims of ``x`` with the first ``n_in`` of ``w`` as ONE 2-D matmul.

    ``x[..., i1..in] · w[i1..in, o1..om] -> [..., o1..om]`` (same math as the einsum; the 2-D form is what
    the CPU backend runs fastest, see ``benchmarks/forward.py``). ``fp8`` (an
    :class:`~deepseek_jax.config.FP8Config`, i.e. ``cfg.fp8`` of the layers that run in FP8) takes the 2-D
    product through :func:`deepseek_jax.kernels.fp8.dense` (1x128 activation tiles, 128x128 blocks of the
    flattened ``[in, out]`` weight -- the checkpoint's blocks, transposed). The embedding, head and router
    pass no ``fp8``: they stay in high precision, as in DeepSeek-V3. A :class:`Weight` is gathered inside the
    product on an FSDP mesh (:func:`~deepseek_jax.parallel.fsdp.fsdp_matmul`; ``x``'s first dim is the
    batch); with ``fp8`` it is gathered first (its 128x128 blocks need the whole matrix).
    """
    if isinstance(w, Weight):
        if fp8 is None and fsdp_active():
            return fsdp_matmul(x, w.value, n_in, w.names, lambda a, b: linear(a, b, n_in))
        w = w.gathered()
    lead, ins, outs = x.shape[: x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
    k = math.prod(ins)
    if fp8 is None:
        y = x.reshape(-1, k) @ w.astype(x.dtype).reshape(k, -1)
    else:
        y = fp8_ops.dense(x.reshape(-1, k), w.reshape(k, -1), fp8.scale_fmt, fp8_ops.resolve_impl(fp8))
    return y.reshape(lead + outs)


def take(table: jax.Array | Weight, ids: jax.Array) -> jax.Array:
    """Embedding rows ``table[ids]`` (``ids[B, ...]``); a :class:`Weight` is looked up shard-locally."""
    if isinstance(table, Weight):
        if fsdp_active():
            return fsdp_take(table.value, ids, table.names)
        table = table.gathered()
    return jnp.take(table, ids, axis=0)


class RMSNorm(nn.Module):
    """``y = w * cast(x_f32 * rsqrt(mean(x_f32^2) + eps))`` (normalise in float32, then scale)."""

    dim: int
    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = param(self, "scale", (self.dim,), ("norm",), None, self.param_dtype)
        xf = x.astype(jnp.float32)
        y = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
        return w.astype(x.dtype) * y


class MLP(nn.Module):
    """SwiGLU MLP ``w2(silu(x w1) * (x w3))``.

    ``x[B_batch, T, D] · W1[D_fsdp, F_tensor] -> h[B_batch, T, F_tensor] · W2[F_tensor, D_fsdp] -> {U_tensor}``:
    the hidden is split over ``tensor``; the down-projection's partial sums are all-reduced over it.
    """

    cfg: ModelConfig
    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, pd = self.cfg, jnp.dtype(self.cfg.param_dtype)
        w1 = param(self, "w1", (c.d_model, self.hidden), ("embed", "mlp"), c.init_std, pd, gather=False)
        w3 = param(self, "w3", (c.d_model, self.hidden), ("embed", "mlp"), c.init_std, pd, gather=False)
        w2 = param(self, "w2", (self.hidden, c.d_model), ("mlp", "embed"), c.init_std, pd, gather=False)
        h = jax.nn.silu(checkpoint_name(linear(x, w1, fp8=c.fp8), "mlp_in")) * checkpoint_name(
            linear(x, w3, fp8=c.fp8), "mlp_in")
        h = constrain(h, "act_batch", "act_length", "act_mlp")
        return linear(h, w2, fp8=c.fp8)
