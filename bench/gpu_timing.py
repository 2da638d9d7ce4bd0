"""What the GPU benchmarks share: timing with rotated inputs, the copy bandwidth, and RESULTS.md."""

from __future__ import annotations

import datetime
import itertools
import math
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

RESULTS = Path(__file__).with_name("RESULTS.md")


def require_gpu(script: str) -> None:
    if not torch.cuda.is_available():
        sys.exit(f"{script} measures GPU kernels and needs a CUDA or ROCm device; none is available.")


def l2_bytes() -> int:
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)


def rotated(make, bytes_each: int, l2: int) -> list:
    """Enough copies of a buffer that one pass over them is at least twice the L2 cache: every timed
    call then reads its inputs from memory, not from the cache the previous call filled."""
    return [make() for _ in range(max(2, math.ceil(2 * l2 / bytes_each)))]


def median_ms(fn, buffers: list | None = None) -> float:
    """Median milliseconds of fn() (or of fn(b), b cycling through `buffers`)."""
    if buffers is None:
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    it = itertools.cycle(buffers)
    return do_bench(lambda: fn(next(it)), warmup=25, rep=100, return_mode="median")


def copy_gbps() -> float:
    """GB/s of a 1 GiB device-to-device copy, bytes read plus written (far larger than any L2)."""
    n = 1 << 30
    src, dst = (torch.empty(n, dtype=torch.uint8, device="cuda") for _ in range(2))
    return 2 * n / median_ms(lambda: dst.copy_(src)) / 1e6


def heading(title: str) -> str:
    """A RESULTS.md section heading naming the device, date and versions."""
    name = torch.cuda.get_device_properties(0).name
    return f"## {title} ({datetime.date.today()}, {name}, torch {torch.__version__}, triton {triton.__version__})"


def append_results(table: str) -> None:
    print(table)
    with RESULTS.open("a") as f:
        f.write(table)
