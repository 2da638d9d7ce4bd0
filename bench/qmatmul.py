"""Quantized matmul on the GPU: GB/s against the copy bandwidth, TFLOP/s against cuBLAS on the dequantized weight.

    python bench/qmatmul.py [TYPE ...] [--m 1,2,4,8,16,64,256,2048] [--path gemv|skinny|splitk|gemm|dequant]

Types: Q4_0 Q4_K Q5_K Q6_K Q8_0 IQ4_XS, then any named as arguments. Shapes (N x K): an 8B llama's linear
layers, 4096x4096 (q, o), 1024x4096 (k, v), 14336x4096 (gate, up), 4096x14336 (down), 128256x4096 (lm head),
times bf16 x of M rows. Each (type, shape, M) times `qmatmul` on the path `_choose_path` picks (or --path, to
measure one path at every M and so set the dispatch thresholds); each (shape, M) times cuBLAS (torch.matmul in
bf16) on a dense weight of the same shape. GB/s counts the raw weight bytes plus x and out; of copy: that over
the bandwidth (read + written) of a 1 GiB copy; TFLOP/s = 2 M N K / time; vs cuBLAS: cuBLAS time / ours; err:
‖out − ref‖ / ‖ref‖ against float32 x @ W^T. Times are `triton.testing.do_bench` medians, after warm-up and
autotuning, over weights rotated so that one round exceeds twice the L2 cache (each call reads its weight from
memory). Weights of Q4_0, Q5_0, Q8_0 and Q6_K are in the planar layout the engine loads them in (the GEMV reads
it; the other paths decode it in place). The gemv path takes M <= 16 only. Prints a table and appends it to
bench/RESULTS.md. `bench/gpu_check.py` runs the same measurements.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from ggtriton.gguf import GGMLType
from ggtriton.kernels import dequantize, qmatmul
from ggtriton.kernels._common import backend
from ggtriton.kernels.planar import RELAID_TYPES, to_planar
from ggtriton.kernels.qgemv import rows_aligned
from ggtriton.kernels.qmatmul import PATHS, _choose_path, path_takes
from ggtriton.runtime.synthetic import random_tensor
from gpu_timing import append_results, copy_gbps, device, heading, l2_bytes, median_ms, rel_err, require_gpu, rotated

TYPES = ("Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "IQ4_XS")
SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096))
M_VALUES = "1,2,4,8,16,64,256,2048"
DTYPE = torch.bfloat16
# The module (ggtriton.kernels exports the function of the same name): its config tables and thresholds.
qmatmul_module = importlib.import_module("ggtriton.kernels.qmatmul")
qgemv_module = importlib.import_module("ggtriton.kernels.qgemv")


def random_weight(t: GGMLType, shape: Sequence[int], dev: torch.device, seed: int = 0) -> torch.Tensor:
    """The raw bytes (flat uint8 on `dev`) of a random (N, K) weight of type t: valid blocks, or normals."""
    data = random_tensor(tuple(shape), t, np.random.default_rng(seed))
    return torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).reshape(-1)).to(dev)


def planar(t: GGMLType, k: int) -> bool:
    """Whether the engine keeps a weight of type t and rows of k relaid (see Ops.preload)."""
    return t in RELAID_TYPES and rows_aligned(t, (1, k))


def _tables(path: str) -> tuple[dict, object]:
    """The config table of `path` and the module whose `_tuned` cache is built from it."""
    if path == "gemv":
        return qgemv_module._CONFIGS, qgemv_module
    return (qmatmul_module._GEMM_CONFIGS if path == "gemm" else qmatmul_module._SKINNY_CONFIGS), qmatmul_module


def configs(path: str, dev: torch.device) -> list[tuple]:
    """The autotune configs `qmatmul` tries on `path` ("dequant" has none)."""
    if path == "dequant":
        return []
    return list(_tables(path)[0][backend(dev)])


def thresholds(dev: torch.device) -> dict[str, int]:
    """The dispatch thresholds `_choose_path` uses on `dev`."""
    return dict(qmatmul_module._DISPATCH[backend(dev)])


@contextmanager
def only_config(path: str, config: tuple, dev: torch.device) -> Iterator[None]:
    """Inside the block, `path` has the one config `config`: qmatmul compiles and runs it, without tuning."""
    table, module = _tables(path)
    be = backend(dev)
    saved = table[be]
    table[be] = [config]
    module._tuned.cache_clear()  # the autotuned kernels are built from the lists once, then cached
    try:
        yield
    finally:
        table[be] = saved
        module._tuned.cache_clear()


class Bench:
    """Times `qmatmul` at (type, N, K, M, path) points and cuBLAS at (N, K, M), each once. The weights made
    (rotated copies, and their float32 values for the error) stay until `weights.clear()`."""

    def __init__(self, copy: float | None, rep: int = 100):
        self.copy, self.rep = copy, rep
        self.dev = device()
        self.l2 = l2_bytes()
        self.points: dict[tuple, dict] = {}
        self.cublas: dict[tuple, float | None] = {}
        self.weights: dict[tuple, tuple[list[torch.Tensor], torch.Tensor]] = {}
        self.xs: dict[tuple, torch.Tensor] = {}

    def _weight(self, t: GGMLType, n: int, k: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Rotated copies of a random weight, in the layout the engine keeps it in, and its float32 values."""
        if (t, n, k) not in self.weights:
            raw = random_weight(t, (n, k), self.dev)
            w = dequantize(raw, t, (n, k), torch.float32)
            if planar(t, k):
                raw = to_planar(raw, t, (n, k))
            self.weights[(t, n, k)] = (rotated(raw.clone, raw.numel(), self.l2), w)
        return self.weights[(t, n, k)]

    def _x(self, m: int, k: int) -> torch.Tensor:
        if (m, k) not in self.xs:
            self.xs[(m, k)] = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(self.dev, DTYPE)
        return self.xs[(m, k)]

    def cublas_ms(self, n: int, k: int, m: int) -> float | None:
        """torch.matmul in bf16 on a dense weight (the best a dequantize-then-multiply could do)."""
        if (n, k, m) not in self.cublas:
            x = self._x(m, k)
            dense = rotated(lambda: torch.randn(n, k, dtype=DTYPE, device=self.dev), n * k * DTYPE.itemsize, self.l2)
            self.cublas[(n, k, m)] = median_ms(lambda w: torch.matmul(x, w.t()), dense, self.rep)
        return self.cublas[(n, k, m)]

    def point(self, t: GGMLType, n: int, k: int, m: int, path: str | None = None) -> dict:
        """{type, n, k, m, path, us, gbps, of_copy, tflops, err} of qmatmul on `path` (default: dispatch);
        the timing figures are None without a GPU."""
        path = path or _choose_path(t, m, n, k, self.dev)
        key = (t, n, k, m, path)
        if key not in self.points:
            raws, w = self._weight(t, n, k)
            x = self._x(m, k)
            kw = dict(path=path, planar=planar(t, k))
            err = rel_err(qmatmul(x, raws[0], t, (n, k), **kw), x.float() @ w.t())
            ms = median_ms(lambda r: qmatmul(x, r, t, (n, k), **kw), raws, self.rep)
            p = dict(type=t.name, n=n, k=k, m=m, path=path, err=err, us=None, gbps=None, of_copy=None, tflops=None)
            if ms is not None:
                gbps = (raws[0].numel() + (m * k + m * n) * DTYPE.itemsize) / ms / 1e6
                p |= dict(us=ms * 1e3, gbps=gbps, of_copy=gbps / self.copy, tflops=2 * m * n * k / ms / 1e9)
            self.points[key] = p
        return self.points[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("types", nargs="*", help="GGUF types to add to " + " ".join(TYPES))
    parser.add_argument("--m", default=M_VALUES, help="comma-separated rows of x")
    parser.add_argument("--path", choices=PATHS, help="force one path (default: the dispatch's choice)")
    args = parser.parse_args()
    require_gpu("bench/qmatmul.py")
    types = [GGMLType[name] for name in dict.fromkeys([*TYPES, *args.types])]
    ms_rows = [int(m) for m in args.m.split(",")]

    bench = Bench(copy_gbps())
    rows = []
    for n, k in SHAPES:
        bench.weights.clear()
        for t in types:
            for m in ms_rows:
                if args.path and not path_takes(args.path, t, m):
                    continue
                p = bench.point(t, n, k, m, args.path)
                cublas = bench.cublas_ms(n, k, m)
                rows.append(
                    f"| {t.name} | {n}x{k} | {m} | {p['path']} | {p['us']:.1f} | {p['gbps']:.0f} | {p['of_copy']:.0%} | "
                    f"{p['tflops']:.1f} | {cublas * 1e3:.1f} | {2 * m * n * k / cublas / 1e9:.1f} | "
                    f"{cublas * 1e3 / p['us']:.2f} | {p['err']:.1e} |"
                )
                print(rows[-1], flush=True)

    lines = [
        "",
        heading("Quantized matmul"),
        "",
        f"bf16 x [M, K] @ W^T, W (N, K) in GGUF blocks; path: {args.path or 'dispatch'}; copy bandwidth "
        f"{bench.copy:.0f} GB/s (read + written); cuBLAS: torch.matmul in bf16 on a dense W.",
        "",
        "| type | N x K | M | path | µs | GB/s | of copy | TFLOP/s | cuBLAS µs | cuBLAS TFLOP/s | vs cuBLAS | err |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    append_results("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
