"""Training: the run configuration, data, optimiser, objectives, the jitted step, hooks, the run folder and
the loop behind ``deepseek-jax train``. ``dsj.train.*`` re-exports the public names of the submodules."""

from deepseek_jax.analysis.params import flops_per_token, peak_flops
from deepseek_jax.train import data, optim
from deepseek_jax.train.balance import max_violation, update_router_bias
from deepseek_jax.train.config import PipelineConfig, StepConfig, TrainConfig, load_run_config, scheduled
from deepseek_jax.train.loop import TrainingDiverged, train
from deepseek_jax.train.objectives import Objective, Pretrain, cross_entropy, shifted_targets
from deepseek_jax.train.run_dir import load_run
from deepseek_jax.train.step import TrainFns, global_batch, hyper, make_train_fns, mesh_for, objective_loss

__all__ = ["TrainConfig", "PipelineConfig", "StepConfig", "load_run_config", "scheduled", "Objective", "Pretrain", "cross_entropy",
           "shifted_targets", "objective_loss", "max_violation", "update_router_bias", "make_train_fns", "TrainFns",
           "hyper", "mesh_for", "global_batch", "train", "TrainingDiverged", "load_run", "flops_per_token",
           "peak_flops", "data", "optim"]
