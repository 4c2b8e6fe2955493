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
# # 09 · Planning DeepSeek-V3-671B at scale, on a laptop
#
# Does V3's training step fit on a TPU v5p slice, in which layout, how many bytes cross the interconnect per
# step, what MFU could it reach? `deepseek-jax plan` answers with the TPU compiler itself: `libtpu` (the
# `tpu-plan` extra) compiles for a slice's *compile-only* devices on a CPU host
# (`jax.experimental.topologies`), so the REAL step -- pre-training loss, AdamW, the state's shardings, the
# TPU kernels (`ragged_dot`, `ragged-all-to-all`) -- is partitioned and scheduled as on the hardware, and the
# compiler reports per-chip memory against HBM, FLOPs, and every collective. Nothing is allocated.
#
# V3 compiles take minutes each on 2 cores, so the V3 numbers come from `benchmarks/plan_v3.py`, which wrote
# `benchmarks/results/plan_v3_v5p.json` (set `PLAN_LIVE=1` to recompile them here: ~1 hour). What runs live
# is (1) a small plan to show the API and (2) the analytic side: parameter counts, the H800 sanity check.

# %%
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU devices are compile-only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from deepseek_jax.analysis.params import model_info  # noqa: E402
from deepseek_jax.config import load_config  # noqa: E402
from deepseek_jax.train.plan import format_plan, format_search, plan  # noqa: E402

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
RESULTS = ROOT / "benchmarks" / "results" / "plan_v3_v5p.json"
GiB = 2 ** 30
v3 = load_config("deepseek-v3-671b")
info = model_info(v3)
print(f"V3: {info['params_total'] / 1e9:.0f}B parameters (+{info['params_mtp'] / 1e9:.1f}B MTP), "
      f"{info['params_active'] / 1e9:.1f}B active per token")

# %% [markdown]
# ## 1 · One plan, live: a small MoE on an 8-chip slice
# `tiny` (MLA, 8 routed experts, MTP) as data=2 x expert=4 on v5p:2x2x2. The report: memory per chip vs HBM,
# FLOPs (compiler vs analytic), collectives per kind and mesh axis, the kernels in the TPU program, roofline.

# %%
small = plan(load_config("tiny"), "v5p:2x2x2", "data=2,expert=4", batch=8, seq=256, remat="full")
print(format_plan(small))
assert small["kernels"]["ragged-all-to-all"] > 0 and small["kernels"]["ragged-dot"] > 0

# %% [markdown]
# ## 2 · V3-671B: the layout search on v5p:8x8x4 (256 chips)
# Every data x fsdp x expert x tensor factorisation the layout check accepts, times three remat policies, is
# estimated analytically (state bytes by the rules table plus an activation allowance; compute and
# communication at the chip's peaks); the most promising are compiled. One 4096-token row per chip.

# %%
if os.environ.get("PLAN_LIVE") == "1":
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plan_v3.py"), "--out", str(RESULTS)], check=True)
doc = json.loads(RESULTS.read_text())
s = doc["search"]
print(format_search(s))  # ranked: the fitting ones first, by the roofline's step time

# %% [markdown]
# ### Pipelined layouts (`--pipeline 1f1b,dualpipev`)
# With schedules given, the search adds every `stage` factorisation x schedule x micro-batch count the batch
# allows; each is estimated with the schedule's simulated bubble and the executor's weights (routed experts
# split over `expert` only, the rest over `tensor`, float32 gradients). The best pipelined estimate of each
# searched slice was compiled (the first one before the estimator counted those weights).

# %%
for topo, e in (doc.get("pipelined") or {}).items():
    p, b = e["plan"], e["plan"]["per_chip_bytes"]
    best = e["estimated"][0]
    print(f"{topo}: {e['candidates']} candidates, {e['fits_estimate']} estimated to fit; best pipelined estimate "
          f"(rank {e['rank_of_best_pipelined']}): {p['mesh']}, {p['pipeline']}:{p['microbatches']}, bubble "
          f"{best['bubble_fraction']:.1%}, estimated {best['bytes'] / GiB:.0f} GiB -> compiled: fits {p['fits']}, "
          f"peak {(b.get('peak') or 0) / GiB:.0f} GiB ({p['compile_s']:.0f} s)")
    if "estimate_note" in e:
        print("   ", e["estimate_note"])

# %% [markdown]
# ## 3 · From 64 to 1,024 chips
# The best-estimated layout of each slice, compiled. Memory per chip by kind (the state's parts from the
# shardings, the compiler's temporaries; over budget: the compiler's own figure), the collective bytes of the
# compiled program by mesh axis, and the roofline's MFU (overlapped: compute, HBM traffic and collectives
# perfectly overlapped; serial: none overlapped). The layer stacks are rolled loops here (full remat), and the
# HLO holds a loop body once: its collective bytes are per layer, so the roofline takes the step's compute and
# traffic from the analytic model (`rolled_roofline`).

