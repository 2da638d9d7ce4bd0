"""`LLM`: a GGUF model ready to score and generate text."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ggtriton.gguf import GGUFFile, Tokenizer
from ggtriton.gguf.bundled import default_model_path

from .batch import ForwardBatch
from .config import ModelConfig
from .kv_cache import KVCacheLayout
from .models.decoder import DecoderModel
from .ops import Ops
from .weights import load_weights

# Tokens scored per forward by `LLM.logits`: bounds the float32 [tokens, vocab] logits held at once.
_LOGITS_CHUNK = 512


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LLM:
    """A GGUF model: weights in their blocks on `device`, tokenizer and chat template from the file.

    device: default the GPU when there is one, else the CPU. backend: "triton" (default on a GPU; on CPU
    it needs TRITON_INTERPRET=1) or "torch" (the reference ops; default on CPU). dtype: activations and
    KV cache; default float32 on CPU, bfloat16 on a GPU.
    """

    def __init__(self, model: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
                 backend: str | None = None, dtype: torch.dtype | None = None, block_size: int = 16):
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
        self.model = DecoderModel(self.config, load_weights(self.gguf, self.device), self.ops, self.device)
        self.block_size = block_size

    @property
    def backend(self) -> str:
        return self.ops.backend

    def _kv_layout(self, num_blocks: int) -> KVCacheLayout:
        cfg = self.config
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
