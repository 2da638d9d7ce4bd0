"""Turns a step's chunks into device tensors, runs a model, returns the logits to sample from.

The only place that builds device tensors for a step and owns a model's KV cache (and the throwaway
caches of warm-up and scoring). With speculative decoding there are two runners, the target's and the
draft's, over the same page ids (each page id indexes both caches).

On CUDA with the Triton kernels, steps of a few tokens per sequence replay a CUDA graph: a decode step is
hundreds of small kernel launches, and replaying them as one graph removes the launch overhead that otherwise
dominates small batches. Graphs are captured per (batch-size bucket, tokens per sequence q): q = 1 for plain
decode and the draft's steps, and up to 1 + the most drafts a step verifies for speculative verification.
Every sequence of a step is padded to q tokens and the batch to its bucket: padding rows come after a
sequence's own tokens, so causal attention keeps them out of its rows; they write no K/V (slot -1), and
padding sequences attend to nothing (context length 0). The graph never depends on the step's lengths: block
tables are sized for the longest sequence, and the attention kernels read lengths on the device. A graph
ends at the final norm; the output product runs after the replay on the rows the step wants, so a graph
keeps only its hidden states. (The torch reference ops read lengths back to the host to size their gathers,
a sync that capture forbids: they run eagerly.)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..models.decoder import DecoderModel
from ..sampling_params import SamplingParams
from .batch import ForwardBatch, row_flags
from .kv_cache import KVCacheLayout, slots
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
    hidden: torch.Tensor  # the static output it writes: [bucket * q, hidden]


class ModelRunner:
    """Runs one model. Its KV cache is allocated by `allocate_kv`, once the memory left for it is known."""

    def __init__(self, model: DecoderModel, config: ModelConfig, device: torch.device, block_size: int,
                 max_model_len: int, cuda_graphs: bool = True, graph_tokens: int = 1):
        self.model = model
        self.config = config
        self.device = device
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cuda_graphs = cuda_graphs and device.type == "cuda" and model.ops.backend == "triton"
        self.graph_tokens = graph_tokens  # the most tokens per sequence a graphed step takes
        self._graphs: dict[tuple[int, int], _Graph] = {}
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

    def graph_keys(self, max_num_seqs: int) -> list[tuple[int, int]]:
        """(bucket, tokens per sequence) of every graph captured at start-up."""
        return [(b, q) for q in range(1, self.graph_tokens + 1) for b in self.graph_sizes(max_num_seqs)]

    def graph_output_bytes(self, max_num_seqs: int) -> int:
        """Bytes the captured graphs' outputs hold for good: [bucket * q, hidden] in the model's dtype each."""
        rows = sum(b * q for b, q in self.graph_keys(max_num_seqs))
        return rows * self.config.hidden * self.model.ops.dtype.itemsize

    def _dummy_step(self, seqs: int, q: int, kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                    generated: bool = False) -> tuple[ForwardBatch, list[tuple[torch.Tensor, torch.Tensor]]]:
        """A step of `seqs` sequences of q placeholder tokens each, from position 0, prompt tokens or (`generated`)
        decoded ones, and a throwaway cache for it (or `kv`, when large enough)."""
        per_seq = -(-q // self.block_size)
        kv = kv if kv is not None else self.kv_layout(max(seqs * per_seq, 1)).allocate(self.device)
        pages = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(seqs)]
        return ForwardBatch.build([[0] * q] * seqs, [0] * seqs, pages, self.block_size, self.device,
                                  [0] * seqs if generated else None), kv

    @torch.inference_mode()
    def warm_up(self, token_counts: list[int], logit_rows: int, decode_sizes: list[int], decode_tokens: int = 1) -> int:
        """Run a one-sequence prefill step of each of `token_counts` tokens (logits for its last `logit_rows`
        tokens at most) and an eager decode step of each of `decode_sizes` sequences of `decode_tokens` tokens
        each (a verify step when more than one), into a throwaway cache: every kernel these steps launch
        compiles (and tunes) now. Returns the peak bytes the steps allocate beyond that cache (CUDA; 0
        elsewhere). The engine's own cache and state are not touched."""
        per_seq = -(-decode_tokens // self.block_size)
        blocks = max([-(-t // self.block_size) for t in token_counts] + [b * per_seq for b in decode_sizes] + [1])
        kv = self.kv_layout(blocks).allocate(self.device)

        def steps() -> None:
            for t in token_counts:
                batch, _ = self._dummy_step(1, t, kv)
                self.model.logits(self.model.forward(batch, kv)[-min(t, logit_rows):])
            for b in decode_sizes:
                batch, _ = self._dummy_step(b, decode_tokens, kv, generated=True)
                self.model.logits(self.model.forward(batch, kv), batch.generated)

        return peak_bytes(self.device, steps)

    @torch.inference_mode()
    def step_time(self, seqs: int, q: int, reps: int = 3) -> float:
        """Seconds a decode (q = 1) or verify step of `seqs` sequences of q tokens each takes, the logits of every
        token included: the replay of its captured graph when there is one (on its static inputs, which write and
        attend nothing), else an eager step into a throwaway cache. The median of `reps` runs after an unrecorded
        one."""
        graph = self._graphs.get((seqs, q))
        if graph is not None:
            def step() -> None:
                graph.replay()
                self.model.logits(graph.hidden)
        else:
            batch, kv = self._dummy_step(seqs, q, generated=True)

            def step() -> None:
                self.model.logits(self.model.forward(batch, kv), batch.generated)
        times = []
        for _ in range(reps + 1):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

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
        """Capture the graph of every (bucket, q) up to `max_num_seqs` sequences and `graph_tokens` tokens each
        now (after `allocate_kv`)."""
        keys = [key for key in self.graph_keys(max_num_seqs) if key not in self._graphs]
        for size, q in keys:
            self._capture(size, q)
        return len(keys)

    @torch.inference_mode()
    def run(self, chunks: list[Chunk], device_tokens: DeviceTokens | None = None) -> torch.Tensor:
        """Compute the chunks; float32 logits [sum of n_logits, vocab], chunk by chunk in order."""
        q = max((len(c.tokens) for c in chunks), default=0)
        if self.cuda_graphs and 0 < len(chunks) <= GRAPH_BATCH_SIZES[-1] and q <= self.graph_tokens:
            return self._replay(chunks, q, device_tokens)
        batch = ForwardBatch.build([c.tokens for c in chunks], [c.start for c in chunks],
                                   [c.seq.block_table for c in chunks], self.block_size, self.device,
                                   [c.seq.num_prompt_tokens for c in chunks])
        self._place(batch.input_ids, device_tokens)
        hidden = self.model.forward(batch, self.kv_caches)
        rows, sampling, end = [], [], 0
        for c in chunks:
            end += len(c.tokens)
            rows += range(end - c.n_logits, end)
            first = c.start + len(c.tokens) - c.n_logits  # the position of the chunk's first logits row
            # rows that pick a generated token: the prompt's last one and every later one (not prompt scoring)
            sampling += [p >= c.seq.num_prompt_tokens - 1 for p in range(first, first + c.n_logits)]
        if not rows:
            return torch.empty(0, self.config.vocab_size, device=self.device)
        return self.model.logits(hidden[torch.tensor(rows, device=self.device)], row_flags(sampling))

    def _place(self, input_ids: torch.Tensor, device_tokens: DeviceTokens | None) -> None:
        if device_tokens is not None and device_tokens.rows:
            rows = torch.tensor(device_tokens.rows, dtype=torch.int64).to(self.device, non_blocking=True)
            input_ids.index_copy_(0, rows, device_tokens.ids.to(input_ids.dtype))

    def _replay(self, chunks: list[Chunk], q: int, device_tokens: DeviceTokens | None) -> torch.Tensor:
        n = len(chunks)
        size = next(b for b in GRAPH_BATCH_SIZES if b >= n)
        g = self._graphs.get((size, q)) or self._capture(size, q)
        # Sequence b's token i sits at row b * q + i; its padding rows after it write nothing.
        rows = [b * q + i for b, c in enumerate(chunks) for i in range(len(c.tokens))]
        slot_ids = [s for c in chunks for s in slots(c.seq.block_table, c.start, c.start + len(c.tokens),
                                                         self.block_size)]
        width = max(len(c.seq.block_table) for c in chunks)
        tables = [c.seq.block_table + [0] * (width - len(c.seq.block_table)) for c in chunks]
        starts = torch.tensor([c.start for c in chunks], dtype=torch.int64)

        def host(values, dtype):
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        s = g.batch
        index = host(rows, torch.int64)
        s.input_ids.index_copy_(0, index, host([t for c in chunks for t in c.tokens], torch.int64))
        s.slot_mapping.fill_(-1)  # padding rows of this step and of the last replay: no K/V written
        s.slot_mapping.index_copy_(0, index, host(slot_ids, torch.int64))
        s.positions[: n * q].copy_((starts[:, None] + torch.arange(q)).flatten().to(self.device, non_blocking=True))
        s.context_lens[:n].copy_((starts + q).to(self.device, non_blocking=True))
        s.context_lens[n:].zero_()  # padding sequences attend to nothing
        s.block_tables[:n].zero_()
        s.block_tables[:n, :width].copy_(host(tables, torch.int32).reshape(n, width), non_blocking=True)
        if device_tokens is not None and device_tokens.rows:
            self._place(s.input_ids, DeviceTokens([rows[r] for r in device_tokens.rows], device_tokens.ids))
        g.replay()
        wanted = [b * q + i for b, c in enumerate(chunks) for i in range(len(c.tokens) - c.n_logits, len(c.tokens))]
        if not wanted:
            return torch.empty(0, self.config.vocab_size, device=self.device)
        return self.model.logits(g.hidden[host(wanted, torch.int64)])

    def _capture(self, size: int, q: int) -> _Graph:
        """Record a step of `size` sequences of `q` tokens each (after warm-up runs that compile and autotune)."""
        # room for a sequence's padding rows past its last page, up to the longest context
        pages = -(-(self.max_model_len + q - 1) // self.block_size)

        def zeros(*shape, dtype):
            return torch.zeros(shape, dtype=dtype, device=self.device)

        batch = ForwardBatch(
            input_ids=zeros(size * q, dtype=torch.int64), positions=zeros(size * q, dtype=torch.int64),
            slot_mapping=torch.full((size * q,), -1, dtype=torch.int64, device=self.device),
            block_tables=zeros(size, pages, dtype=torch.int32), context_lens=zeros(size, dtype=torch.int32),
            cu_seqlens_q=torch.arange(0, size * q + 1, q, dtype=torch.int32, device=self.device),
            max_seqlen_q=q, is_decode=q == 1,
        )
        replay, hidden = self._record(lambda: self.model.forward(batch, self.kv_caches))
        self._graphs[size, q] = _Graph(replay, batch, hidden)
        return self._graphs[size, q]

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