# %%
rows = [(t, r["plan"]) for t, r in doc["slices"].items() if r.get("plan")]
rows.sort(key=lambda tr: tr[1]["chips"])
names = [f"{p['chips']}\n{p['mesh']}" for _, p in rows]
fig, ax = plt.subplots(1, 3, figsize=(17, 4.2))
bottom = np.zeros(len(rows))
for kind, label in (("params", "parameters"), ("opt_state", "AdamW moments"), ("batch", "batch")):
    vals = np.array([(p.get("analytic_bytes") or {}).get(kind, 0) / GiB for _, p in rows])
    ax[0].bar(names, vals, bottom=bottom, label=label)
    bottom += vals
temps = np.array([p["per_chip_bytes"].get("temp", 0) / GiB for _, p in rows])
ax[0].bar(names, temps, bottom=bottom, label="temporaries")
over = [i for i, (_, p) in enumerate(rows) if not p["fits"]]
for i in over:  # over budget: the compiler's own figure for the whole program
    ax[0].bar(names[i], rows[i][1]["per_chip_bytes"]["peak"] / GiB, color="0.8", hatch="//", label="needed (over)")
ax[0].axhline(rows[0][1]["per_chip_bytes"]["capacity"] / GiB, color="k", ls="--", lw=1, label="HBM")
ax[0].set_ylabel("GiB per chip"), ax[0].set_title("memory per chip"), ax[0].legend(fontsize=7)
axes_seen = sorted({a for _, p in rows for by in (p.get("collectives") or {}).values() for a in by})
bottom = np.zeros(len(rows))
for a in axes_seen:
    vals = np.array([sum(by.get(a, {}).get("bytes", 0) for by in (p.get("collectives") or {}).values()) / 1e9
                     for _, p in rows])
    ax[1].bar(names, vals, bottom=bottom, label=a)
    bottom += vals
ax[1].set_ylabel("GB per chip"), ax[1].set_title("collectives of the compiled HLO (one layer loop body)")
ax[1].legend(fontsize=7)
fit = [(p["chips"], p["roofline"]) for _, p in rows if p["fits"]]
ax[2].plot([c for c, _ in fit], [r["mfu_overlapped"] for _, r in fit], "o-", label="overlapped bound")
ax[2].plot([c for c, _ in fit], [r["mfu_serial"] for _, r in fit], "s--", label="serial bound")
ax[2].set_xscale("log", base=2), ax[2].set_xlabel("chips"), ax[2].set_ylabel("MFU"), ax[2].set_title("roofline MFU")
ax[2].legend(fontsize=7)
for a in ax[:2]:
    a.tick_params(axis="x", labelsize=7)
plt.tight_layout()
plt.show()
for t, p in rows:
    b = p["per_chip_bytes"]
    print(f"{t:12s} {p['chips']:5d} chips  {p['mesh']:30s} remat {p['remat']:8s} fits {str(p['fits']):5s} "
          f"peak {(b.get('peak') or 0) / GiB:6.1f} of {b['capacity'] / GiB:.1f} GiB  compile {p['compile_s']:.0f} s")

# %% [markdown]
# ## 4 · Sanity check against DeepSeek's report (analytic: no deviceless GPU compiler exists)
# DeepSeek-V3 pre-training: 14.8T tokens in 2.664M H800 GPU-hours (2.788M with context extension and
# post-training), FP8 mixed precision on 2,048 H800s. The plan's compute bound for a step of 16,384 x 4,096
# tokens at the dense FP8 peak gives the GPU-hours at 100% MFU; the ratio is DeepSeek's effective MFU.

# %%
h = plan(v3, "h800:2048", "data=8,fsdp=8,expert=32", batch=16384, seq=4096, fp8=True, moments="bfloat16")
tokens = 16384 * 4096
hours = 14.8e12 / tokens * h["roofline"]["compute_s"] * 2048 / 3600
print(f"state per GPU {h['per_chip_bytes']['state'] / GiB:.1f} GiB; compute bound {h['roofline']['compute_s']:.2f} "
      f"s per step -> {hours / 1e6:.2f}M GPU-hours at 100% of the FP8 peak; DeepSeek: 2.664M, i.e. "
      f"{hours / 2.664e6:.0%} of the FP8 peak ({2 * hours / 2.664e6:.0%} of the bf16 peak)")
best = max((p for _, p in rows if p["fits"]), key=lambda p: p["roofline"]["mfu_overlapped"], default=None)
if best is not None:
    chip_s = 14.8e12 / (best["batch"] * best["seq"]) * best["roofline"]["step_s_overlapped"] * best["chips"]
    print(f"the same 14.8T tokens on {best['chips']} v5p chips ({best['mesh']}): "
          f"{chip_s / 3600 / 1e6:.2f}M chip-hours at the overlapped roofline bound")
