"""Post-training configuration: the ``sft:``, ``grpo:``, ``distill:``, ``reward:``, ``task:`` and ``eval:``
sections of a preset, beside the model fields and ``train:`` (post-training.md §3). Strict like the rest:
unknown keys are errors naming the known ones; bad values name the field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepseek_jax.config import ModelConfig, config_from_dict
from deepseek_jax.config_io import (POST_SECTIONS, from_dict, merge, parse_overrides, read_yaml, resolve_config_path,
                                    strip_train_section)
from deepseek_jax.post_train.grpo import AGGREGATIONS, KL_ESTIMATORS, SCALES
from deepseek_jax.post_train.tasks import addition
from deepseek_jax.post_train.rewards import parse_keep
from deepseek_jax.train.config import TrainConfig

__all__ = ["SFTConfig", "GRPOConfig", "DistillConfig", "RewardSpec", "TaskConfig", "EvalConfig", "PostConfig",
           "SECTIONS", "STAGES", "load_post_config"]

SECTIONS = POST_SECTIONS


def _positive(where: str, **values: Any) -> None:
    for k, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{where}.{k}={v!r} must be a positive integer")


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning data (``sft:``).

    Attributes:
      data: a JSONL file of ``{prompt_field: ..., completion_field: ...}`` records; empty = the ``task:``'s
        own demonstrations.
      loss_on: ``completion`` (targets are the completion tokens and the EOS) or ``all``.
      packing: several samples per row (each its own segment: attention and positions never cross); off =
        one sample per row.
      val_fraction: share of the samples held out for the validation loss.
    """

    data: str = ""
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    loss_on: str = "completion"
    packing: bool = True
    val_fraction: float = 0.02

    def __post_init__(self):
        if self.loss_on not in ("completion", "all"):
            raise ValueError(f"sft.loss_on={self.loss_on!r} must be 'completion' or 'all'")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"sft.val_fraction={self.val_fraction!r} must be in (0, 1)")


@dataclass(frozen=True)
class GRPOConfig:
    """Group Relative Policy Optimisation (``grpo:``; formulas in :mod:`deepseek_jax.post_train.grpo`).

    Attributes:
      prompts_per_step (B), num_generations (G): B x G completions per step, from one ``generate`` call.
      num_iterations (mu): passes over each rollout batch; minibatches: updates per pass.
      loss_agg: ``grpo | bnpo | dapo | dr_grpo``; scale_rewards: ``group | batch | none``; adv_eps.
      epsilon_low / epsilon_high: the clip range (DAPO clip-higher: 0.2 / 0.28); delta: dual clip (> 1) or 0 (off).
      beta: KL weight (0 = no reference model); kl_estimator ``k3 | k2 | k1 | k3+``; ref_update_every: reset
        the reference to the policy every N steps (0 = never).
      temperature / max_completion_tokens: sampling; mask_truncated: drop completions without EOS from the loss.
      dynamic_sampling: resample groups whose rewards are all equal, up to ``dynamic_tries`` extra rollouts.
      bias_gamma (router-bias updates, frozen by default), balance_alpha, mtp_lambda (MTP loss, off by default).
      shuffle_rewards: a control experiment -- each step's rewards are permuted across the batch before the
        advantages (the verifier's signal destroyed, everything else the same).
    """

    prompts_per_step: int = 16
    num_generations: int = 8
    num_iterations: int = 1
    minibatches: int = 1
    loss_agg: str = "dapo"
    scale_rewards: str = "group"
    adv_eps: float = 1e-4
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float = 0.0
    beta: float = 0.0
    kl_estimator: str = "k3"
    ref_update_every: int = 0
    temperature: float = 1.0
    max_completion_tokens: int = 16
    mask_truncated: bool = False
    dynamic_sampling: bool = False
    dynamic_tries: int = 2
    bias_gamma: float = 0.0
    balance_alpha: float = 1e-4
    mtp_lambda: float = 0.0
    shuffle_rewards: bool = False

    def __post_init__(self):
        _positive("grpo", prompts_per_step=self.prompts_per_step, num_iterations=self.num_iterations,
                  minibatches=self.minibatches, max_completion_tokens=self.max_completion_tokens)
        if not isinstance(self.num_generations, int) or self.num_generations < 2:
            raise ValueError(f"grpo.num_generations={self.num_generations!r} must be an integer >= 2 (a group)")
        for name, value, options in (("loss_agg", self.loss_agg, AGGREGATIONS), ("scale_rewards", self.scale_rewards,
                                     SCALES), ("kl_estimator", self.kl_estimator, KL_ESTIMATORS)):
            if value not in options:
                raise ValueError(f"grpo.{name}={value!r} must be one of {options}")
        if self.delta and self.delta <= 1:
            raise ValueError(f"grpo.delta={self.delta} must be > 1 (dual clip) or 0 (off)")
        if self.temperature <= 0:
            raise ValueError(f"grpo.temperature={self.temperature} must be > 0 (GRPO samples)")
        if (self.prompts_per_step * self.num_generations) % self.minibatches:
            raise ValueError(f"grpo.minibatches={self.minibatches} must divide prompts_per_step x num_generations")
        for n in ("beta", "bias_gamma", "balance_alpha", "mtp_lambda", "ref_update_every", "dynamic_tries"):
            if getattr(self, n) < 0:
                raise ValueError(f"grpo.{n}={getattr(self, n)!r} must be >= 0")

    @property
    def rows(self) -> int:
        return self.prompts_per_step * self.num_generations


