"""Inference: KV caches, jitted prefill and decode, samplers, and MTP speculative decoding.

* **Caches** are the ``"cache"`` collection of :class:`~deepseek_jax.model.Transformer` (ordinary pytrees;
  :func:`init_cache` builds them, sharded on a mesh with the batch over ``data, fsdp, expert`` and heads
  over ``tensor``). For MLA the ``"latent"`` cache holds ``[RMSNorm(c_kv) | RoPE(k_pe)]`` per token and
  layer (``kv_lora_rank + qk_rope_head_dim`` values) and attention runs in the absorbed form; ``"naive"``
  caches the expanded per-head keys and values. ``dtype="fp8"`` stores E4M3 with a scale per 1x128 tile.
* **Slots are positions**: prompts of different lengths are right-padded in one batch; row ``i``'s token at
  position ``p`` lives in slot ``p`` and a query at ``p`` attends to slots ``0..p``. Decoding writes each
  row's next slot, so padding written by the prefill is overwritten before anything reads it.
* **Speculative decoding** (``speculative=True``) drafts one token per step with MTP module 1 (DeepSeek-V3
  has ``D = 1``), verifies ``[last, draft]`` in one main-model forward and accepts the draft when the main
  model agrees (greedy) or by the rejection rule ``u < p(d) / q(d)``, resampling from ``max(p - q, 0)``
  otherwise (sampling): the output is exactly plain greedy decoding, or distributed exactly as the main
  model's samples. MTP module 1 keeps its own cache of ``(h_i, Emb(t_{i+1}))`` for every accepted position.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deepseek_jax.attention import CacheConfig
from deepseek_jax.config import ModelConfig
from deepseek_jax.model import Transformer, abstract_variables, check_tokens
from deepseek_jax.sharding import BATCH_AXES, check_layout, shard_variables

__all__ = ["CacheConfig", "init_cache", "cache_bytes_per_token", "processed_logprobs", "sample",
           "speculative_accept", "generate", "load_run"]


# ----------------------------------------------------------------------------------------------------
# caches

def _cache_config(cfg: ModelConfig, size: int, kind: str, dtype: str | None) -> CacheConfig:
    return CacheConfig(size=size, kind=kind, dtype=dtype or cfg.dtype)


def _batch_dim(top: str) -> int:
    """Index of the batch dim of a cache leaf under ``top``: scanned stacks carry a leading layer dim."""
    return 1 if top in ("dense_layers", "moe_layers") else 0


def _cache_spec(path: tuple[str, ...], ndim: int) -> P:
    """Batch dim over the batch axes; the head dim of per-head K/V caches over ``tensor``."""
    lead = _batch_dim(path[0])
    spec: list = [None] * ndim
    spec[lead] = BATCH_AXES
    if path[-1] in ("k", "v") and ndim == lead + 4:
        spec[lead + 2] = "tensor"
    return P(*spec)


@functools.lru_cache(maxsize=32)
def _cache_shapes(cfg: ModelConfig, batch: int, cc: CacheConfig):
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    variables = nn.meta.unbox(abstract_variables(cfg))

    def run(v, t):
        return Transformer(cfg, cache=cc).apply(v, t, jnp.zeros(t.shape, jnp.int32), mutable=["cache"])[1]["cache"]

    return jax.eval_shape(run, variables, tokens)


def init_cache(cfg: ModelConfig, batch: int, size: int, kind: str = "latent", dtype: str | None = None,
               mesh: Mesh | None = None) -> dict:
    """A zero cache for ``batch`` sequences of up to ``size`` positions (main model and MTP modules).

    ``kind``: ``"latent"`` or ``"naive"`` (MLA); ``dtype``: storage dtype (default ``cfg.dtype``) or ``"fp8"``.
    """
    shapes = _cache_shapes(cfg, batch, _cache_config(cfg, size, kind, dtype))
    if mesh is None:
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    shardings = jax.tree_util.tree_unflatten(jax.tree.structure(shapes), [
        NamedSharding(mesh, _cache_spec(tuple(k.key for k in kp), len(s.shape))) for kp, s in flat])
    return jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), out_shardings=shardings)()


def cache_bytes_per_token(cache: dict, include_mtp: bool = False) -> float:
    """Bytes the cache arrays hold per (sequence, position), over every layer of the main model (and the
    MTP modules when ``include_mtp``), measured from the arrays."""
    total, per = 0, None
    for kp, x in jax.tree_util.tree_flatten_with_path(cache)[0]:
        top = kp[0].key
        if top.startswith("mtp") and not include_mtp:
            continue
        lead = _batch_dim(top)
        b, s = x.shape[lead], x.shape[lead + 1]
        per = b * s
        total += x.size * x.dtype.itemsize
    return total / per if per else 0.0


# ----------------------------------------------------------------------------------------------------
# samplers

def processed_logprobs(logits: jax.Array, temperature: float, top_k: int | None = None,
                       top_p: float | None = None) -> jax.Array:
    """Log-probabilities ``[..., v]`` of the sampling distribution: ``softmax(logits / temperature)``
    restricted to the ``top_k`` most likely tokens and then to the smallest set whose probability reaches
    ``top_p`` (the nucleus), renormalised; excluded tokens get ``-inf``."""
    x = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(x, top_k)[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if top_p is not None:
        order = jnp.argsort(-x, axis=-1)
        sorted_p = jax.nn.softmax(jnp.take_along_axis(x, order, axis=-1), axis=-1)
        before = jnp.cumsum(sorted_p, axis=-1) - sorted_p  # mass of strictly more likely tokens
        keep = jnp.take_along_axis(before < top_p, jnp.argsort(order, axis=-1), axis=-1)
        x = jnp.where(keep, x, -jnp.inf)
    return jax.nn.log_softmax(x, axis=-1)


def sample(logits: jax.Array, key: jax.Array, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None) -> jax.Array:
    """Next tokens ``[...]`` int32 from ``logits [..., v]``: argmax when ``temperature == 0``."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, processed_logprobs(logits, temperature, top_k, top_p)).astype(jnp.int32)


