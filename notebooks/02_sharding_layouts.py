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
# # 02 · One model, many layouts
#
# The same tiny DeepSeek-V3 on 8 (fake) CPU devices, laid out six ways over the mesh axes
# `data, fsdp, expert, tensor`. For each layout: where a few parameters live, the memory each device
# holds, and the collectives the compiled forward+backward pays for. One rules table
# (`dsj.sharding.RULES`) maps every logical axis name to mesh axes; nothing else changes between layouts.

# %%
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax
import matplotlib.pyplot as plt
import numpy as np

import deepseek_jax as dsj
from deepseek_jax import sharding as S
from deepseek_jax.train.step import step_layout_report

print(len(jax.devices()), "devices")
for name, axes in S.RULES.items():
    print(f"{name:12s} -> {axes}")

# %% [markdown]
# ## Where the parameters live
# Scaling-book notation: `W[D_fsdp, F_tensor]` means dim D is split over the `fsdp` axis and F over
# `tensor`. `visualize_array_sharding` draws which devices hold which block of a 2-D array.

# %%
cfg = dsj.load_config("tiny")
mesh = S.make_mesh(dict(data=2, fsdp=2, tensor=2))
variables = S.init_sharded(cfg, mesh, 0)  # born sharded: jit(init, out_shardings=...)
p = variables["params"]
print("embedding [v, d]:", p["embed"].sharding.spec)
jax.debug.visualize_array_sharding(p["embed"])
print("dense MLP w1[0] [d, f]:", p["dense_layers"]["ffn"]["w1"].sharding.spec)
jax.debug.visualize_array_sharding(p["dense_layers"]["ffn"]["w1"][0])

# %%
mesh_ep = S.make_mesh(dict(expert=4, tensor=2))
experts = S.shard_variables(cfg, dsj.init_variables(cfg, 0), mesh_ep)["params"]["moe_layers"]["ffn"]["w1"]
print("routed experts w1 [layers, e, d, f]:", experts.sharding.spec)
jax.debug.visualize_array_sharding(experts[0, :, :, 0])  # [e, d]: experts split over 4 shards

# %% [markdown]
# ## Memory and collectives per layout
# `step_layout_report` compiles the real training step -- the pre-training loss, AdamW, the state's
# shardings as in/out shardings, donation (nothing is run) -- and reads its memory and collectives.

# %%
layouts = ["data=8", "fsdp=8", "expert=8", "tensor=2,expert=4", "data=2,fsdp=2,expert=2", "data=2,tensor=2,expert=2"]
reports = {name: step_layout_report(cfg, S.make_mesh(name), batch=8, seq=128) for name in layouts}
print(f"{'layout':26s} {'params MiB':>10s} {'+grads+Adam':>12s} {'step temp MiB':>14s}  collectives (count, MiB)")
for name, r in reports.items():
    m = r["bytes_per_device"]
    coll = ", ".join(f"{k} x{v['count']} {v['bytes'] / 2**20:.2f}" for k, v in sorted(r["collectives"].items()))
    print(f"{name:26s} {m['params'] / 2**20:10.2f} {(m['params'] + m['grads_f32'] + m['adam_f32']) / 2**20:12.2f} "
          f"{m['step_temp'] / 2**20:14.2f}  {coll}")

# %%
kinds = ["all-gather", "all-reduce", "all-to-all", "reduce-scatter", "collective-permute"]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
bottom = np.zeros(len(layouts))
for kind in kinds:
    vals = np.array([reports[n]["collectives"].get(kind, {"bytes": 0})["bytes"] / 2**20 for n in layouts])
    if vals.any():
        ax1.barh(layouts, vals, left=bottom, label=kind)
        bottom += vals
ax1.set_xlabel("collective MiB per device per step")
ax1.legend(fontsize=8)
state = [(reports[n]["bytes_per_device"]["params"] * 4) / 2**20 for n in layouts]  # params+grads+2 Adam moments
ax2.barh(layouts, state)
ax2.set_xlabel("parameter + gradient + Adam MiB per device")
ax2.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown]
# Reading the table:
# * `data=8` keeps a full copy everywhere and all-reduces the gradients;
# * `fsdp=8` holds 1/8 of the state (every weight matrix has an `fsdp` axis, the MLA up-projections on
#   their latent rank), all-gathers each layer's weights inside the product that uses them and
#   reduce-scatters their gradients -- nothing of size is all-reduced;
# * any `expert > 1` layout adds the MoE dispatch and combine all-to-alls, and splits the experts;
# * `tensor=2` splits heads, MLP width and vocabulary, paying all-reduces of partial sums.
#
# All layouts compute the same numbers: the test suite checks logits and gradients of every layout
# against one device; here two of them, on logits.

# %%
tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (8, 32))
ref = np.asarray(dsj.forward(cfg, dsj.init_variables(cfg, 0), tokens))
for name in ["fsdp=8", "data=2,tensor=2,expert=2"]:
    m = S.make_mesh(name)
    out = np.asarray(dsj.forward(cfg, S.shard_variables(cfg, dsj.init_variables(cfg, 0), m), tokens, mesh=m))
    print(f"{name:26s} max |logits - 1 device| / max |logits| = {np.abs(out - ref).max() / np.abs(ref).max():.1e}")
