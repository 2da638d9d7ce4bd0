"""Turns a step's chunks into device tensors, runs a model, returns the logits to sample from.

The only place that builds device tensors for a step and owns a model's KV cache (and the throwaway
caches of warm-up and scoring). With speculative decoding there are two runners, the target's and the
draft's, over the same page ids (each page id indexes both caches).

On CUDA with the Triton kernels, decode-only steps (one token per sequence) replay a CUDA graph captured
once per batch-size bucket: a decode step is hundreds of small kernel launches, and replaying them as one
graph removes the launch overhead that otherwise dominates small batches. The batch is padded to its
bucket with rows that write no K/V (slot -1) and attend to nothing (context length 0). The graph never
depends on the step's lengths: block tables are sized for the longest sequence, and paged decode sizes
its splits from each sequence's length on the device. (The torch reference ops read lengths back to the
host to size their gathers, a sync that capture forbids: they run eagerly.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..models.decoder import DecoderModel
from ..sampling_params import SamplingParams
from .batch import ForwardBatch
from .kv_cache import KVCacheLayout
from .sampler import Sampler, token_probs
from .sequence import Sequence

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def peak_bytes(device: torch.device, fn: Callable[[], object]) -> int:
    """Device memory `fn` allocates at its peak beyond what was allocated before it (0 off CUDA)."""
    if device.type != "cuda":
        fn()
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


@dataclass
class Chunk:
    """`tokens` of `seq` fed at positions start, start + 1, ...; logits wanted for the last `n_logits`."""

    seq: Sequence
    start: int
    tokens: list[int]
    n_logits: int


@dataclass
class DeviceTokens:
    """Token ids of a step that stay on the device (drafts, never read back): `ids` [len(rows)] replace the
    placeholders at `rows` of the step's packed tokens."""

    rows: list[int]
    ids: torch.Tensor


@dataclass
class _Graph:
    replay: Callable[[], object]
    batch: ForwardBatch  # the static inputs the graph reads
    logits: torch.Tensor  # the static output it writes


