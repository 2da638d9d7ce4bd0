"""Quantized matmul on the GPU: GB/s against the copy bandwidth, TFLOP/s against cuBLAS on the dequantized weight.

    python bench/qmatmul.py [TYPE ...] [--m 1,2,4,8,16,64,256,2048] [--path skinny|splitk|gemm|dequant]

Types: Q4_0 Q4_K Q5_K Q6_K Q8_0 IQ4_XS, then any named as arguments. Shapes (N x K): an 8B llama's linear
layers, 4096x4096 (q, o), 1024x4096 (k, v), 14336x4096 (gate, up), 4096x14336 (down), 128256x4096 (lm head),
times bf16 x of M rows. Each (type, shape, M) times `qmatmul` on the path `_choose_path` picks (or --path, to
measure one path at every M and so set the dispatch thresholds); each (shape, M) times cuBLAS (torch.matmul in
bf16) on a dense weight of the same shape. GB/s counts the raw weight bytes plus x and out; of copy: that over
the bandwidth (read + written) of a 1 GiB copy; TFLOP/s = 2 M N K / time; vs cuBLAS: cuBLAS time / ours. Times
are `triton.testing.do_bench` medians, after warm-up and autotuning, over weights rotated so that one round
exceeds twice the L2 cache (each call reads its weight from memory). Prints a table and appends it to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ggtriton.gguf import TYPE_TRAITS, GGMLType
from ggtriton.gguf.quantize import random_blocks
from ggtriton.kernels import qmatmul
from ggtriton.kernels.qmatmul import PATHS, _choose_path
from gpu_timing import append_results, copy_gbps, heading, l2_bytes, median_ms, require_gpu, rotated

TYPES = ("Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "IQ4_XS")
SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096))
M_VALUES = "1,2,4,8,16,64,256,2048"
DTYPE = torch.bfloat16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("types", nargs="*", help="GGUF types to add to " + " ".join(TYPES))
    parser.add_argument("--m", default=M_VALUES, help="comma-separated rows of x")
    parser.add_argument("--path", choices=PATHS, help="force one path (default: the dispatch's choice)")
    args = parser.parse_args()
    require_gpu("bench/qmatmul.py")
    types = [GGMLType[name] for name in dict.fromkeys([*TYPES, *args.types])]
    ms_rows = [int(m) for m in args.m.split(",")]
    l2 = l2_bytes()
    device = torch.device("cuda")
    rng = np.random.default_rng(0)

    copy = copy_gbps()
    rows = []
    for n, k in SHAPES:
        xs = {m: torch.randn(m, k, dtype=DTYPE, device="cuda") for m in ms_rows}
        dense = rotated(lambda: torch.randn(n, k, dtype=DTYPE, device="cuda"), n * k * DTYPE.itemsize, l2)
        cublas = {m: median_ms(lambda w: torch.matmul(xs[m], w.t()), dense) for m in ms_rows}
        del dense
        for t in types:
            raw = torch.from_numpy(random_blocks(t, n * k // TYPE_TRAITS[t].block_elements, rng).reshape(-1)).cuda()
            raws = rotated(raw.clone, raw.numel(), l2)
            for m in ms_rows:
                x = xs[m]
                ms = median_ms(lambda r: qmatmul(x, r, t, (n, k), path=args.path), raws)
                gbps = (raw.numel() + (m * k + m * n) * DTYPE.itemsize) / ms / 1e6
                tflops = 2 * m * n * k / ms / 1e9
                path = args.path or _choose_path(t, m, n, k, device)
                rows.append(
                    f"| {t.name} | {n}x{k} | {m} | {path} | {ms * 1e3:.1f} | {gbps:.0f} | {gbps / copy:.0%} | "
                    f"{tflops:.1f} | {cublas[m] * 1e3:.1f} | {2 * m * n * k / cublas[m] / 1e9:.1f} | "
                    f"{cublas[m] / ms:.2f} |"
                )
                print(rows[-1], flush=True)
            del raws, raw

    lines = [
        "",
        heading("Quantized matmul"),
        "",
        f"bf16 x [M, K] @ W^T, W (N, K) in GGUF blocks; path: {args.path or 'dispatch'}; copy bandwidth "
        f"{copy:.0f} GB/s (read + written); cuBLAS: torch.matmul in bf16 on a dense W.",
        "",
        "| type | N x K | M | path | µs | GB/s | of copy | TFLOP/s | cuBLAS µs | cuBLAS TFLOP/s | vs cuBLAS |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    append_results("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
