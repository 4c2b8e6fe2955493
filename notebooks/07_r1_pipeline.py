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
# # 07 · The R1 pipeline on a task only a verifier can teach: SFT -> GRPO -> rejection sampling -> distillation
#
# DeepSeek-R1 is pre-training plus a post-training pipeline: supervised fine-tuning, reinforcement learning
# with GRPO against rule-based rewards, rejection-sampling SFT on verified samples, and distillation into
# smaller models. Here all four run on **noisy-teacher addition** (`post_train.tasks.addition`): prompts
# `a+b=` with 3-digit operands, answers `<a>` + the sum + `</a>` + EOS, every number written least significant
# digit first (155 + 251 is `551+152=`, answered `<a>604</a>`). The SFT data comes from a
# teacher that, on the hard subset S (a carry into the top digit, about half the problems), drops that carry
# 70% of the time. SFT learns the teacher -- including its mistake: greedy answers on S are mostly wrong,
# yet samples are right about 30% of the time there. Only a verifier can teach the model more than its
# teacher knew. The model is a 1.2M-parameter DeepSeek-V3 (MLA, MoE with a shared expert, MTP) from
# `configs/r1-addition.yaml`, on one CPU device; the whole notebook takes about 12 minutes on 2 cores.
#
# Every stage writes a normal run folder (`metrics.jsonl`, TensorBoard, checkpoints) under `R1_OUT`
# (default `runs/r1-notebook`); the held-out evaluation (256 problems) is each folder's `kind: eval` record.
# The test suite executes this notebook and checks its `results.json` against the calibrated floors.

# %%
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                   if "xla_force_host_platform_device_count" not in f)  # one device
import matplotlib.pyplot as plt  # noqa: E402

from deepseek_jax.post_train.config import load_post_config  # noqa: E402
from deepseek_jax.post_train.distill import run_distill  # noqa: E402
from deepseek_jax.post_train.grpo_run import run_grpo  # noqa: E402
from deepseek_jax.post_train.sft import run_sft  # noqa: E402
from deepseek_jax.train.run_dir import load_run  # noqa: E402

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
OUT = Path(os.environ.get("R1_OUT", ROOT / "runs" / "r1-notebook"))
shutil.rmtree(OUT, ignore_errors=True)
PRESET, STUDENT = ROOT / "configs" / "r1-addition.yaml", ROOT / "configs" / "r1-addition-student.yaml"
results, seconds = {}, {}


