"""Turns a step's chunks into device tensors, runs a model, returns the logits to sample from.

The only place that builds device tensors for a step and owns a model's KV cache. With speculative
decoding there are two runners, the target's and the draft's, over the same page ids (each page id
indexes both caches).

On CUDA, decode-only steps (one token per sequence) replay a CUDA graph captured once per batch-size
bucket: a decode step is hundreds of small kernel launches, and replaying them as one graph removes the
launch overhead that otherwise dominates small batches. The batch is padded to its bucket with rows
that write no K/V (slot -1) and attend to nothing (context length 0); attention is bounded by the
model's maximum length, so the graph never depends on the step's actual lengths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..models.decoder import DecoderModel
from .batch import ForwardBatch
from .kv_cache import KVCacheLayout
from .sequence import Sequence

# KV cache of a CPU engine when none is given: plenty for the small models CPU inference is for.
DEFAULT_CPU_KV_BYTES = 2 << 30
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def kv_cache_budget(device: torch.device, gpu_memory_utilization: float, kv_cache_bytes: int | None,
                    warm_up: Callable[[], object]) -> int:
    """Bytes for the KV cache: as given, else on a GPU what is left of `gpu_memory_utilization` of its
    memory after the weights and the activations of the largest step, measured by running `warm_up`."""
    if kv_cache_bytes is not None:
        return kv_cache_bytes
    if device.type != "cuda":
        return DEFAULT_CPU_KV_BYTES
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    warm_up()
    torch.cuda.synchronize(device)
    activations = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return max(0, int(free - (1 - gpu_memory_utilization) * total - activations))


@dataclass
class Chunk:
    """`tokens` of `seq` fed at positions start, start + 1, ...; logits wanted for the last `n_logits`."""

    seq: Sequence
    start: int
    tokens: list[int]
    n_logits: int


@dataclass
class _Graph:
    replay: Callable[[], object]
    batch: ForwardBatch  # the static inputs the graph reads
    logits: torch.Tensor  # the static output it writes


class ModelRunner:
    def __init__(self, model: DecoderModel, config: ModelConfig, layout: KVCacheLayout, device: torch.device,
                 max_model_len: int, cuda_graphs: bool = True):
        self.model = model
        self.config = config
        self.layout = layout
        self.device = device
        self.max_model_len = max_model_len
        self.kv_caches = layout.allocate(device)
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self._graphs: dict[int, _Graph] = {}
        self._pool = None

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """Compute the chunks; float32 logits [sum of n_logits, vocab], chunk by chunk in order."""
        if (self.cuda_graphs and 0 < len(chunks) <= GRAPH_BATCH_SIZES[-1]
                and all(len(c.tokens) == 1 and c.n_logits == 1 for c in chunks)):
            return self._replay(chunks)
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

    def _replay(self, chunks: list[Chunk]) -> torch.Tensor:
        n = len(chunks)
        size = next(b for b in GRAPH_BATCH_SIZES if b >= n)
        g = self._graphs.get(size) or self._capture(size)
        host = ForwardBatch.build([c.tokens for c in chunks], [c.start for c in chunks],
                                  [c.seq.block_table for c in chunks], self.layout.block_size, torch.device("cpu"))
        s = g.batch
        s.input_ids[:n].copy_(host.input_ids, non_blocking=True)
        s.positions[:n].copy_(host.positions, non_blocking=True)
        s.slot_mapping[:n].copy_(host.slot_mapping, non_blocking=True)
        s.context_lens[:n].copy_(host.context_lens, non_blocking=True)
        s.block_tables[:n].zero_()
        s.block_tables[:n, : host.block_tables.shape[1]].copy_(host.block_tables, non_blocking=True)
        # Padding rows of a smaller batch than the last replay: no K/V written, nothing attended.
        s.slot_mapping[n:].fill_(-1)
        s.context_lens[n:].zero_()
        g.replay()
        return g.logits[:n]

    def _capture(self, size: int) -> _Graph:
        """Record a decode step of `size` sequences (after warm-up runs that compile and autotune)."""
        pages = -(-self.max_model_len // self.layout.block_size)

        def zeros(*shape, dtype):
            return torch.zeros(shape, dtype=dtype, device=self.device)

        batch = ForwardBatch(
            input_ids=zeros(size, dtype=torch.int64), positions=zeros(size, dtype=torch.int64),
            slot_mapping=torch.full((size,), -1, dtype=torch.int64, device=self.device),
            block_tables=zeros(size, pages, dtype=torch.int32), context_lens=zeros(size, dtype=torch.int32),
            cu_seqlens_q=torch.arange(size + 1, dtype=torch.int32, device=self.device),
            max_seqlen_q=1, max_context_len=self.max_model_len, is_decode=True,
        )
        replay, logits = self._record(lambda: self.model.logits(self.model.forward(batch, self.kv_caches)))
        self._graphs[size] = _Graph(replay, batch, logits)
        return self._graphs[size]

    def _record(self, step: Callable[[], torch.Tensor]) -> tuple[Callable[[], object], torch.Tensor]:
        """Capture `step` as a CUDA graph: (replay, the output tensor each replay rewrites)."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles and autotunes every kernel before capture
                step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = step()
        self._pool = graph.pool()
        return graph.replay, out
