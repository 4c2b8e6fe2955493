"""Post-training, DeepSeek-R1 style (post-training.md). So far: GRPO's pure pieces -- group advantages, the KL
estimators and the clipped policy loss with its aggregations (:mod:`deepseek_jax.post_train.grpo`); per-token
log-probabilities under the training forward (:mod:`deepseek_jax.post_train.logprobs`); reward
plug-ins (:mod:`deepseek_jax.post_train.rewards`); the noisy-teacher addition task
(:mod:`deepseek_jax.post_train.tasks.addition`)."""

from deepseek_jax.post_train.grpo import AGGREGATIONS, KL_ESTIMATORS, SCALES, group_advantages, grpo_loss, kl_estimate
from deepseek_jax.post_train.logprobs import per_token_logps
from deepseek_jax.post_train.rewards import RewardError, Rewards, load_reward

__all__ = ["group_advantages", "grpo_loss", "kl_estimate", "AGGREGATIONS", "KL_ESTIMATORS", "SCALES", "Rewards",
           "RewardError", "load_reward", "per_token_logps"]
