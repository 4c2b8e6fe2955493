"""The decode engine: a jitted prefill, then decoding as one on-device ``lax.while_loop`` (plain or MTP
speculative) with sampling, per-row EOS stops and the cache inside: no Python dispatch per token.

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
from deepseek_jax.nn.attention.mla import absorbed_weights
from deepseek_jax.nn.placement import check_layout, shard_variables
from deepseek_jax.nn.transformer import Transformer, check_tokens
from deepseek_jax.parallel.rules import batch_spec

__all__ = ["generate", "Generation", "STREAM_CHUNK"]

STREAM_CHUNK = 8  # decode steps per on-device loop call when the caller streams (``on_tokens``)


class _Steps:
    """Jitted prefill / decode / speculative functions for one (config, cache, sampler); a mesh only
    changes the input shardings, which ``jax.jit`` specialises on by itself."""

    def __init__(self, cfg: ModelConfig, cc: CacheConfig, temperature: float, top_k, top_p, logprobs: bool = False):
        model = Transformer(cfg, cache=cc, stacked=False)
        samp = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)
        self.logp = functools.partial(processed_logprobs, temperature=max(temperature, 1e-6), top_k=top_k, top_p=top_p)
        # the sampling log-probability of each emitted token (greedy: under softmax(logits)), or 0 when not asked
        token_logp = functools.partial(_token_logp, logprobs=logprobs, temperature=temperature or 1.0, top_k=top_k,
                                       top_p=top_p)

        def run(variables, cache, tokens, positions):
            out, upd = model.apply({**variables, tree.CACHE: cache}, tokens, positions, with_mtp=False,
                                   mutable=[tree.CACHE])
            return out, upd[tree.CACHE]

        def prefill(variables, cache, tokens, lengths, key):
            b, t = tokens.shape
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            out, cache = run(variables, cache, tokens, positions)
            last = jnp.take_along_axis(out.logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
            tok = samp(last, key)
            return tok, token_logp(last, tok), out.hidden, cache

        def step(variables, cache, tokens, positions, key):
            out, cache = run(variables, cache, tokens, positions)
            tok = samp(out.logits[:, -1], key)
            return tok, token_logp(out.logits[:, -1], tok), cache

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
        self.spec_start = jax.jit(spec_start, donate_argnums=1)
        # single steps: the loops' bodies, kept jitted for host-driven reference loops (tests)
        self.step = jax.jit(step, donate_argnums=1)
        self.spec_step = jax.jit(spec_step, donate_argnums=1)
        self.plain_loop = jax.jit(_plain_loop_fn(step), donate_argnums=1, static_argnums=5)
        self.spec_loop = jax.jit(_spec_loop_fn(spec_step), donate_argnums=1, static_argnums=5)


def _token_logp(logits: jax.Array, tok: jax.Array, *, logprobs: bool, temperature: float, top_k, top_p) -> jax.Array:
    """``[b]`` float32: ``log p(tok)`` under the sampling distribution of ``logits [b, v]``, or zeros."""
    if not logprobs:
        return jnp.zeros(tok.shape, jnp.float32)
    lp = processed_logprobs(logits, temperature, top_k, top_p)
    return jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]


def _plain_loop_fn(step):
    """The on-device plain decode loop around one jitted ``step``."""

    def plain_loop(variables, cache, state, eos, max_new, chunk):
        """Up to ``chunk`` decode steps as one ``while_loop`` on device, stopping early once every row
        is done; ``state``: ``tok [b]`` (emitted, not yet in the cache), ``pos [b]``, ``key``,
        ``done [b]``, ``count [b]`` (tokens emitted). Returns ``(steps, state, cache, tokens [b, chunk],
        logps [b, chunk])`` (``logps``: each token's sampling log-probability, zeros unless asked for)."""

        def body(c):
            i, s, cache, buf, lbuf = c
            key, k = jax.random.split(s["key"])
            tok, lp, cache = step(variables, cache, s["tok"][:, None], s["pos"][:, None], k)
            done, count = _advance(s["done"], s["count"], tok, eos, max_new)
            s = {**s, "tok": tok, "pos": s["pos"] + 1, "key": key, "done": done, "count": count}
            return (i + 1, s, cache, jax.lax.dynamic_update_slice_in_dim(buf, tok[:, None], i, 1),
                    jax.lax.dynamic_update_slice_in_dim(lbuf, lp[:, None], i, 1))

        b = state["tok"].shape[0]
        buf, lbuf = jnp.zeros((b, chunk), jnp.int32), jnp.zeros((b, chunk), jnp.float32)
        return jax.lax.while_loop(_running(chunk), body, (jnp.int32(0), state, cache, buf, lbuf))

    return plain_loop


def _spec_loop_fn(spec_step):
    """The on-device speculative decode loop around one ``spec_step``."""

    def spec_loop(variables, cache, state, eos, max_new, chunk):
        """Up to ``chunk`` speculative steps as one ``while_loop``; each row writes the tokens a step
        emits (``[draft, bonus]`` or ``[bonus]``) at its own offset ``n [b]`` of ``tokens [b, 2 chunk]``.
        ``state`` adds ``last, drafted, h_prev, q_logp`` and the counters ``n_drafted, n_accepted`` (over
        rows still active at the step's start). Returns ``(steps, state, cache, tokens, n)``."""
        b = state["last"].shape[0]
        rows = jnp.arange(b)

        def body(c):
            i, s, cache, buf, n = c
            key, k = jax.random.split(s["key"])
            cache, accept, bonus, drafted, pos, h_prev, q_logp = spec_step(
                variables, cache, s["last"], s["drafted"], s["pos"], s["h_prev"], s["q_logp"], k)
            active = ~s["done"]
            first = jnp.where(accept, s["drafted"], bonus)
            done, count = _advance(s["done"], s["count"], first, eos, max_new)
            done2, count2 = _advance(done, count, bonus, eos, max_new)
            buf = buf.at[rows, n].set(first).at[rows, n + 1].set(bonus)
            s = {"last": bonus, "drafted": drafted, "pos": pos, "h_prev": h_prev, "q_logp": q_logp, "key": key,
                 "done": jnp.where(accept, done2, done), "count": jnp.where(accept, count2, count),
                 "n_drafted": s["n_drafted"] + active.sum(dtype=jnp.int32),
                 "n_accepted": s["n_accepted"] + (accept & active).sum(dtype=jnp.int32)}
            return i + 1, s, cache, buf, n + 1 + accept.astype(jnp.int32)

        buf = jnp.zeros((b, 2 * chunk), jnp.int32)
        return jax.lax.while_loop(_running(chunk), body, (jnp.int32(0), state, cache, buf, jnp.zeros(b, jnp.int32)))

    return spec_loop


def _running(chunk: int):
    """Loop condition: fewer than ``chunk`` steps taken and some row not done (carry ``(i, state, ...)``)."""
    return lambda c: (c[0] < chunk) & ~jnp.all(c[1]["done"])


def _advance(done, count, tok, eos, max_new):
    """A row that is not done emits ``tok``: EOS ends it (not counted), otherwise it counts, and reaching
    ``max_new`` tokens ends it (the host's ``_Emitter`` applies the same rule)."""
    stop = ~done & (tok == eos)
    count = count + (~done & ~stop).astype(count.dtype)
    return done | stop | (count >= max_new), count


def decode_layout(cfg: ModelConfig, variables: dict) -> dict:
    """``variables`` in the layout the decode loop reads (``Transformer(cfg, stacked=False)``): one sub-tree per
    layer, plus the absorbed MLA weights (``"decode"`` collection). A copy, made once per ``generate`` call:
    inside a loop XLA:CPU would otherwise copy every layer's weights out of the stacks at every step."""
    v = tree.unstack_layers(variables)
    if cfg.attention.kind == "mla":
        v[tree.DECODE] = absorbed_weights(v[tree.PARAMS], cfg.attention.qk_nope_head_dim)
    return v


_decode_layout = jax.jit(decode_layout, static_argnums=0)


@functools.lru_cache(maxsize=16)
def _steps(cfg, cc, temperature, top_k, top_p, logprobs: bool = False) -> _Steps:
    return _Steps(cfg, cc, temperature, top_k, top_p, logprobs)


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
    """Collects each row's new tokens: stops a row at EOS (kept only when ``keep_eos``) or after ``max_new``
    tokens, and passes what each row gained to ``on_tokens`` (streaming). ``logps`` (when given to the
    call) are collected beside the tokens; ``ended[i]``: row ``i`` stopped at EOS."""

    rows: int
    max_new: int
    eos: int | None
    on_tokens: Callable[[list[list[int]]], None] | None = None
    keep_eos: bool = False
    out: list[list[int]] = field(init=False)
    logps: list[list[float]] = field(init=False)
    done: np.ndarray = field(init=False)
    ended: np.ndarray = field(init=False)

    def __post_init__(self):
        self.out = [[] for _ in range(self.rows)]
        self.logps = [[] for _ in range(self.rows)]
        self.done = np.zeros(self.rows, bool)
        self.ended = np.zeros(self.rows, bool)

    def __call__(self, new: list[list[int]], new_logps: list[list[float]] | None = None) -> None:
        gained = []
        for i, toks in enumerate(new):
            g = []
            for j, t in enumerate(toks):
                if self.done[i] or len(self.out[i]) >= self.max_new:
                    break
                is_eos = self.eos is not None and t == self.eos
                if not is_eos or self.keep_eos:
                    self.out[i].append(int(t))
                    g.append(int(t))
                    if new_logps is not None:
                        self.logps[i].append(float(new_logps[i][j]))
                if is_eos:
                    self.done[i] = self.ended[i] = True
                    break
            if len(self.out[i]) - int(self.ended[i] and self.keep_eos) >= self.max_new:
                self.done[i] = True
            gained.append(g)
        if self.on_tokens is not None:
            self.on_tokens(gained)


@dataclass(frozen=True)
class Generation:
    """What ``generate(..., details=True)`` returns, one entry per prompt.

    Attributes:
      tokens: the new token ids, ending with the EOS id where the row stopped at EOS.
      ended: whether the row stopped at EOS (False: it ran out of ``max_new_tokens``, i.e. truncated).
      logprobs: with ``logprobs=True``, ``log p(token)`` of each entry of ``tokens`` (EOS included) under the
        sampling distribution -- ``softmax(logits / temperature)`` after top-k/top-p (greedy: under
        ``softmax(logits)``); else None.
    """

    tokens: list[list[int]]
    ended: list[bool]
    logprobs: list[list[float]] | None = None


def _placer(mesh: Mesh | None) -> Callable[[np.ndarray], jax.Array]:
    """Host arrays ``[b, ...]`` onto the device(s): the batch split like activations on a mesh."""
    if mesh is None:
        return jnp.asarray
    return lambda a: jax.device_put(jnp.asarray(a), NamedSharding(mesh, batch_spec(np.ndim(a))))


def generate(cfg: ModelConfig, variables: dict, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             mesh: Mesh | None = None, speculative: bool = False, eos_id: int | None = None,
             max_len: int | None = None, cache_kind: str = "latent", cache_dtype: str | None = None,
             on_tokens: Callable[[list[list[int]]], None] | None = None, stats: dict | None = None,
             details: bool = False, logprobs: bool = False) -> list[list[int]] | Generation:
    """Generate up to ``max_new_tokens`` after each prompt; returns the new token ids per prompt.

    ``prompts``: token-id lists of any lengths (one batch). Greedy when ``temperature == 0``; otherwise
    samples from ``softmax(logits / temperature)`` with optional ``top_k`` / ``top_p``. A row stops after
    ``eos_id`` (default ``cfg.eos_token_id``; the EOS token is not returned). ``max_len``: cache size in
    positions (default: longest prompt + ``max_new_tokens`` (+ 1 when speculating), rounded up to a multiple
    of 128 so that repeated calls reuse the compiled steps); a prompt that does not fit is an error.
    ``mesh``: variables and cache sharded on it (batch over ``data, fsdp, expert``). ``speculative``:
    MTP draft + one-forward verification (needs ``mtp.depth >= 1``); the result equals plain decoding
    (greedy) or has its distribution (sampling). ``cache_kind`` ``"latent"`` (absorbed MLA) or ``"naive"``;
    ``cache_dtype`` e.g. ``"fp8"``. Decoding runs on device as one ``while_loop`` (the whole budget in one
    call); with ``on_tokens(new)`` (streaming) it runs in calls of ``STREAM_CHUNK`` steps and ``on_tokens``
    receives the tokens each row gained after every call. ``stats``, if given, receives ``steps``
    (main-model forwards after the prefill), ``drafted``, ``accepted``, ``acceptance_rate``,
    ``tokens_per_forward``.

    ``details=True`` returns a :class:`Generation` instead: the tokens WITH the EOS id where a row ended
    (what a post-training batch needs: the model must learn to stop), whether each row ended, and with
    ``logprobs=True`` each token's sampling log-probability (plain decoding only). Top-k/top-p sample a
    truncated distribution that a plain training forward does not reproduce. ``variables`` may already be
    placed on ``mesh`` (``device_put`` then moves nothing).
    """
    ids = _check_prompts(cfg, prompts, max_new_tokens)
    if speculative and not cfg.mtp.depth:
        raise ValueError("speculative=True needs MTP modules (mtp.depth >= 1) to draft with")
    if logprobs and (speculative or not details):
        raise ValueError("logprobs=True needs details=True and plain decoding (speculative=False)")
    check_sampler(temperature, top_k, top_p, cfg.vocab_size)
    b = len(ids)
    lengths = np.array([len(p) for p in ids], np.int32)
    size = _cache_size(cfg, int(lengths.max()), max_new_tokens, speculative, max_len)
    if mesh is not None:
        check_layout(cfg, mesh, global_batch=b)
    fns = _steps(cfg, cache_config(cfg, size, cache_kind, cache_dtype), float(temperature), top_k, top_p, logprobs)
    width = min(-(-int(lengths.max()) // 16) * 16, size)  # prompt shapes in buckets of 16 (right padding)
    tokens = np.zeros((b, width), np.int32)
    for i, p in enumerate(ids):
        tokens[i, :len(p)] = p
    variables = tree.model_variables(nn.meta.unbox(variables))
    emit = _Emitter(b, max_new_tokens, cfg.eos_token_id if eos_id is None else eos_id, on_tokens, keep_eos=details)
    st = {"steps": 0, "drafted": 0, "accepted": 0}
    with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
        if mesh is not None:
            variables = shard_variables(cfg, variables, mesh)
        variables = _decode_layout(cfg, variables)
        put = _placer(mesh)
        cache = init_cache(cfg, b, size, cache_kind, cache_dtype, mesh, stacked=False)
        key, k0 = jax.random.split(jax.random.key(seed))
        tok, lp, hidden, cache = fns.prefill(variables, cache, put(tokens), put(lengths), k0)
        emit([[int(t)] for t in np.asarray(tok)], np.asarray(lp)[:, None] if logprobs else None)
        if speculative:
            _speculative_loop(fns, variables, cache, tokens, lengths, tok, hidden, key, put, emit, st, size)
        else:
            _plain_loop(fns, variables, cache, tok, lengths, key, put, emit, st, size)
    # per sequence and main-model forward: 1 token, plus the accepted draft when speculating
    st["tokens_per_forward"] = 1.0 + (st["accepted"] / st["drafted"] if st["drafted"] else 0.0)
    st["acceptance_rate"] = st["accepted"] / st["drafted"] if st["drafted"] else None
    if stats is not None:
        stats.update(st)
    if details:
        return Generation(emit.out, emit.ended.tolist(), emit.logps if logprobs else None)
    return emit.out


def _row_state(emit: _Emitter, put) -> dict:
    """The loop's per-row stop state after the prefill's token: ``done [b]`` and ``count [b]`` (emitted)."""
    return {"done": put(emit.done.copy()), "count": put(np.array([len(o) for o in emit.out], np.int32))}


def _limits(emit: _Emitter, size: int) -> tuple:
    """``(eos, max_new, chunk)`` of a loop call: EOS id (-1: none), token budget, and steps per call -- the
    whole budget at once (a cache of ``size`` positions never needs more steps), or ``STREAM_CHUNK`` when a
    caller streams."""
    chunk = min(STREAM_CHUNK, size) if emit.on_tokens is not None else size
    return np.int32(-1 if emit.eos is None else emit.eos), np.int32(emit.max_new), chunk


def _plain_loop(fns: _Steps, variables, cache, first, lengths, key, put, emit: _Emitter, st: dict, size: int) -> None:
    """Decode on device in chunks until every row is done; each chunk's tokens go to the emitter at once."""
    state = {"tok": first, "pos": put(lengths.copy()), "key": key, **_row_state(emit, put)}
    limits = _limits(emit, size)
    while not emit.done.all():
        steps, state, cache, buf, lbuf = fns.plain_loop(variables, cache, state, *limits)
        steps, buf, lbuf = int(steps), np.asarray(buf), np.asarray(lbuf)
        st["steps"] += steps
        emit([[int(t) for t in row[:steps]] for row in buf], lbuf[:, :steps])


def _speculative_loop(fns: _Steps, variables, cache, tokens, lengths, first, hidden, key, put, emit: _Emitter,
                      st: dict, size: int) -> None:
    """Draft with MTP module 1, verify ``[last, draft]`` in one forward, accept or correct (see module doc),
    on device in chunks of steps."""
    b, width = tokens.shape
    first_np = np.asarray(first)
    nxt = np.zeros((b, width), np.int32)
    nxt[:, :-1] = tokens[:, 1:]
    nxt[np.arange(b), lengths - 1] = first_np  # t_L: the first generated token
    key, k = jax.random.split(key)
    cache, drafted, q_logp, h_prev = fns.spec_start(variables, cache, hidden, put(nxt), put(lengths), k)
    # ``last``: emitted, not yet in the main cache
    state = {"last": first, "drafted": drafted, "pos": put(lengths.copy()), "h_prev": h_prev, "q_logp": q_logp,
             "key": key, **_row_state(emit, put), "n_drafted": jnp.int32(0), "n_accepted": jnp.int32(0)}
    limits = _limits(emit, size)
    while not emit.done.all():
        steps, state, cache, buf, n = fns.spec_loop(variables, cache, state, *limits)
        buf, n = np.asarray(buf), np.asarray(n)
        st["steps"] += int(steps)
        emit([[int(t) for t in buf[i, :n[i]]] for i in range(b)])
    st["drafted"], st["accepted"] = int(state["n_drafted"]), int(state["n_accepted"])
