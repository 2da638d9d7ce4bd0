"""What the GPU benchmarks share: timing with rotated inputs, the copy bandwidth and matmul rate, counting
kernel launches, and RESULTS.md.

Every function also runs on CPU tensors (the Triton interpreter, `bench/gpu_check.py --smoke`), so that
the code paths stay exercised without a GPU: there, what needs CUDA timing returns None.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import triton
import triton.testing
from triton.testing import do_bench

RESULTS = Path(__file__).with_name("RESULTS.md")


def require_gpu(script: str) -> None:
    if not torch.cuda.is_available():
        sys.exit(f"{script} measures GPU kernels and needs a CUDA or ROCm device; none is available.")


def device() -> torch.device:
    """The GPU when there is one, else the CPU (kernels in the Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    return torch.cuda.get_device_properties(0).name if torch.cuda.is_available() else "cpu (Triton interpreter)"


def l2_bytes() -> int:
    if not torch.cuda.is_available():
        return 0
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)


def rotated(make, bytes_each: int, l2: int) -> list:
    """Enough copies of a buffer that one pass over them is at least twice the L2 cache: every timed
    call then reads its inputs from memory, not from the cache the previous call filled."""
    return [make() for _ in range(max(2, math.ceil(2 * l2 / bytes_each)))]


def median_ms(fn, buffers: list | None = None, rep: int = 100) -> float | None:
    """Median milliseconds of fn() (or of fn(b), b cycling through `buffers`) over `rep` ms of calls.
    Without a GPU: one untimed call, and None."""
    call = fn if buffers is None else (lambda it=itertools.cycle(buffers): fn(next(it)))
    if not torch.cuda.is_available():
        call()
        return None
    return do_bench(call, warmup=max(5, rep // 4), rep=rep, return_mode="median")


def copy_gbps() -> float | None:
    """GB/s of a 1 GiB device-to-device copy, bytes read plus written (far larger than any L2)."""
    if not torch.cuda.is_available():
        return None
    n = 1 << 30
    src, dst = (torch.empty(n, dtype=torch.uint8, device="cuda") for _ in range(2))
    return 2 * n / median_ms(lambda: dst.copy_(src)) / 1e6


def matmul_tflops(n: int = 8192) -> float | None:
    """TFLOP/s of an n^3 bfloat16 matmul (torch: cuBLAS or hipBLASLt)."""
    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    return 2 * n**3 / median_ms(lambda: a @ b) / 1e9


def quick_autotune(rep: int = 20) -> None:
    """Make triton.autotune time each config over `rep` ms instead of 100: tuning the hundreds of keys of
    a benchmark run then takes seconds, not minutes, and the medians still span hundreds of calls. The
    autotuner looks `triton.testing.do_bench` up when it first tunes, so call this before that."""
    triton.testing.do_bench = functools.partial(do_bench, warmup=max(5, rep // 4), rep=rep)


@contextmanager
def count_launches() -> Iterator[Counter]:
    """Count the Triton kernel launches (by kernel name) made inside the block: compiled kernels, or
    interpreted ones on CPU. An autotuned kernel counts once per launch once tuned."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    counts: Counter = Counter()
    cls = JITFunction if torch.cuda.is_available() else InterpretedFunction
    run = cls.run

    def counted(self, *args, **kwargs):
        counts[self.fn.__name__] += 1
        return run(self, *args, **kwargs)

    cls.run = counted
    try:
        yield counts
    finally:
        cls.run = run


def gpu_kernels(fn: Callable[[], object]) -> int | None:
    """How many GPU kernels (Triton's and torch's alike, copies aside) fn() launches, by the torch
    profiler; None on CPU."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset")))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64."""
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm()).item()


def heading(title: str) -> str:
    """A RESULTS.md section heading naming the device, date and versions."""
    return (f"## {title} ({datetime.date.today()}, {device_name()}, torch {torch.__version__}, "
            f"triton {triton.__version__})")


def append_results(table: str) -> None:
    print(table)
    with RESULTS.open("a") as f:
        f.write(table)
