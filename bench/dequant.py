"""Dequantization throughput of every GGUF type on the GPU, against the copy bandwidth measured in the same run.

    python bench/dequant.py [--elements 67108864] [--dtype bf16] [--types Q4_K,Q8_0]

Each type dequantizes a [elements / 4096, 4096] tensor of random valid blocks; GB/s counts the raw bytes read
plus the values written. Times are `triton.testing.do_bench` medians over buffers rotated so that one round
exceeds the L2 cache; the copy bandwidth is that of a large `Tensor.copy_` (bytes read plus written).
Prints a table and appends it to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from ggtriton.gguf import TYPE_TRAITS, GGMLType
from ggtriton.gguf.quants import DEQUANTIZERS
from ggtriton.gguf.quantize import random_blocks
from ggtriton.kernels import dequantize
from gpu_timing import append_results, copy_gbps, heading, l2_bytes, median_ms, require_gpu, rotated

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
ROW = 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--elements", type=int, default=1 << 26, help="elements per tensor (multiple of 4096)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--types", default=",".join(t.name for t in DEQUANTIZERS), help="comma-separated")
    args = parser.parse_args()
    require_gpu("bench/dequant.py")
    if args.elements % ROW:
        sys.exit(f"--elements must be a multiple of {ROW}")
    types = [GGMLType[name] for name in args.types.split(",")]
    dtype = DTYPES[args.dtype]
    l2 = l2_bytes()
    shape = (args.elements // ROW, ROW)
    rng = np.random.default_rng(0)

    copy = copy_gbps()
    rows = []
    for t in types:
        n_blocks = args.elements // TYPE_TRAITS[t].block_elements
        raw = torch.from_numpy(random_blocks(t, n_blocks, rng).reshape(-1)).cuda()
        out_bytes = args.elements * dtype.itemsize
        bufs = rotated(
            lambda: (raw.clone(), torch.empty(shape, dtype=dtype, device="cuda")), raw.numel() + out_bytes, l2
        )
        ms = median_ms(lambda b: dequantize(b[0], t, shape, dtype, out=b[1]), bufs)
        gbps = (raw.numel() + out_bytes) / ms / 1e6
        rows.append(f"| {t.name} | {t.bits_per_weight:.3g} | {ms * 1e3:.1f} | {gbps:.0f} | {gbps / copy:.0%} |")
        del bufs, raw

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
