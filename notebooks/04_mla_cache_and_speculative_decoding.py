# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · The MLA latent cache, absorbed decoding, and MTP speculative decoding
#
# Multi-head Latent Attention exists to make the KV cache small: per token and layer it caches the
# normalised latent `c_kv` (`kv_lora_rank` values) and one rotated RoPE key shared by all heads
# (`qk_rope_head_dim`), and decoding *absorbs* the key and value up-projections into the query and the
# output instead of re-expanding the cache. This notebook measures:
#
# 1. cache bytes per token on DeepSeek-V3's shapes for MHA, GQA, MLA with a naive (expanded) cache and
#    MLA with the latent cache -- from the cache arrays `dsj.init_cache` builds (shapes only, via
#    `jax.eval_shape`: nothing of V3's size is allocated);
# 2. decode speed against context length, absorbed vs naive;
# 3. the acceptance rate of the MTP draft on the trained tiny model, and what speculative decoding buys.

# %%
import os

# One CPU device is what a laptop has; drop the 8 fake devices the test suite may have exported.
os.environ["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                   if "xla_force_host_platform_device_count" not in f)
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import deepseek_jax as dsj  # noqa: E402
from deepseek_jax import infer as G  # noqa: E402
from deepseek_jax.nn.attention import CacheConfig  # noqa: E402

os.chdir(Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd())

# %% [markdown]
# ## 1. Cache bytes per token on V3's shapes (61 layers, bf16)
# V3's attention has 128 heads of 128 (+64 RoPE) dimensions. For comparison, the same model with
# MHA (128 K/V heads of 128), GQA (8 K/V heads), MLA caching the expanded keys and values ("naive"),
# and MLA caching the latent.

# %%
v3 = dsj.load_config("deepseek-v3-671b", dtype="bfloat16", **{"mtp.depth": 0})


def cache_bytes(cfg, kind="latent"):
    shapes = jax.eval_shape(lambda: G.init_cache(cfg, 1, 1, kind))
    return G.cache_bytes_per_token(shapes)


def with_attention(attention):
    d = v3.to_dict()
    d["attention"] = attention
    return dsj.ModelConfig.from_dict(d)


mha = with_attention({"kind": "mha", "n_heads": 128, "head_dim": 128})
gqa = with_attention({"kind": "gqa", "n_heads": 128, "n_kv_heads": 8, "head_dim": 128})
rows = {"MHA (128 KV heads)": cache_bytes(mha), "GQA (8 KV heads)": cache_bytes(gqa),
        "MLA, naive cache": cache_bytes(v3, "naive"), "MLA, latent cache": cache_bytes(v3, "latent")}
a = v3.attention
assert rows["MLA, latent cache"] == (a.kv_lora_rank + a.qk_rope_head_dim) * v3.n_layers * 2
for name, b in rows.items():
    print(f"{name:20s} {b:>12,.0f} B/token  ({b / rows['MLA, latent cache']:6.1f}x the latent cache)")
fig, ax = plt.subplots(figsize=(7, 2.8))
ax.barh(list(rows), [b / 1024 for b in rows.values()])
ax.set_xscale("log")
ax.set_xlabel("KiB per token (all 61 layers, bf16)")
plt.show()
print(f"a 128K-token context: latent {rows['MLA, latent cache'] * 131072 / 2**30:.1f} GiB, "
      f"MHA {rows['MHA (128 KV heads)'] * 131072 / 2**30:.0f} GiB per sequence")

# %% [markdown]
# ## 2. Decode speed against context length: absorbed vs naive
# The tiny preset with 16 heads (so the naive cache is 16 x 2 x (96 + 64) values per token and layer,
# the latent one 160), batch 4; each point is the median of 12 decode steps with the cache filled to
# that context. Both kinds run the same model with the same weights.

# %%
cfg16 = dsj.load_config("tiny", **{"mtp.depth": 0, "attention.n_heads": 16})
v16 = dsj.init_variables(cfg16, 0)


def decode_time(kind, ctx, batch=4, steps=12):
    size = ctx + steps + 1
    model = dsj.Transformer(cfg16, cache=CacheConfig(size, kind))
    run = jax.jit(lambda v, c, t, p: model.apply({**v, "cache": c}, t, p, with_mtp=False, mutable=["cache"]))
    cache = G.init_cache(cfg16, batch, size, kind)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 512, (batch, ctx)), jnp.int32)
    _, upd = run(v16, cache, prompt, jnp.broadcast_to(jnp.arange(ctx), (batch, ctx)))
    cache, times, tok = upd["cache"], [], prompt[:, -1:]
    for i in range(steps):
        t = time.perf_counter()
        out, upd = run(v16, cache, tok, jnp.full((batch, 1), ctx + i))
        jax.block_until_ready(out.logits)
        times.append(time.perf_counter() - t)
        cache, tok = upd["cache"], jnp.argmax(out.logits[:, -1:], -1)
    return float(np.median(times[1:]))


contexts = [64, 256, 1024]
speed = {kind: [4 / decode_time(kind, c) for c in contexts] for kind in ("latent", "naive")}
fig, ax = plt.subplots(figsize=(6, 3))
for kind, label in (("latent", "absorbed (latent cache)"), ("naive", "naive (expanded cache)")):
    ax.plot(contexts, speed[kind], marker="o", label=label)
ax.set_xscale("log")
ax.set_xlabel("context length")
ax.set_ylabel("decode tokens/s (batch 4)")
ax.legend()
plt.show()
for c, lat, nai in zip(contexts, speed["latent"], speed["naive"]):
    print(f"context {c:5d}: absorbed {lat:7.1f} tokens/s, naive {nai:7.1f} tokens/s ({lat / nai:.2f}x)")

# %% [markdown]
# ## 3. MTP speculative decoding on the trained tiny model
# The model of the README's main command (`runs/tiny`) if it is there; otherwise a short run is trained
# here. MTP module 1 drafts the token after next; the main model verifies `[last, draft]` in one forward.
# Greedy speculative output is identical to plain greedy output (the tests check 200 tokens).

# %%
run_dir = Path("runs/tiny")
if not (run_dir / "checkpoints").is_dir():
    from deepseek_jax import train as T

    run_dir = Path(tempfile.mkdtemp()) / "tiny"
    cfg, tcfg = T.load_run_config("tiny", ["train.steps=150", "train.batch_size=4", "train.seq_len=128",
                                           "train.sample_tokens=0", "train.eval_every=1000"])
    T.train(cfg, tcfg.replace(out=str(run_dir)), progress=False)
cfg, variables, tok = dsj.load_run(str(run_dir))
prompts = ["def __init__(self", "import os\nimport sys\n", "class Foo:\n    ", "for i in range("]
ids = [tok.encode(p).ids for p in prompts]
accept = []
for p, i in zip(prompts, ids):
    stats = {}
    plain = dsj.generate(cfg, variables, [i], 60, eos_id=-1)
    spec = dsj.generate(cfg, variables, [i], 60, eos_id=-1, speculative=True, stats=stats)
    assert spec == plain
    accept.append(stats["acceptance_rate"])
    print(f"{p!r:28s} acceptance {stats['acceptance_rate']:.2f}, {stats['tokens_per_forward']:.2f} tokens per "
          f"main-model forward")
print(f"mean acceptance {np.mean(accept):.2f} (DeepSeek-V3 reports 85-90% for its second token)")
print("\nsample (greedy):\n" + prompts[-1] + tok.decode(plain[0]))
