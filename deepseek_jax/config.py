"""Typed, frozen model configuration.

One tree of small frozen dataclasses describes every architecture this package implements:

* DeepSeek LLM 7B / 67B (LLaMA-style, MHA / GQA, dense SwiGLU), ``attention.kind = "mha" | "gqa"``;
* DeepSeek-V2 / V2-Lite (MLA, DeepSeekMoE with softmax routing);
* DeepSeek-V3 (MLA with q-LoRA, sigmoid routing with correction bias, node-limited routing, MTP).

Presets live in ``configs/*.yaml`` and are read by :func:`load_config`. Unknown keys are errors,
and every invalid value raises ``ValueError`` naming the field and how to fix it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from deepseek_jax.config_io import (CONFIG_DIR, from_dict, merge, plain, read_yaml, resolve_config_path,
                                   strip_train_section)
from deepseek_jax.kernels.nsa import NSAShape

__all__ = [
    "YarnConfig",
    "RopeConfig",
    "SparseConfig",
    "AttentionConfig",
    "RouterConfig",
    "MoEConfig",
    "MTPConfig",
    "FP8Config",
    "ModelConfig",
    "load_config",
    "config_from_dict",
    "yarn_mscale",
    "CONFIG_DIR",
]
_DTYPES = ("float32", "bfloat16", "float16")


def _fail(field_name: str, value: Any, why: str) -> None:
    raise ValueError(f"{field_name}={value!r} {why}")


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            _fail(n, v, "must be a positive integer")


@dataclass(frozen=True)
class YarnConfig:
    """YaRN context extension (Peng et al. 2023), as DeepSeek-V2/V3 use it.

    Attributes:
      factor: context extension factor ``s`` (V3: 40).
      original_max_position_embeddings: pre-training context ``L0`` (V3: 4096).
      beta_fast, beta_slow: rotation counts bounding the frequency ramp (32, 1).
      mscale, mscale_all_dim: DeepSeek's two mscale knobs. The softmax scale is multiplied by
        ``(0.1 * mscale_all_dim * ln s + 1) ** 2`` when ``mscale_all_dim`` is non-zero; cos/sin are
        multiplied by ``m(s, mscale) / m(s, mscale_all_dim)`` (1 for every released checkpoint).
      truncate: floor/ceil the correction range (HF default True).
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True

    def __post_init__(self):
        if not self.factor >= 1.0:
            _fail("rope.yarn.factor", self.factor, "must be >= 1 (1 disables the extension)")
        if self.original_max_position_embeddings <= 0:
            _fail("rope.yarn.original_max_position_embeddings", self.original_max_position_embeddings,
                  "must be positive")
        if not self.beta_fast > self.beta_slow > 0:
            _fail("rope.yarn.beta_fast", self.beta_fast, f"must exceed beta_slow={self.beta_slow} > 0")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding. ``yarn=None`` is plain RoPE."""

    theta: float = 10000.0
    yarn: YarnConfig | None = None

    def __post_init__(self):
        if not self.theta > 1.0:
            _fail("rope.theta", self.theta, "must be > 1")


@dataclass(frozen=True)
class SparseConfig:
    """Sparse attention in place of full attention, ``attention.sparse`` (``long-context.md`` §1, §6).

    ``kind="nsa"`` (Native Sparse Attention, arXiv 2502.11089): three branches mixed by per-head sigmoid gates
    of ``x`` (bias initialised to ``gate_bias``, cmp / slc / win): attention over compressed blocks of
    ``cmp_block`` tokens every ``cmp_stride``, over the ``slc_count`` most important blocks of ``slc_block``
    tokens (the ``init_blocks`` first and ``local_blocks`` last of them forced), and over the last ``window``
    tokens. ``compress``: ``mlp`` (the paper's phi, hidden width ``compress_hidden``, 0 = the key width) or
    ``mean``. ``impl``: ``gather`` (blocks gathered for ``chunk`` queries at a time) or ``dense`` (masks; the
    oracle). Paper defaults below; the tiny presets shrink them. Valid for MLA (one group: the absorbed form)
    and MHA/GQA (``n_kv_heads`` groups).

    ``kind="dsa"`` (DeepSeek Sparse Attention, V3.2; MLA with q-LoRA only): a lightning indexer of
    ``index_heads`` heads of ``index_head_dim`` (the first ``qk_rope_head_dim`` rotated) scores every earlier
    token, and each query attends to its ``topk`` best (all of them when ``topk`` >= the length).
    """

    kind: Literal["nsa", "dsa"]
    cmp_block: int = NSAShape.cmp_block  # the paper's sizes, defined once in NSAShape
    cmp_stride: int = NSAShape.cmp_stride
    slc_block: int = NSAShape.slc_block
    slc_count: int = NSAShape.slc_count
    init_blocks: int = NSAShape.init_blocks
    local_blocks: int = NSAShape.local_blocks
    window: int = NSAShape.window
    compress: Literal["mlp", "mean"] = "mlp"
    compress_hidden: int = 0
    gate_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    impl: Literal["gather", "dense"] = "gather"
    chunk: int = 64
    index_heads: int = 64
    index_head_dim: int = 128
    topk: int = 2048

    def __post_init__(self):
        if self.kind not in ("nsa", "dsa"):
            _fail("attention.sparse.kind", self.kind, "must be 'nsa' or 'dsa'")
        for n in ("compress_hidden", "chunk", "index_heads", "index_head_dim", "topk"):
            v, low = getattr(self, n), 0 if n == "compress_hidden" else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                _fail(f"attention.sparse.{n}", v, f"must be an integer >= {low}")
        self.shape  # validates the block sizes, naming the field
        for n, ok in (("compress", ("mlp", "mean")), ("impl", ("gather", "dense"))):
            if getattr(self, n) not in ok:
                _fail(f"attention.sparse.{n}", getattr(self, n), f"must be one of {ok}")
        bias = tuple(float(b) for b in self.gate_bias) if isinstance(self.gate_bias, (list, tuple)) else ()
        if len(bias) != 3:
            _fail("attention.sparse.gate_bias", self.gate_bias, "must be three numbers (cmp, slc, win)")
        object.__setattr__(self, "gate_bias", bias)

    @property
    def shape(self) -> NSAShape:
        return NSAShape(self.cmp_block, self.cmp_stride, self.slc_block, self.slc_count, self.init_blocks,
                        self.local_blocks, self.window)


@dataclass(frozen=True)
class AttentionConfig:
    """Attention block.

    ``kind="mha"|"gqa"`` (DeepSeek LLM): ``n_heads`` query heads of size ``head_dim`` and
    ``n_kv_heads`` key/value heads. ``kind="mla"`` (V2/V3, Multi-head Latent Attention): queries
    optionally through a rank-``q_lora_rank`` bottleneck (0 disables it, as in V2-Lite); keys and
    values through a normalised latent of size ``kv_lora_rank``; a decoupled RoPE key of size
    ``qk_rope_head_dim`` shared by all heads.
    """

    kind: Literal["mha", "gqa", "mla"]
    n_heads: int
    n_kv_heads: int | None = None  # mha/gqa; defaults to n_heads
    head_dim: int | None = None  # mha/gqa; defaults to d_model // n_heads
    q_lora_rank: int = 0  # mla
    kv_lora_rank: int = 0  # mla
    qk_nope_head_dim: int = 0  # mla
    qk_rope_head_dim: int = 0  # mla
    v_head_dim: int = 0  # mla
    sparse: SparseConfig | None = None  # dense attention when unset

    def __post_init__(self):
        if self.kind not in ("mha", "gqa", "mla"):
            _fail("attention.kind", self.kind, "must be one of 'mha', 'gqa', 'mla'")
        _positive(self, "n_heads")
        if self.kind == "mla":
            for n in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, n) <= 0:
                    _fail(f"attention.{n}", getattr(self, n), "must be positive for kind='mla'")
            if self.q_lora_rank < 0:
                _fail("attention.q_lora_rank", self.q_lora_rank, "must be >= 0 (0 disables q-LoRA)")
            if self.qk_rope_head_dim % 2:
                _fail("attention.qk_rope_head_dim", self.qk_rope_head_dim, "must be even")
            if self.n_kv_heads not in (None, self.n_heads):
                _fail("attention.n_kv_heads", self.n_kv_heads, "must be unset for kind='mla'")
            if self.sparse is not None and self.sparse.kind == "dsa":
                if self.q_lora_rank <= 0:
                    _fail("attention.q_lora_rank", self.q_lora_rank, "must be positive with attention.sparse.kind="
                          "'dsa' (the indexer's queries come from the q-LoRA latent)")
                if self.sparse.index_head_dim <= self.qk_rope_head_dim:
                    _fail("attention.sparse.index_head_dim", self.sparse.index_head_dim,
                          f"must exceed qk_rope_head_dim={self.qk_rope_head_dim} (its first dims are rotated)")
        else:
            for n in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, n):
                    _fail(f"attention.{n}", getattr(self, n), f"is an MLA field; remove it for kind={self.kind!r}")
            if self.n_kv_heads is None:
                object.__setattr__(self, "n_kv_heads", self.n_heads)
            kv = self.kv_heads
            if kv <= 0 or self.n_heads % kv:
                _fail("attention.n_kv_heads", self.n_kv_heads, f"must divide n_heads={self.n_heads}")
            if self.kind == "mha" and kv != self.n_heads:
                _fail("attention.n_kv_heads", self.n_kv_heads, "must equal n_heads for kind='mha' (use 'gqa')")
            if self.head_dim is not None and (self.head_dim <= 0 or self.head_dim % 2):
                _fail("attention.head_dim", self.head_dim, "must be a positive even integer")
            if self.sparse is not None and self.sparse.kind == "dsa":
                _fail("attention.sparse.kind", "dsa", f"needs attention.kind='mla' with q-LoRA, not {self.kind!r}")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def qk_head_dim(self) -> int:
        """Query/key width per head: ``dn + dr`` for MLA, ``head_dim`` otherwise."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.kind == "mla" else self.head_dim


@dataclass(frozen=True)
class RouterConfig:
    """Top-k router of DeepSeekMoE.

    * V3: ``scoring_func="sigmoid"``, ``topk_method="noaux_tc"``: a correction bias (not trained by
      gradients) is added for *selection only*; groups scored by the sum of their top-2 biased scores;
      the weights are the unbiased scores, normalised if ``norm_topk_prob``.
    * V2: ``"softmax"`` with ``"group_limited_greedy"`` (groups scored by their max).
    * V2-Lite: ``"softmax"`` with ``"greedy"`` (plain top-k).
    Gate weights are finally multiplied by ``routed_scaling_factor``.
    """

    scoring_func: Literal["sigmoid", "softmax"] = "sigmoid"
    topk_method: Literal["noaux_tc", "greedy", "group_limited_greedy"] = "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0

    def __post_init__(self):
        if self.scoring_func not in ("sigmoid", "softmax"):
            _fail("moe.router.scoring_func", self.scoring_func, "must be 'sigmoid' or 'softmax'")
        if self.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
            _fail("moe.router.topk_method", self.topk_method,
                  "must be 'noaux_tc', 'greedy' or 'group_limited_greedy'")
        if (self.topk_method == "noaux_tc") != (self.scoring_func == "sigmoid"):
            _fail("moe.router.topk_method", self.topk_method,
                  f"does not go with scoring_func={self.scoring_func!r} (V3: sigmoid+noaux_tc; "
                  "V2: softmax+greedy or softmax+group_limited_greedy)")
        if self.n_group <= 0 or not 0 < self.topk_group <= self.n_group:
            _fail("moe.router.topk_group", self.topk_group, f"must be in 1..n_group={self.n_group}")
        if self.topk_method == "greedy" and self.n_group != 1:
            _fail("moe.router.n_group", self.n_group, "must be 1 for topk_method='greedy'")
        if not self.routed_scaling_factor > 0:
            _fail("moe.router.routed_scaling_factor", self.routed_scaling_factor, "must be positive")


@dataclass(frozen=True)
class MoEConfig:
    """DeepSeekMoE: fine-grained routed experts plus always-on shared experts.

    Layers ``0 .. first_k_dense_replace-1`` use the dense MLP; the rest use this MoE. The shared
    experts are one SwiGLU MLP of width ``n_shared_experts * moe_intermediate_size``.
    """

    n_routed_experts: int
    experts_per_token: int
    moe_intermediate_size: int
    n_shared_experts: int = 0
    first_k_dense_replace: int = 0
    router: RouterConfig = field(default_factory=RouterConfig)
    capacity_factor: float | None = None  # expert parallelism only; None = dropless

    def __post_init__(self):
        _positive(self, "n_routed_experts", "experts_per_token", "moe_intermediate_size")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            _fail("moe.capacity_factor", self.capacity_factor, "must be positive, or null for dropless")
        if self.n_shared_experts < 0:
            _fail("moe.n_shared_experts", self.n_shared_experts, "must be >= 0")
        if self.first_k_dense_replace < 0:
            _fail("moe.first_k_dense_replace", self.first_k_dense_replace, "must be >= 0")
        if self.experts_per_token > self.n_routed_experts:
            _fail("moe.experts_per_token", self.experts_per_token,
                  f"exceeds n_routed_experts={self.n_routed_experts}")
        r = self.router
        if self.n_routed_experts % r.n_group:
            _fail("moe.n_routed_experts", self.n_routed_experts, f"is not divisible by n_group={r.n_group}")
        per_group = self.n_routed_experts // r.n_group
        if r.topk_method == "noaux_tc" and per_group < 2:
            _fail("moe.router.n_group", r.n_group, "leaves fewer than 2 experts per group (groups score top-2)")
        if r.topk_group * per_group < self.experts_per_token:
            _fail("moe.router.topk_group", r.topk_group,
                  f"keeps {r.topk_group * per_group} experts, fewer than experts_per_token={self.experts_per_token}")


@dataclass(frozen=True)
class MTPConfig:
    """Multi-token prediction (V3 §2.2): ``depth`` sequential modules; depth k predicts token t+k+1."""

    depth: int = 0

    def __post_init__(self):
        if self.depth < 0:
            _fail("mtp.depth", self.depth, "must be >= 0")


@dataclass(frozen=True)
class FP8Config:
    """DeepSeek-V3's fine-grained FP8 (``fp8:`` in a preset; ``fp8: true`` takes these defaults).

    Every linear layer (attention projections, dense and shared MLPs, ``eh_proj``) and the routed experts
    (one 128x128-block scale grid per expert) run through :mod:`deepseek_jax.fp8`: E4M3 operands,
    1x128 activation tiles, 128x128 weight blocks, float32 accumulation, FP8 Dgrad and Wgrad. The
    embedding, output head, router, norms and the attention core stay in ``dtype``; master weights
    stay in ``param_dtype``.

    Attributes:
      scale_fmt: ``None`` (float32 scales) or ``"ue8m0"`` (power-of-two scales, V3.1's choice).
      impl: ``"auto"`` (native FP8 dots on GPU/TPU, simulation on CPU), ``"simulate"`` or ``"native"``.
    """

    scale_fmt: str | None = None
    impl: Literal["auto", "simulate", "native"] = "auto"

    def __post_init__(self):
        if self.scale_fmt not in (None, "ue8m0"):
            _fail("fp8.scale_fmt", self.scale_fmt, "must be null (float32 scales) or 'ue8m0'")
        if self.impl not in ("auto", "simulate", "native"):
            _fail("fp8.impl", self.impl, "must be 'auto', 'simulate' or 'native'")


@dataclass(frozen=True)
class ModelConfig:
    """The whole architecture. See ``configs/*.yaml`` for the published presets.

    Attributes:
      vocab_size: v. d_model: d (``hidden_size``). n_layers: main-model decoder layers.
      intermediate_size: f of the dense SwiGLU MLP. moe: None for a dense model.
      dtype: activation/compute dtype. param_dtype: storage dtype of parameters.
      init_std: std of the normal initialiser of every weight matrix (DeepSeek: 0.006).
      fp8: None (off) or an :class:`FP8Config` (``fp8: true`` in YAML for the defaults).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    intermediate_size: int
    attention: AttentionConfig
    rope: RopeConfig = field(default_factory=RopeConfig)
    moe: MoEConfig | None = None
    mtp: MTPConfig = field(default_factory=MTPConfig)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    init_std: float = 0.006
    fp8: FP8Config | None = None

    def __post_init__(self):
        if self.fp8 is True:
            object.__setattr__(self, "fp8", FP8Config())
        elif self.fp8 is False:
            object.__setattr__(self, "fp8", None)
        elif self.fp8 is not None and not isinstance(self.fp8, FP8Config):
            _fail("fp8", self.fp8, "must be true/false/null or a mapping of FP8Config fields")
        _positive(self, "vocab_size", "d_model", "n_layers", "intermediate_size", "max_position_embeddings")
        a = self.attention
        if a.kind != "mla" and a.head_dim is None:
            if self.d_model % a.n_heads:
                _fail("attention.n_heads", a.n_heads,
                      f"does not divide d_model={self.d_model}; set attention.head_dim explicitly")
            object.__setattr__(self, "attention", dataclasses.replace(a, head_dim=self.d_model // a.n_heads))
        if self.moe is not None and self.moe.first_k_dense_replace > self.n_layers:
            _fail("moe.first_k_dense_replace", self.moe.first_k_dense_replace, f"exceeds n_layers={self.n_layers}")
        if self.mtp.depth and self.attention.kind != "mla":
            _fail("mtp.depth", self.mtp.depth, "is only supported with attention.kind='mla' (DeepSeek-V3)")
        for n in ("dtype", "param_dtype"):
            if getattr(self, n) not in _DTYPES:
                _fail(n, getattr(self, n), f"must be one of {_DTYPES}")
        if not self.rms_norm_eps > 0:
            _fail("rms_norm_eps", self.rms_norm_eps, "must be positive")
        if not self.init_std > 0:
            _fail("init_std", self.init_std, "must be positive")
        for n in ("bos_token_id", "eos_token_id"):
            v = getattr(self, n)
            if v is not None and not 0 <= v < self.vocab_size:
                _fail(n, v, f"must be in [0, vocab_size={self.vocab_size})")

    # ----------------------------------------------------------------------------------------------
    @property
    def n_dense_layers(self) -> int:
        """Number of leading layers with the dense MLP."""
        return self.n_layers if self.moe is None else self.moe.first_k_dense_replace

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim ** -0.5``, times YaRN's ``m**2`` when ``mscale_all_dim`` is set (§2.3)."""
        scale = self.attention.qk_head_dim ** -0.5
        y = self.rope.yarn
        if y is not None and y.mscale_all_dim:
            m = yarn_mscale(y.factor, y.mscale_all_dim)
            scale *= m * m
        return scale

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists (YAML-writable)."""
        return plain(dataclasses.asdict(self))

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A new validated config with ``overrides`` (dotted keys reach nested fields)."""
        return config_from_dict(merge(self.to_dict(), overrides))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return config_from_dict(d)


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention factor ``m(s, mscale) = 0.1 * mscale * ln s + 1`` (1 for ``s <= 1``)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Build and validate a :class:`ModelConfig`; unknown keys raise ``ValueError``."""
    return from_dict(ModelConfig, d, "")


def load_config(path: str | Path, **overrides: Any) -> ModelConfig:
    """Read a YAML preset. ``path`` may be a file or a preset name in ``configs/`` (``"tiny"``).

    ``overrides`` are merged first, e.g. ``load_config("tiny", n_layers=4, **{"mtp.depth": 2})``. The
    preset's ``train:`` section (the run settings, :mod:`deepseek_jax.train.config`) is ignored here.
    """
    p = resolve_config_path(path)
    model, _ = strip_train_section(read_yaml(p))
    try:
        return config_from_dict(merge(model, overrides))
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None
