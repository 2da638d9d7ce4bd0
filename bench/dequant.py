"""Dequantization throughput of every GGUF type on the GPU, against the copy bandwidth measured in the same run.

    python bench/dequant.py [--elements 67108864] [--dtype bf16] [--types Q4_K,Q8_0]

Each type dequantizes a [elements / 4096, 4096] tensor of random valid blocks; GB/s counts the raw bytes read
plus the values written. Times are `triton.testing.do_bench` medians over buffers rotated so that one round
exceeds the L2 cache; the copy bandwidth is that of a large `Tensor.copy_` (bytes read plus written).
Prints a table and appends it to bench/RESULTS.md. `bench/gpu_check.py` runs the same measurement.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ggtriton.gguf import GGMLType
from ggtriton.gguf.quants import DEQUANTIZERS
from ggtriton.kernels import dequantize
from gpu_timing import append_results, copy_gbps, device, heading, l2_bytes, median_ms, require_gpu, rotated
from qmatmul import random_weight

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
ROW = 4096


def dequant_point(t: GGMLType, elements: int, dtype: torch.dtype, copy: float | None) -> dict:
    """{type, us, gbps, of_copy} of dequantizing `elements` (a multiple of 4096) values of type t into
    `dtype`; the figures are None without a GPU."""
    dev = device()
    shape = (elements // ROW, ROW)
    raw = random_weight(t, shape, dev)
    out_bytes = elements * dtype.itemsize
    bufs = rotated(lambda: (raw.clone(), torch.empty(shape, dtype=dtype, device=dev)), raw.numel() + out_bytes,
                   l2_bytes())
    ms = median_ms(lambda b: dequantize(b[0], t, shape, dtype, out=b[1]), bufs)
    if ms is None:
        return dict(type=t.name, us=None, gbps=None, of_copy=None)
    gbps = (raw.numel() + out_bytes) / ms / 1e6
    return dict(type=t.name, us=ms * 1e3, gbps=gbps, of_copy=gbps / copy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--elements", type=int, default=1 << 26, help="elements per tensor (multiple of 4096)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--types", default=",".join(t.name for t in DEQUANTIZERS), help="comma-separated")
    args = parser.parse_args()
    require_gpu("bench/dequant.py")
    if args.elements % ROW:
        sys.exit(f"--elements must be a multiple of {ROW}")
    copy = copy_gbps()
    rows = []
    for name in args.types.split(","):
        t = GGMLType[name]
        p = dequant_point(t, args.elements, DTYPES[args.dtype], copy)
        rows.append(f"| {t.name} | {t.bits_per_weight:.3g} | {p['us']:.1f} | {p['gbps']:.0f} | {p['of_copy']:.0%} |")

    lines = [
        "",
        heading("Dequantization"),
        "",
        f"{args.elements} elements per tensor, {args.dtype} output; copy bandwidth {copy:.0f} GB/s "
        "(read + written).",
        "",
        "| type | bits/weight | µs | GB/s | of copy |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ]
    append_results("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
