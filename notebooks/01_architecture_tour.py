# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · A tour of the DeepSeek architecture
#
# What this notebook shows, all on CPU in a few seconds:
# 1. **Multi-head Latent Attention**: the shapes of its weights, and why its KV cache is small.
# 2. **DeepSeekMoE routing**: one router decision on real text, step by step (sigmoid scores,
#    correction bias, group-limited top-k).
# 3. **Parameter counts** of the published presets, computed from shapes alone.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import deepseek_jax as dsj
from deepseek_jax.nn.attention import MLA
from deepseek_jax.nn.layers import RMSNorm
from deepseek_jax.nn.moe import route

cfg = dsj.load_config("tiny")
variables = dsj.init_variables(cfg, 0)
print(cfg.attention)

# %% [markdown]
# ## 1. MLA weights
# Queries go through a rank-`q_lora_rank` bottleneck; keys and values are expanded from a
# normalised latent `c` of size `kv_lora_rank`; one RoPE key of size `qk_rope_head_dim` is shared by
# all heads. Weights are stored `[in, out...]` with the dimension letters of the README
# (d model, q q-latent, c kv-latent, n heads, r rope).

# %%
attn = variables["params"]["moe_layers"]["attn"]  # leading axis: the scanned layers
for name, w in sorted(jax.tree_util.tree_leaves_with_path(attn), key=lambda kv: jax.tree_util.keystr(kv[0])):
    print(f"{jax.tree_util.keystr(name):28s} {tuple(w.shape)}")

# %% [markdown]
# ## KV cache per token: MLA vs MHA vs GQA
# MLA caches only the latent and the RoPE key (`c + r` numbers per layer); MHA caches a key and a
# value per head; GQA per key/value group. The DeepSeek-V3 shapes (61 layers, 128 heads of 128):

# %%
v3 = dsj.load_config("deepseek-v3-671b")
a = v3.attention
per_layer = {
    "MLA (V3)": a.kv_lora_rank + a.qk_rope_head_dim,
    "GQA, 8 groups": 2 * 8 * 128,
    "MHA, 128 heads": 2 * a.n_heads * 128,
}
kib = {k: 2 * v * v3.n_layers / 1024 for k, v in per_layer.items()}  # bf16
for k in per_layer:
    print(f"{k:15s} {per_layer[k]:6d} numbers/layer  {kib[k]:8.1f} KiB/token")
assert dsj.model_info(v3)["kv_cache_bytes_per_token"] == 2 * per_layer["MLA (V3)"] * v3.n_layers == 70_272
plt.figure(figsize=(5, 2.5))
plt.barh(list(kib), list(kib.values()))
plt.xscale("log")
plt.xlabel("KV cache per token, KiB (bf16, log scale)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. One router decision on real tokens
# The tiny model's vocabulary (512) covers all bytes, so UTF-8 bytes of a sentence are valid tokens.
# We run the embedding and the first (dense) layer, normalise as the first MoE layer does, and route.
# A correction bias (as auxiliary-loss-free balancing would learn) shifts *which* experts win, but the
# gate weights stay the unbiased sigmoid scores.

# %%
text = "Multi-head latent attention"
tokens = jnp.asarray([list(text.encode())], jnp.int32)
p, router_vars = variables["params"], variables["router"]
pos = jnp.arange(tokens.shape[1])[None]
seg = jnp.zeros_like(tokens)
x = p["embed"][tokens]
first = jax.tree_util.tree_map(lambda w: w[0], p["dense_layers"])
x, _ = dsj.DecoderLayer(cfg, moe=False).apply({"params": first}, x, pos, seg)
moe0 = jax.tree_util.tree_map(lambda w: w[0], p["moe_layers"])
x_attn = x + MLA(cfg).apply({"params": moe0["attn"]},
                           RMSNorm(cfg.d_model, cfg.rms_norm_eps).apply({"params": moe0["attn_norm"]}, x), pos, seg)
h = RMSNorm(cfg.d_model, cfg.rms_norm_eps).apply({"params": moe0["ffn_norm"]}, x_attn)[0]
logits = h @ moe0["ffn"]["router"]
bias = 0.005 * jax.random.normal(jax.random.key(1), (cfg.moe.n_routed_experts,))  # an illustrative learned bias
weights, experts = route(logits, bias, cfg.moe)
per_group = cfg.moe.n_routed_experts // cfg.moe.router.n_group
print(f"{cfg.moe.n_routed_experts} experts in {cfg.moe.router.n_group} groups; each token may use "
      f"{cfg.moe.router.topk_group} groups and {cfg.moe.experts_per_token} experts")
for ch, e, w in list(zip(text, np.asarray(experts), np.asarray(weights)))[:10]:
    print(f"{ch!r:5} experts {sorted(e.tolist())!s:18} groups {sorted(set((e // per_group).tolist()))!s:8} "
          f"weights sum {w.sum():.2f}")
assert all(len(set((e // per_group).tolist())) <= cfg.moe.router.topk_group for e in np.asarray(experts))

# %%
scores = jax.nn.sigmoid(logits)
fig, ax = plt.subplots(figsize=(7, 3))
ax.imshow(np.asarray(scores + bias).T, aspect="auto", cmap="viridis")
for t, e in enumerate(np.asarray(experts)):
    ax.scatter([t] * len(e), e, marker="x", color="red", s=12)
ax.set_xticks(range(len(text)), list(text))
ax.set_ylabel("expert")
ax.set_title("selection scores (sigmoid + bias); red: chosen experts")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Parameter counts of the presets
# `jax.eval_shape` traces `init` without allocating anything, so the 671B model is counted in a
# fraction of a second. "Active" excludes the routed experts a token skips and the embedding lookup.

# %%
rows = []
for name in ["deepseek-llm-7b", "deepseek-llm-67b", "deepseek-v2-lite-16b", "deepseek-v2-236b", "deepseek-v3-671b", "tiny"]:
    info = dsj.model_info(dsj.load_config(name))
    rows.append((name, info["params_total"] / 1e6, info["params_active"] / 1e6, info["params_mtp"] / 1e6,
                 info["kv_cache_bytes_per_token"]))
print(f"{'preset':22s} {'total (M)':>12s} {'active (M)':>12s} {'MTP (M)':>10s} {'KV B/token':>11s}")
for r in rows:
    print(f"{r[0]:22s} {r[1]:12,.1f} {r[2]:12,.1f} {r[3]:10,.1f} {r[4]:11,d}")
