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
# # 08 · Long context you can see: needles in a haystack, and extending the context with YaRN
#
# DeepSeek-V2 and V3 pre-train at 4K tokens, then switch YaRN on and fine-tune briefly at a longer length
# (V3: 4K -> 32K -> 128K, 1000 steps each), and show the result as needle-in-a-haystack heatmaps. Here is the
# same recipe at CPU scale (long-context.md §4-5):
#
# 1. a 0.45M-parameter 2-layer MLA model trained **without** YaRN at L = 256 tokens on synthetic key-value
#    retrieval (`configs/niah-tiny.yaml`: `KEY k1 k2 VAL v1 v2 v3` hidden in random filler, the loss on the
#    answer only);
# 2. evaluated up to 4L = 1024 three ways: (a) as trained, (b) with YaRN s = 4 switched on without training,
#    (c) with YaRN s = 4 after a short fine-tune at 2L (`configs/niah-tiny-yarn.yaml`, from the run folder);
# 3. perplexity by position on long held-out samples;
# 4. the KV cache: MLA's latent against a GQA model of equal parameters on the same task.
#
# Every stage is a normal run folder under `NIAH_OUT` (default `runs/niah-notebook`); the test suite executes
# this notebook and checks its `results.json` against the calibrated floors.

# %%
import json
import os
import shutil
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                   if "xla_force_host_platform_device_count" not in f)  # one device
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from deepseek_jax.eval.long_context import (niah_eval, parse_depths, perplexity_by_position, plot_niah,  # noqa: E402
                                            with_yarn)
from deepseek_jax.train.config import load_run_config  # noqa: E402
from deepseek_jax.train.loop import train  # noqa: E402
from deepseek_jax.train.run_dir import load_run  # noqa: E402
from deepseek_jax.train.synthetic import make_sample  # noqa: E402

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
OUT = Path(os.environ.get("NIAH_OUT", ROOT / "runs" / "niah-notebook"))
shutil.rmtree(OUT, ignore_errors=True)
L = 256
LENGTHS, DEPTHS, SAMPLES = [64, 128, 256, 512, 1024], parse_depths("0:100:11"), 20
results, seconds = {}, {}


def run(name, preset, *overrides, init=None):
    cfg, tcfg = load_run_config(ROOT / "configs" / preset, [f"train.out={OUT / name}", *overrides])
    t0 = time.perf_counter()
    train(cfg, tcfg, progress=False, init=init)
    seconds[name] = round(time.perf_counter() - t0, 1)
    return load_run(OUT / name)


def grid(name, cfg, variables, scoring="argmax", lengths=LENGTHS, samples=SAMPLES):
    t0 = time.perf_counter()
    r = niah_eval(cfg, variables, task="kv", lengths=lengths, depths=DEPTHS, samples=samples, seed=0,
                  scoring=scoring, train_length=L)
    seconds[f"eval_{name}"] = round(time.perf_counter() - t0, 1)
    results[name] = r
    print(f"{name}: exact match by length {r['by_length']} ({seconds[f'eval_{name}']} s)")
    return r


# %% [markdown]
# ## 1 · Train at L = 256 without YaRN
# 1500 steps of 16 samples, each of a random length in [32, 256] with the needle at a random depth.

# %%
cfg, variables, _ = run("base", "niah-tiny.yaml")
print(f"trained in {seconds['base']} s")
base = grid("no_yarn", cfg, variables)

# %% [markdown]
# ## 2 · YaRN without fine-tuning, then a short fine-tune at 2L
# YaRN rescales the rotary frequencies by parts (high frequencies kept, low ones interpolated by s) and
# sharpens the softmax by `(0.1 ln s + 1)^2`; the weights are the same. Then 150 steps at 512 tokens from the
# run folder, as DeepSeek did (`deepseek-jax train --config configs/niah-tiny-yarn.yaml --init runs/niah`).

