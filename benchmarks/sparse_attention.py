"""Sparse vs dense attention: compiled FLOPs and temporary memory vs context length, and decode steps per second.

For each length it compiles (on this backend, nothing run) one attention layer's core, forward or forward +
backward: dense causal attention (masked softmax over every earlier key) and NSA's block-gather path
(:func:`deepseek_jax.kernels.nsa.nsa_attention`, compressed keys included; FLOPs from a compile with
``unroll=True``, since XLA's cost analysis counts a loop body once; memory from the ``lax.map`` program).
Then it times one decode step (one new token
against caches of that length): dense attention over every slot vs :func:`~deepseek_jax.kernels.nsa.nsa_decode`.
Shapes: MLA's absorbed form by default (every head against one 576-wide latent key, 512-wide values, as
DeepSeek-V3), or ``--form gqa`` (the NSA paper's backbone: 4 groups, keys 192 and values 128 wide).

Prints JSON (config, results, provenance)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import deepseek_jax as dsj  # noqa: E402
from deepseek_jax.config import config_from_dict  # noqa: E402
from deepseek_jax.kernels import dsa as dsa_kernels  # noqa: E402
from deepseek_jax.kernels import nsa  # noqa: E402
from _provenance import provenance, time_fn  # noqa: E402

FORMS = {"mla": dict(groups=1, dk=576, dv=512), "gqa": dict(groups=4, dk=192, dv=128)}


def dense(q, k, v, scale):
    """Causal attention, ``q [b, t, h, D]`` against ``k [b, t, g, D]`` (heads grouped in order)."""
    b, t, h, d = q.shape
    g = k.shape[2]
    s = jnp.einsum("btgrd,bsgd->bgrts", q.reshape(b, t, g, h // g, d), k) * scale
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    o = jnp.einsum("bgrts,bsgd->btgrd", jax.nn.softmax(s, -1), v)
    return o.reshape(b, t, h, -1)


def sparse(q, k, v, gates, shape, scale, chunk, unroll):
    b, t = q.shape[:2]
    seg = jnp.zeros((b, t), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    kc, vc = (nsa.compress_mean(nsa.block_tokens(x, shape)) for x in (k, v))
    return nsa.nsa_attention(q, k, v, kc, vc, gates, seg, pos, scale, shape, "gather", chunk, unroll=unroll)


def dsa(q, k, v, qi, ki, wi, topk, scale):
    """DSA as the model trains it: the indexer scores every visible key, the top-k mask, masked dense attention
    (a kernel that skips the masked keys is what makes V3.2's training sparse; XLA:CPU has none)."""
    t = q.shape[1]
    ok = dsa_kernels.visible(jnp.zeros((1, t), jnp.int32))
    keep = dsa_kernels.topk_mask(dsa_kernels.indexer_scores(qi, ki, wi), ok, topk)
    b, _, h, d = q.shape
    g = k.shape[2]
    s = jnp.einsum("btgrd,bsgd->bgrts", q.reshape(b, t, g, h // g, d), k) * scale
    s = jnp.where(keep[:, None, None], s, -jnp.inf)
    o = jnp.einsum("bgrts,bsgd->btgrd", jax.nn.softmax(s, -1), v)
    return o.reshape(b, t, h, -1)


def _compile(fn, args, grad):
    f = jax.jit(jax.grad(lambda *a: fn(*a).sum(), argnums=(0, 1, 2))) if grad else jax.jit(fn)
    t0 = time.perf_counter()
    c = f.lower(*args).compile()
    cost = c.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost), c.memory_analysis(), time.perf_counter() - t0


def _compiled(fn, args, grad, fn_for_flops=None):
    """FLOPs (of ``fn_for_flops`` when given: the same computation without loops) and temporary bytes."""
    cost, mem, sec = _compile(fn, args, grad)
    if fn_for_flops is not None:
        cost, _, sec2 = _compile(fn_for_flops, args, grad)
        sec += sec2
    return {"flops": float(cost["flops"]), "temp_bytes": int(mem.temp_size_in_bytes), "compile_s": round(sec, 1)}


def _decode_step_s(size, args, shape, scale):
    """Seconds per decode step of one token against caches of ``size`` slots (the query at the last one)."""
    rng = np.random.default_rng(0)
    f, h = FORMS[args.form], args.heads
    q = jnp.asarray(rng.normal(size=(1, 1, h, f["dk"])), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, size, f["groups"], f["dk"])), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, size, f["groups"], f["dv"])), jnp.float32)
    kc, vc = (nsa.compress_mean(nsa.block_tokens(x, shape)) for x in (k, v))
    gates = jnp.full((1, 1, h, 3), 0.5, jnp.float32)
    pos = jnp.full((1, 1), size - 1, jnp.int32)

    def dense_step(q, k, v):
        g = k.shape[2]
        s = jnp.einsum("btgrd,bsgd->bgrts", q.reshape(1, 1, g, h // g, -1), k) * scale
        return jnp.einsum("bgrts,bsgd->btgrd", jax.nn.softmax(s, -1), v)

    sparse_step = jax.jit(lambda q, k, v, kc, vc, g, p: nsa.nsa_decode(q, k, v, kc, vc, g, p, scale, shape))
    return (time_fn(jax.jit(dense_step), q, k, v, iters=args.iters),
            time_fn(sparse_step, q, k, v, kc, vc, gates, pos, iters=args.iters))


def _decode_rate(cfg, variables, prompt, t, new):
    """Decode tokens/s of one ``generate`` call, prefill excluded: it streams (``on_tokens``, a host sync every
    ``STREAM_CHUNK`` steps), and the rate is the tokens gained after the first callback (the prefill's token)
    over the time since it. ``eos_id=-1``: no early stop (a random model emits its EOS id sooner or later)."""
    stamps = []
    dsj.generate(cfg, variables, prompt, new, max_len=t, eos_id=-1,
                 on_tokens=lambda gained: stamps.append((time.perf_counter(), len(gained[0]))))
    tokens = sum(n for _, n in stamps[1:])
    assert tokens + stamps[0][1] == new, stamps
    return tokens / (stamps[-1][0] - stamps[0][0])


def _generate_tokens_per_s(lengths, iters):
    """Decode tokens/s of a one-layer MLA model (d_model 512, 16 heads, latent 512 + 64, V3's head sizes) with
    dense attention, NSA (the paper's sizes) and DSA (top-2048, 4 indexer heads of 128): ``generate`` after a
    prompt filling the context to each length, 41 new tokens, the median over ``iters`` calls of the rate after
    the prefill (:func:`_decode_rate`)."""
    base = dict(vocab_size=256, d_model=512, n_layers=1, intermediate_size=1024, max_position_embeddings=16384,
                attention=dict(kind="mla", n_heads=16, q_lora_rank=256, kv_lora_rank=512, qk_nope_head_dim=128,
                               qk_rope_head_dim=64, v_head_dim=128))
    variants = {"dense": None, "nsa": {"kind": "nsa"},
                "dsa": {"kind": "dsa", "topk": 2048, "index_heads": 4, "index_head_dim": 128}}
    out = {}
    for name, sparse in variants.items():
        d = {**base, "attention": {**base["attention"], **({"sparse": sparse} if sparse else {})}}
        cfg = config_from_dict(d)
        variables = dsj.init_variables(cfg, 0)
        out[name] = {}
        for t in lengths:
            prompt = [list(np.random.default_rng(t).integers(0, 256, t - 48))]
            _decode_rate(cfg, variables, prompt, t, 41)  # compile
            rates = sorted(_decode_rate(cfg, variables, prompt, t, 41) for _ in range(iters))
            out[name][t] = round(rates[len(rates) // 2], 1)
            print(json.dumps({"generate": name, "length": t, "tokens_per_s": out[name][t]}), file=sys.stderr,
                  flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--form", choices=sorted(FORMS), default="mla")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--grad", action="store_true", help="forward + backward instead of forward")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--generate", action="store_true",
                    help="instead: decode tokens/s of a one-layer model, dense vs NSA vs DSA, through generate")
    args = ap.parse_args()
    if args.generate:
        lengths = [int(x) for x in args.lengths.split(",")]
        print(json.dumps({"benchmark": "sparse_attention_generate", "lengths": lengths,
                          "tokens_per_s": _generate_tokens_per_s(lengths, max(args.iters // 4, 3)), **provenance()},
                         indent=1))
        return
    shape = nsa.NSAShape()  # the paper's sizes: l 32, d 16, l' 64, n 16, w 512
    f = FORMS[args.form]
    scale = f["dk"] ** -0.5
    rows = []
    for t in (int(x) for x in args.lengths.split(",")):
        rng = np.random.default_rng(t)
        q = jnp.asarray(rng.normal(size=(1, t, args.heads, f["dk"])), jnp.float32)
        k = jnp.asarray(rng.normal(size=(1, t, f["groups"], f["dk"])), jnp.float32)
        v = jnp.asarray(rng.normal(size=(1, t, f["groups"], f["dv"])), jnp.float32)
        gates = jnp.full((1, t, args.heads, 3), 0.5, jnp.float32)
        qi = jnp.asarray(rng.normal(size=(1, t, 4, 128)), jnp.float32)
        ki = jnp.asarray(rng.normal(size=(1, t, 128)), jnp.float32)
        wi = jnp.asarray(rng.normal(size=(1, t, 4)), jnp.float32)
        row = {"length": t,
               "dsa": _compiled(lambda q, k, v: dsa(q, k, v, qi, ki, wi, 2048, scale), (q, k, v), args.grad),
               "dense": _compiled(lambda q, k, v: dense(q, k, v, scale), (q, k, v), args.grad),
               "nsa": _compiled(lambda q, k, v: sparse(q, k, v, gates, shape, scale, args.chunk, False), (q, k, v),
                                args.grad, lambda q, k, v: sparse(q, k, v, gates, shape, scale, args.chunk, True)),
               "decode_keys": {"nsa": nsa.decode_keys(t, shape), "dense": t}}
        if not args.no_decode:
            d, s = _decode_step_s(t, args, shape, scale)
            row["decode_steps_per_s"] = {"dense": round(1 / d, 1), "nsa": round(1 / s, 1)}
        if rows:
            for kind in ("dense", "nsa", "dsa"):
                row[kind]["flops_ratio_to_previous"] = round(row[kind]["flops"] / rows[-1][kind]["flops"], 3)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "sparse_attention", "form": args.form, "heads": args.heads, **FORMS[args.form],
                      "grad": args.grad, "chunk": args.chunk, "nsa_shape": vars(shape), "results": rows,
                      **provenance()}, indent=1))


if __name__ == "__main__":
    main()
