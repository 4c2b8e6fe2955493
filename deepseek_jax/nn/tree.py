"""The variable tree's names: the ONLY module that spells a path of the model's variables.

Layout of ``Transformer(cfg).init(...)`` (collections at the top)::

    params/  embed, head, final_norm/scale,
             dense_layers/ ...   moe_layers/ ...     scanned stacks: every leaf has a leading ``layers`` axis
                 attn_norm, attn/{wq_a, q_norm, wq_b | wq, wkv_a, kv_norm, wkv_b, wo} (or wq, wk, wv, wo),
                 ffn_norm, ffn/{w1, w3, w2} (dense) or ffn/{router, w1, w3, w2, shared/{w1, w3, w2}} (MoE)
             mtp_0/ ... mtp_{D-1}/  enorm, hnorm, eh_proj, layer/ (one decoder layer), final_norm
             (decoding: :func:`unstack_layers` gives each stack one sub-tree per layer,
             ``dense_layers/layer_0/...``, without the leading axis)
    router/  moe_layers/ffn/e_score_correction_bias [L, e], mtp_k/layer/ffn/e_score_correction_bias [e]
    cache/   (inference) the same module paths, each attention's cache arrays
    fp8_scale/  (kept-FP8 checkpoints) block scales beside their weights
    decode/  (decoding, unstacked layers only) weights re-laid-out once for the absorbed MLA products

Everything that walks the tree (optimizer masks, balancing, FLOPs and parameter counts, cache layouts)
asks this module instead of matching strings.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

__all__ = ["PARAMS", "ROUTER", "CACHE", "FP8_SCALE", "INTERMEDIATES", "DECODE", "MODEL_COLLECTIONS",
           "DENSE_STACK", "MOE_STACK", "STACKS", "STAGE_ACTIVE", "EMBED", "HEAD", "FINAL_NORM", "FFN", "SHARED", "MTP_LAYER",
           "ROUTER_WEIGHT", "ROUTER_BIAS", "BALANCE", "DROPPED_ROWS", "DISPATCHED_ROWS", "INDEXER_KL", "is_indexer",
           "mtp_name",
           "layer_name", "unstack_layers", "is_mtp", "keys", "is_stacked", "is_norm", "is_routed_expert",
           "is_embedding", "split_mtp", "model_variables", "collect", "router_biases", "replace_router_biases"]

# collections
PARAMS, ROUTER, CACHE, FP8_SCALE, INTERMEDIATES = "params", "router", "cache", "fp8_scale", "intermediates"
DECODE = "decode"
MODEL_COLLECTIONS = (PARAMS, ROUTER, FP8_SCALE)  # what a forward pass reads (no cache, no sown values)

# module and parameter names
DENSE_STACK, MOE_STACK = "dense_layers", "moe_layers"
STACKS = (DENSE_STACK, MOE_STACK)
STAGE_ACTIVE = "active_layers"  # pipeline stages (nn/stages.py): which of a stage's padded layer slots are real
EMBED, HEAD, FFN, SHARED, MTP_LAYER = "embed", "head", "ffn", "shared", "layer"
FINAL_NORM = "final_norm"
ROUTED_WEIGHTS = ("w1", "w2", "w3")
ROUTER_WEIGHT = "router"  # the MoE gate's [d, e] kernel in params (not the collection of the same name)
ROUTER_BIAS = "e_score_correction_bias"
_MTP = "mtp_"
_LAYER = "layer_"  # one layer of an unstacked stack

# values the MoE layers sow into "intermediates"
BALANCE, DROPPED_ROWS, DISPATCHED_ROWS = "balance", "dropped_rows", "dispatched_rows"
INDEXER_KL = "indexer_kl"  # DSA: the indexer's KL against the attention, sown per layer


def mtp_name(k: int) -> str:
    """Module name of MTP depth ``k + 1`` (``k`` counts from 0)."""
    return f"{_MTP}{k}"


def layer_name(i: int) -> str:
    """Name of layer ``i`` of an unstacked stack (decoding, see :func:`unstack_layers`)."""
    return f"{_LAYER}{i}"


def unstack_layers(variables: dict) -> dict:
    """``variables`` (any collections) with every scanned stack ``[L, ...]`` split into ``L`` per-layer
    sub-trees ``layer_0 .. layer_{L-1}``: the layout of ``Transformer(cfg, stacked=False)``. A decode step
    inside a loop then reads each weight where it lies, where slicing a stack would copy every weight once
    per step (XLA materialises the slices)."""
    out = {}
    for col, sub in variables.items():
        out[col] = dict(sub)
        for stack in STACKS:
            if stack in sub:
                n = jax.tree.leaves(sub[stack])[0].shape[0]
                out[col][stack] = {layer_name(i): jax.tree.map(lambda x, i=i: x[i], sub[stack]) for i in range(n)}
    return out


def is_mtp(name: str) -> bool:
    return name.startswith(_MTP)


def keys(path: Sequence[Any]) -> tuple[str, ...]:
    """A ``jax.tree_util`` key path as plain strings."""
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def is_stacked(path: Sequence[Any]) -> bool:
    """True for leaves of a scanned layer stack (they carry a leading ``layers`` axis; not once
    :func:`unstack_layers` split it). ``path`` starts below the collection."""
    ks = keys(path)
    return bool(ks) and ks[0] in STACKS and not (len(ks) > 1 and ks[1].startswith(_LAYER))


def is_indexer(path: Sequence[Any]) -> bool:
    """DSA's lightning indexer (``.../attn/indexer/...``): what its dense warm-up trains."""
    return "indexer" in keys(path)