def speculative_accept(p_logp: jax.Array, q_logp: jax.Array, draft: jax.Array, key: jax.Array):
    """The speculative-sampling rule for one drafted token per row.

    ``p_logp``, ``q_logp [b, v]``: the target (main model) and draft log-probabilities at the drafted
    position; ``draft [b]`` sampled from ``q``. Returns ``(accept [b] bool, fallback [b])``: accept with
    probability ``min(1, p(d) / q(d))``; otherwise the caller emits ``fallback``, a sample of
    ``max(p - q, 0)`` renormalised. The emitted token is then distributed exactly as ``p``.
    """
    k1, k2 = jax.random.split(key)
    p, q = jnp.exp(p_logp), jnp.exp(q_logp)
    pd = jnp.take_along_axis(p, draft[:, None], axis=-1)[:, 0]
    qd = jnp.take_along_axis(q, draft[:, None], axis=-1)[:, 0]
    accept = jax.random.uniform(k1, draft.shape) * qd < pd
    resid = jnp.maximum(p - q, 0.0)
    resid = jnp.where(resid.sum(-1, keepdims=True) > 0, resid, p)
    fallback = jax.random.categorical(k2, jnp.log(resid)).astype(jnp.int32)
    return accept, fallback


# ----------------------------------------------------------------------------------------------------
# jitted steps

