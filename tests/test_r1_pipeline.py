"""The R1 pipeline end to end on noisy-teacher addition (post-training.md E1-E6), on one CPU device: the notebook
``07_r1_pipeline`` runs SFT from scratch, GRPO, the two controls, rejection-sampling SFT (through ``deepseek-jax
sample``) and logit distillation into a smaller student, and writes each stage's held-out evaluation (256
problems, about half in the hard subset S) to ``results.json``; a GRPO run interrupted and resumed through the
command line repeats the uninterrupted one.

The thresholds are floors fixed from the calibration runs reported in the README (section "Post-training"),
with margin.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "07_r1_pipeline.py"
PRESET = "configs/r1-addition.yaml"
GRPO = ["--config", PRESET, "--no-progress"]
# floors from the calibration runs (README, "Post-training"), with margin
E1_EASY, E1_HARD_MAX, E1_PASS8_HARD = 0.9, 0.45, 0.85
E2_GAIN, E2_EASY_DROP, E2_REWARD_GAIN, E2_KL_MAX = 0.5, 0.05, 0.2, 5.0
E3_MOVE = 0.1
E4_GAIN = 0.4
E5_FRACTION = 0.9


def _cli(*args, timeout=900):
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    r = subprocess.run([sys.executable, "-m", "deepseek_jax.cli", *map(str, args)], env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _records(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The notebook ``07_r1_pipeline`` executed once (every stage, one CPU device; it writes its run folders and
    ``results.json`` under ``R1_OUT``): ``(folder, results)``."""
    import jupytext
    from nbclient import NotebookClient

    out = tmp_path_factory.mktemp("r1")
    old = os.environ.get("R1_OUT")
    os.environ["R1_OUT"] = str(out)  # the kernel inherits this process's environment
    try:
        nb = jupytext.read(NOTEBOOK)
        NotebookClient(nb, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    finally:
        os.environ.pop("R1_OUT") if old is None else os.environ.__setitem__("R1_OUT", old)
    return out, json.loads((out / "results.json").read_text())["results"]


def test_e1_sft_learns_the_teacher_including_its_mistakes(runs):
    e = runs[1]["sft"]
    assert e["em_easy"] >= E1_EASY and e["em_hard"] <= E1_HARD_MAX and e["pass@8_hard"] >= E1_PASS8_HARD, e


def test_e2_grpo_fixes_the_hard_subset_without_hurting_the_rest(runs):
    out, res = runs
    sft, grpo = res["sft"], res["grpo"]
    assert grpo["em_hard"] - sft["em_hard"] >= E2_GAIN, (sft, grpo)
    assert grpo["em_easy"] >= sft["em_easy"] - E2_EASY_DROP, (sft, grpo)
    train = _records(out / "grpo", "train")
    first, last = train[:5], train[-5:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "reward/mean") - mean(first, "reward/mean") >= E2_REWARD_GAIN
    assert mean(last, "frac_reward_zero_std") > mean(first, "frac_reward_zero_std")  # groups agree more often
    assert all(r["completion/truncated_frac"] < 0.05 and r["kl_max"] < E2_KL_MAX for r in train)


def test_e3_controls_do_not_gain_on_the_hard_subset(runs):
    res = runs[1]
    assert res["shuffled"]["em_hard"] <= res["sft"]["em_hard"] + E3_MOVE
    assert abs(res["more_sft"]["em_hard"] - res["sft"]["em_hard"]) <= E3_MOVE


def test_e4_rejection_sampling_sft_lifts_the_hard_subset(runs):
    res = runs[1]
    assert res["rs"]["em_hard"] - res["sft"]["em_hard"] >= E4_GAIN


def test_e5_a_smaller_student_distilled_from_the_grpo_model_keeps_most_of_its_exact_match(runs):
    res = runs[1]
    assert res["student"]["em"] >= E5_FRACTION * res["grpo"]["em"]


def test_e6_grpo_interrupted_and_resumed_repeats_the_uninterrupted_run(runs, tmp_path):
    """With dynamic sampling on (its extra rollouts are part of what must repeat)."""
    common = [*GRPO, "--init", runs[0] / "sft", "train.steps=6", "train.checkpoint_every=3", "eval.every=3",
              "grpo.dynamic_sampling=true"]
    _cli("grpo", *common, "--out", tmp_path / "straight")
    _cli("grpo", *common, "--out", tmp_path / "resumed", "train.steps=3")
    _cli("grpo", *common, "--out", tmp_path / "resumed")
    drop = ("time/", "tokens_per_s")
    clean = lambda rs: [{k: v for k, v in r.items() if not k.startswith(drop)} for r in rs]  # noqa: E731
    straight, resumed = (clean(_records(tmp_path / n, "train")) for n in ("straight", "resumed"))
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert resumed == straight
    assert sum(r["dynamic/replaced_groups"] for r in straight) > 0
    assert clean(_records(tmp_path / "resumed", "eval"))[-1] == clean(_records(tmp_path / "straight", "eval"))[-1]
