"""The model cut into pipeline stages (pipeline.md §6): the MoE layer stack split over the stages (evenly, or
unevenly as :func:`stage_split` states); the embedding and the dense-MLP layers run before the first stage,
the final norm, head and MTP modules after the last. What runs before and after every stage is *shared*
(replicated over ``stage``; its gradients are summed over the stages, where only the end stages contribute).

    split_variables(cfg, variables, n)  ->  stage variables [n, m, ...] (params, router bias, active mask), shared
    front(cfg, shared, tokens, ...)     ->  x [b, t, d]                 embedding + dense stack
    stage(cfg, w, x, ...)               ->  x, expert load [m, e], balance loss terms (summed)
    back(cfg, shared, x, tokens, ...)   ->  ModelOutput (logits, mtp_logits, MTP loads), MTP balance terms

These are plain functions of variables (each applies a small Linen module over a subset of the tree, with
the same names as :class:`~deepseek_jax.nn.transformer.Transformer`), so the pipeline executor can call them
per device.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.nn import tree
from deepseek_jax.nn.block import layer_cls, scan_unroll
from deepseek_jax.nn.transformer import ModelOutput, embed_and_dense, embedding_params, head_and_mtp

__all__ = ["stage_split", "split_tree", "split_variables", "join_layers", "join_stage_tree", "front", "stage", "back"]


def stage_split(cfg: ModelConfig, n_stages: int, split: Sequence[int] | None = None) -> tuple[int, ...]:
    """MoE layers per stage. ``split=None``: as even as possible; when the layers do not divide, the extra
    layers go to the middle stages first, then the last, then the first (the first stage also runs the
    embedding and the dense layers, the last the head and the MTP modules). An explicit ``split`` must list
    one count >= 1 per stage summing to the MoE layers. Uneven stages are padded to the longest with
    inactive layer slots (copies, passed through): a lock-step tick lasts as long as the longest stage
    anyway, so the padding costs memory (one layer per missing slot), not time."""
    n = cfg.n_moe_layers
    if n == 0:
        raise ValueError("pipeline: the model has no MoE layer stack to split over stages (n_moe_layers = 0)")
    if split is None:
        if n < n_stages:
            raise ValueError(f"pipeline: {n} MoE layers (n_layers - first_k_dense_replace) cannot fill {n_stages} "
                             "stages (each needs one); use fewer stages or more layers")
        counts = [n // n_stages] * n_stages
        for s in (list(range(1, n_stages - 1)) + [n_stages - 1, 0])[:n % n_stages]:
            counts[s] += 1
        return tuple(counts)
    split = tuple(int(c) for c in split)
    if len(split) != n_stages or sum(split) != n or min(split) < 1:
        raise ValueError(f"pipeline.split={list(split)} must give each of the {n_stages} stages at least one layer "
                         f"and sum to the {n} MoE layers (n_layers - first_k_dense_replace)")
    return split


def _slots(split: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(layer index [n, m], active [n, m])`` of the padded stage layout, ``m = max(split)``: stage ``s``'s
    slot ``j`` holds layer ``start_s + j`` if ``j < split[s]``, else a copy of its first layer (inactive)."""
    starts = np.cumsum((0,) + tuple(split))[:-1]
    m = max(split)
    j = np.arange(m)[None]
    active = j < np.asarray(split)[:, None]
    return np.where(active, starts[:, None] + j, starts[:, None]), active


def split_tree(variables: dict) -> tuple[dict, dict]:
    """``({params, router} of the MoE stack, every other variable)``, leaves as they are (arrays, logical
    names, shardings)."""
    stages, shared = {}, {}
    for col in (tree.PARAMS, tree.ROUTER):
        if col in variables:
            stages[col] = variables[col][tree.MOE_STACK]
            shared[col] = {k: v for k, v in variables[col].items() if k != tree.MOE_STACK}
    return stages, shared