def is_norm(path: Sequence[Any]) -> bool:
    """RMSNorm scales (every norm module's name ends in ``norm``): no weight decay, no FLOPs."""
    return any(k.endswith("norm") for k in keys(path))


def is_embedding(path: Sequence[Any]) -> bool:
    return keys(path)[-1] == EMBED


def is_routed_expert(path: Sequence[Any]) -> bool:
    """A routed-expert weight (``w1, w3, w2`` of an MoE layer of the main stack or of an MTP module, not of
    its shared experts; for a dense model the caller ignores it). ``path`` starts below the collection."""
    ks = keys(path)
    return ks[-1] in ROUTED_WEIGHTS and SHARED not in ks and (ks[0] == MOE_STACK or is_mtp(ks[0]))


def split_mtp(params: dict) -> tuple[dict, dict]:
    """``(main-model part, MTP part)`` of the ``params`` collection."""
    return ({k: v for k, v in params.items() if not is_mtp(k)}, {k: v for k, v in params.items() if is_mtp(k)})


def model_variables(variables: dict) -> dict:
    """The collections a forward pass reads (``params``, ``router``, ``fp8_scale``), non-empty ones only."""
    return {k: v for k, v in variables.items() if k in MODEL_COLLECTIONS and v}


def collect(tree: Any, name: str) -> list[jax.Array]:
    """Every leaf under a key called ``name`` (e.g. the sown ``BALANCE`` terms of all MoE layers)."""
    return [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if name in keys(path)]


def _bias_paths(router: dict) -> list[tuple[str, ...]]:
    """Paths of the correction biases in ``ModelOutput.expert_load`` row order: the main stack, then MTP."""
    paths = []
    if MOE_STACK in router:
        paths.append((MOE_STACK, FFN, ROUTER_BIAS))
    for k in sorted((k for k in router if is_mtp(k)), key=lambda s: int(s[len(_MTP):])):
        paths.append((k, MTP_LAYER, FFN, ROUTER_BIAS))
    return paths


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def router_biases(router: dict) -> list[jax.Array]:
    """The correction biases (``[L, e]`` for the main stack, ``[e]`` per MTP layer), in expert-load row order."""
    return [_get(router, p) for p in _bias_paths(router)]


def replace_router_biases(router: dict, biases: Sequence[jax.Array]) -> dict:
    """A copy of ``router`` with the biases of :func:`router_biases` replaced, in the same order."""
    out = jax.tree.map(lambda x: x, router)  # a copy of the dict structure
    for path, b in zip(_bias_paths(router), biases, strict=True):
        _get(out, path[:-1])[path[-1]] = b
    return out
