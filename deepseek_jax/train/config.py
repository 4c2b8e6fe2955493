"""The run's configuration: :class:`TrainConfig` (a preset's ``train:`` section), the :class:`StepConfig`
that the compiled step depends on, piecewise-constant schedules, and reading a preset's two sections."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepseek_jax.config import ModelConfig, config_from_dict
from deepseek_jax.config_io import from_dict, merge, parse_overrides, read_yaml, resolve_config_path, strip_train_section
from deepseek_jax.nn.block import REMAT_POLICIES
from deepseek_jax.parallel.mesh import parse_mesh
from deepseek_jax.parallel.pipeline.schedule import SCHEDULES
from deepseek_jax.train.data import DataConfig
from deepseek_jax.train.optim import OptimConfig

__all__ = ["Schedulable", "scheduled", "PipelineConfig", "TrainConfig", "StepConfig", "load_run_config"]

Schedulable = float | tuple[tuple[int, float], ...]


DSA_STAGES = ("sparse", "dense_warmup")


def scheduled(value: Schedulable, step: int) -> float:
    """A constant, or piecewise constant ``((from_step, value), ...)``: the last entry with ``from_step <= step``."""
    if isinstance(value, (int, float)):
        return float(value)
    out = value[0][1]
    for start, v in value:
        if step >= start:
            out = v
    return float(out)


def _schedulable(name: str, value: Any) -> Schedulable:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        pairs = tuple((int(s), float(v)) for s, v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a number or a list of [from_step, value] pairs") from None
    if not pairs or pairs[0][0] != 0 or any(a[0] >= b[0] for a, b in zip(pairs, pairs[1:])):
        raise ValueError(f"{name}={value!r}: the [from_step, value] pairs must start at step 0 and increase")
    return pairs


@dataclass(frozen=True)
class PipelineConfig:
    """Pipeline parallelism over the mesh's ``stage`` axis (the ``train.pipeline`` section).

    Attributes:
      schedule: ``none`` (off) or one of ``gpipe, 1f1b, interleaved_1f1b, zb_h1, dualpipe, dualpipev``.
      microbatches: micro-batches per step (per pipe: DualPipe runs two pipes of that many; see
        :mod:`deepseek_jax.parallel.pipeline.schedule` for each schedule's minimum); the global batch splits
        into them, and each into the ``data x fsdp x expert`` shards.
      split: MoE layers per stage, e.g. ``[15, 15, 14, 14]`` (default: as even as possible,
        :func:`deepseek_jax.nn.stages.stage_split`).
    """

    schedule: str = "none"
    microbatches: int = 1
    split: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.schedule != "none" and self.schedule not in SCHEDULES:
            raise ValueError(f"train.pipeline.schedule={self.schedule!r} must be 'none' or one of {sorted(SCHEDULES)}")
        if not isinstance(self.microbatches, int) or isinstance(self.microbatches, bool) or self.microbatches < 1:
            raise ValueError(f"train.pipeline.microbatches={self.microbatches!r} must be a positive integer")
        if self.split is not None:
            if isinstance(self.split, (str, bytes)) or not all(isinstance(c, int) for c in self.split):
                raise ValueError(f"train.pipeline.split={self.split!r} must be a list of layer counts, one per stage")
            object.__setattr__(self, "split", tuple(self.split))

    @property
    def on(self) -> bool:
        return self.schedule != "none"


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a run except the architecture (the ``train:`` section of a preset).

    Attributes:
      steps, batch_size (global rows), seq_len, seed.
      mesh: e.g. ``"data=2,expert=2,tensor=2"`` or ``"stage=4,data=2"``; empty = ``data`` over every device.
      pipeline: :class:`PipelineConfig` (a ``stage`` axis in the mesh needs a schedule).
      out: run folder (checkpoints, metrics.jsonl, tensorboard/, tokenizer.json).
      remat: ``none`` | ``full`` | ``deepseek`` (see :func:`deepseek_jax.nn.block.remat_policy`).
      mtp_lambda: MTP loss weight (divided by the depth), number or ``[[from_step, value], ...]``
        (V3: 0.3 then 0.1). balance_alpha: sequence-wise balance loss weight (V3: 1e-4).
      z_loss: weight of ``mean(logsumexp(logits)^2)`` (0 = off).
      bias_gamma: auxiliary-loss-free bias update speed (V3: 0.001, then 0), schedulable like mtp_lambda.
      bias_center: subtract the mean of each layer's update (keeps the biases zero-mean).
      eval_every / eval_batches, checkpoint_every / keep_checkpoints, log_every.
      sample_tokens: length of the text sample generated at the end (0 = none); sample_prompt.
      peak_flops: FLOP/s of the whole machine for MFU; 0 = a table for known accelerators, or a measured
        fp32 matmul on CPU.
      dsa_stage: for a model with ``attention.sparse.kind: dsa`` (DeepSeek-V3.2's two stages): ``sparse``
        (every query reads its top-k keys; the model learns from the LM loss, the indexer from its KL over the
        kept keys) or ``dense_warmup`` (attention dense, only the indexer trained, on its KL over every
        visible key). dsa_kl_weight: the KL's weight in the loss.
    """

    steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    seed: int = 0
    mesh: str = ""
    out: str = "runs/default"
    remat: str = "none"
    mtp_lambda: Schedulable = 0.3
    balance_alpha: float = 1e-4
    z_loss: float = 0.0
    bias_gamma: Schedulable = 0.001
    bias_center: bool = False
    log_every: int = 1
    eval_every: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    sample_tokens: int = 64
    sample_prompt: str = "def "
    peak_flops: float = 0.0
    dsa_stage: str = "sparse"
    dsa_kl_weight: float = 1.0
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self):
        for n in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
            v = getattr(self, n)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"train.{n}={v!r} must be a positive integer")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"train.remat={self.remat!r} must be one of {REMAT_POLICIES}")
        if self.dsa_stage not in DSA_STAGES:
            raise ValueError(f"train.dsa_stage={self.dsa_stage!r} must be one of {DSA_STAGES}")
        for n in ("balance_alpha", "z_loss", "peak_flops", "dsa_kl_weight"):
            if getattr(self, n) < 0:
                raise ValueError(f"train.{n}={getattr(self, n)!r} must be >= 0")
        if self.sample_tokens < 0 or self.eval_batches < 0:
            raise ValueError("train.sample_tokens and train.eval_batches must be >= 0")
        object.__setattr__(self, "mtp_lambda", _schedulable("train.mtp_lambda", self.mtp_lambda))
        object.__setattr__(self, "bias_gamma", _schedulable("train.bias_gamma", self.bias_gamma))
        stage = parse_mesh(self.mesh).get("stage", 1) if self.mesh else 1
        if stage > 1 and not self.pipeline.on:
            raise ValueError(f"train.mesh={self.mesh!r} has stage={stage}: set train.pipeline.schedule (e.g. "
                             "train.pipeline.schedule=1f1b train.pipeline.microbatches=8) to run the stages")
        if self.optim.warmup_steps > self.steps:
            raise ValueError(f"train.optim.warmup_steps={self.optim.warmup_steps} exceeds train.steps={self.steps}; "
                             "lower the warm-up or run longer")

    def replace(self, **overrides: Any) -> "TrainConfig":
        return from_dict(TrainConfig, merge(dataclasses.asdict(self), overrides), "train.")


