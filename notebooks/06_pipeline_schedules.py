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
# # 06 · Pipeline schedules: 1F1B, zero bubble, DualPipe and DualPipeV
#
# Schedules are data here (`dsj.pipeline`): per-rank action lists in `torch.distributed.pipelining`'s
# string form (`0F3` = stage 0 forward of micro-batch 3; `I` and `W` the input- and weight-gradient halves
# of a backward; `(0F7;7B3)OVERLAP_F_B` a forward and a backward run as one overlapped unit). A simulator runs
# them with per-action costs. We draw every schedule, check the bubbles and activation peaks against
# DeepSeek-V3's table, watch activations live over time, and run the lock-step executor on 4 fake devices.

# %%
import os

os.environ["XLA_FLAGS"] = " ".join([f for f in os.environ.get("XLA_FLAGS", "").split()
                                    if "xla_force_host_platform_device_count" not in f]
                                   + ["--xla_force_host_platform_device_count=4"])
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import deepseek_jax as dsj  # noqa: E402
from deepseek_jax.parallel.pipeline import make_schedule, simulator, toy  # noqa: E402
from deepseek_jax.parallel.pipeline.executor import make_executor, merge_stage_grads, stage_params  # noqa: E402
from deepseek_jax.parallel.pipeline.program import build_program  # noqa: E402
from deepseek_jax.parallel.mesh import make_mesh  # noqa: E402

# %% [markdown]
# ## The schedules as text
# DualPipeV on 4 ranks with 10 micro-batches is exactly torch's published golden
# (`dualpipev_4rank_10mb.csv`, checked in the tests). Rank 0 holds stages 0 and 7: the "V".

# %%
for rank, row in enumerate(dsj.pipeline.schedule("dualpipev", 4, 10)):
    print(rank, " ".join(row[:12]), "...")

# %% [markdown]
# ## Gantt charts
# Costs per chunk: F = 1, B = 2 split as I = 1 and W = 1, an overlapped F&B pair 2.5 (the overlap hides half a
# forward). One row per rank; colour = action kind, label = micro-batch. PP = 4 ranks (DualPipeV: 4 ranks
# holding 8 stages, so its chunks are half as long: costs halved).

# %%
COLORS = {"F": "#4C72B0", "B": "#55A868", "I": "#8ED08B", "W": "#C44E52", "FB": "#8172B2"}
COSTS = {"F": 1.0, "B": 2.0, "W": 1.0, "FB": 2.5}
cases = [("gpipe", 4, 8), ("1f1b", 4, 8), ("interleaved_1f1b", 4, 8), ("zb_h1", 4, 8), ("dualpipe", 4, 8),
         ("dualpipev", 4, 10)]


def costs_for(name):
    scale = 0.5 if name in ("dualpipev", "interleaved_1f1b") else 1.0  # twice the stages, half the work each
    return {k: v * scale for k, v in COSTS.items()}


