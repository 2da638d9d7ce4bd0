"""Tensor parallelism over torch.distributed: sharded GGUF weights (shard.py), the collectives (parallel_state.py,
parallel_ops.py), the worker processes (worker.py) and the driver's side (executor.py)."""

from .executor import ParallelModelRunner, Workers
from .shard import check_tensor_parallel, check_weights
from .worker import load_rank_model

__all__ = ["ParallelModelRunner", "Workers", "check_tensor_parallel", "check_weights", "load_rank_model"]
