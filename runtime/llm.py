"""`LLM`: a GGUF model ready to score and generate text."""

from __future__ import annotations

import os
import sys
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ggtriton.gguf import GGUFFile, Tokenizer
from ggtriton.gguf.bundled import default_model_path
from ggtriton.kernels.cache import use_cache_dir

from .config import ModelConfig
from .distributed import ParallelModelRunner, Workers, check_tensor_parallel, check_weights, load_rank_model
from .engine.block_manager import BlockManager
from .engine.engine import Engine
from .engine.model_runner import GRAPH_BATCH_SIZES, ModelRunner
from .engine.sampler import Sampler
from .engine.scheduler import Scheduler, SchedulerConfig
from .engine.spec_decode import SpecDecoder
from .engine.step_cost import StepCost
from .models.decoder import DecoderModel
from .models.ops import Ops
from .models.weights import load_weights
from .sampling_params import RequestOutput, SamplingParams

Messages = Sequence[Mapping[str, Any]]

# Tokens scored per forward by `LLM.logits` (at most the step budget): bounds the float32 [tokens, vocab]
# logits held at once.
_LOGITS_CHUNK = 512
# KV cache of a CPU engine when none is given: plenty for the small models CPU inference is for.
DEFAULT_CPU_KV_BYTES = 2 << 30


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on, with its index: "cuda" alone names the current GPU, so that every tensor and
    random generator of the engine reports one and the same device (a generator made on "cuda" says cuda:0
    only once the index is given)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


