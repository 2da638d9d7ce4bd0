"""Turns a scheduled step into device tensors, runs the model, returns the logits to sample from.

The only place that builds device tensors for a step and owns the KV cache.
"""

from __future__ import annotations

import itertools

import torch

from .batch import ForwardBatch
from .config import ModelConfig
from .kv_cache import KVCacheLayout
from .models.decoder import DecoderModel
from .scheduler import ScheduledSeq

# KV cache of a CPU engine when none is given: plenty for the small models CPU inference is for.
DEFAULT_CPU_KV_BYTES = 2 << 30


def kv_cache_budget(device: torch.device, gpu_memory_utilization: float, kv_cache_bytes: int | None) -> int:
    """Bytes for the KV cache: as given, else on a GPU the share of its memory left after the weights
    and a warm-up step that keeps the device's use under `gpu_memory_utilization`."""
    if kv_cache_bytes is not None:
        return kv_cache_bytes
    if device.type != "cuda":
        return DEFAULT_CPU_KV_BYTES
    free, total = torch.cuda.mem_get_info(device)
    return max(0, int(free - (1 - gpu_memory_utilization) * total))


class ModelRunner:
    def __init__(self, model: DecoderModel, config: ModelConfig, layout: KVCacheLayout, device: torch.device):
        self.model = model
        self.config = config
        self.layout = layout
        self.device = device
        self.kv_caches = layout.allocate(device)

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        """Compute the step; float32 logits [n, vocab] for the n sequences whose chunk `completes`, in order."""
        batch = ForwardBatch.build(
            [s.seq.token_ids[s.start : s.start + s.num_new_tokens] for s in scheduled],
            [s.start for s in scheduled],
            [s.seq.block_table for s in scheduled],
            self.layout.block_size,
            self.device,
        )
        hidden = self.model.forward(batch, self.kv_caches)
        ends = itertools.accumulate(s.num_new_tokens for s in scheduled)
        last = [end - 1 for s, end in zip(scheduled, ends) if s.completes]
        if not last:
            return torch.empty(0, self.config.vocab_size, device=self.device)
        return self.model.logits(hidden[torch.tensor(last, device=self.device)])
