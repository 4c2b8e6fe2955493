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
# # 05 · Training and auxiliary-loss-free load balancing
#
# The tiny DeepSeek-V3-style preset trained twice from the same seed on the default corpus (Python's
# standard library): once with the router's correction bias frozen (`bias_gamma = 0`) and once with the
# auxiliary-loss-free update `b_i <- b_i + gamma * sign(mean load - load_i)` after every step.
# We plot the learning-rate schedules, the loss curves, MaxVio (max load / mean load - 1) per step,
# and the expert loads over time as heatmaps.
#
# Runs are short (CPU), so the numbers are illustrative; `deepseek-jax train --config configs/tiny.yaml`
# is the full default run.

# %%
import os

# One CPU device is what a laptop has; drop the 8 fake devices the test suite may have exported.
os.environ["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                   if "xla_force_host_platform_device_count" not in f)
import json  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from deepseek_jax import train as T
from deepseek_jax.train import optim  # noqa: E402

os.chdir(Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd())

# %% [markdown]
# ## Learning-rate schedules
# DeepSeek LLM's multi-step schedule (x0.316 after 80% of training, x0.1 after 90%) and DeepSeek-V3's
# (constant, cosine to 10%, then two constant tails), both with a linear warm-up, over 1,000 steps.

# %%
steps = np.arange(1000)
fig, ax = plt.subplots(figsize=(7, 3))
for kind in ("multistep", "v3", "cosine"):
    s = optim.lr_schedule(optim.OptimConfig(lr=1.0, schedule=kind, warmup_steps=50), 1000)
    ax.plot(steps, [float(s(t)) for t in steps], label=kind)
ax.set_xlabel("step")
ax.set_ylabel("lr / peak")
ax.legend()
plt.show()

# %% [markdown]
# ## Two short runs: gamma = 0 vs gamma = 0.01
# Same seed, same data order; only the bias update speed differs (it is a traced argument, so both runs
# share one compiled step).

# %%
N_STEPS = 60
base = ["train.batch_size=8", "train.seq_len=128", f"train.steps={N_STEPS}", "train.optim.warmup_steps=6",
        "train.optim.lr=0.003", "train.eval_every=30", "train.checkpoint_every=60", "train.sample_tokens=0",
        "train.data.max_documents=40"]
root = Path(tempfile.mkdtemp(prefix="dsj-nb05-"))
runs = {}
for gamma in (0.0, 0.01):
    cfg, tcfg = T.load_run_config("tiny", base + [f"train.bias_gamma={gamma}"])
    out = root / f"gamma{gamma}"
    summary = T.train(cfg, tcfg.replace(out=str(out)), progress=False)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    runs[gamma] = {"train": [r for r in recs if r["kind"] == "train"], "val": [r for r in recs if r["kind"] == "val"],
                   "summary": summary}
    print(f"gamma={gamma}: final train loss {runs[gamma]['train'][-1]['loss']:.3f}, "
          f"validation loss {summary['val_loss']:.3f} (unigram entropy {summary['unigram_entropy']:.3f})")

# %% [markdown]
# ## Loss curves and MaxVio

# %%
fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.5))
for gamma, r in runs.items():
    a1.plot([x["step"] for x in r["train"]], [x["ce"] for x in r["train"]], label=f"train CE, gamma={gamma}")
    a1.plot([x["step"] for x in r["val"]], [x["loss"] for x in r["val"]], "o", label=f"val, gamma={gamma}")
    a2.plot([x["step"] for x in r["train"]], [x["maxvio"] for x in r["train"]], label=f"gamma={gamma}")
a1.axhline(runs[0.0]["summary"]["unigram_entropy"], color="gray", ls="--", label="unigram entropy")
a1.set_xlabel("step")
a1.set_ylabel("nats")
a1.legend(fontsize=7)
a2.set_xlabel("step")
a2.set_ylabel("MaxVio (mean over MoE layers)")
a2.legend()
plt.show()
for gamma, r in runs.items():
    print(f"gamma={gamma}: MaxVio over the last 10 steps {np.mean([x['maxvio'] for x in r['train'][-10:]]):.3f}")

# %% [markdown]
# ## Expert loads over time (first MoE layer)
# Each column is one step; each row one of the 16 routed experts; colour = tokens routed to it divided
# by the mean. With gamma = 0 a few experts take most tokens; the bias update flattens the picture.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5), sharey=True)
for ax, (gamma, r) in zip(axes, runs.items()):
    load = np.array([x["expert_load"][0] for x in r["train"]], float).T  # [experts, steps]
    im = ax.imshow(load / load.mean(0, keepdims=True), aspect="auto", cmap="viridis", vmin=0, vmax=3)
    ax.set_title(f"gamma = {gamma}")
    ax.set_xlabel("step")
axes[0].set_ylabel("expert")
fig.colorbar(im, ax=axes, label="load / mean load")
plt.show()