class LLM:
    """A GGUF model: weights in their blocks on `device`, tokenizer and chat template from the file.

    device: default the GPU when there is one, else the CPU. backend: "triton" (default on a GPU; on CPU
    it needs TRITON_INTERPRET=1), "cpu" (default on CPU: packed int4 and bfloat16 weights, fewer bytes per token;
    see runtime/models/cpu_weights.py) or "torch" (the float32 reference ops, the oracle of the others).
    dtype: activations and KV cache; default float32 on CPU, bfloat16 on a GPU.
    Batching: at most `max_num_seqs` sequences and `max_num_batched_tokens` tokens per step; the KV cache
    takes `kv_cache_bytes` (default: on a GPU what keeps its memory use under `gpu_memory_utilization`,
    see `_kv_cache_budget`; 2 GiB on CPU) in pages of `block_size` tokens, shared between prompts with
    common prefixes when `enable_prefix_caching`. `max_model_len`: longest sequence (default: the model's
    context); past a LongRoPE model's original context it selects the long RoPE factors, as llama.cpp's
    context size does.
    Speculative decoding: `draft_model` (a GGUF with the same vocabulary) proposes up to
    `num_speculative_tokens` tokens per step, stopping early when its top probability is below
    `draft_p_min`; proposals shorter than `draft_min` are dropped. With `adaptive_speculation` (the default)
    each sequence drafts as many tokens as pay at its running acceptance rate, given the draft's cost (its
    share of the target's weight bytes), down to none when drafting does not pay; otherwise always
    `num_speculative_tokens`. The output distribution is the target's own. `cuda_graphs`: replay decode
    and verify steps as CUDA graphs (CUDA with the Triton kernels).
    Start-up: with `warm_up` (default on CUDA) the constructor compiles and tunes every kernel shape the
    engine's steps use and captures every decode graph, printing one line per phase on stderr, so that no
    request pays for compilation. Compiled kernels and tuning results persist in
    `cache_dir`/<device name> (default $GGTRITON_CACHE_DIR or ~/.cache/ggtriton): a second start skips both.
    Tensor parallelism: `tensor_parallel_size` N > 1 splits the model over N processes (this one and N - 1
    workers; N GPUs from `device`'s, or the CPU) over torch.distributed, as runtime/distributed/shard.py
    describes; the scheduler and sampling stay here. No draft model, no CUDA graphs. `close()` (or a `with`
    block) stops the workers; they stop with this process in any case.
    """

    def __init__(self, model: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
                 backend: str | None = None, dtype: torch.dtype | None = None, block_size: int = 16,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 2048, max_model_len: int | None = None,
                 kv_cache_bytes: int | None = None, gpu_memory_utilization: float = 0.9,
                 enable_prefix_caching: bool = True, seed: int | None = None,
                 draft_model: str | os.PathLike | None = None, num_speculative_tokens: int = 4,
                 draft_p_min: float = 0.0, draft_min: int = 1, adaptive_speculation: bool = True,
                 cuda_graphs: bool = True, tensor_parallel_size: int = 1,
                 warm_up: bool | None = None, cache_dir: str | os.PathLike | None = None):
        self.path = Path(model) if model is not None else default_model_path()
        self.device = resolve_device(device)
        if backend is None:
            backend = "cpu" if self.device.type == "cpu" else "triton"
        if backend == "triton" and self.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' on CPU needs TRITON_INTERPRET=1 (the Triton interpreter)")
        if backend == "cpu" and self.device.type != "cpu":
            raise ValueError(f"backend='cpu' runs on the CPU only, not on {self.device}")
        if dtype is None:
            dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        if self.device.type == "cuda":
            use_cache_dir(cache_dir, self.device)  # before the first kernel compiles
        self.gguf = GGUFFile(self.path)
        self.config = ModelConfig.from_gguf(self.gguf)
        self.tokenizer = Tokenizer.from_gguf(self.gguf)
        self.ops = Ops(backend, dtype)
        max_len = min(max_model_len or self.config.context_length, self.config.context_length)
        check_tensor_parallel(self.config, tensor_parallel_size)
        if tensor_parallel_size > 1 and draft_model is not None:
            raise ValueError("a draft model (speculative decoding) is not supported with tensor_parallel_size > 1")
        self._workers: Workers | None = None
        if tensor_parallel_size > 1:
            self.model = self._load_parallel(tensor_parallel_size, dtype, max_len, block_size)
            self.ops = self.model.ops
        else:
            self.model = self._load(self.gguf, self.config, max_len)
        self.draft: tuple[ModelConfig, DecoderModel] | None = None
        draft_cost = 0.0
        if draft_model is not None:
            draft = GGUFFile(draft_model)
            draft_cost = _weight_bytes(draft) / max(_weight_bytes(self.gguf), 1)
            draft_config = ModelConfig.from_gguf(draft)
            if draft.metadata.get("tokenizer.ggml.tokens") != self.gguf.metadata.get("tokenizer.ggml.tokens"):
                raise ValueError(f"draft model {draft_model} does not share the vocabulary of {self.path}")
            self.draft = (draft_config, self._load(draft, draft_config, max_len))
        self.block_size = block_size
        self.scheduler_config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_len,
                                                num_speculative_tokens if draft_model is not None else 0,
                                                StepCost.weight_bound(draft_cost), adaptive_speculation)
        # Graphs take verify steps (1 + the drafts) on the target and catch-ups of up to 2 tokens on the draft.
        verify = 1 + self.scheduler_config.num_speculative_tokens
        self.runner = (ModelRunner(self.model, self.config, self.device, block_size, max_len, cuda_graphs, verify)
                       if self._workers is None else
                       ParallelModelRunner(self._workers, self.model, self.device, block_size, max_len))
        self.draft_runner = (ModelRunner(self.draft[1], self.draft[0], self.device, block_size, max_len, cuda_graphs,
                                         2) if self.draft else None)
        self._draft_p_min, self._draft_min = draft_p_min, draft_min
        self._prefix_caching = enable_prefix_caching
        self._seed = seed
        self._engine: Engine | None = None
        warm = warm_up if warm_up is not None else self.device.type == "cuda"
        self._kv_cache_bytes = self._kv_cache_budget(kv_cache_bytes, gpu_memory_utilization, warm)
        if warm and any(r.cuda_graphs for r in self._runners):
            start = time.perf_counter()
            self.engine  # noqa: B018 - allocates the KV cache
            n = sum(r.capture_graphs(max_num_seqs) for r in self._runners)
            _log(f"warm-up: captured {n} CUDA graphs of decode and verify steps in {time.perf_counter() - start:.1f} s")
        if warm and self.draft_runner is not None and adaptive_speculation:
            self.scheduler_config.step_cost = self._measure_step_cost()

    def _measure_step_cost(self) -> StepCost:
        """The step costs the lookahead is chosen by, timed now: the target's pass over each batch bucket of one
        token and of 1 + num_speculative_tokens tokens per sequence, and the draft's decode step over each
        bucket, relative to the target's one-token decode step."""
        cfg = self.scheduler_config
        buckets = [b for b in GRAPH_BATCH_SIZES if b < cfg.max_num_seqs] + [cfg.max_num_seqs]
        start = time.perf_counter()
        target: dict[int, float] = {}
        for b in buckets:
            for q in (1, 1 + cfg.num_speculative_tokens):
                if b * q <= cfg.max_num_batched_tokens:
                    target[b * q] = min(target.get(b * q, float("inf")), self.runner.step_time(b, q))
        unit = target[1]
        draft = [(b, self.draft_runner.step_time(b, 1) / unit) for b in buckets]
        cost = StepCost([(n, t / unit) for n, t in target.items()], draft)
        q = 1 + cfg.num_speculative_tokens
        _log(f"warm-up: step costs measured in {time.perf_counter() - start:.1f} s; at batch 1 a verify pass of {q} "
             f"tokens costs {cost.target_time(q):.2f} decode steps, a draft step {cost.draft_time(1):.2f}")
        return cost

    def _load(self, f: GGUFFile, config: ModelConfig, max_model_len: int) -> DecoderModel:
        weights = load_weights(f, self.device)
        model = DecoderModel(config, weights, self.ops, self.device, max_model_len)
        start = time.perf_counter()
        relaid = self.ops.preload(weights.values())
        if relaid and self.device.type != "cpu":
            _log(f"load: {relaid / 2**20:.0f} MiB of Q4_0/Q5_0/Q8_0/Q6_K/MXFP4 weights relaid planar "
                 f"in {time.perf_counter() - start:.2f} s (same size)")
        return model

    def _load_parallel(self, size: int, dtype: torch.dtype, max_len: int, block_size: int) -> DecoderModel:
        """Rank 0's shard of the model, once ranks 1..size-1 have started in their processes and loaded theirs."""
        check_weights(self.gguf, self.config, size)
        self._workers = Workers(self.path, size, self.device, self.ops.backend, dtype, max_len, block_size)
        weakref.finalize(self, self._workers.close)
        try:
            model = load_rank_model(self.gguf, self.config, self._workers.group, self.ops.backend, dtype, max_len)
            self._workers.wait_ready()
        except BaseException:
            self._workers.close()
            raise
        return model

    def close(self) -> None:
        """Stop the tensor-parallel workers (nothing to do without them); the engine cannot run after."""
        if self._workers is not None:
            self._workers.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _runners(self) -> list[ModelRunner]:
        return [self.runner] + ([self.draft_runner] if self.draft_runner else [])

    @property
    def backend(self) -> str:
        return self.ops.backend

    @property
    def _score_chunk(self) -> int:
        return min(_LOGITS_CHUNK, self.scheduler_config.max_num_batched_tokens)

    def _kv_cache_budget(self, kv_cache_bytes: int | None, gpu_memory_utilization: float, warm: bool) -> int:
        """Bytes for the KV cache: as given; else on CPU 2 GiB; else on a GPU

            free - (1 - gpu_memory_utilization) * total - max(step, sampler) - graphs

        with `free` measured after the weights are loaded and the warm-up steps have run, `step` the peak
        activations of the largest step (a full prefill of max_num_batched_tokens tokens, its logits
        included), `sampler` the peak of sampling and speculative verification over the most logit rows a
        step can have (every filter and penalty on), and `graphs` what the step graphs keep: each
        graph's hidden states [bucket * q, hidden], plus their private memory pool, as large as the
        activations of a step of the largest bucket and q. Each counts the target and the draft model.
        The target's and the draft's KV pages are bought in pairs, one page id indexing both caches.
        Runs the warm-up (every step shape when `warm`, only the largest otherwise) when it has to measure.
        """
        measure = self.device.type == "cuda" and kv_cache_bytes is None
        if not (warm or measure):
            return kv_cache_bytes if kv_cache_bytes is not None else DEFAULT_CPU_KV_BYTES
        peaks = self._warm_up(every_shape=warm)
        if not measure:
            return kv_cache_bytes if kv_cache_bytes is not None else DEFAULT_CPU_KV_BYTES
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        return max(0, int(free - (1 - gpu_memory_utilization) * total - peaks))

    @torch.inference_mode()
    def _warm_up(self, every_shape: bool) -> int:
        """Run the engine's steps into throwaway caches: with `every_shape`, prefills of 2^i - 1 and 2^i
        tokens (every power-of-two bucket the kernels tune by, on both sides of each dispatch threshold)
        and decodes of one and of the most sequences, so that kernels compile and tune now (the decode
        graphs compile theirs when captured); else the largest steps only. Returns the memory the KV cache
        must leave free (see `_kv_cache_budget`)."""
        cfg = self.scheduler_config
        max_tokens = min(cfg.max_num_batched_tokens, cfg.max_model_len - 1)
        counts = [max_tokens]
        if every_shape:
            powers = [1 << i for i in range(max_tokens.bit_length())]
            counts = sorted({t for p in powers for t in (p - 1, p) if t > 0} | {max_tokens})
        rows = min(max(cfg.max_num_seqs * (1 + cfg.num_speculative_tokens), self._score_chunk), max_tokens)
        start = time.perf_counter()
        activations = self.runner.sampling_peak(rows)
        graphs = 0
        for runner in self._runners:
            sizes = runner.graph_sizes(cfg.max_num_seqs)
            largest = sizes[-1] if sizes else cfg.max_num_seqs
            activations = max(activations, runner.warm_up(counts, rows, []))
            decode = runner.warm_up([], rows, [largest] + ([1] if every_shape else []), runner.graph_tokens)
            activations = max(activations, decode)
            if sizes:  # kept for good: each graph's output, and a private pool as large as its largest step
                graphs += runner.graph_output_bytes(cfg.max_num_seqs) + decode
        if every_shape:
            _log(f"warm-up: kernels compiled and tuned for {len(counts)} prefill sizes up to {max_tokens} tokens "
                 f"in {time.perf_counter() - start:.1f} s")
        return activations + graphs

    def _checked(self, token_ids: Sequence[int]) -> list[int]:
        ids = [int(t) for t in token_ids]
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary of {self.config.vocab_size}")
        if len(ids) > self.config.context_length:
            raise ValueError(f"{len(ids)} tokens exceed the model's context of {self.config.context_length}")
        return ids

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Next-token logits at every position of `token_ids`: float32 [len(token_ids), n_vocab] on CPU.

        The sequence is fed in chunks that attend to the cached pages of the chunks before them, as
        chunked prefill does.
        """
        ids = self._checked(token_ids)
        out = torch.empty(len(ids), self.config.vocab_size)
        for _, pos, part in self.runner.score([ids], self._score_chunk):
            out[pos : pos + len(part)] = part.cpu()
        return out

    def score(self, sequences: Sequence[Sequence[int]], first: int = 0) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Next-token logits of many sequences at their positions from `first` on, without sampling.

        Forward steps of up to `max_num_batched_tokens` tokens pack several sequences (a long one spreads
        over steps, as chunked prefill does), into a cache of their own: the engine's cache is not touched.
        Yields (i, p, logits): float32 [rows, n_vocab] on the model's device, the logits of sequence i at
        positions p, p + 1, ...; every position from `first` on comes once, in order within each sequence,
        and the sequences in order.
        """
        seqs = [self._checked(s) for s in sequences]
        return self.runner.score(seqs, self.scheduler_config.max_num_batched_tokens, first)

    # --- generation ---------------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The continuous-batching engine, built (and its KV cache allocated) on first use."""
        if self._engine is None:
            # Target and draft caches have one page per page id each: the budget buys pairs of pages.
            pair_bytes = sum(r.kv_layout(1).block_bytes for r in self._runners)
            if self._kv_cache_bytes < pair_bytes:
                raise ValueError(f"KV cache budget {self._kv_cache_bytes} B is below one page ({pair_bytes} B)")
            num_blocks = self._kv_cache_bytes // pair_bytes
            for r in self._runners:
                r.allocate_kv(num_blocks)
            blocks = BlockManager(num_blocks, self.block_size, prefix_caching=self._prefix_caching)
            sampler = Sampler(self._seed)
            spec = None
            if self.draft_runner:
                spec = SpecDecoder(self.draft_runner, sampler, p_min=self._draft_p_min, min_drafts=self._draft_min,
                                   max_batched_tokens=self.scheduler_config.max_num_batched_tokens)
            self._engine = Engine(self.runner, self.tokenizer, Scheduler(self.scheduler_config, blocks), sampler,
                                  spec)
        return self._engine

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids) in one continuous batch; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params if params is not None else SamplingParams()
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} sampling params")
        engine = self.engine
        ids = []
        try:
            for prompt, p in zip(prompts, per_prompt):
                ids.append(engine.add_request(prompt, p))
        except ValueError:
            for rid in ids:
                engine.abort(rid)
            engine.pop_finished()
            raise
        outputs: dict[str, RequestOutput] = {}
        progress = Progress("generating", len(ids), "requests") if use_tqdm else None
        tokens = 0
        while engine.has_unfinished():
            for out in engine.step():
                outputs[out.request_id] = out
                tokens += len(out.token_ids)
            if progress:
                progress.update(len(outputs), tokens)
        if progress:
            progress.close()
        engine.pop_finished()
        return [outputs[rid] for rid in ids]

    def chat(self, messages: Messages | Sequence[Messages], params: SamplingParams | None = None, *,
             use_tqdm: bool = True, **template_kwargs: Any) -> list[RequestOutput]:
        """Generate the assistant's reply to one conversation or to each of several."""
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, **template_kwargs)
                   for c in conversations]
        outputs = self.generate([self.tokenizer.encode_chat(p) for p in prompts], params, use_tqdm=use_tqdm)
        for out, prompt in zip(outputs, prompts):
            out.prompt = prompt
        return outputs

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Generate for one prompt, yielding text as it is produced; `last_output` holds the result."""
        engine = self.engine
        rid = engine.add_request(prompt, params or SamplingParams())
        try:
            while engine.has_unfinished():
                for out in engine.step():
                    if out.request_id == rid:
                        self.last_output = out
                delta = engine.stream_deltas().get(rid)
                if delta:
                    yield delta
        finally:
            engine.abort(rid)
            engine.pop_finished()


def _weight_bytes(f: GGUFFile) -> int:
    """Bytes a decode step reads: every tensor, less the token embedding unless it is the output matrix too (a
    step reads only a few of its rows)."""
    untied = "output.weight" in f.tensors
    return sum(t.nbytes for name, t in f.tensors.items() if not (untied and name == "token_embd.weight"))


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Progress:
    """Progress of a long job on stderr: `done` of `total` units and output tokens per second.

    On a terminal, one line redrawn in place (`\r`) at most `tty_every` seconds apart; anywhere else (a
    pipe, a log file) a plain line every `plain_every` seconds, so that no `\r` reaches a file. `close`
    writes the final state on its own line.
    """

    tty_every = 0.1
    plain_every = 5.0
    width = 30  # characters of the bar

    def __init__(self, label: str, total: int, unit: str):
        self.label, self.total, self.unit = label, total, unit
        self.stream = sys.stderr
        self.tty = self.stream.isatty()
        self.start = self._shown = time.perf_counter()
        self.done = self.tokens = 0

    def update(self, done: int, tokens: int) -> None:
        self.done, self.tokens = done, tokens
        now = time.perf_counter()
        if now - self._shown >= (self.tty_every if self.tty else self.plain_every):
            self._shown = now
            self._show()

    def close(self) -> None:
        self._show()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _show(self) -> None:
        elapsed = time.perf_counter() - self.start
        share = self.done / self.total if self.total else 1.0
        status = (f"{self.done}/{self.total} {self.unit}, {self.tokens / max(elapsed, 1e-9):.1f} output tokens/s, "
                  f"{elapsed:.0f} s")
        if self.tty:
            filled = round(share * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {share:4.0%} {status}\x1b[K")  # ESC[K: clear the rest
        else:
            self.stream.write(f"{self.label}: {share:.0%}, {status}\n")
        self.stream.flush()