@dataclass(frozen=True)
class DistillConfig:
    """Distillation (``distill:``): ``seq`` (SFT on teacher samples), ``logit`` (temperature-scaled forward
    KL to the teacher's distribution, masked; ``alpha`` mixes in the hard-label CE) or ``on_policy``
    (generalised JSD with ``beta`` on student samples with probability ``lmbda``).

    Attributes:
      teacher: the teacher's run folder or Hugging Face checkpoint (``--teacher`` overrides it).
      temperature (tau), alpha, beta, lmbda, top_k (teacher's top-k, 0 = full vocabulary): the losses'.
      prompts: task prompts the teacher completes (0 = ``task.sft_examples``); samples_per_prompt;
      sample_temperature: the teacher's sampling temperature (0 = greedy); keep: a reward filter such as
      ``reward==1`` (rejection sampling of the teacher's samples; needs ``reward:``).
    """

    mode: str = "seq"
    teacher: str = ""
    temperature: float = 2.0
    alpha: float = 0.5
    beta: float = 1.0
    lmbda: float = 1.0
    top_k: int = 0
    prompts: int = 0
    samples_per_prompt: int = 1
    sample_temperature: float = 1.0
    keep: str = ""

    def __post_init__(self):
        if self.mode not in ("seq", "logit", "on_policy"):
            raise ValueError(f"distill.mode={self.mode!r} must be 'seq', 'logit' or 'on_policy'")
        for n in ("alpha", "beta", "lmbda"):
            if not 0 <= getattr(self, n) <= 1:
                raise ValueError(f"distill.{n}={getattr(self, n)!r} must be in [0, 1]")
        if self.temperature <= 0 or self.top_k < 0 or self.sample_temperature < 0 or self.prompts < 0:
            raise ValueError("distill.temperature must be > 0; distill.top_k, prompts and sample_temperature >= 0")
        if self.samples_per_prompt < 1:
            raise ValueError(f"distill.samples_per_prompt={self.samples_per_prompt!r} must be >= 1")
        parse_keep(self.keep, "distill.keep")


@dataclass(frozen=True)
class RewardSpec:
    """One reward function: ``module:function`` or ``path/file.py:function``, and its weight."""

    fn: str
    weight: float = 1.0


