"""Decoding: absorbed (latent-cache) vs naive-cache MLA at several context lengths, cache bytes, and MTP
speculative decoding on a trained tiny model.

* Decode tokens/s: ``--batch`` sequences whose cache already holds ``ctx`` positions (a prefill of random
  tokens), then ``--steps`` jitted decode steps, for ``cache kind = latent`` (absorbed) and ``naive``, both
  in the same run, alternating. Configs: ``tiny`` (2 heads) and ``tiny`` with 16 heads (``tiny-h16``): the
  naive cache grows with the heads, the latent one does not.
* Cache bytes per token (all layers), measured from the cache arrays.
* Speculative decoding: greedy, 200 new tokens after a few prompts, plain vs ``speculative=True`` on the
  trained tiny model (``--run``, default ``runs/tiny``, the README's main command; trained here briefly if
  absent): acceptance rate, tokens per main-model forward, and the wall-clock speed-up.

    python benchmarks/decode.py [--contexts 128 1024 4096] [--batch 4] [--steps 32] [--run runs/tiny]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import deepseek_jax as dsj  # noqa: E402
from _provenance import provenance  # noqa: E402
from deepseek_jax import infer as G  # noqa: E402
from deepseek_jax.nn.attention import CacheConfig  # noqa: E402


def _decoder(cfg, kind: str, size: int):
    model = dsj.Transformer(cfg, cache=CacheConfig(size, kind, cfg.dtype))

    @jax.jit
    def run(v, cache, tokens, positions):
        out, upd = model.apply({**v, "cache": cache}, tokens, positions, with_mtp=False, mutable=["cache"])
        return jnp.argmax(out.logits[:, -1], -1), upd["cache"]

    return run


def decode_speed(cfg, variables, ctx: int, batch: int, steps: int) -> dict:
    size = ctx + steps + 1
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, ctx)), jnp.int32)
    pos0 = jnp.broadcast_to(jnp.arange(ctx, dtype=jnp.int32), (batch, ctx))
    state = {}
    for kind in ("latent", "naive"):
        run = _decoder(cfg, kind, size)
        cache = G.init_cache(cfg, batch, size, kind)
        tok, cache = run(variables, cache, prompt, pos0)  # prefill (compiles the prefill shape)
        tok, cache2 = run(variables, cache, tok[:, None], jnp.full((batch, 1), ctx, jnp.int32))  # compile decode
        jax.block_until_ready(tok)
        state[kind] = {"run": run, "cache": cache2, "tok": tok, "pos": ctx + 1, "times": [],
                       "bytes_per_token": G.cache_bytes_per_token(cache2)}
    for _ in range(steps - 1):  # alternate the two kinds so machine drift hits both
        for kind, s in state.items():
            t = time.perf_counter()
            s["tok"], s["cache"] = s["run"](variables, s["cache"], s["tok"][:, None], jnp.full((batch, 1), s["pos"], jnp.int32))
            jax.block_until_ready(s["tok"])
            s["times"].append(time.perf_counter() - t)
            s["pos"] += 1
    out = {"context": ctx, "batch": batch}
    for kind, s in state.items():
        sec = statistics.median(s["times"])
        out[kind] = {"step_s": sec, "tokens_per_s": batch / sec, "cache_bytes_per_token": s["bytes_per_token"]}
    out["absorbed_over_naive_speed"] = out["latent"]["tokens_per_s"] / out["naive"]["tokens_per_s"]
    return out


def speculative(run_dir: str, new_tokens: int) -> dict:
    if not (Path(run_dir) / "checkpoints").is_dir():
        from deepseek_jax import train as T

        print(f"{run_dir} not found: training the tiny preset briefly (200 steps of 4x128)", file=sys.stderr)
        cfg, tcfg = T.load_run_config("tiny", ["train.steps=200", "train.batch_size=4", "train.seq_len=128",
                                               "train.sample_tokens=0", f"train.out={run_dir}"])
        T.train(cfg, tcfg, progress=False)
    cfg, variables, tok = dsj.load_run(run_dir)
    prompts = [tok.encode(s).ids for s in ("def __init__(self", "import os\nimport sys\n", "class Foo:\n    ",
                                             "for i in range(")]
    res = {"run": run_dir, "new_tokens": new_tokens, "prompts": len(prompts), "batch": 1}
    for spec in (False, True):  # one prompt at a time (a batch waits for its slowest row)
        key = "speculative" if spec else "plain"
        for p in prompts:  # compile every shape first (prompt and cache buckets)
            dsj.generate(cfg, variables, [p], new_tokens, speculative=spec, eos_id=-1)
        dt, outs, forwards, drafted, accepted = 0.0, [], 0, 0, 0
        for p in prompts:
            stats: dict = {}
            t = time.perf_counter()
            outs += dsj.generate(cfg, variables, [p], new_tokens, speculative=spec, eos_id=-1, stats=stats)
            dt += time.perf_counter() - t
            forwards += stats["steps"] + 1
            drafted += stats["drafted"]
            accepted += stats["accepted"]
        res[key] = {"seconds": dt, "tokens_per_s": sum(map(len, outs)) / dt, "main_forwards": forwards,
                    "acceptance_rate": accepted / drafted if drafted else None,
                    "tokens_per_main_forward": sum(map(len, outs)) / forwards}
        res[key + "_tokens"] = outs
    res["identical_outputs"] = res.pop("plain_tokens") == res.pop("speculative_tokens")
    res["speed_up"] = res["speculative"]["tokens_per_s"] / res["plain"]["tokens_per_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--run", default="runs/tiny")
    ap.add_argument("--new-tokens", type=int, default=200)
    args = ap.parse_args()
    base = dsj.load_config("tiny", **{"mtp.depth": 0})
    configs = {"tiny": base, "tiny-h16": base.replace(**{"attention.n_heads": 16})}
    speeds = []
    for name, cfg in configs.items():
        variables = dsj.init_variables(cfg, 0)
        for ctx in args.contexts:
            r = {"config": name, **decode_speed(cfg, variables, ctx, args.batch, args.steps)}
            print(json.dumps(r), file=sys.stderr)
            speeds.append(r)
    v3 = dsj.load_config("deepseek-v3-671b")
    a = v3.attention
    bytes_v3 = {"latent_bf16": (a.kv_lora_rank + a.qk_rope_head_dim) * v3.n_layers * 2,
                "naive_bf16": a.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) * v3.n_layers * 2}
    spec = speculative(args.run, args.new_tokens)
    print(json.dumps({"benchmark": "decode", "decode": speeds, "v3_cache_bytes_per_token": bytes_v3,
                      "speculative": spec, **provenance()}, indent=1))


if __name__ == "__main__":
    main()
