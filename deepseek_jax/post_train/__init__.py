"""Post-training, DeepSeek-R1 style (post-training.md): SFT (:mod:`.sft`), rejection sampling (:mod:`.sample`),
distillation (:mod:`.distill`) and GRPO (:mod:`.grpo` pure pieces, :mod:`.objectives`, :mod:`.rollout`,
:mod:`.grpo_run`), with reward plug-ins (:mod:`.rewards`), prompt sources (:mod:`.prompts`), held-out
evaluation (:mod:`.evaluate`), the configuration sections (:mod:`.config`) and the noisy-teacher addition task
(:mod:`.tasks.addition`)."""

from deepseek_jax.post_train.config import (DistillConfig, EvalConfig, GRPOConfig, PostConfig, RewardSpec, SFTConfig,
                                            TaskConfig, load_post_config)
from deepseek_jax.post_train.distill import (OnPolicyDistill, forward_kl, generalized_jsd, run_distill,
                                             teacher_logprobs)
from deepseek_jax.post_train.evaluate import evaluate_task, majority_correct, pass_at_k
from deepseek_jax.post_train.grpo import AGGREGATIONS, KL_ESTIMATORS, SCALES, group_advantages, grpo_loss, kl_estimate
from deepseek_jax.post_train.grpo_run import run_grpo
from deepseek_jax.post_train.logprobs import per_token_logps
from deepseek_jax.post_train.objectives import GRPO, token_logps
from deepseek_jax.post_train.rewards import RewardError, Rewards, load_reward
from deepseek_jax.post_train.rollout import Rollout, rollout
from deepseek_jax.post_train.sample import sample_records
from deepseek_jax.post_train.sft import pack_samples, run_sft

__all__ = ["group_advantages", "grpo_loss", "kl_estimate", "AGGREGATIONS", "KL_ESTIMATORS", "SCALES", "Rewards",
           "RewardError", "load_reward", "per_token_logps", "token_logps", "GRPO", "Rollout", "rollout", "run_grpo",
           "run_sft", "pack_samples", "sample_records", "run_distill", "OnPolicyDistill", "forward_kl",
           "generalized_jsd", "teacher_logprobs", "evaluate_task", "pass_at_k", "majority_correct", "load_post_config",
           "PostConfig", "SFTConfig", "GRPOConfig", "DistillConfig", "RewardSpec", "TaskConfig", "EvalConfig"]
