"""Tokenizer build time and encode/decode throughput on the bundled models.

    pytest bench/bench_tokenizer.py

Build time starts from an open `GGUFFile` (the reader's own time is bench_gguf_open.py's). Prints the
medians and appends the table to bench/RESULTS.md.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import time
from pathlib import Path

import pytest

from ggtriton.gguf import GGUFFile, bundled
from ggtriton.gguf.tokenizer import Tokenizer

MODELS = {"SmolLM2-135M (gpt2, 49k)": bundled.smollm2_path, "Gemma-3-270M (llama, 262k)": bundled.gemma3_path}
RESULTS = Path(__file__).with_name("RESULTS.md")
TEXT = (Path(__file__).parent.parent / "tests" / "fixtures" / "make_tokenizer_fixtures.py").read_text() * 4
rows: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    lines = [
        "",
        f"## Tokenizer ({datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, tokenizers {importlib.metadata.version('tokenizers')})",
        "",
        "| model | build (s) | encode (MB/s) | decode (MB/s) |",
        "|---|---|---|---|",
        *(f"| {m} | {r.get('build', float('nan')):.3f} | {r.get('encode', float('nan')):.2f} | "
          f"{r.get('decode', float('nan')):.2f} |" for m, r in rows.items()),
    ]
    print("\n".join(lines))
    with RESULTS.open("a") as f:
        f.write("\n".join(lines) + "\n")


@pytest.mark.parametrize("name", MODELS)
def test_build(benchmark, name):
    gguf = GGUFFile(MODELS[name]())
    benchmark.pedantic(Tokenizer.from_gguf, args=(gguf,), rounds=3, iterations=1)
    rows.setdefault(name, {})["build"] = benchmark.stats.stats.median


@pytest.mark.parametrize("name", MODELS)
def test_encode_decode(benchmark, name):
    tok = Tokenizer.from_gguf(MODELS[name]())
    ids = tok.encode(TEXT)
    mb = len(TEXT.encode()) / 1e6
    benchmark.pedantic(tok.encode, args=(TEXT,), rounds=5, iterations=1)
    rows.setdefault(name, {})["encode"] = mb / benchmark.stats.stats.median
    tok.decode(ids)  # builds the piece table outside the timing
    start = time.perf_counter()
    tok.decode(ids)
    rows[name]["decode"] = mb / (time.perf_counter() - start)
