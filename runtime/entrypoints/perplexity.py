"""`ggtriton perplexity`: the perplexity of a model on a text, computed as llama-perplexity computes it.

The method (llama.cpp's `perplexity`, without a stride):

- the whole text is tokenized once, with BOS when the vocabulary adds one, and cut into `n_chunks` chunks
  of `n_ctx` tokens (the tokens past the last whole chunk are dropped);
- when the vocabulary adds BOS, the first token of every chunk is overwritten with BOS (nothing is
  prepended, so every chunk keeps n_ctx tokens);
- each chunk is evaluated on its own, from an empty cache, and its second half is scored: the token at
  position j + 1 is predicted from the logits at position j, for j = n_ctx / 2 ... n_ctx - 2
  (n_ctx - n_ctx / 2 - 1 tokens per chunk);
- negative log-likelihoods are summed in float64; PPL = exp(mean NLL), and its standard error is
  PPL * sqrt((mean(NLL^2) - mean(NLL)^2) / (count - 1)).

llama-perplexity refuses a text of fewer than 2 * n_ctx tokens; here one whole chunk is enough. Many chunks
go through each forward step together (`LLM.score`), up to the engine's token budget per step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ggtriton.gguf import Tokenizer

from ..llm import LLM
from .cli import _check_device, _device_flags, _int_flag, _model_path

# Elements of one slice of logits reduced at a time, which bounds the temporary memory of scoring a step's logits.
# On a GPU, large slices take few launches. On the CPU, a slice's float64 temporaries of 2 MB stay in the caches
# and the allocator's free lists, where 128 MB ones fault in their pages at every allocation: quant-bench's
# statistics of 256 rows of a 49152-token vocabulary take 4x less time in slices of 4 rows than in one.
_SLICE_ELEMENTS = 1 << 24
_SLICE_ELEMENTS_CPU = 1 << 18


@dataclass
class PerplexityResult:
    ppl: float
    ppl_stderr: float
    chunks: int
    tokens_scored: int
    n_ctx: int


class NLLStats:
    """Running sums of negative log-likelihoods, as llama.cpp keeps them (float64)."""

    def __init__(self) -> None:
        self.nll = self.nll2 = 0.0
        self.count = 0

    def add(self, nll: torch.Tensor) -> None:
        self.nll += nll.sum().item()
        self.nll2 += nll.square().sum().item()
        self.count += nll.numel()

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.count)

    @property
    def ppl_stderr(self) -> float:
        mean = self.nll / self.count
        var = self.nll2 / self.count - mean * mean
        return math.sqrt(var / (self.count - 1)) * self.ppl if var > 0 and self.count > 1 else 0.0


def read_text(path: str | Path) -> str:
    """The text of a file as llama.cpp's `-f` reads it: the bytes as they are (no newline translation), one
    trailing newline dropped."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return text.removesuffix("\n")


def make_chunks(tokens: Sequence[int], n_ctx: int, n_chunks: int | None, bos: int | None) -> list[list[int]]:
    """The text's tokens cut into chunks of n_ctx (at most `n_chunks` of them), the first token of each
    replaced by `bos` when there is one."""
    if n_ctx < 4:
        raise ValueError(f"-c {n_ctx}: a chunk must hold at least 4 tokens")
    available = len(tokens) // n_ctx
    if available == 0:
        raise ValueError(f"the text is {len(tokens)} tokens long: too short for one chunk of {n_ctx} (-c)")
    count = available if n_chunks is None else min(n_chunks, available)
    chunks = [list(tokens[i * n_ctx : (i + 1) * n_ctx]) for i in range(count)]
    if bos is not None:
        for chunk in chunks:
            chunk[0] = bos
    return chunks


def tokenize_chunks(tok: Tokenizer, text: str, n_ctx: int,
                    n_chunks: int | None) -> tuple[list[list[int]], list[list[int]]]:
    """(inputs, targets) of every chunk: inputs with BOS written over their first token when the vocabulary
    adds one, targets the text's own tokens."""
    tokens = tok.encode(text, add_special=True, parse_special=False)
    targets = make_chunks(tokens, n_ctx, n_chunks, None)
    inputs = make_chunks(tokens, n_ctx, n_chunks, tok.bos_token_id if tok.add_bos else None)
    return inputs, targets


def first_scored(n_ctx: int) -> int:
    """Position of a chunk's first scored logits (the token after it is the first one predicted)."""
    return n_ctx // 2