def split_variables(cfg: ModelConfig, variables: dict, n_stages: int, split: Sequence[int] | None = None
                    ) -> tuple[dict, dict]:
    """``({params, router} of the MoE stack as [n_stages, m, ...] with the mask ``STAGE_ACTIVE [n_stages, m]``,
    every other variable)``; ``m`` the longest stage's layer count (:func:`stage_split`)."""
    index, active = _slots(stage_split(cfg, n_stages, split))
    stages, shared = split_tree(variables)
    stages = jax.tree.map(lambda a: a[index], stages)
    stages[tree.STAGE_ACTIVE] = jnp.asarray(active, jnp.float32)
    return stages, shared


def join_layers(a: jax.Array, split: Sequence[int]) -> jax.Array:
    """``[n, m, ...]`` per stage slot -> ``[L, ...]`` per MoE layer (inactive slots dropped)."""
    rows, cols = np.nonzero(_slots(split)[1])  # row-major: stage by stage, layer by layer
    return a[rows, cols]


def join_stage_tree(stages: dict, shared: dict, split: Sequence[int]) -> dict:
    """Inverse of :func:`split_variables` for one collection (e.g. gradients of ``params``):
    ``stages [n, m, ...]`` and the shared part -> the model's tree."""
    return {**shared, tree.MOE_STACK: jax.tree.map(lambda a: join_layers(a, split), stages)}


class _Front(nn.Module):
    cfg: ModelConfig
    remat: str = "none"

    @nn.compact
    def __call__(self, tokens, positions, segment_ids):
        embed, _ = embedding_params(self, self.cfg)
        return embed_and_dense(self.cfg, embed, tokens, positions, segment_ids, self.remat)


class _Back(nn.Module):
    cfg: ModelConfig
    remat: str = "none"

    @nn.compact
    def __call__(self, x, tokens, positions, segment_ids):
        embed, head = embedding_params(self, self.cfg)
        return head_and_mtp(self.cfg, x, embed, head, tokens, positions, segment_ids, self.remat)


def front(cfg: ModelConfig, shared: dict, tokens, positions, segment_ids, remat: str = "none") -> jax.Array:
    """Embedding and dense layers: ``tokens [b, t]`` -> ``[b, t, d]``."""
    return _Front(cfg, remat).apply(shared, tokens, positions, segment_ids)


def stage(cfg: ModelConfig, w: dict, x, positions, segment_ids, remat: str = "none"):
    """One stage's slice of the MoE stack, ``w`` leaves ``[m, ...]`` (optionally with the mask
    ``STAGE_ACTIVE [m]``): ``(x, load [m, e], balance)``, an inactive slot passing ``x`` through and counting
    no load and no balance loss. ``balance``: the sum of the layers' sequence-wise balance terms."""
    w = dict(w)
    active = w.pop(tree.STAGE_ACTIVE, None)
    m = jax.tree.leaves(w[tree.PARAMS])[0].shape[0]
    active = jnp.ones((m,), jnp.float32) if active is None else active
    layer = layer_cls(remat)(cfg, True, None)

    def body(x, slot):
        wl, on = slot
        (y, load), sown = layer.apply(wl, x, positions, segment_ids, mutable=[tree.INTERMEDIATES])
        balance = sum(jnp.sum(b) for b in tree.collect(sown, tree.BALANCE))
        return jnp.where(on > 0, y, x), (load * on, balance * on)

    x, (load, balance) = jax.lax.scan(body, x, (w, active), unroll=scan_unroll(0, m, remat))
    return x, load, jnp.sum(balance)


def back(cfg: ModelConfig, shared: dict, x, tokens, positions, segment_ids, remat: str = "none"
         ) -> tuple[ModelOutput, dict]:
    """Final norm, head and MTP modules: ``(ModelOutput, sown)``."""
    return _Back(cfg, remat).apply(shared, x, tokens, positions, segment_ids, mutable=[tree.INTERMEDIATES])