@dataclass(frozen=True)
class StepConfig:
    """What the compiled train step depends on (and nothing else: run folders, logging, data and the
    scheduled values do not recompile). Build it with :meth:`from_train`.

    Attributes:
      batch_size, seq_len: the global batch's shape. steps: the length of the learning-rate schedule.
      remat: recomputation policy. bias_center: see ``TrainConfig``. optim: the optimiser (EMA excluded:
      it lives on the host). pipeline: the stage schedule (``TrainConfig.pipeline``).
    """

    batch_size: int
    seq_len: int
    steps: int
    remat: str = "none"
    bias_center: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    dsa_stage: str = "sparse"

    @classmethod
    def from_train(cls, tcfg: TrainConfig) -> "StepConfig":
        return cls(batch_size=tcfg.batch_size, seq_len=tcfg.seq_len, steps=tcfg.steps, remat=tcfg.remat,
                   bias_center=tcfg.bias_center, optim=dataclasses.replace(tcfg.optim, ema_decay=0.0),
                   pipeline=tcfg.pipeline, dsa_stage=tcfg.dsa_stage)


def load_run_config(path: str | Path, overrides: list[str] | dict[str, Any] = ()) -> tuple[ModelConfig, TrainConfig]:
    """A preset's model and ``train:`` sections, with ``key=value`` overrides (``train.steps=50``,
    ``moe.n_routed_experts=8``; values are YAML). Unknown keys are errors."""
    p = resolve_config_path(path)
    model_d, train_d = strip_train_section(merge(read_yaml(p), parse_overrides(overrides)))
    try:
        return config_from_dict(model_d), from_dict(TrainConfig, train_d, "train.")
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None