def row_slices(logits: torch.Tensor) -> Iterator[slice]:
    """Slices of rows of `logits` small enough to reduce with temporaries of their own size."""
    per_slice = _SLICE_ELEMENTS_CPU if logits.device.type == "cpu" else _SLICE_ELEMENTS
    rows = max(1, per_slice // logits.shape[-1])
    for start in range(0, len(logits), rows):
        yield slice(start, start + rows)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] of each row, as float64. The log-sum-exp is taken in float32 after
    subtracting the row's maximum, as llama.cpp does: exact to about 1e-7, far below what PPL resolves."""
    out = torch.empty(len(logits), dtype=torch.float64, device=logits.device)
    for s in row_slices(logits):
        x = logits[s]
        out[s] = torch.logsumexp(x, -1).double() - x.gather(1, targets[s, None])[:, 0].double()
    return out


def scored_logits(llm: LLM, inputs: list[list[int]]) -> Iterator[tuple[int, int, torch.Tensor]]:
    """`LLM.score` over the chunks, from the first scored position on. The last token of a chunk is only
    ever a target, so the model reads n_ctx - 1 tokens of each."""
    n_ctx = len(inputs[0])
    return llm.score([chunk[:-1] for chunk in inputs], first=first_scored(n_ctx))


def perplexity(llm: LLM, text: str, n_ctx: int = 512, n_chunks: int | None = None,
               on_chunk: Callable[[int, NLLStats], None] | None = None) -> PerplexityResult:
    """llama-perplexity's PPL of `text` (see the module docstring); `on_chunk(i, stats)` after each chunk
    with the running sums."""
    inputs, targets = tokenize_chunks(llm.tokenizer, text, n_ctx, n_chunks)
    first = first_scored(n_ctx)
    per_chunk = n_ctx - first - 1
    stats, done = NLLStats(), [0] * len(inputs)
    for i, pos, logits in scored_logits(llm, inputs):
        target = torch.tensor(targets[i][pos + 1 : pos + 1 + len(logits)], device=logits.device)
        stats.add(token_nll(logits, target))
        done[i] += len(logits)
        if done[i] == per_chunk and on_chunk:
            on_chunk(i, stats)
    return PerplexityResult(stats.ppl, stats.ppl_stderr, len(inputs), stats.count, n_ctx)


def add_command(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    p = command("perplexity", "perplexity of a model on a text file, as llama-perplexity computes it")
    p.add_argument("-m", "--model", help="GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    scoring_flags(p)
    p.add_argument("--json", action="store_true",
                   help='print {"ppl", "ppl_stderr", "chunks", "tokens_scored", "n_ctx"} (running PPL on stderr)')
    _device_flags(p)
    p.set_defaults(run=run)


def scoring_flags(p: argparse.ArgumentParser) -> None:
    """The text and how it is cut and scored (perplexity, quant-bench)."""
    p.add_argument("-f", "--file", required=True, help="the text (UTF-8)")
    p.add_argument("-c", "--ctx-size", type=_int_flag(lambda n: n >= 4, "4 or more"), default=512,
                   help="tokens per chunk; the second half of each chunk is scored")
    p.add_argument("--chunks", type=_int_flag(lambda n: n >= 1, "1 or more"), default=None,
                   help="score at most this many chunks (default: every whole chunk of the text)")
    p.add_argument("-b", "--batch-size", type=_int_flag(lambda n: n >= 1, "1 or more"), default=2048,
                   help="tokens per forward step: chunks are evaluated this many tokens at a time, together")


def run(args: argparse.Namespace) -> int:
    """The `ggtriton perplexity` command."""
    text = read_text(args.file)
    if args.device:
        _check_device(args.device)
    # Scoring runs in caches of its own: the engine's KV cache is never used, so none is bought.
    llm = LLM(_model_path(args.model), device=args.device, backend=args.backend, max_model_len=args.ctx_size,
              max_num_batched_tokens=args.batch_size, kv_cache_bytes=0, warm_up=False, cache_dir=args.cache_dir)
    if args.ctx_size > llm.config.context_length:
        raise ValueError(f"-c {args.ctx_size} is above the model's context of {llm.config.context_length} tokens")
    # The running PPL of each chunk, as llama-perplexity prints it; on stderr when stdout carries JSON.
    stream = sys.stderr if args.json else sys.stdout

    def report(i: int, stats: NLLStats) -> None:
        stream.write(f"[{i + 1}]{stats.ppl:.4f},")
        stream.flush()

    start = time.perf_counter()
    result = perplexity(llm, text, args.ctx_size, args.chunks, report)
    elapsed = time.perf_counter() - start
    stream.write("\n")
    stream.flush()
    evaluated = result.chunks * result.n_ctx
    print(f"{result.chunks} chunks of {result.n_ctx} tokens in {elapsed:.2f} s: {evaluated / elapsed:.1f} tokens/s "
          f"({llm.device}, {llm.backend})", file=sys.stderr)
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_stderr:.5f}")
    return 0