class ModelRunner:
    """Runs one model. Its KV cache is allocated by `allocate_kv`, once the memory left for it is known."""

    def __init__(self, model: DecoderModel, config: ModelConfig, device: torch.device, block_size: int,
                 max_model_len: int, cuda_graphs: bool = True):
        self.model = model
        self.config = config
        self.device = device
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cuda_graphs = cuda_graphs and device.type == "cuda" and model.ops.backend == "triton"
        self._graphs: dict[int, _Graph] = {}
        self._pool = None

    def kv_layout(self, num_blocks: int) -> KVCacheLayout:
        cfg = self.config
        return KVCacheLayout(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, num_blocks, self.block_size,
                             self.model.ops.dtype)

    def allocate_kv(self, num_blocks: int) -> None:
        self.kv_caches = self.kv_layout(num_blocks).allocate(self.device)

    def graph_sizes(self, max_num_seqs: int) -> list[int]:
        """The batch-size buckets decode graphs are captured for (none without graphs)."""
        if not self.cuda_graphs:
            return []
        cap = next((b for b in GRAPH_BATCH_SIZES if b >= max_num_seqs), GRAPH_BATCH_SIZES[-1])
        return [b for b in GRAPH_BATCH_SIZES if b <= cap]

    def graph_output_bytes(self, max_num_seqs: int) -> int:
        """Bytes the captured graphs' logits hold for good: float32 [bucket, vocab] each."""
        return sum(self.graph_sizes(max_num_seqs)) * self.config.vocab_size * 4

    @torch.inference_mode()
    def warm_up(self, token_counts: list[int], logit_rows: int, decode_sizes: list[int]) -> int:
        """Run a one-sequence prefill step of each of `token_counts` tokens (logits for its last `logit_rows`
        tokens at most) and an eager decode step of each of `decode_sizes` sequences, into a throwaway cache:
        every kernel these steps launch compiles (and tunes) now. Returns the peak bytes the steps allocate
        beyond that cache (CUDA; 0 elsewhere). The engine's own cache and state are not touched."""
        blocks = max([-(-t // self.block_size) for t in token_counts] + decode_sizes + [1])
        kv = self.kv_layout(blocks).allocate(self.device)

        def steps() -> None:
            for t in token_counts:
                pages = list(range(-(-t // self.block_size)))
                batch = ForwardBatch.build([[0] * t], [0], [pages], self.block_size, self.device)
                self.model.logits(self.model.forward(batch, kv)[-min(t, logit_rows):])
            for b in decode_sizes:
                batch = ForwardBatch.build([[0]] * b, [0] * b, [[i] for i in range(b)], self.block_size, self.device)
                self.model.logits(self.model.forward(batch, kv))

        return peak_bytes(self.device, steps)

    @torch.inference_mode()
    def sampling_peak(self, rows: int) -> int:
        """Peak bytes of sampling and of speculative verification over `rows` logit rows of this model,
        every filter and penalty on (CUDA; 0 elsewhere)."""
        vocab = self.config.vocab_size
        params = [SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                                 presence_penalty=0.1, frequency_penalty=0.1, logprobs=5)] * rows
        history = [list(range(min(vocab, 64)))] * rows

        def sample() -> None:
            logits = torch.randn(rows, vocab, device=self.device)
            Sampler(0).sample(logits, params, history, history, [None] * rows)
            token_probs(logits, params, history, history)

        return peak_bytes(self.device, sample)

    @torch.inference_mode()
    def score(self, sequences: list[list[int]], max_tokens: int,
              first: int = 0) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Next-token logits of several sequences at their positions from `first` on, into a throwaway cache.

        Steps of at most `max_tokens` tokens pack the sequences in order; a sequence that does not fit in a
        step goes on in the next one, its later tokens attending to the cached pages of its earlier ones (as
        chunked prefill does). Pages go back to the pool when a sequence is done, so the cache holds only the
        sequences of one step. Yields (i, p, logits) per piece of a step: float32 [rows, vocab] on the device,
        the logits of sequence i at positions p, p + 1, ...; each scored position once, in order per sequence.
        """
        plan, step, room = [], [], max_tokens
        for i, seq in enumerate(sequences):
            pos = 0
            while pos < len(seq):
                n = min(room, len(seq) - pos)
                step.append((i, pos, pos + n))
                pos, room = pos + n, room - n
                if room == 0:
                    plan.append(step)
                    step, room = [], max_tokens
        if step:
            plan.append(step)
        pages = [-(-len(seq) // self.block_size) for seq in sequences]
        pool = max((sum(pages[i] for i, _, _ in step) for step in plan), default=0)
        if not pool:
            return
        kv = self.kv_layout(pool).allocate(self.device)
        free, tables = list(range(pool)), {}
        for step in plan:
            for i, start, _ in step:
                if start == 0:
                    tables[i], free = free[: pages[i]], free[pages[i] :]
            batch = ForwardBatch.build([sequences[i][start:end] for i, start, end in step], [s for _, s, _ in step],
                                       [tables[i] for i, _, _ in step], self.block_size, self.device)
            hidden = self.model.forward(batch, kv)
            rows, pieces, offset = [], [], 0
            for i, start, end in step:
                lo = max(start, first)
                if lo < end:
                    pieces.append((i, lo, end - lo))
                    rows += range(offset + lo - start, offset + end - start)
                offset += end - start
            if rows:
                logits = self.model.logits(hidden[torch.tensor(rows, device=self.device)])
                for (i, lo, n), part in zip(pieces, logits.split([n for _, _, n in pieces])):
                    yield i, lo, part
            for i, _, end in step:
                if end == len(sequences[i]):
                    free += tables.pop(i)

    def capture_graphs(self, max_num_seqs: int) -> int:
        """Capture the decode graph of every bucket up to `max_num_seqs` now (after `allocate_kv`)."""
        sizes = [b for b in self.graph_sizes(max_num_seqs) if b not in self._graphs]
        for size in sizes:
            self._capture(size)
        return len(sizes)

    @torch.inference_mode()
    def run(self, chunks: list[Chunk], device_tokens: DeviceTokens | None = None) -> torch.Tensor:
        """Compute the chunks; float32 logits [sum of n_logits, vocab], chunk by chunk in order."""
        if (self.cuda_graphs and 0 < len(chunks) <= GRAPH_BATCH_SIZES[-1]
                and all(len(c.tokens) == 1 and c.n_logits == 1 for c in chunks)):
            return self._replay(chunks, device_tokens)
        batch = ForwardBatch.build([c.tokens for c in chunks], [c.start for c in chunks],
                                   [c.seq.block_table for c in chunks], self.block_size, self.device)
        self._place(batch.input_ids, device_tokens)
        hidden = self.model.forward(batch, self.kv_caches)
        rows, end = [], 0
        for c in chunks:
            end += len(c.tokens)
            rows += range(end - c.n_logits, end)
        if not rows:
            return torch.empty(0, self.config.vocab_size, device=self.device)
        return self.model.logits(hidden[torch.tensor(rows, device=self.device)])

    def _place(self, input_ids: torch.Tensor, device_tokens: DeviceTokens | None) -> None:
        if device_tokens is not None and device_tokens.rows:
            rows = torch.tensor(device_tokens.rows, dtype=torch.int64).to(self.device, non_blocking=True)
            input_ids.index_copy_(0, rows, device_tokens.ids.to(input_ids.dtype))

    def _replay(self, chunks: list[Chunk], device_tokens: DeviceTokens | None) -> torch.Tensor:
        n = len(chunks)
        size = next(b for b in GRAPH_BATCH_SIZES if b >= n)
        g = self._graphs.get(size) or self._capture(size)
        host = ForwardBatch.build([c.tokens for c in chunks], [c.start for c in chunks],
                                  [c.seq.block_table for c in chunks], self.block_size, torch.device("cpu"))
        s = g.batch
        s.input_ids[:n].copy_(host.input_ids, non_blocking=True)
        self._place(s.input_ids, device_tokens)
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
        pages = -(-self.max_model_len // self.block_size)

        def zeros(*shape, dtype):
            return torch.zeros(shape, dtype=dtype, device=self.device)

        batch = ForwardBatch(
            input_ids=zeros(size, dtype=torch.int64), positions=zeros(size, dtype=torch.int64),
            slot_mapping=torch.full((size,), -1, dtype=torch.int64, device=self.device),
            block_tables=zeros(size, pages, dtype=torch.int32), context_lens=zeros(size, dtype=torch.int32),
            cu_seqlens_q=torch.arange(size + 1, dtype=torch.int32, device=self.device),
            max_seqlen_q=1, is_decode=True,
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
