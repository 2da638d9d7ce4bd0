"""Perplexity throughput on CPU: `ggtriton perplexity`'s method against llama.cpp's, both on 2 threads.

Both evaluate the same chunks of tests/fixtures/perplexity_text.txt (llama-perplexity's method: chunks of
512 tokens, BOS written over the first, the second half scored) on SmolLM2-135M-Instruct Q4_1:

- ggtriton: `perplexity()` over `LLM.score`, chunks packed 4 to a forward step (torch reference ops, float32
  weights dequantized once at load);
- llama.cpp: llama-cpp-python, one chunk per `eval` with every position's logits kept (as
  tests/fixtures/make_perplexity_fixtures.py does), log-softmax in numpy.

Reports evaluated text tokens per second (chunks x 512 over the wall time, model load excluded), best of
`--repeat`, and the two PPLs. Prints a table and appends it to bench/RESULTS.md.

    python bench/perplexity.py [--chunks 4] [--repeat 3] [--no-append]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from ggtriton.gguf import bundled
from ggtriton.runtime.entrypoints.perplexity import perplexity, read_text
from ggtriton.runtime.llm import LLM

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
FIXTURES = HERE.parent / "tests" / "fixtures"
THREADS = 2


def ours(path: Path, text: str, chunks: int, repeat: int) -> tuple[float, float]:
    """(PPL, best seconds) of ggtriton."""
    llm = LLM(path, device="cpu", kv_cache_bytes=0, warm_up=False)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = perplexity(llm, text, 512, chunks)
        best = min(best, time.perf_counter() - start)
    return result.ppl, best


def llamacpp(path: Path, text: str, chunks: int, repeat: int) -> tuple[float, float]:
    """(PPL, best seconds) of llama.cpp, with the fixture script's evaluator (512-token context)."""
    spec = importlib.util.spec_from_file_location("fixtures", FIXTURES / "make_perplexity_fixtures.py")
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    ev = fixtures.Evaluator(path)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        tokens, evaluated = ev.chunks(text)
        targets = fixtures.targets(tokens)
        nll = [-np.take_along_axis(ev.scored_logprobs(c), t[:, None], axis=1)[:, 0]
               for c, t in zip(evaluated[:chunks], targets[:chunks])]
        best = min(best, time.perf_counter() - start)
    return float(np.exp(np.concatenate(nll).mean())), best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=4, help="chunks of 512 tokens (the fixture evaluator makes 4)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-append", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    path = bundled.smollm2_path()
    text = read_text(FIXTURES / "perplexity_text.txt")
    tokens = args.chunks * 512
    rows = []
    for name, fn in (("ggtriton (CPU, torch backend, float32)", ours), ("llama.cpp (CPU, Q4_1 blocks)", llamacpp)):
        ppl, seconds = fn(path, text, args.chunks, args.repeat)
        rows.append(f"| {name} | {tokens / seconds:.1f} | {seconds:.2f} | {ppl:.4f} |")
    table = "\n".join([
        f"## Perplexity on CPU against llama.cpp ({datetime.date.today()}, {platform.machine()} {THREADS} threads, "
        f"torch {torch.__version__}, llama-cpp-python {version('llama_cpp_python')})",
        "",
        f"SmolLM2-135M-Instruct Q4_1, {args.chunks} chunks of 512 tokens of tests/fixtures/perplexity_text.txt "
        f"(llama-perplexity's method), best of {args.repeat}, model load excluded. llama.cpp runs one chunk per "
        "`eval` with every position's logits copied out (llama-cpp-python's logits_all), near its CPU prompt rate.",
        "",
        "| engine | text tokens/s | seconds | PPL |",
        "|---|---:|---:|---:|",
        *rows,
    ])
    print(table)
    if not args.no_append:
        with RESULTS.open("a") as f:
            f.write("\n" + table + "\n")


if __name__ == "__main__":
    main()
