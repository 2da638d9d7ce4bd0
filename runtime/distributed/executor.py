"""The driver's side of tensor parallelism: it starts the workers, sends them each step, and stops them.

`Workers` spawns ranks 1..N-1 (torch.multiprocessing, spawn), the driver process being rank 0. The driver's
`ParallelModelRunner` is a `ModelRunner` that broadcasts each call (a step's chunks, a scoring pass, warm-up,
the KV cache's allocation) to the workers before running it on its own shard, so that every rank runs the same
forward passes and meets the same collectives; rank 0 alone samples. Decode steps run eagerly (no CUDA graphs).

Any failure ends the whole group: a worker that fails reports its traceback and exits, the driver's next
collective fails, and the driver stops every worker and raises a RuntimeError with the worker's report (or,
for a failure of its own, the original exception). No worker outlives the driver.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..engine.model_runner import Chunk, DeviceTokens, ModelRunner
from ..models.decoder import DecoderModel
from .parallel_state import ParallelGroup, free_port, rank_devices
from .worker import Pages, WorkerArgs, worker_main

_POLL_S = 0.2  # how often start-up checks that the workers still live
_STOP_S = 10.0  # how long a worker may take to stop before it is terminated


class Workers:
    """Ranks 1..`size` - 1 of a tensor-parallel group over the model at `path`, and the group itself."""

    def __init__(self, path: os.PathLike | str, size: int, device: torch.device, backend: str, dtype: torch.dtype,
                 max_model_len: int, block_size: int):
        devices = rank_devices(device, size)
        args = WorkerArgs(str(path), size, free_port(), devices, backend, dtype, max_model_len, block_size)
        ctx = torch.multiprocessing.get_context("spawn")
        self.reports = ctx.Queue()
        self.procs = [ctx.Process(target=worker_main, args=(rank, args, self.reports), daemon=True,
                                  name=f"ggtriton-tp-rank{rank}") for rank in range(1, size)]
        self.group: ParallelGroup | None = None
        self.closed = False
        for p in self.procs:
            p.start()
        try:
            self._wait_for("started")
            self.group = ParallelGroup.join(0, size, args.port, devices[0])
        except BaseException:
            self.close()
            raise

    def wait_ready(self) -> None:
        """Return once every worker has loaded its shard (the driver has loaded its own)."""
        try:
            self._wait_for("ready")
        except BaseException:
            self.close()
            raise

    def _wait_for(self, kind: str) -> None:
        waiting = {p.pid for p in self.procs}
        ranks = {p.pid: rank for rank, p in enumerate(self.procs, 1)}
        while waiting:
            try:
                got, rank, text = self.reports.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [p for p in self.procs if p.pid in waiting and p.exitcode is not None]
                if dead:
                    raise RuntimeError(self._failure() or f"tensor-parallel worker {ranks[dead[0].pid]} exited with "
                                                          f"status {dead[0].exitcode} while starting")
                continue
            if got == "error":
                raise RuntimeError(f"tensor-parallel worker {rank} failed:\n{text}")
            if got == kind:
                waiting.discard(self.procs[rank - 1].pid)

    @contextmanager
    def step(self, message: tuple[Any, ...]) -> Iterator[None]:
        """Broadcast `message` and run the body (rank 0's share of the step); any failure ends the group."""
        if self.closed or self.group is None:
            raise RuntimeError("the tensor-parallel workers have stopped (an earlier step failed, or the engine "
                               "was closed)")
        try:
            self.group.broadcast(message)
            yield
        except GeneratorExit:  # a scoring pass left early, and run to its end (see `ParallelModelRunner.score`)
            raise
        except BaseException as e:
            reason = self._failure()
            self.close(graceful=False)
            if reason:
                raise RuntimeError(reason) from e
            raise

    def _failure(self) -> str:
        """Why the group failed: the workers' reports, else the exit status of a worker that died silently."""
        for p in self.procs:
            p.join(timeout=1.0)  # a failing worker reports and exits at once
        errors = []
        while True:
            try:
                kind, rank, text = self.reports.get_nowait()
            except (queue.Empty, OSError, ValueError):
                break
            if kind == "error":
                errors.append(f"tensor-parallel worker {rank} failed:\n{text}")
        errors += [f"tensor-parallel worker {rank} exited with status {p.exitcode}"
                   for rank, p in enumerate(self.procs, 1) if p.exitcode not in (None, 0) and not errors]
        return "\n".join(errors)

    def close(self, graceful: bool = True) -> None:
        """Stop every worker (asked to when `graceful` and the group is sound, else terminated) and leave the
        group. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if graceful and self.group is not None and all(p.is_alive() for p in self.procs):
            try:
                self.group.broadcast(("stop",))
            except RuntimeError:
                pass  # a worker is gone: the joins below end the rest
        for p in self.procs:
            p.join(timeout=_STOP_S if graceful else 0.0)
            if p.is_alive():
                p.terminate()
                p.join(timeout=_STOP_S)
            if p.is_alive():
                p.kill()
                p.join()
        if self.group is not None:
            ParallelGroup.leave()
        self.reports.close()
        self.reports.join_thread()


class ParallelModelRunner(ModelRunner):
    """Rank 0's runner: each call goes to the workers first (see the module docstring)."""

    def __init__(self, workers: Workers, model: DecoderModel, device: torch.device, block_size: int,
                 max_model_len: int):
        super().__init__(model, model.config, device, block_size, max_model_len, cuda_graphs=False)
        self.workers = workers

    def allocate_kv(self, num_blocks: int) -> None:
        with self.workers.step(("allocate_kv", num_blocks)):
            super().allocate_kv(num_blocks)

    def warm_up(self, *args: Any) -> int:
        with self.workers.step(("warm_up", *args)):
            return super().warm_up(*args)

    def run(self, chunks: list[Chunk], device_tokens: DeviceTokens | None = None) -> torch.Tensor:
        if device_tokens is not None:
            raise ValueError("speculative decoding is not supported with tensor parallelism")
        sent = [Chunk(Pages(list(c.seq.block_table), c.seq.num_prompt_tokens), c.start, list(c.tokens), c.n_logits)
                for c in chunks]
        with self.workers.step(("run", sent)):
            return super().run(chunks)

    def score(self, sequences: list[list[int]], max_tokens: int,
              first: int = 0) -> Iterator[tuple[int, int, torch.Tensor]]:
        with self.workers.step(("score", sequences, max_tokens, first)):
            steps = super().score(sequences, max_tokens, first)
            try:
                for piece in steps:  # not `yield from`: closing this generator must not close `steps`
                    yield piece
            finally:
                for _ in steps:  # the workers run every step of the pass: so does this rank, if left early
                    pass
