"""Turns a step's chunks into device tensors, runs a model, returns the logits to sample from.

The only place that builds device tensors for a step and owns a model's KV cache. With speculative
decoding there are two runners, the target's and the draft's, over the same page ids (each page id
indexes both caches).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import ForwardBatch
from .config import ModelConfig
from .kv_cache import KVCacheLayout
from .models.decoder import DecoderModel
from .sequence import Sequence

# KV cache of a CPU engine when none is given: plenty for the small models CPU inference is for.
DEFAULT_CPU_KV_BYTES = 2 << 30


def kv_cache_budget(device: torch.device, gpu_memory_utilization: float, kv_cache_bytes: int | None) -> int:
    """Bytes for the KV cache: as given, else on a GPU the share of its memory left after the weights
    that keeps the device's use under `gpu_memory_utilization`."""
    if kv_cache_bytes is not None:
        return kv_cache_bytes
    if device.type != "cuda":
        return DEFAULT_CPU_KV_BYTES
    free, total = torch.cuda.mem_get_info(device)
    return max(0, int(free - (1 - gpu_memory_utilization) * total))


@dataclass
class Chunk:
    """`tokens` of `seq` fed at positions start, start + 1, ...; logits wanted for the last `n_logits`."""

    seq: Sequence
    start: int
    tokens: list[int]
    n_logits: int


class ModelRunner:
    def __init__(self, model: DecoderModel, config: ModelConfig, layout: KVCacheLayout, device: torch.device):
        self.model = model
        self.config = config
        self.layout = layout
        self.device = device
        self.kv_caches = layout.allocate(device)

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """Compute the chunks; float32 logits [sum of n_logits, vocab], chunk by chunk in order."""
        batch = ForwardBatch.build([c.tokens for c in chunks], [c.start for c in chunks],
                                   [c.seq.block_table for c in chunks], self.layout.block_size, self.device)
        hidden = self.model.forward(batch, self.kv_caches)
        rows, end = [], 0
        for c in chunks:
            end += len(c.tokens)
            rows += range(end - c.n_logits, end)
        if not rows:
            return torch.empty(0, self.config.vocab_size, device=self.device)
        return self.model.logits(hidden[torch.tensor(rows, device=self.device)])
