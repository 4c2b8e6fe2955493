"""The decode engine: jitted prefill and decode steps, the generation loop, MTP speculative decoding.

* **Caches** (:mod:`deepseek_jax.infer.cache`) are the model's cache collection; with the MLA
  ``"latent"`` cache attention runs in the absorbed form.
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
from dataclasses import dataclass, field
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from deepseek_jax.config import ModelConfig
from deepseek_jax.infer.cache import cache_config, init_cache
from deepseek_jax.infer.sampling import check_sampler, processed_logprobs, sample, speculative_accept
from deepseek_jax.nn import tree
from deepseek_jax.nn.attention import CacheConfig
from deepseek_jax.nn.placement import check_layout, shard_variables
from deepseek_jax.nn.transformer import Transformer, check_tokens
from deepseek_jax.parallel.rules import batch_spec

__all__ = ["generate"]


class _Steps:
    """Jitted prefill / decode / speculative functions for one (config, cache, sampler); a mesh only
    changes the input shardings, which ``jax.jit`` specialises on by itself."""

    def __init__(self, cfg: ModelConfig, cc: CacheConfig, temperature: float, top_k, top_p):
        model = Transformer(cfg, cache=cc)
        samp = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)
        self.logp = functools.partial(processed_logprobs, temperature=max(temperature, 1e-6), top_k=top_k, top_p=top_p)

        def run(variables, cache, tokens, positions):
            out, upd = model.apply({**variables, tree.CACHE: cache}, tokens, positions, with_mtp=False,
                                   mutable=[tree.CACHE])
            return out, upd[tree.CACHE]

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
            out, upd = model.apply({**variables, tree.CACHE: cache}, next_tokens, positions, draft_from=hidden,
                                   mutable=[tree.CACHE])
            return out.logits, upd[tree.CACHE]

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


def _cache_size(cfg: ModelConfig, width: int, max_new_tokens: int, speculative: bool, max_len: int | None) -> int:
    """Cache positions for prompts of ``width`` tokens: the longest prompt plus ``max_new_tokens`` (+1 for the
    speculative draft), rounded up to a multiple of 128 so that repeated calls reuse the compiled steps."""
    need = width + max_new_tokens + (1 if speculative else 0)
    if need > cfg.max_position_embeddings:
        raise ValueError(f"the longest prompt ({width} tokens) plus max_new_tokens={max_new_tokens}"
                         f"{' plus the speculative draft' if speculative else ''} is {need} positions, past the "
                         f"model's limit max_position_embeddings={cfg.max_position_embeddings}"
                         f"{' (with YaRN)' if cfg.rope.yarn else ''}; lower max_new_tokens or shorten the prompt")
    size = max_len if max_len is not None else -(-need // 128) * 128  # buckets: fewer recompilations
    if size < need:
        raise ValueError(f"the longest prompt ({width} tokens) plus max_new_tokens={max_new_tokens}"
                         f"{' plus the speculative draft' if speculative else ''} needs {need} cache positions; "
                         f"max_len={size} is too small")
    return size


@dataclass
class _Emitter:
    """Collects each row's new tokens: stops a row at EOS (not returned) or after ``max_new`` tokens, and
    passes what each row gained to ``on_tokens`` (streaming)."""

    rows: int
    max_new: int
    eos: int | None
    on_tokens: Callable[[list[list[int]]], None] | None = None
    out: list[list[int]] = field(init=False)
    done: np.ndarray = field(init=False)

    def __post_init__(self):
        self.out = [[] for _ in range(self.rows)]
        self.done = np.zeros(self.rows, bool)

    def __call__(self, new: list[list[int]]) -> None:
        gained = []
        for i, toks in enumerate(new):
            g = []
            for t in toks:
                if self.done[i] or len(self.out[i]) >= self.max_new:
                    break
                if self.eos is not None and t == self.eos:
                    self.done[i] = True
                    break
                self.out[i].append(int(t))
                g.append(int(t))
            if len(self.out[i]) >= self.max_new:
                self.done[i] = True
            gained.append(g)
        if self.on_tokens is not None:
            self.on_tokens(gained)


def _placer(mesh: Mesh | None) -> Callable[[np.ndarray], jax.Array]:
    """Host arrays ``[b, ...]`` onto the device(s): the batch split like activations on a mesh."""
    if mesh is None:
        return jnp.asarray
    return lambda a: jax.device_put(jnp.asarray(a), NamedSharding(mesh, batch_spec(np.ndim(a))))


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
    check_sampler(temperature, top_k, top_p, cfg.vocab_size)
    b = len(ids)
    lengths = np.array([len(p) for p in ids], np.int32)
    size = _cache_size(cfg, int(lengths.max()), max_new_tokens, speculative, max_len)
    if mesh is not None:
        check_layout(cfg, mesh, global_batch=b)
    fns = _steps(cfg, cache_config(cfg, size, cache_kind, cache_dtype), float(temperature), top_k, top_p)
    width = min(-(-int(lengths.max()) // 16) * 16, size)  # prompt shapes in buckets of 16 (right padding)
    tokens = np.zeros((b, width), np.int32)
    for i, p in enumerate(ids):
        tokens[i, :len(p)] = p
    variables = tree.model_variables(nn.meta.unbox(variables))
    emit = _Emitter(b, max_new_tokens, cfg.eos_token_id if eos_id is None else eos_id, on_tokens)
    st = {"steps": 0, "drafted": 0, "accepted": 0}
    with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
        if mesh is not None:
            variables = shard_variables(cfg, variables, mesh)
        put = _placer(mesh)
        cache = init_cache(cfg, b, size, cache_kind, cache_dtype, mesh)
        key, k0 = jax.random.split(jax.random.key(seed))
        tok, hidden, cache = fns.prefill(variables, cache, put(tokens), put(lengths), k0)
        first = np.asarray(tok)
        emit([[int(t)] for t in first])
        if speculative:
            _speculative_loop(fns, variables, cache, tokens, lengths, first, hidden, key, put, emit, st)
        else:
            _plain_loop(fns, variables, cache, lengths, first, key, put, emit, st)
    # per sequence and main-model forward: 1 token, plus the accepted draft when speculating
    st["tokens_per_forward"] = 1.0 + (st["accepted"] / st["drafted"] if st["drafted"] else 0.0)
    st["acceptance_rate"] = st["accepted"] / st["drafted"] if st["drafted"] else None
    if stats is not None:
        stats.update(st)
    return emit.out


def _plain_loop(fns: _Steps, variables, cache, lengths, first, key, put, emit: _Emitter, st: dict) -> None:
    """One decode step per token until every row is done."""
    tok_np, pos = first, lengths.copy()
    while not emit.done.all():
        key, k = jax.random.split(key)
        tok, cache = fns.step(variables, cache, put(tok_np[:, None]), put(pos[:, None]), k)
        tok_np = np.asarray(tok)
        pos += 1
        st["steps"] += 1
        emit([[int(t)] for t in tok_np])


def _speculative_loop(fns: _Steps, variables, cache, tokens, lengths, first, hidden, key, put, emit: _Emitter,
                      st: dict) -> None:
    """Draft with MTP module 1, verify ``[last, draft]`` in one forward, accept or correct (see module doc)."""
    b, width = tokens.shape
    nxt = np.zeros((b, width), np.int32)
    nxt[:, :-1] = tokens[:, 1:]
    nxt[np.arange(b), lengths - 1] = first  # t_L: the first generated token
    key, k = jax.random.split(key)
    cache, drafted, q_logp, h_prev = fns.spec_start(variables, cache, hidden, put(nxt), put(lengths), k)
    last, pos = put(first.astype(np.int32)), put(lengths.copy())  # ``last``: emitted, not yet in the main cache
    while not emit.done.all():
        key, k = jax.random.split(key)
        old_draft = drafted
        cache, accept, bonus, drafted, pos, h_prev, q_logp = fns.spec_step(variables, cache, last, drafted, pos,
                                                                           h_prev, q_logp, k)
        last = bonus
        acc, bon, dr = (np.asarray(a) for a in (accept, bonus, old_draft))
        st["steps"] += 1
        active = ~emit.done
        st["drafted"] += int(active.sum())
        st["accepted"] += int((acc & active).sum())
        emit([[int(dr[i]), int(bon[i])] if acc[i] else [int(bon[i])] for i in range(b)])
