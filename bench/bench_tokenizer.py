"""Tokenizer build time and encode/decode throughput on the bundled models, beside llama.cpp's.

    pytest bench/bench_tokenizer.py

Build time starts from an open `GGUFFile` (the reader's own time is bench_gguf_open.py's). Encoding
runs over 1 MB of distinct text: the tokenizer test corpus (many scripts, emoji, odd spaces) and then
the Python standard library's sources (code and English prose) up to 1 MB, as ten requests of ~100 KB.
(One 1 MB request is as fast for ggtriton. llama.cpp's time grows with the square of the number of
user-defined tokens in a request, as its partition walks its fragment list from the start for each one:
Gemma-3 makes "\n" one, and its 1 MB in one call takes minutes.) Every
round encodes with a fresh tokenizer, so no word is cached from an earlier round. llama.cpp
(llama-cpp-python, the vocabulary alone) encodes the same requests when it is installed and must give
the same ids. Prints the medians and appends the table to bench/RESULTS.md.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import time
from itertools import pairwise
from pathlib import Path

import pytest

from ggtriton.gguf import GGUFFile, bundled
from ggtriton.gguf.tokenizer import Tokenizer

MODELS = {"SmolLM2-135M (gpt2, 49k)": bundled.smollm2_path, "Gemma-3-270M (llama, 262k)": bundled.gemma3_path}
RESULTS = Path(__file__).with_name("RESULTS.md")
CORPUS = Path(__file__).parent.parent / "tests" / "fixtures" / "tokenizer_llamacpp.json"
TEXT_BYTES = 1_000_000
rows: dict[str, dict[str, float]] = {}


def _text() -> str:
    parts = ["\n".join(json.loads(CORPUS.read_text(encoding="utf-8"))["corpus"])]
    size = len(parts[0].encode())
    for source in sorted(Path(os.__file__).parent.glob("*.py")):
        if size >= TEXT_BYTES:
            break
        parts.append(source.read_text(encoding="utf-8", errors="replace"))
        size += len(parts[-1].encode())
    return "\n".join(parts).encode()[:TEXT_BYTES].decode(errors="ignore")


def _requests(text: str, n: int) -> list[str]:
    """`text` in `n` pieces of about equal size, cut after newlines."""
    cuts = [0, *(text.index("\n", len(text) * k // n) + 1 for k in range(1, n)), len(text)]
    return [text[a:b] for a, b in pairwise(cuts)]


TEXT = _text()
REQUESTS = _requests(TEXT, 10)
MB = len(TEXT.encode()) / 1e6


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    try:
        llamacpp = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        llamacpp = None
    lines = [
        "",
        f"## Tokenizer ({datetime.date.today()}, {platform.machine()} {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, tokenizers {importlib.metadata.version('tokenizers')}"
        + (f", llama-cpp-python {llamacpp}" if llamacpp else "") + ")",
        "",
        f"{MB:.2f} MB of text in {len(REQUESTS)} requests (bench/bench_tokenizer.py), median of 5 rounds "
        "(llama.cpp: 3), a fresh ggtriton tokenizer per round; both give the same ids.",
        "",
        "| model | build (s) | encode (MB/s) | llama.cpp encode (MB/s) | decode (MB/s) |",
        "|---|---:|---:|---:|---:|",
        *(f"| {m} | {r.get('build', float('nan')):.3f} | {r.get('encode', float('nan')):.2f} | "
          f"{r.get('llama.cpp encode', float('nan')):.2f} | {r.get('decode', float('nan')):.2f} |"
          for m, r in rows.items()),
    ]
    print("\n".join(lines))
    with RESULTS.open("a") as f:
        f.write("\n".join(lines) + "\n")


@pytest.mark.parametrize("name", MODELS)
def test_build(benchmark, name):
    gguf = GGUFFile(MODELS[name]())
    benchmark.pedantic(Tokenizer.from_gguf, args=(gguf,), rounds=5, iterations=1)
    rows.setdefault(name, {})["build"] = benchmark.stats.stats.median


def _encode_all(tok: Tokenizer) -> list[list[int]]:
    return [tok.encode(text, add_special=False) for text in REQUESTS]


@pytest.mark.parametrize("name", MODELS)
def test_encode_decode(benchmark, name):
    gguf = GGUFFile(MODELS[name]())
    benchmark.pedantic(_encode_all, setup=lambda: ((Tokenizer.from_gguf(gguf),), {}), rounds=5, iterations=1)
    rows.setdefault(name, {})["encode"] = MB / benchmark.stats.stats.median
    tok = Tokenizer.from_gguf(gguf)
    ids = tok.encode(TEXT, add_special=False)
    tok.decode(ids)  # builds the piece table outside the timing
    start = time.perf_counter()
    tok.decode(ids)
    rows[name]["decode"] = MB / (time.perf_counter() - start)


@pytest.mark.parametrize("name", MODELS)
def test_llamacpp_encode(benchmark, name):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(MODELS[name]()), vocab_only=True, verbose=False)
    requests = [text.encode() for text in REQUESTS]

    def encode_all() -> list[list[int]]:
        return [llm.tokenize(data, add_bos=False, special=False) for data in requests]

    ids = benchmark.pedantic(encode_all, rounds=3, iterations=1)
    rows.setdefault(name, {})["llama.cpp encode"] = MB / benchmark.stats.stats.median
    assert ids == _encode_all(Tokenizer.from_gguf(MODELS[name]())), "the two tokenizers disagree"
