"""A tensor-parallel worker process (ranks 1..N-1): its shard of the model, then the driver's steps.

The driver (rank 0) keeps the scheduler and samples; each step it broadcasts one message, which every worker
runs through its own `ModelRunner` (its shard, its own paged KV cache for its KV heads), taking part in the
step's collectives. A worker reports on `reports`: ("started", rank), ("ready", rank), or ("error", rank,
traceback) before exiting with status 1. It never outlives the driver: it exits as soon as its parent is gone.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from ggtriton.gguf import GGUFFile

from ..config import ModelConfig
from ..engine.model_runner import ModelRunner
from ..models.decoder import DecoderModel
from .parallel_ops import ParallelOps
from .parallel_state import ParallelGroup
from .shard import ShardPlan, load_shard


@dataclass
class Pages:
    """The part of a sequence a worker's step reads: its block table and its prompt's length."""

    block_table: list[int]
    num_prompt_tokens: int


@dataclass
class WorkerArgs:
    path: str
    size: int
    port: int
    devices: list[torch.device]
    backend: str
    dtype: torch.dtype
    max_model_len: int
    block_size: int


def load_rank_model(f: GGUFFile, config: ModelConfig, group: ParallelGroup, backend: str, dtype: torch.dtype,
                    max_model_len: int) -> DecoderModel:
    """This rank's shard of the model of `f`, ready to run (the driver's rank 0 and the workers alike)."""
    plan = ShardPlan(config, group.size, group.rank)
    ops = ParallelOps(backend, dtype, group, plan)
    weights = load_shard(f, plan, group.device)
    model = DecoderModel(plan.shard_config(), weights, ops, group.device, max_model_len)
    ops.preload(weights.values())
    return model


def run_step(runner: ModelRunner, message: tuple[Any, ...]) -> None:
    """Run one step message (see `ParallelModelRunner`) on this rank; its results are rank 0's to use."""
    kind, *args = message
    if kind == "run":
        runner.run(args[0])
    elif kind == "score":
        for _ in runner.score(*args):
            pass
    elif kind == "warm_up":
        runner.warm_up(*args)
    elif kind == "allocate_kv":
        runner.allocate_kv(*args)
    else:
        raise ValueError(f"unknown step message {kind!r}")


def worker_main(rank: int, args: WorkerArgs, reports: Any) -> None:
    """The process of rank `rank` (spawned by `Workers`)."""
    _exit_with_parent()
    try:
        reports.put(("started", rank, ""))
        group = ParallelGroup.join(rank, args.size, args.port, args.devices[rank])
        f = GGUFFile(args.path)
        model = load_rank_model(f, ModelConfig.from_gguf(f), group, args.backend, args.dtype, args.max_model_len)
        runner = ModelRunner(model, model.config, group.device, args.block_size, args.max_model_len,
                             cuda_graphs=False)
        reports.put(("ready", rank, ""))
        while (message := group.broadcast())[0] != "stop":
            run_step(runner, message)
    except BaseException:
        reports.put(("error", rank, traceback.format_exc()))
        reports.close()
        reports.join_thread()  # the report reaches the driver before the process ends
        os._exit(1)
    ParallelGroup.leave()


def _exit_with_parent(poll_s: float = 0.5) -> None:
    """End this process as soon as its parent is gone, whatever it is blocked in (a collective, a load)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
