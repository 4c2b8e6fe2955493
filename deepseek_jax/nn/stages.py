"""The model cut into pipeline stages (pipeline.md §6): the MoE layer stack split evenly over the stages; the
embedding and the dense-MLP layers run before the first stage, the final norm, head and MTP modules after the
last. What runs before and after every stage is *shared* (replicated over ``stage``; its gradients are summed
over the stages, where only the end stages contribute).

    split_variables(cfg, variables, n)  ->  stage variables [n, L/n, ...] (params and router bias), shared ones
    front(cfg, shared, tokens, ...)     ->  x [b, t, d]                 embedding + dense stack
    stage(cfg, w, x, ...)               ->  x, expert load [L/n, e], balance terms
    back(cfg, shared, x, tokens, ...)   ->  ModelOutput (logits, mtp_logits, MTP loads), MTP balance terms

These are plain functions of variables (each applies a small Linen module over a subset of the tree, with
the same names as :class:`~deepseek_jax.nn.transformer.Transformer`), so the pipeline executor can call them
per device.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from deepseek_jax.config import ModelConfig
from deepseek_jax.nn import tree
from deepseek_jax.nn.block import layer_stack
from deepseek_jax.nn.transformer import ModelOutput, embed_and_dense, embedding_params, head_and_mtp

__all__ = ["check_stages", "split_variables", "join_stage_tree", "front", "stage", "back"]


def check_stages(cfg: ModelConfig, n_stages: int) -> int:
    """Layers per stage; raises naming the fields when the MoE stack does not split evenly."""
    if cfg.n_moe_layers == 0:
        raise ValueError("pipeline: the model has no MoE layer stack to split over stages (n_moe_layers = 0)")
    if cfg.n_moe_layers % n_stages:
        raise ValueError(f"pipeline: {cfg.n_moe_layers} MoE layers (n_layers - first_k_dense_replace) do not split "
                         f"evenly over {n_stages} stages; choose a stage count that divides them")
    return cfg.n_moe_layers // n_stages


def split_variables(cfg: ModelConfig, variables: dict, n_stages: int) -> tuple[dict, dict]:
    """``({params, router} of the MoE stack as [n_stages, L/n, ...], every other variable)``."""
    per = check_stages(cfg, n_stages)
    cut = lambda a: a.reshape((n_stages, per) + a.shape[1:])  # noqa: E731
    stages, shared = {}, {}
    for col in (tree.PARAMS, tree.ROUTER):
        if col in variables:
            stages[col] = jax.tree.map(cut, variables[col][tree.MOE_STACK])
            shared[col] = {k: v for k, v in variables[col].items() if k != tree.MOE_STACK}
    return stages, shared


def join_stage_tree(stages: dict, shared: dict) -> dict:
    """Inverse of :func:`split_variables` for one collection (e.g. gradients of ``params``):
    ``stages [n, L/n, ...]`` and the shared part -> the model's tree."""
    flat = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), stages)
    return {**shared, tree.MOE_STACK: flat}


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
    """One stage's slice of the MoE stack (``w`` leaves ``[L/n, ...]``): ``(x, load [L/n, e], sown)``."""
    per = jax.tree.leaves(w[tree.PARAMS])[0].shape[0]
    (x, load), sown = layer_stack(cfg, True, per, tree.MOE_STACK, remat).apply(
        w, x, positions, segment_ids, mutable=[tree.INTERMEDIATES])
    return x, load, sown


def back(cfg: ModelConfig, shared: dict, x, tokens, positions, segment_ids, remat: str = "none"
         ) -> tuple[ModelOutput, dict]:
    """Final norm, head and MTP modules: ``(ModelOutput, sown)``."""
    return _Back(cfg, remat).apply(shared, x, tokens, positions, segment_ids, mutable=[tree.INTERMEDIATES])