@dataclass(frozen=True)
class TaskConfig:
    """Where prompts come from (``task:``): a built-in task -- ``addition`` (noisy-teacher addition,
    :mod:`...tasks.addition`) -- or ``prompts``, a JSONL of ``{prompt, ...columns}`` records (the columns reach
    the reward functions by name; ``prompt_field`` names the prompt's field).

    Attributes:
      digits: operand digits; q: how often the teacher drops the carry on the hard subset S.
      sft_examples: teacher demonstrations for SFT; eval_prompts: held-out problems for evaluation.
      train_seed / eval_seed: the seeds of the training prompts and the held-out ones (disjoint streams).
    """

    name: str = ""
    prompts: str = ""
    prompt_field: str = "prompt"
    digits: int = 3
    q: float = addition.Q
    sft_examples: int = 20_000
    eval_prompts: int = 256
    train_seed: int = 0
    eval_seed: int = 12345

    def __post_init__(self):
        if self.name not in ("", "addition"):
            raise ValueError(f"task.name={self.name!r} must be 'addition' or empty (prompts from task.prompts)")
        if self.name and self.prompts:
            raise ValueError(f"task.name={self.name!r} and task.prompts={self.prompts!r}: give one source of prompts")
        _positive("task", digits=self.digits, sft_examples=self.sft_examples, eval_prompts=self.eval_prompts)
        if not 0 <= self.q <= 1:
            raise ValueError(f"task.q={self.q!r} must be in [0, 1]")


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation (``eval:``) on ``prompts`` (a JSONL; default: the built-in task's held-out problems):
    greedy reward and exact match -- a completion is right when its reward passes ``correct`` (``reward==1``) --
    on and off the hard subset (rows with a boolean ``hard`` column); pass@k (unbiased) and maj@k from
    ``samples`` completions per prompt at temperature 1 on the first ``pass_prompts`` prompts."""

    prompts: str = ""
    correct: str = "reward==1"
    every: int = 50
    pass_k: tuple[int, ...] = (1, 2, 4, 8)
    samples: int = 8
    pass_prompts: int = 64
    show: int = 3

    def __post_init__(self):
        object.__setattr__(self, "pass_k", tuple(int(k) for k in self.pass_k))
        _positive("eval", every=self.every, samples=self.samples, pass_prompts=self.pass_prompts)
        parse_keep(self.correct, "eval.correct")
        if any(k < 1 or k > self.samples for k in self.pass_k):
            raise ValueError(f"eval.pass_k={list(self.pass_k)} must lie in 1..eval.samples={self.samples}")


@dataclass(frozen=True)
class PostConfig:
    """All post-training sections of a preset."""

    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    reward: tuple[RewardSpec, ...] = ()
    task: TaskConfig = field(default_factory=TaskConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        specs = []
        for i, r in enumerate(self.reward or ()):
            specs.append(r if isinstance(r, RewardSpec) else from_dict(RewardSpec, r, f"reward[{i}]."))
        object.__setattr__(self, "reward", tuple(specs))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


STAGES = ("sft", "grpo", "distill")


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted override keys as nested dicts: ``{"grpo.train.steps": 5}`` -> ``{"grpo": {"train": {"steps": 5}}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *heads, last = key.split(".")
        for h in heads:
            if not isinstance(node.get(h), dict):
                node[h] = {}
            node = node[h]
        node[last] = merge(node[last], value) if isinstance(node.get(last), dict) and isinstance(value, dict) else value
    return out


def _pop_train(d: dict[str, Any], section: str) -> dict[str, Any]:
    """Remove and return ``d[section]["train"]`` (without changing the caller's nested dicts)."""
    if not isinstance(d.get(section), dict) or "train" not in d[section]:
        return {}
    d[section] = dict(d[section])
    return d[section].pop("train") or {}


def load_post_config(path: str | Path, overrides: list[str] | dict[str, Any] = (), stage: str | None = None
                     ) -> tuple[ModelConfig, TrainConfig, PostConfig]:
    """A post-training preset: ``(model, train:, the post-training sections)``, with ``key=value`` overrides
    (``grpo.beta=0.04``, ``train.steps=50``). Unknown keys are errors.

    One preset can hold a whole pipeline: each stage section (``sft:``, ``grpo:``, ``distill:``) may carry a
    ``train:`` of its own (``grpo: {train: {steps: 30, out: runs/grpo, optim: {lr: 1e-4}}}``) used when that
    ``stage`` runs. Precedence, lowest first: the preset's ``train:``, the stage's ``train:``, ``train.*``
    overrides, ``<stage>.train.*`` overrides."""
    p = resolve_config_path(path)
    raw, ov = dict(read_yaml(p)), _nested(parse_overrides(overrides))
    own = {s: (_pop_train(raw, s), _pop_train(ov, s)) for s in STAGES}
    yaml_train, ov_train = raw.get("train") or {}, ov.get("train") or {}
    d = merge(raw, ov)
    post = {k: d.pop(k) for k in SECTIONS if k in d}
    model_d, _ = strip_train_section(d)

    def run_train(s: str | None) -> dict[str, Any]:
        y, o = own.get(s, ({}, {}))
        return merge(merge(merge(yaml_train, y), ov_train), o)

    try:
        for s in STAGES:  # every stage's run settings are checked, not just the one that runs
            if any(own[s]):
                from_dict(TrainConfig, run_train(s), f"{s}.train.")
        return (config_from_dict(model_d), from_dict(TrainConfig, run_train(stage), "train."),
                from_dict(PostConfig, post))
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None