# %%
yarn_cfg = with_yarn(cfg, 4.0, L)
grid("yarn", yarn_cfg, variables)
ft_cfg, ft_vars, _ = run("yarn_ft", "niah-tiny-yarn.yaml", init=variables)
print(f"fine-tuned in {seconds['yarn_ft']} s")
grid("yarn_ft", ft_cfg, ft_vars)

fig, ax = plt.subplots(1, 3, figsize=(18, 4.5))
for a, (name, title) in zip(ax, [("no_yarn", "(a) trained at 256, no YaRN"), ("yarn", "(b) YaRN s=4, no training"),
                                  ("yarn_ft", "(c) YaRN s=4 + 150 steps at 512")]):
    plot_niah(results[name], ax=a, title=title)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3 · Teacher-forced scoring against greedy decoding through the latent cache
# `argmax` scores a whole sample in one forward; `generate` decodes the answer greedily through the absorbed
# MLA cache. On the trained models they agree cell by cell.

# %%
check = grid("yarn_ft_generate", ft_cfg, ft_vars, scoring="generate", lengths=[256, 1024], samples=10)
same = grid("yarn_ft_argmax_check", ft_cfg, ft_vars, lengths=[256, 1024], samples=10)
agree = [c["exact"] for c in check["cells"]] == [c["exact"] for c in same["cells"]]
print("argmax and generate give the same exact match in every cell:", agree)

# %% [markdown]
# ## 4 · Perplexity by position
# Mean next-token NLL over held-out 1024-token samples (most tokens are uniform filler: ln 64 = 4.16 nats is
# the floor a model can reach on them). Past the training length the un-extended model loses its footing.

# %%
rng = np.random.default_rng(123)
rows = np.stack([make_sample("kv", 1024, float(rng.uniform(0, 100)), rng).tokens for _ in range(16)])
ppl = {name: perplexity_by_position(c, v, rows, bins=8)
       for name, c, v in [("no_yarn", cfg, variables), ("yarn", yarn_cfg, variables), ("yarn_ft", ft_cfg, ft_vars)]}
plt.figure(figsize=(7, 3.5))
for name, r in ppl.items():
    plt.plot([(b["start"] + b["end"]) / 2 for b in r["bins"]], [b["nll"] for b in r["bins"]], "o-", label=name)
plt.axvline(L, color="k", ls="--", lw=1), plt.axhline(np.log(64), color="gray", lw=0.5)
plt.xlabel("position"), plt.ylabel("NLL (nats/token)"), plt.legend()
plt.show()

# %% [markdown]
# ## 5 · The cache: MLA's latent against GQA of equal parameters
# The GQA model (`configs/niah-tiny-gqa.yaml`, 443K parameters: 4 query heads sharing 2 K/V heads of 32)
# caches 128 numbers per token and layer; MLA caches its 64-wide latent plus the 16-wide RoPE key: 80. Both
# are trained the same way; the bytes are measured from the caches `generate` allocates.

# %%
gcfg, gvars, _ = run("gqa", "niah-tiny-gqa.yaml")
grid("gqa", gcfg, gvars, lengths=[64, 128, 256])
cache = {"mla": results["no_yarn"]["kv_cache"], "gqa": results["gqa"]["kv_cache"]}
for k, c in cache.items():
    print(f"{k}: {c['formula_bytes_per_token']:.0f} B/token by the formula; measured at each length "
          f"{c['measured_bytes_per_token']}")
print("exact match at L:", {"mla": results["no_yarn"]["by_length"]["256"], "gqa": results["gqa"]["by_length"]["256"]})

# %%
summary = {name: {"by_length": r["by_length"], "min_cell_at_most_L": min(
    c["exact"] for c in r["cells"] if c["length"] <= L)} for name, r in results.items()}
(OUT / "results.json").write_text(json.dumps({"results": summary, "cells": {k: r["cells"] for k, r in results.items()},
                                              "agree": agree, "cache": cache,
                                              "ppl": {k: r["bins"] for k, r in ppl.items()}, "seconds": seconds},
                                             indent=1))
for name, s in summary.items():
    print(f"{name:>22}: {s['by_length']}")
