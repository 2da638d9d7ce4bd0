"""GGUF open time: ggtriton's reader against the PyPI `gguf` package's GGUFReader, side by side.

    pytest bench/bench_gguf_open.py

Opening means parsing the whole header (every metadata value, the vocabulary included, and the
tensor table) with the file in the page cache. Prints the medians and their ratio and appends the
table to bench/RESULTS.md.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
from pathlib import Path

import gguf as gguf_pypi
import numpy as np
import pytest

from ggtriton.gguf import GGUFFile, bundled

MODELS = {"SmolLM2-135M Q4_1": bundled.smollm2_path, "Gemma-3-270M Q4_K_M": bundled.gemma3_path}
READERS = {"ggtriton.gguf.GGUFFile": GGUFFile, "gguf.GGUFReader": gguf_pypi.GGUFReader}
ROUNDS = {"ggtriton.gguf.GGUFFile": 20, "gguf.GGUFReader": 3}
RESULTS = Path(__file__).with_name("RESULTS.md")
medians: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if len(medians) != len(MODELS) * len(READERS):
        return
    ours, ref = READERS
    lines = [
        "",
        f"## GGUF open time ({datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, gguf {importlib.metadata.version('gguf')}, "
        f"numpy {np.__version__})",
        "",
        f"| model | {ours} | {ref} | speed-up |",
        "|---|---:|---:|---:|",
    ]
    for model in MODELS:
        a, b = medians[(model, ours)], medians[(model, ref)]
        lines.append(f"| {model} | {a * 1e3:.1f} ms | {b * 1e3:.0f} ms | {b / a:.0f}x |")
    table = "\n".join(lines) + "\n"
    print(table)
    with RESULTS.open("a") as f:
        f.write(table)


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("model", list(MODELS))
def test_open(benchmark, model, reader):
    path = MODELS[model]()
    opened = benchmark.pedantic(READERS[reader], args=(path,), rounds=ROUNDS[reader], warmup_rounds=1)
    assert opened is not None
    medians[(model, reader)] = benchmark.stats.stats.median