def records(run, kind):
    return [r for r in map(json.loads, (OUT / run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def final_eval(run):
    return records(run, "eval")[-1]


def stage(name, fn, *args, **kw):
    t0 = time.perf_counter()
    fn(*args, progress=False, **kw)
    seconds[name] = round(time.perf_counter() - t0, 1)
    e = final_eval(name)
    results[name] = {k: e[k] for k in ("em", "em_hard", "em_easy", "pass@1_hard", "pass@8_hard")}
    print(f"{name}: {seconds[name]} s; held-out greedy EM {e['em']:.3f} (on S {e['em_hard']:.3f}, off S "
          f"{e['em_easy']:.3f}); pass@8 on S {e['pass@8_hard']:.3f}")


def config(path, stage_name, out, *overrides):
    return load_post_config(path, [f"train.out={OUT / out}", *overrides], stage=stage_name)


# %% [markdown]
# ## 1 · SFT from scratch on the noisy teacher
# 1500 steps of 32 packed rows of 64 tokens, loss on the completion tokens (EOS included) and the MTP loss.
# The completion loss falls from ~0.6 to ~0.06 nats between steps ~300 and ~800 as the model learns the
# carries (written least significant digit first, one attention pattern serves every digit), then settles near
# the teacher's own noise. It reproduces its teacher: right off S, mostly wrong on S when greedy, but pass@8 on
# S is high -- the signal GRPO needs.

# %%
cfg, tcfg, pcfg = config(PRESET, "sft", "sft")
stage("sft", run_sft, cfg, tcfg, pcfg)
sft_train = records("sft", "train")
plt.figure(figsize=(6, 3))
plt.plot([r["step"] for r in sft_train], [r["ce"] for r in sft_train], lw=0.8)
plt.yscale("log"), plt.xlabel("step"), plt.ylabel("completion CE (nats/token)"), plt.title("SFT")
plt.show()

# %% [markdown]
# ## 2 · GRPO from the SFT model
# Each step: 16 prompts x 8 samples at T = 1 from one `generate` call, the strict exact-match reward, group
# advantages, one clipped policy-gradient update (`dapo` token mean) with a k3 KL penalty (beta = 0.04)
# against the frozen SFT model. 30 steps, under a minute.

# %%
_, sft_vars, sft_tok = load_run(OUT / "sft")
cfg, tcfg, pcfg = config(PRESET, "grpo", "grpo", "grpo.beta=0.04")
stage("grpo", run_grpo, cfg, tcfg, pcfg, init=sft_vars)
g_train, g_eval = records("grpo", "train"), records("grpo", "eval")
fig, ax = plt.subplots(1, 4, figsize=(16, 3))
ax[0].plot([r["step"] for r in g_train], [r["reward/mean"] for r in g_train]), ax[0].set_title("training reward")
ax[1].plot([r["step"] for r in g_eval], [r["em_hard"] for r in g_eval], "o-", label="on S")
ax[1].plot([r["step"] for r in g_eval], [r["em_easy"] for r in g_eval], "o-", label="off S")
ax[1].set_title("held-out greedy exact match"), ax[1].legend()
ax[2].plot([r["step"] for r in g_train], [r["kl"] for r in g_train]), ax[2].set_title("KL(pi || SFT) (k3)")
ax[3].plot([r["step"] for r in g_train], [r["entropy"] for r in g_train]), ax[3].set_title("entropy (nats/token)")
for a in ax:
    a.set_xlabel("GRPO step")
plt.tight_layout()
plt.show()
print("seconds per GRPO step (rollout / reward / reference / update):",
      {k: round(sum(r[f"time/{k}"] for r in g_train[1:]) / (len(g_train) - 1), 3)
       for k in ("rollout", "reward", "reference", "update", "step")})

# %% [markdown]
# ## 3 · Controls: is it the verifier?
# (a) GRPO with each step's rewards shuffled across the batch (same updates, no verifier signal); (b) SFT
# continued on the same teacher data for about the same wall-clock time.

# %%
cfg, tcfg, pcfg = config(PRESET, "grpo", "shuffled", "grpo.beta=0.04", "grpo.shuffle_rewards=true", "eval.every=30")
stage("shuffled", run_grpo, cfg, tcfg, pcfg, init=sft_vars)
more = ["train.steps=150", "train.optim.lr=2e-4", "train.optim.schedule=constant", "train.optim.warmup_steps=0",
        "train.checkpoint_every=150", "train.eval_every=150"]
cfg, tcfg, pcfg = config(PRESET, "sft", "more_sft", *more)
stage("more_sft", run_sft, cfg, tcfg, pcfg, init=sft_vars)

# %% [markdown]
# ## 4 · Rejection sampling, then SFT on the verified samples
# `deepseek-jax sample` draws 4 completions for each of 2000 training prompts from the SFT model and keeps the
# ones the verifier accepts; SFT on them (150 steps) from the SFT model.

# %%
rs = OUT / "rs.jsonl"
cmd = [sys.executable, "-m", "deepseek_jax.cli", "sample", "--config", str(PRESET), "--init", str(OUT / "sft"),
       "--n", "4", "--num-prompts", "2000", "--keep", "reward==1", "--out", str(rs), "--no-progress"]
print(subprocess.run(cmd, capture_output=True, text=True, check=True).stderr.strip())
cfg, tcfg, pcfg = config(PRESET, "sft", "rs", *more, f"sft.data={rs}")
stage("rs", run_sft, cfg, tcfg, pcfg, init=sft_vars, tokenizer=sft_tok)

# %% [markdown]
# ## 5 · Distillation into a smaller student
# A 0.42M-parameter student (`configs/r1-addition-student.yaml`, same vocabulary) trained from scratch on the
# GRPO model's greedy answers to 20000 prompts, with the teacher's whole distribution at every completion
# position (`logit`: alpha tau^2 KL(p_T^tau || q_S^tau) + (1 - alpha) CE, tau = 2, alpha = 0.5). Here 150
# steps, to keep the notebook short: the distillation term falls fast, but exact match needs the student to
# "get" carries, which it has not done in 1200 steps either (the preset's budget; see the README's limits).

# %%
cfg, tcfg, pcfg = config(STUDENT, "distill", "student", "train.steps=150", "train.checkpoint_every=150",
                         "train.eval_every=150")
stage("student", run_distill, cfg, tcfg, pcfg, str(OUT / "grpo"))

# %% [markdown]
# ## Summary
# Held-out greedy exact match on and off the hard subset after each stage.

# %%
names = list(results)
fig, ax = plt.subplots(figsize=(8, 3))
for i, key in enumerate(("em_hard", "em_easy")):
    ax.bar([j + 0.4 * i for j in range(len(names))], [results[n][key] for n in names], 0.4,
           label="on S" if key == "em_hard" else "off S")
ax.set_xticks([j + 0.2 for j in range(len(names))], names), ax.set_ylabel("greedy EM"), ax.legend()
plt.show()
(OUT / "results.json").write_text(json.dumps({"results": results, "seconds": seconds}, indent=1))
for n in names:
    print(f"{n:>9}: EM on S {results[n]['em_hard']:.3f}, off S {results[n]['em_easy']:.3f} ({seconds[n]} s)")