class _Steps:
    """Jitted prefill / decode / speculative functions for one (config, cache, sampler); a mesh only
    changes the input shardings, which ``jax.jit`` specialises on by itself."""

    def __init__(self, cfg: ModelConfig, cc: CacheConfig, temperature: float, top_k, top_p):
        model = Transformer(cfg, cache=cc)
        samp = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)
        self.logp = functools.partial(processed_logprobs, temperature=max(temperature, 1e-6), top_k=top_k, top_p=top_p)

        def run(variables, cache, tokens, positions):
            out, upd = model.apply({**variables, "cache": cache}, tokens, positions, with_mtp=False, mutable=["cache"])
            return out, upd["cache"]

        def prefill(variables, cache, tokens, lengths, key):
            b, t = tokens.shape
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            out, cache = run(variables, cache, tokens, positions)
            last = jnp.take_along_axis(out.logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
            return samp(last, key), out.hidden, cache

        def step(variables, cache, tokens, positions, key):
            out, cache = run(variables, cache, tokens, positions)
            return samp(out.logits[:, -1], key), cache

        def draft(variables, cache, hidden, next_tokens, positions):
            out, upd = model.apply({**variables, "cache": cache}, next_tokens, positions, draft_from=hidden,
                                   mutable=["cache"])
            return out.logits, upd["cache"]

        greedy = temperature == 0
        logp = self.logp

        def spec_start(variables, cache, hidden, next_tokens, lengths, key):
            """MTP prefill over the prompt: position j takes ``(h_j, Emb(t_{j+1}))``; the draft comes from L-1."""
            b, t = next_tokens.shape
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            q, cache = draft(variables, cache, hidden, next_tokens, positions)
            q_last = jnp.take_along_axis(q, (lengths - 1)[:, None, None], axis=1)[:, 0]
            h_prev = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
            return cache, samp(q_last, key), logp(q_last), h_prev

        def spec_step(variables, cache, last, drafted, pos, h_prev, q_logp, key):
            """Verify ``[last, draft]`` at ``pos, pos+1`` in one forward, accept or correct, then let MTP
            module 1 take the two newest positions and draft the next token; one dispatch per step."""
            k_acc, k_after, k_draft = jax.random.split(key, 3)
            out, cache = run(variables, cache, jnp.stack([last, drafted], 1), jnp.stack([pos, pos + 1], 1))
            v, g = out.logits, out.hidden
            if greedy:
                pred = jnp.argmax(v, -1).astype(jnp.int32)
                accept = pred[:, 0] == drafted
                bonus = jnp.where(accept, pred[:, 1], pred[:, 0])
            else:
                accept, fallback = speculative_accept(logp(v[:, 0]), q_logp, drafted, k_acc)
                bonus = jnp.where(accept, samp(v[:, 1], k_after), fallback)
            # MTP window: positions new_pos-2, new_pos-1 with their hidden states and next tokens
            h_win = jnp.where(accept[:, None, None], g, jnp.stack([h_prev, g[:, 0]], 1))
            t_win = jnp.where(accept[:, None], jnp.stack([drafted, bonus], 1), jnp.stack([last, bonus], 1))
            new_pos = pos + 1 + accept.astype(jnp.int32)
            q, cache = draft(variables, cache, h_win, t_win, jnp.stack([new_pos - 2, new_pos - 1], 1))
            h_next = jnp.where(accept[:, None], g[:, 1], g[:, 0])
            return cache, accept, bonus, samp(q[:, 1], k_draft), new_pos, h_next, logp(q[:, 1])

        self.prefill = jax.jit(prefill, donate_argnums=1)
        self.step = jax.jit(step, donate_argnums=1)
        self.spec_start = jax.jit(spec_start, donate_argnums=1)
        self.spec_step = jax.jit(spec_step, donate_argnums=1)


@functools.lru_cache(maxsize=16)
def _steps(cfg, cc, temperature, top_k, top_p) -> _Steps:
    return _Steps(cfg, cc, temperature, top_k, top_p)


# ----------------------------------------------------------------------------------------------------
# generate

def _check_prompts(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of token-id lists (tokenize text first)")
    out = []
    for i, p in enumerate(prompts):
        ids = [int(t) for t in np.asarray(p).reshape(-1)]
        if not ids:
            raise ValueError(f"prompt {i} is empty: give at least one token (e.g. the BOS or EOS id)")
        out.append(ids)
    width = max(len(p) for p in out)
    check_tokens(np.array([p + [0] * (width - len(p)) for p in out]), cfg.vocab_size)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    return out


def generate(cfg: ModelConfig, variables: dict, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             mesh: Mesh | None = None, speculative: bool = False, eos_id: int | None = None,
             max_len: int | None = None, cache_kind: str = "latent", cache_dtype: str | None = None,
             on_tokens: Callable[[list[list[int]]], None] | None = None, stats: dict | None = None) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` after each prompt; returns the new token ids per prompt.

    ``prompts``: token-id lists of any lengths (one batch). Greedy when ``temperature == 0``; otherwise
    samples from ``softmax(logits / temperature)`` with optional ``top_k`` / ``top_p``. A row stops after
    ``eos_id`` (default ``cfg.eos_token_id``; the EOS token is not returned). ``max_len``: cache size in
    positions (default: longest prompt + ``max_new_tokens`` (+ 1 when speculating), rounded up to a multiple
    of 128 so that repeated calls reuse the compiled steps); a prompt that does not fit is an error.
    ``mesh``: variables and cache sharded on it (batch over ``data, fsdp, expert``). ``speculative``:
    MTP draft + one-forward verification (needs ``mtp.depth >= 1``); the result equals plain decoding
    (greedy) or has its distribution (sampling). ``cache_kind`` ``"latent"`` (absorbed MLA) or ``"naive"``;
    ``cache_dtype`` e.g. ``"fp8"``. ``on_tokens(new)`` is called after every step with the tokens each row
    gained (streaming). ``stats``, if given, receives ``steps`` (main-model forwards after the prefill),
    ``drafted``, ``accepted``, ``acceptance_rate``, ``tokens_per_forward``.
    """
    ids = _check_prompts(cfg, prompts, max_new_tokens)
    if speculative and not cfg.mtp.depth:
        raise ValueError("speculative=True needs MTP modules (mtp.depth >= 1) to draft with")
    if temperature < 0 or (top_k is not None and not 0 < top_k <= cfg.vocab_size) or (
            top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"bad sampler settings: temperature={temperature} (>= 0), top_k={top_k} (1..vocab), "
                         f"top_p={top_p} (0 < p <= 1)")
    eos = cfg.eos_token_id if eos_id is None else eos_id
    b = len(ids)
    lengths = np.array([len(p) for p in ids], np.int32)
    width = int(lengths.max())
    need = width + max_new_tokens + (1 if speculative else 0)
    size = max_len if max_len is not None else -(-need // 128) * 128  # buckets: fewer recompilations
    if size < need:
        raise ValueError(f"the longest prompt ({width} tokens) plus max_new_tokens={max_new_tokens}"
                         f"{' plus the speculative draft' if speculative else ''} needs {need} cache positions; "
                         f"max_len={size} is too small")
    if mesh is not None:
        check_layout(cfg, mesh, global_batch=b)
    cc = _cache_config(cfg, size, cache_kind, cache_dtype)
    fns = _steps(cfg, cc, float(temperature), top_k, top_p)
    key = jax.random.key(seed)
    width = min(-(-width // 16) * 16, size)  # prompt shapes in buckets of 16 (right padding)
    tokens = np.zeros((b, width), np.int32)
    for i, p in enumerate(ids):
        tokens[i, :len(p)] = p
    variables = {k: v for k, v in nn.meta.unbox(variables).items() if k in ("params", "router", "fp8_scale")}

    with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
        if mesh is not None:
            variables = shard_variables(cfg, variables, mesh)

            def put(a):
                return jax.device_put(jnp.asarray(a), NamedSharding(mesh, P(BATCH_AXES, *[None] * (np.ndim(a) - 1))))
        else:
            put = jnp.asarray
        cache = init_cache(cfg, b, size, cache_kind, cache_dtype, mesh)
        out: list[list[int]] = [[] for _ in range(b)]
        done = np.zeros(b, bool)

        def emit(new: list[list[int]]) -> None:
            gained = []
            for i, toks in enumerate(new):
                g = []
                for t in toks:
                    if done[i] or len(out[i]) >= max_new_tokens:
                        break
                    if eos is not None and t == eos:
                        done[i] = True
                        break
                    out[i].append(int(t))
                    g.append(int(t))
                if len(out[i]) >= max_new_tokens:
                    done[i] = True
                gained.append(g)
            if on_tokens is not None:
                on_tokens(gained)

        key, k0 = jax.random.split(key)
        tok, hidden, cache = fns.prefill(variables, cache, put(tokens), put(lengths), k0)
        tok_np = np.asarray(tok)
        emit([[int(t)] for t in tok_np])
        st = {"steps": 0, "drafted": 0, "accepted": 0}
        if not speculative:
            pos = lengths.copy()
            while not done.all():
                key, k = jax.random.split(key)
                tok, cache = fns.step(variables, cache, put(tok_np[:, None]), put(pos[:, None]), k)
                tok_np = np.asarray(tok)
                pos += 1
                st["steps"] += 1
                emit([[int(t)] for t in tok_np])
        else:
            _speculative_loop(fns, variables, cache, tokens, lengths, tok_np, hidden, key, put, emit, done, st)
    # per sequence and main-model forward: 1 token, plus the accepted draft when speculating
    st["tokens_per_forward"] = 1.0 + (st["accepted"] / st["drafted"] if st["drafted"] else 0.0)
    st["acceptance_rate"] = st["accepted"] / st["drafted"] if st["drafted"] else None
    if stats is not None:
        stats.update(st)
    return out


def _speculative_loop(fns: _Steps, variables, cache, tokens, lengths, first, hidden, key, put, emit, done,
                      st) -> None:
    """Draft with MTP module 1, verify ``[last, draft]`` in one forward, accept or correct (see module doc)."""
    b, width = tokens.shape
    nxt = np.zeros((b, width), np.int32)
    nxt[:, :-1] = tokens[:, 1:]
    nxt[np.arange(b), lengths - 1] = first  # t_L: the first generated token
    key, k = jax.random.split(key)
    cache, drafted, q_logp, h_prev = fns.spec_start(variables, cache, hidden, put(nxt), put(lengths), k)
    last, pos = put(first.astype(np.int32)), put(lengths.copy())  # ``last``: emitted, not yet in the main cache
    while not done.all():
        key, k = jax.random.split(key)
        old_draft = drafted
        cache, accept, bonus, drafted, pos, h_prev, q_logp = fns.spec_step(variables, cache, last, drafted, pos,
                                                                           h_prev, q_logp, k)
        last = bonus
        acc, bon, dr = (np.asarray(a) for a in (accept, bonus, old_draft))
        st["steps"] += 1
        active = ~done
        st["drafted"] += int(active.sum())
        st["accepted"] += int((acc & active).sum())
        emit([[int(dr[i]), int(bon[i])] if acc[i] else [int(bon[i])] for i in range(b)])


# ----------------------------------------------------------------------------------------------------
# loading a trained run

def load_run(path: str, step: int | None = None) -> tuple[ModelConfig, dict, Any]:
    """``(cfg, variables, tokenizer)`` from a ``deepseek-jax train`` run folder (its ``config.yaml``,
    ``tokenizer.json`` and the newest -- or ``step``'s -- Orbax checkpoint) or from a Hugging Face
    checkpoint directory (``config.json`` + safetensors; ``tokenizer.json`` when present, else None)."""
    from pathlib import Path

    import yaml

    from deepseek_jax.config import config_from_dict

    root = Path(path)
    tok_path = root / "tokenizer.json"
    tokenizer = None
    if tok_path.exists():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tok_path))
    if (root / "config.json").exists():
        from deepseek_jax.hf import load_checkpoint

        cfg, variables = load_checkpoint(root)
        return cfg, variables, tokenizer
    if not (root / "config.yaml").exists() or not (root / "checkpoints").is_dir():
        raise FileNotFoundError(f"{root} is neither a training run folder (config.yaml + checkpoints/) nor a "
                                "Hugging Face checkpoint (config.json + *.safetensors)")
    import orbax.checkpoint as ocp

    d = yaml.safe_load((root / "config.yaml").read_text())
    d.pop("train", None)
    cfg = config_from_dict(d)
    mngr = ocp.CheckpointManager((root / "checkpoints").resolve())
    steps = sorted(mngr.all_steps())
    if not steps:
        raise FileNotFoundError(f"{root / 'checkpoints'} holds no checkpoint yet")
    use = steps[-1] if step is None else step
    if use not in steps:
        raise ValueError(f"no checkpoint at step {step} in {root / 'checkpoints'} (have {steps})")
    restored = mngr.restore(use, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    mngr.close()
    variables = {"params": restored["params"], "router": restored["router"]}
    return cfg, jax.tree.map(jnp.asarray, variables), tokenizer