fig, axes = plt.subplots(len(cases), 1, figsize=(12, 1.3 * len(cases) + 1), sharex=True)
for ax, (name, ranks, mbs) in zip(axes, cases):
    out = dsj.pipeline.simulate(make_schedule(name, ranks, mbs), costs_for(name))
    for r, events in enumerate(out["trace"]):
        for start, end, a in events:
            ax.barh(r, end - start, left=start, color=COLORS[a.kind], edgecolor="white", linewidth=0.5)
            label = f"{a.mb}" if a.kind != "FB" else f"{a.mb}|{a.mb_b}"
            ax.text((start + end) / 2, r, label, ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks(range(ranks))
    ax.invert_yaxis()
    ax.set_ylabel(name, rotation=0, ha="right", va="center")
    ax.text(1.0, 0.5, f"makespan {out['makespan']:.1f}", transform=ax.transAxes, fontsize=8)
axes[-1].set_xlabel("time (F = 1)")
handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
fig.legend(handles, COLORS.keys(), loc="upper right", ncol=5)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Bubbles and memory against DeepSeek-V3's table
# Per-rank bubble = makespan - busy time. The formulas hold exactly in stated regimes (the tests sweep random
# costs): 1F1B `(PP-1)(F+B)` always; ZB-H1 `(PP-1)(F+B-2W)` when `W <= min(F, I)`; DualPipe and DualPipeV
# `(PP/2-1)(F&B+B-3W)` on the worst rank when `I = F`, `W <= F` and `max(F, B) <= F&B <= F+B`.
# Peak activations do not depend on the costs or on the micro-batch count.

# %%
F, I, W, FB = 1.0, 1.2, 0.7, 2.6
B = I + W
rows = []
for pp in (4, 8):
    for name, ranks, formula in (("1f1b", pp, (pp - 1) * (F + B)), ("zb_h1", pp, (pp - 1) * (F + B - 2 * W)),
                                 ("dualpipe", pp, None), ("dualpipev", pp // 2, None)):
        costs = {"F": F, "I": I, "W": W, "FB": FB}
        if formula is None:  # DualPipe's regime needs I = F
            costs = {"F": F, "I": F, "W": W, "FB": FB}
            formula = (pp / 2 - 1) * (FB + (F + W) - 3 * W)
        peaks = [simulator.simulate(make_schedule(name, ranks, c), costs)["peak_activations"]
                 for c in (2 * pp, 4 * pp)]
        out = simulator.simulate(make_schedule(name, ranks, 2 * pp), costs)
        rows.append((name, pp, max(out["bubble"]), formula, peaks[0], peaks[0] == peaks[1]))
print(f"{'schedule':10} {'PP':>3} {'bubble':>7} {'formula':>8}  peak activations per rank (same at 2x micro-batches)")
for name, pp, bubble, formula, peak, flat in rows:
    print(f"{name:10} {pp:3d} {bubble:7.2f} {formula:8.2f}  {peak} {flat}")

# %% [markdown]
# ## Live activations over time
# Stashed stage inputs per rank (forward done, input gradient not yet), 8 ranks, 32 micro-batches: 1F1B
# front-loads rank 0 (PP stashes), DualPipeV keeps every rank at PP + 1 = 9 with half the ranks per stage pair.

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3), sharey=True)
for ax, (name, ranks) in zip(axes, (("1f1b", 8), ("zb_h1", 8), ("dualpipev", 4))):
    out = simulator.simulate(make_schedule(name, ranks, 32), costs_for(name))
    for r, events in enumerate(out["trace"]):
        times, live, n = [0.0], [0], 0
        for start, end, a in events:
            for part in a.parts():
                n += {"F": 1, "B": -1, "I": -1}.get(part.kind, 0)
            times.append(end)
            live.append(n)
        ax.step(times, live, where="post", label=f"rank {r}", lw=1)
    ax.set_title(f"{name}: peaks {out['peak_activations']}", fontsize=8)
    ax.set_xlabel("time")
axes[0].set_ylabel("live activation stashes")
axes[-1].legend(fontsize=6, ncol=2)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The executed program
# The executor runs a **tick table**: a unit-cost simulation where each action takes one tick and uses only
# what earlier ticks produced. Every tick each rank runs one `lax.switch` branch, then fixed-shape `ppermute`
# channels carry activations right and gradients left. Below, DualPipeV on a `stage = 4` mesh (4 fake CPU
# devices) running the executor's toy model (tensor-parallel MLP stages between an input projection and a
# regression head, `deepseek_jax.parallel.pipeline.toy`): its tick table, then loss and gradients against
# `jax.value_and_grad` of the same model without a pipeline.

# %%
schedule = make_schedule("dualpipev", 4, 8)
program = build_program(schedule)
kinds = program.table[..., 0]
fig, ax = plt.subplots(figsize=(12, 2))
palette = ["#FFFFFF"] + [COLORS[k] for k in ("F", "B", "I", "W", "FB")]
ax.imshow(kinds, aspect="auto", cmap=plt.matplotlib.colors.ListedColormap(palette), vmin=0, vmax=5,
          interpolation="nearest")
ax.set_xlabel("tick")
ax.set_ylabel("rank")
ax.set_title(f"{program.ticks} ticks; idle ticks per rank {program.idle_ticks()}; channels (rank offsets) "
             f"{program.channels}; stash slots x {program.x_depths}, g {program.g_depths}", fontsize=8)
plt.show()

mesh = make_mesh({"stage": 4}, jax.devices()[:4])
stacked, shared, inputs = toy.problem(schedule)
step = make_executor(program, mesh, toy.embed, toy.stage, toy.loss, w_specs=toy.W_SPECS)
loss, (gw, gshared), _ = step(stage_params(program, stacked), shared, inputs)
ref_loss, (ref_w, ref_shared) = jax.value_and_grad(toy.reference_loss, (0, 1))(stacked, shared, inputs)
gw = merge_stage_grads(program, gw)
print(f"loss pipelined {float(loss):.6f} vs reference {float(ref_loss):.6f}")
for k in ref_w:
    print(f"d{k}: max relative error {float(np.max(np.abs(gw[k] - ref_w[k])) / np.max(np.abs(ref_w[k]))):.1e}")
for k in ref_shared:
    err = float(np.max(np.abs(gshared[k] - ref_shared[k])) / np.max(np.abs(ref_shared[k])))
    print(f"d{k}: max relative error {err:.1e}")

# %% [markdown]
# ## The DeepSeek model in the executor
# The same executor runs the DeepSeek model (`deepseek_jax.train.pipeline.pipeline_grad_fn`; in training,
# `train.pipeline: {schedule, microbatches, split}`): embedding and dense layers before stage 0, a slice of the
# MoE stack per stage (uneven slices allowed), final norm, head, MTP and the training objective after the last.
# Inside a stage the experts are split over `expert` (all-to-all dispatch in the executor's branches) and the
# heads and MLP widths over `tensor`. A small V3-style config (4 MoE layers, MTP depth 1) on
# `stage = 2 x expert = 2` (this notebook fakes 4 devices) with DualPipeV (2 ranks, 4 stages): the loss, the
# gradients and the expert loads against the unpipelined objective averaged over the same micro-batches.

# %%
from deepseek_jax.nn import tree  # noqa: E402
from deepseek_jax.train.objectives import Pretrain  # noqa: E402
from deepseek_jax.train.pipeline import microbatches, pipeline_grad_fn  # noqa: E402
from deepseek_jax.train.step import hyper, objective_loss  # noqa: E402

cfg = dsj.load_config("configs/tiny.yaml", n_layers=5, d_model=64, vocab_size=128, intermediate_size=96,
                      **{"attention.q_lora_rank": 32, "attention.kv_lora_rank": 32, "attention.qk_nope_head_dim": 16,
                         "attention.qk_rope_head_dim": 8, "attention.v_head_dim": 16, "moe.moe_intermediate_size": 32})
variables = dsj.init_variables(cfg, 0)
params, router = variables[tree.PARAMS], variables[tree.ROUTER]
rows, t = 16, 16
tokens = jax.random.randint(jax.random.key(1), (rows, t), 0, cfg.vocab_size)
batch = {"tokens": tokens, "positions": jax.numpy.broadcast_to(jax.numpy.arange(t), (rows, t)),
         "segment_ids": jax.numpy.ones((rows, t), jax.numpy.int32)}
objective, hyp = Pretrain(balance_alpha=0.01), hyper(0.3, 0.0)
schedule = make_schedule("dualpipev", 2, 4)
mesh = make_mesh({"stage": 2, "expert": 2})
loss, grads, load, metrics = pipeline_grad_fn(cfg, mesh, schedule, objective)(params, router, batch, hyp)

mb = microbatches(batch, 4)


def reference(params):
    outs = [objective_loss(cfg, "none", objective, params, router, jax.tree.map(lambda a: a[i], mb), hyp)
            for i in range(4)]
    return sum(o[0] for o in outs) / 4, sum(o[1]["expert_load"] for o in outs)


(ref_loss, ref_load), ref_grads = jax.jit(jax.value_and_grad(reference, has_aux=True))(params)
errors = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b))), grads, ref_grads))
print(f"loss pipelined {float(loss):.6f} vs unpipelined {float(ref_loss):.6f}")
print(f"largest relative gradient error over {len(errors)} parameters: {max(errors):.1e}")
print("expert loads identical:", bool(np.all(np.asarray(load) == np.asarray(ref_load))), "shape", load.shape)
print("metrics:", {k: np.round(np.asarray(v), 4).tolist() for k, v in metrics.items()})
