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
# same recipe at CPU scale (long-context.md §4-5), in about 20 minutes on 2 cores (with the sparse models):
#
# 1. a 0.45M-parameter 2-layer MLA model trained **without** YaRN at L = 64 tokens on synthetic pass keys
#    (`configs/niah-tiny.yaml`: `PASS d1 .. d5` hidden in random filler words, `Q PASS` asks for it, the loss
#    on the five answer digits only);
# 2. evaluated up to 4L = 256 three ways: (a) as trained, (b) with the fine-tune's YaRN (s = 4) switched on
#    without training, (c) after a short fine-tune at 2L with that YaRN (`configs/niah-tiny-yarn.yaml`,
#    started from the run's weights);
# 3. the answer's perplexity by the needle's position in 4L-token samples;
# 4. the KV cache: MLA's latent against a GQA model of equal parameters trained on the same data.
#
# Every stage is a normal run folder under `NIAH_OUT` (default `runs/niah-notebook`); the test suite executes
# this notebook and checks its `results.json` against the calibrated floors (README, "Long context").

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

from deepseek_jax.eval.long_context import answer_nll, niah_eval, parse_depths, plot_niah  # noqa: E402
from deepseek_jax.train.config import load_run_config  # noqa: E402
from deepseek_jax.train.loop import train  # noqa: E402
from deepseek_jax.train.metrics_log import read_metrics  # noqa: E402
from deepseek_jax.train.run_dir import load_run  # noqa: E402
from deepseek_jax.train.synthetic import make_sample  # noqa: E402

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
OUT = Path(os.environ.get("NIAH_OUT", ROOT / "runs" / "niah-notebook"))
shutil.rmtree(OUT, ignore_errors=True)
L = 64
LENGTHS, DEPTHS, SAMPLES = [32, 64, 128, 256], parse_depths("0:100:6"), 20
results, seconds = {}, {}


def run(name, preset, init=None):
    cfg, tcfg = load_run_config(ROOT / "configs" / preset, [f"train.out={OUT / name}"])
    t0 = time.perf_counter()
    train(cfg, tcfg, progress=False, init=init)
    seconds[name] = round(time.perf_counter() - t0, 1)
    return load_run(OUT / name)


def grid(name, cfg, variables, scoring="argmax", lengths=LENGTHS, samples=SAMPLES):
    t0 = time.perf_counter()
    r = niah_eval(cfg, variables, task="passkey", lengths=lengths, depths=DEPTHS, samples=samples, seed=0,
                  scoring=scoring, train_length=L)
    seconds[f"eval_{name}"] = round(time.perf_counter() - t0, 1)
    results[name] = r
    print(f"{name}: exact match by length {r['by_length']} ({seconds[f'eval_{name}']} s)")
    return r


def heatmaps(panels):
    """Side-by-side heatmaps of ``[(result name, title), ...]``."""
    fig, ax = plt.subplots(1, len(panels), figsize=(16, 4))
    for a, (name, title) in zip(ax, panels):
        plot_niah(results[name], ax=a, title=title)
    fig.tight_layout()
    plt.show()


# %% [markdown]
# ## 1 · Train at L = 64 without YaRN
# 1500 steps of 64 rows of 64 tokens; each row packs samples of random lengths in [21, 64] with the needle at a
# random depth. The answer loss sits on a plateau, then falls to ~0 once the model finds the pass key by
# content (an induction circuit: "the digit after PASS, then the digit after that one").

# %%
cfg, variables, _ = run("base", "niah-tiny.yaml")
print(f"trained in {seconds['base']} s")
grid("no_yarn", cfg, variables)

# %% [markdown]
# ## 2 · YaRN without fine-tuning, then a short fine-tune at 2L
# YaRN rescales the rotary frequencies by parts (the fast ones kept, the slow ones interpolated by s = 4) and
# sharpens the softmax by `(0.1 ln s + 1)^2`. Switched on as is (b), the weights see positions they were not
# trained on -- compressed ones -- and retrieval breaks even inside L. A fine-tune of 800 steps at 2L = 128
# (`deepseek-jax train --config configs/niah-tiny-yarn.yaml --init runs/niah`, 45 s) repairs it and carries
# to 4L (c), where the un-extended model (a) falls apart.

# %%
ft_model, _ = load_run_config(ROOT / "configs" / "niah-tiny-yarn.yaml")
grid("yarn", ft_model, variables)
ft_cfg, ft_vars, _ = run("yarn_ft", "niah-tiny-yarn.yaml", init=variables)
print(f"fine-tuned in {seconds['yarn_ft']} s")
grid("yarn_ft", ft_cfg, ft_vars)

heatmaps([("no_yarn", "(a) trained at 64, no YaRN"), ("yarn", "(b) YaRN s=4, no training"),
          ("yarn_ft", "(c) YaRN s=4 + 800 steps at 128")])

# %% [markdown]
# ## 3 · Teacher-forced scoring against greedy decoding through the latent cache
# `argmax` scores a whole sample in one forward; `generate` decodes the answer greedily through the absorbed
# MLA cache, one token at a time. On the trained models they agree cell by cell.

# %%
check = grid("yarn_ft_generate", ft_cfg, ft_vars, scoring="generate", lengths=[64, 256], samples=10)
same = grid("yarn_ft_argmax_check", ft_cfg, ft_vars, lengths=[64, 256], samples=10)
agree = [c["exact"] for c in check["cells"]] == [c["exact"] for c in same["cells"]]
print("argmax and generate give the same exact match in every cell:", agree)

