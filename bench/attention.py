"""Attention kernels on a GPU: prefill TFLOP/s against torch SDPA (flash backend) and decode GB/s of KV
read against the measured copy bandwidth.

    python bench/attention.py

Shapes are an 8B llama's: 32 query heads, 8 kv heads, head_dim 128, bfloat16, pages of 16 tokens
scattered over the cache. Prefill: one causal sequence of 1k..16k tokens, FLOPs = 2 * n^2 * heads * d
(QK^T and PV, half of each under the causal mask). Decode: batch {1, 16, 64, 256} x context
{512, 4k, 32k}, bytes = the K and V pages read; each call reads a fresh copy of the cache (rotating
through enough copies to exceed L2) so the figure is HBM bandwidth. Times are `triton.testing.do_bench`
medians. Prints a table and appends it to bench/RESULTS.md. `bench/gpu_check.py` runs the same
measurements.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ggtriton.kernels.flash_attention import flash_attention
from ggtriton.kernels.paged_decode import paged_decode
from gpu_timing import append_results, copy_gbps, device, heading, matmul_tflops, median_ms, rel_err, require_gpu

N_HEADS, N_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
PREFILL_TOKENS = (1024, 2048, 4096, 8192, 16384)
DECODE_BATCH = (1, 16, 64, 256)
DECODE_CONTEXT = (512, 4096, 32768)
ROTATE_BYTES = 512 << 20  # well past any L2: each timed call reads memory the previous calls did not


def paged(ctx_lens: Sequence[int], gen: torch.Generator, copies: int = 1, n_kv_heads: int = N_KV_HEADS,
          head_dim: int = HEAD_DIM) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K and V caches of random values holding `copies` x len(ctx_lens) sequences on shuffled pages, and
    their block tables, int32 [copies, sequences, most pages] (padding: page 0)."""
    dev = device()
    pages = [-(-c // BLOCK_SIZE) for c in ctx_lens]
    num_blocks = copies * sum(pages)
    shape = (num_blocks, BLOCK_SIZE, n_kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=DTYPE, device=dev)
    v_cache = torch.randn(shape, dtype=DTYPE, device=dev)
    perm = torch.randperm(num_blocks, generator=gen, dtype=torch.int32)
    tables = torch.zeros(copies, len(pages), max(pages), dtype=torch.int32)
    start = 0
    for c in range(copies):
        for s, n in enumerate(pages):
            tables[c, s, :n] = perm[start : start + n]
            start += n
    return k_cache, v_cache, tables.to(dev)


def prefill_point(n: int, gen: torch.Generator) -> dict:
    """{tokens, ms, tflops, sdpa_ms, sdpa_tflops, err} of one causal sequence of n tokens, ours against SDPA
    (err: relative norm of the difference); the timing figures are None without a GPU."""
    dev = device()
    k_cache, v_cache, tables = paged([n], gen)
    q = torch.randn(n, N_HEADS, HEAD_DIM, dtype=DTYPE, device=dev)
    cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
    ctx = torch.tensor([n], dtype=torch.int32, device=dev)
    scale = HEAD_DIM**-0.5

    def ours():
        return flash_attention(q, k_cache, v_cache, tables[0], cu, ctx, scale=scale, max_seqlen_q=n)

    # SDPA gets dense, head-expanded K/V (its best case): gathered outside the timing.
    k = k_cache[tables[0, 0].long()].flatten(0, 1)[:n].repeat_interleave(N_HEADS // N_KV_HEADS, 1)
    v = v_cache[tables[0, 0].long()].flatten(0, 1)[:n].repeat_interleave(N_HEADS // N_KV_HEADS, 1)
    qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))

    def sdpa():  # its flash backend on a GPU; on CPU whichever it picks
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if dev.type == "cuda" else nullcontext():
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)

    err = rel_err(ours(), sdpa()[0].transpose(0, 1))
    flops = 2 * n * n * N_HEADS * HEAD_DIM
    t_ours, t_sdpa = median_ms(ours), median_ms(sdpa)
    p = dict(tokens=n, err=err, ms=t_ours, sdpa_ms=t_sdpa, tflops=None, sdpa_tflops=None)
    if t_ours is not None:
        p |= dict(tflops=flops / t_ours / 1e9, sdpa_tflops=flops / t_sdpa / 1e9)
    return p


def decode_point(batch: int, ctx: int, gen: torch.Generator, copy: float | None) -> dict:
    """{batch, context, ms, gbps, of_copy, copies} of one decode step over `batch` sequences of `ctx`
    tokens (GB/s of K and V read); "skipped" names why when the rotated caches do not fit."""
    dev = device()
    kv_bytes = 2 * batch * ctx * N_KV_HEADS * HEAD_DIM * DTYPE.itemsize
    copies = max(1, -(-ROTATE_BYTES // kv_bytes)) if dev.type == "cuda" else 1
    p = dict(batch=batch, context=ctx, copies=copies, ms=None, gbps=None, of_copy=None)
    if dev.type == "cuda" and copies * kv_bytes > 0.6 * torch.cuda.mem_get_info()[0]:
        return p | dict(skipped=f"{copies * kv_bytes / 2**30:.0f} GiB of cache does not fit")
    k_cache, v_cache, tables = paged([ctx] * batch, gen, copies)
    q = torch.randn(batch, N_HEADS, HEAD_DIM, dtype=DTYPE, device=dev)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    turn = itertools.count()
    t = median_ms(lambda: paged_decode(q, k_cache, v_cache, tables[next(turn) % copies], lens,
                                       scale=HEAD_DIM**-0.5))
    if t is not None:
        p |= dict(ms=t, gbps=kv_bytes / t / 1e6, of_copy=kv_bytes / t / 1e6 / copy)
    return p


def main() -> None:
    require_gpu("bench/attention.py")
    gen = torch.Generator().manual_seed(0)
    runtime = f"HIP {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
    copy, mm = copy_gbps(), matmul_tflops()
    prefill = []
    for n in PREFILL_TOKENS:
        p = prefill_point(n, gen)
        prefill.append(f"| {n} | {p['ms']:.3f} | {p['tflops']:.1f} | {p['sdpa_ms']:.3f} | {p['sdpa_tflops']:.1f} | "
                       f"{p['sdpa_ms'] / p['ms']:.2f} | {p['err']:.1e} |")
        torch.cuda.empty_cache()
    decode = []
    for batch in DECODE_BATCH:
        for ctx in DECODE_CONTEXT:
            p = decode_point(batch, ctx, gen, copy)
            decode.append(f"| {batch} | {ctx} | skipped: {p['skipped']} | | | |" if "skipped" in p else
                          f"| {batch} | {ctx} | {p['ms']:.3f} | {p['gbps']:.0f} | {p['of_copy']:.0%} | {p['copies']} |")
            torch.cuda.empty_cache()
    lines = [
        "",
        f"{heading('Attention')}, {runtime}",
        "",
        f"{N_HEADS} heads, {N_KV_HEADS} kv heads, head_dim {HEAD_DIM}, {str(DTYPE)[6:]}, pages of {BLOCK_SIZE}. "
        f"Copy bandwidth {copy:.0f} GB/s; bf16 matmul 8192^3 {mm:.0f} TFLOP/s.",
        "",
        "Prefill, one causal sequence (ratio = SDPA time / ggtriton time; err = relative norm vs SDPA):",
        "",
        "| tokens | ggtriton ms | TFLOP/s | SDPA flash ms | TFLOP/s | ratio | err |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *prefill,
        "",
        "Decode, one token per sequence (GB/s of K and V read; % of the copy bandwidth):",
        "",
        "| batch | context | ms | GB/s | of copy | cache copies |",
        "|---:|---:|---:|---:|---:|---:|",
        *decode,
    ]
    append_results("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
