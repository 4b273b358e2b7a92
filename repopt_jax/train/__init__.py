"""Training: the train state, the sharded train/eval step, the loop, checkpoints and metrics.

    from repopt_jax.train import Trainer
    metrics = Trainer('digits_tiny', '/tmp/run').fit()   # resumes from /tmp/run if it holds a checkpoint
"""

from repopt_jax.config import Config, ConfigError, load_config
from repopt_jax.train.build import Run, build_run
from repopt_jax.train.checkpoint import CheckpointError, Checkpointer, CheckpointWarning
from repopt_jax.train.loop import NonFiniteLossError, Trainer, WorkdirError, exit_status
from repopt_jax.train.mesh import PeerError, batch_sharded, make_mesh, maybe_initialize_distributed, replicated
from repopt_jax.train.metrics import MetricsWriter, Progress, read_jsonl
from repopt_jax.train.run_scales import RunScales, read_run_scales
from repopt_jax.train.state import (TrainState, build_model, build_optimizer, init_state, make_schedule,
                                    split_model)
from repopt_jax.train.step import EvalStep, TrainStep, cross_entropy

__all__ = [
    "Config", "ConfigError", "load_config", "Run", "build_run", "CheckpointError", "Checkpointer",
    "CheckpointWarning", "NonFiniteLossError", "PeerError", "exit_status", "Trainer",
    "WorkdirError", "batch_sharded", "make_mesh", "maybe_initialize_distributed", "replicated", "MetricsWriter",
    "Progress", "read_jsonl", "TrainState", "build_model", "build_optimizer", "init_state", "make_schedule",
    "split_model", "EvalStep", "TrainStep", "cross_entropy", "RunScales", "read_run_scales",
]