# %% [markdown]
# ## 4 · Perplexity by position
# These models are trained with the loss on the answer only, so the likelihood they give the haystack's filler
# words means nothing (`deepseek-jax eval ppl` is for checkpoints trained on text). What carries the signal is
# the perplexity of the answer as a function of where its needle sits: 4L = 256-token samples with the needle
# at 17 positions, 8 samples each, the answer's mean NLL per position. Uniform guessing costs ln 10 = 2.3 nats
# per digit.

# %%
rng = np.random.default_rng(123)
depth_grid = np.linspace(0, 100, 17)
probe = [make_sample("passkey", 4 * L, float(d), rng) for d in depth_grid for _ in range(8)]
where = np.array([s.needles[0] for s in probe]).reshape(17, 8).mean(1)
ppl = {name: answer_nll(c, v, probe).reshape(17, 8).mean(1)
       for name, c, v in [("no_yarn", cfg, variables), ("yarn", ft_model, variables), ("yarn_ft", ft_cfg, ft_vars)]}
plt.figure(figsize=(7, 3.5))
for name, nll in ppl.items():
    plt.plot(4 * L - where, nll, "o-", label=name)
plt.axvline(L, color="k", ls="--", lw=1)
plt.axhline(np.log(10), color="gray", lw=0.5)
plt.xlabel("distance from the needle to the end of the sample (tokens)")
plt.ylabel("answer NLL (nats/digit)")
plt.yscale("symlog", linthresh=0.01)
plt.legend()
plt.show()
for name, nll in ppl.items():
    near, far = nll[where >= 3 * L].mean(), nll[where < 3 * L].mean()
    print(f"{name:>8}: answer NLL {nll.mean():.3f} nats/digit; needle within L of the end {near:.3f}, "
          f"farther {far:.3f}")

# %% [markdown]
# ## 5 · The cache: MLA's latent against GQA of equal parameters
# The GQA model (`configs/niah-tiny-gqa.yaml`, 443K parameters against MLA's 447K: 4 query heads sharing 2
# K/V heads of 32) caches 2 x 2 x 32 = 128 numbers per token and layer; MLA caches its 64-wide latent plus the
# 16-wide RoPE key: 80. GQA trains on the same data for 1000 steps (without YaRN, so it fails past L like
# (a)); the bytes are measured from the caches `generate` allocates at each length, next to the formula.

# %%
gcfg, gvars, _ = run("gqa", "niah-tiny-gqa.yaml")
grid("gqa", gcfg, gvars)
cache = {"mla": results["yarn_ft"]["kv_cache"], "gqa": results["gqa"]["kv_cache"]}
for k, c in cache.items():
    print(f"{k}: {c['formula_bytes_per_token']:.0f} B/token (fp32, 2 layers) by the formula; measured at each "
          f"length: {c['measured_bytes_per_token']}")
print("whole cache of one sequence (KiB):", {n: {k: c["measured_bytes_per_token"][str(n)] * n / 1024
                                                 for k, c in cache.items()} for n in LENGTHS})
print("exact match at L:", {"mla": results["no_yarn"]["by_length"][str(L)], "gqa": results["gqa"]["by_length"][str(L)]})

# %% [markdown]
# ## 6 · Sparse attention: NSA trained natively, DSA added to the trained dense model
# **NSA** (`configs/niah-tiny-nsa.yaml`) is the same model and data (1000 steps) with every attention layer
# Native Sparse Attention at sizes for L = 64: compressed blocks of 8 every 4, 5 selected blocks of 8 (the
# first and the 2 local ones forced) and a window of 8 -- a query at 64 reads 15 compressed keys and 48 tokens.
# **DSA** follows DeepSeek-V3.2: the trained dense model above gains a lightning indexer, a dense warm-up of 200
# steps trains the indexer alone against the attention (`configs/niah-tiny-dsa-warmup.yaml`, KL), then 300 sparse
# steps where each query attends to its indexer's top 16 keys (`configs/niah-tiny-dsa.yaml`). Neither uses YaRN.

# %%
ncfg, nvars, _ = run("nsa", "niah-tiny-nsa.yaml")
print(f"NSA trained in {seconds['nsa']} s")
grid("nsa", ncfg, nvars)

# %%
_, wvars, _ = run("dsa_warmup", "niah-tiny-dsa-warmup.yaml", init=variables)
dcfg, dvars, _ = run("dsa", "niah-tiny-dsa.yaml", init=wvars)
print(f"DSA: indexer warm-up {seconds['dsa_warmup']} s, sparse stage {seconds['dsa']} s")
grid("dsa", dcfg, dvars)
kl = {name: [r["indexer_kl"] for r in read_metrics(OUT / name / "metrics.jsonl") if r["kind"] == "train"]
      for name in ("dsa_warmup", "dsa")}
print("indexer KL (nats) at the start and end of each stage:", {k: (round(v[0], 3), round(v[-1], 3))
                                                                  for k, v in kl.items()})

heatmaps([("no_yarn", "dense MLA (a)"), ("nsa", "NSA, trained natively"),
          ("dsa", "DSA top-16: warm-up 200 + sparse 300 steps")])

# %%
summary = {name: {"by_length": r["by_length"], "min_cell_at_most_L": min(
    c["exact"] for c in r["cells"] if c["length"] <= L)} for name, r in results.items()}
curves = {k: {"needle_index": where.tolist(), "nll": x.tolist()} for k, x in ppl.items()}
(OUT / "results.json").write_text(json.dumps({"results": summary, "cells": {k: r["cells"] for k, r in results.items()},
                                              "agree": agree, "cache": cache, "answer_nll": curves, "indexer_kl": kl,
                                              "seconds": seconds}, indent=1))
for name, s in summary.items():
    print(f"{name:>22}: {s['by_length']}")
print(seconds)
