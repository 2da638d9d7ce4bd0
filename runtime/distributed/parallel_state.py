"""The process group of a tensor-parallel engine and the collectives its model and its step messages use.

Tensors go through the default group: NCCL on CUDA, gloo on CPU. Step messages (Python objects, a handful per
step) go through a gloo group, so that on CUDA they never make a round trip through the GPU. All ranks run on
one machine (the rendezvous is on 127.0.0.1), rank r on the r-th device from the driver's.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port free on this machine now, for the rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_devices(device: torch.device, size: int) -> list[torch.device]:
    """The device of each rank: the CPU for all, or `size` consecutive GPUs from `device`'s."""
    if device.type == "cpu":
        return [device] * size
    if device.type != "cuda":
        raise ValueError(f"tensor parallelism runs on CUDA GPUs or on the CPU, not on {device}")
    first, count = device.index or 0, torch.cuda.device_count()
    if first + size > count:
        raise ValueError(f"tensor_parallel_size {size} from {device} needs GPUs {first}..{first + size - 1}; "
                         f"torch sees {count}")
    return [torch.device("cuda", first + r) for r in range(size)]


@dataclass
class ParallelGroup:
    """This process's place in the group: `rank` of `size`, on `device`."""

    rank: int
    size: int
    device: torch.device
    messages: Any  # the gloo group of step messages

    @classmethod
    def join(cls, rank: int, size: int, port: int, device: torch.device) -> ParallelGroup:
        """Join the group (every rank calls this; it returns once all have)."""
        if dist.is_initialized():
            raise ValueError("a tensor-parallel engine already runs in this process: close it first")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
        messages = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
        return cls(rank, size, device, messages)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over the ranks, in place."""
        dist.all_reduce(t)
        return t

    def gather_columns(self, t: torch.Tensor, total: int) -> torch.Tensor:
        """[rows, total]: the ranks' column blocks side by side, rank order; each rank's `t` [rows, <= width]
        is padded to `width` = ceil(total / size) for the collective, the padding dropped."""
        width = -(-total // self.size)
        if t.shape[1] < width:
            t = torch.nn.functional.pad(t, (0, width - t.shape[1]))
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=1)[:, :total]

    def broadcast(self, message: Any = None) -> Any:
        """Rank 0's `message`, on every rank."""
        box = [message]
        dist.broadcast_object_list(box, src=0, group=self.messages)
        return box[0]

    @staticmethod
    def leave() -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
