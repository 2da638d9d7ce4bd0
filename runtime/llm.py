"""`LLM`: a GGUF model ready to score and generate text."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ggtriton.gguf import GGUFFile, Tokenizer
from ggtriton.gguf.bundled import default_model_path

from .config import ModelConfig
from .engine.batch import ForwardBatch
from .engine.block_manager import BlockManager
from .engine.engine import Engine
from .engine.kv_cache import KVCacheLayout
from .engine.model_runner import ModelRunner, kv_cache_budget
from .engine.sampler import Sampler
from .engine.scheduler import Scheduler, SchedulerConfig
from .engine.spec_decode import SpecDecoder
from .models.decoder import DecoderModel
from .models.ops import Ops
from .models.weights import load_weights
from .sampling_params import RequestOutput, SamplingParams

Messages = Sequence[Mapping[str, Any]]

# Tokens scored per forward by `LLM.logits`: bounds the float32 [tokens, vocab] logits held at once.
_LOGITS_CHUNK = 512


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LLM:
    """A GGUF model: weights in their blocks on `device`, tokenizer and chat template from the file.

    device: default the GPU when there is one, else the CPU. backend: "triton" (default on a GPU; on CPU
    it needs TRITON_INTERPRET=1) or "torch" (the reference ops; default on CPU). dtype: activations and
    KV cache; default float32 on CPU, bfloat16 on a GPU.
    Batching: at most `max_num_seqs` sequences and `max_num_batched_tokens` tokens per step; the KV cache
    takes `kv_cache_bytes` (default: on a GPU what keeps its memory use under `gpu_memory_utilization`,
    2 GiB on CPU) in pages of `block_size` tokens, shared between prompts with common prefixes when
    `enable_prefix_caching`. `max_model_len`: longest sequence (default: the model's context).
    Speculative decoding: `draft_model` (a GGUF with the same vocabulary) proposes up to
    `num_speculative_tokens` tokens per step, stopping early when its top probability is below
    `draft_p_min`; proposals shorter than `draft_min` are dropped. The output distribution is the
    target's own. `cuda_graphs`: replay decode steps as CUDA graphs (CUDA only).
    """

    def __init__(self, model: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
                 backend: str | None = None, dtype: torch.dtype | None = None, block_size: int = 16,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 2048, max_model_len: int | None = None,
                 kv_cache_bytes: int | None = None, gpu_memory_utilization: float = 0.9,
                 enable_prefix_caching: bool = True, seed: int | None = None,
                 draft_model: str | os.PathLike | None = None, num_speculative_tokens: int = 4,
                 draft_p_min: float = 0.0, draft_min: int = 1, cuda_graphs: bool = True):
        self.path = Path(model) if model is not None else default_model_path()
        self.device = torch.device(device) if device is not None else default_device()
        if backend is None:
            backend = "torch" if self.device.type == "cpu" else "triton"
        if backend == "triton" and self.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' on CPU needs TRITON_INTERPRET=1 (the Triton interpreter)")
        if dtype is None:
            dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.gguf = GGUFFile(self.path)
        self.config = ModelConfig.from_gguf(self.gguf)
        self.tokenizer = Tokenizer.from_gguf(self.gguf)
        self.ops = Ops(backend, dtype)
        self.model = self._load(self.gguf, self.config)
        self.draft: tuple[ModelConfig, DecoderModel] | None = None
        if draft_model is not None:
            draft = GGUFFile(draft_model)
            draft_config = ModelConfig.from_gguf(draft)
            if draft.metadata.get("tokenizer.ggml.tokens") != self.gguf.metadata.get("tokenizer.ggml.tokens"):
                raise ValueError(f"draft model {draft_model} does not share the vocabulary of {self.path}")
            self.draft = (draft_config, self._load(draft, draft_config))
        self.block_size = block_size
        self.scheduler_config = SchedulerConfig(max_num_seqs, max_num_batched_tokens,
                                                min(max_model_len or self.config.context_length,
                                                    self.config.context_length),
                                                num_speculative_tokens if draft_model is not None else 0)
        self._draft_p_min, self._draft_min = draft_p_min, draft_min
        self._cuda_graphs = cuda_graphs
        self._kv_cache_bytes = kv_cache_budget(self.device, gpu_memory_utilization, kv_cache_bytes,
                                               lambda: self._warm_up(max_num_batched_tokens))
        self._prefix_caching = enable_prefix_caching
        self._seed = seed
        self._engine: Engine | None = None

    @torch.inference_mode()
    def _warm_up(self, num_tokens: int) -> None:
        """One prefill step of `num_tokens` tokens, the largest a step holds, into a throwaway cache."""
        n = min(num_tokens, self.scheduler_config.max_model_len)
        models = [(self.config, self.model)] + ([self.draft] if self.draft else [])
        for config, model in models:
            blocks = -(-n // self.block_size)
            kv = self._kv_layout(blocks, config).allocate(self.device)
            batch = ForwardBatch.build([[0] * n], [0], [list(range(blocks))], self.block_size, self.device)
            model.logits(model.forward(batch, kv)[-1:])

    def _load(self, f: GGUFFile, config: ModelConfig) -> DecoderModel:
        weights = load_weights(f, self.device)
        model = DecoderModel(config, weights, self.ops, self.device)
        self.ops.preload(weights.values())
        return model

    @property
    def backend(self) -> str:
        return self.ops.backend

    def _kv_layout(self, num_blocks: int, config: ModelConfig | None = None) -> KVCacheLayout:
        cfg = config or self.config
        return KVCacheLayout(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, num_blocks, self.block_size, self.ops.dtype)

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Next-token logits at every position of `token_ids`: float32 [len(token_ids), n_vocab] on CPU.

        The sequence is fed in chunks that attend to the cached pages of the chunks before them, as
        chunked prefill does.
        """
        ids = [int(t) for t in token_ids]
        if not ids:
            return torch.empty(0, self.config.vocab_size)
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary of {self.config.vocab_size}")
        if len(ids) > self.config.context_length:
            raise ValueError(f"{len(ids)} tokens exceed the model's context of {self.config.context_length}")
        n_blocks = -(-len(ids) // self.block_size)
        kv = self._kv_layout(n_blocks).allocate(self.device)
        table = list(range(n_blocks))
        out = torch.empty(len(ids), self.config.vocab_size)
        for start in range(0, len(ids), _LOGITS_CHUNK):
            chunk = ids[start : start + _LOGITS_CHUNK]
            batch = ForwardBatch.build([chunk], [start], [table], self.block_size, self.device)
            out[start : start + len(chunk)] = self.model.logits(self.model.forward(batch, kv)).cpu()
        return out

    # --- generation ---------------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The continuous-batching engine, built (and its KV cache allocated) on first use."""
        if self._engine is None:
            # Target and draft caches have one page per page id each: the budget buys pairs of pages.
            configs = [self.config] + ([self.draft[0]] if self.draft else [])
            pair_bytes = sum(self._kv_layout(1, c).block_bytes for c in configs)
            if self._kv_cache_bytes < pair_bytes:
                raise ValueError(f"KV cache budget {self._kv_cache_bytes} B is below one page ({pair_bytes} B)")
            num_blocks = self._kv_cache_bytes // pair_bytes
            max_len = self.scheduler_config.max_model_len
            runner = ModelRunner(self.model, self.config, self._kv_layout(num_blocks), self.device, max_len,
                                 self._cuda_graphs)
            blocks = BlockManager(num_blocks, self.block_size, prefix_caching=self._prefix_caching)
            sampler = Sampler(self._seed)
            spec = None
            if self.draft:
                draft_config, draft_model = self.draft
                draft_runner = ModelRunner(draft_model, draft_config, self._kv_layout(num_blocks, draft_config),
                                           self.device, max_len, self._cuda_graphs)
                spec = SpecDecoder(draft_runner, sampler, p_min=self._draft_p_min, min_drafts=self._draft_min)
            self._engine = Engine(runner, self.tokenizer, Scheduler(self.scheduler_config, blocks), sampler, spec)
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
        progress = _Progress(len(ids)) if use_tqdm else None
        while engine.has_unfinished():
            for out in engine.step():
                outputs[out.request_id] = out
                if progress:
                    progress.update(out)
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
        return self.generate(prompts, params, use_tqdm=use_tqdm)

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


class _Progress:
    """A one-line progress report on stderr: requests done and output tokens per second."""

    def __init__(self, total: int):
        self.total, self.done, self.tokens = total, 0, 0
        self.start = time.perf_counter()

    def update(self, out: RequestOutput) -> None:
        self.done += 1
        self.tokens += len(out.token_ids)
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        print(f"\rgenerating: {self.done}/{self.total} requests, {rate:.1f} output tokens/s", end="",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr)
