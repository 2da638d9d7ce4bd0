"""Attention kernels on a GPU: prefill TFLOP/s against torch SDPA (flash backend) and decode GB/s of KV
read against the measured copy bandwidth.

    python bench/attention.py

Shapes are an 8B llama's: 32 query heads, 8 kv heads, head_dim 128, bfloat16, pages of 16 tokens
scattered over the cache. Prefill: one causal sequence of 1k..16k tokens, FLOPs = 2 * n^2 * heads * d
(QK^T and PV, half of each under the causal mask). Decode: batch {1, 16, 64, 256} x context
{512, 4k, 32k}, bytes = the K and V pages read; each call reads a fresh copy of the cache (rotating
through enough copies to exceed L2) so the figure is HBM bandwidth. Times are `triton.testing.do_bench`
medians. Prints a table and appends it to bench/RESULTS.md.
"""

from __future__ import annotations

import itertools

import torch

from ggtriton.kernels.flash_attention import flash_attention
from ggtriton.kernels.paged_decode import paged_decode
from gpu_timing import append_results, copy_gbps, heading, median_ms, require_gpu

N_HEADS, N_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
PREFILL_TOKENS = (1024, 2048, 4096, 8192, 16384)
DECODE_BATCH = (1, 16, 64, 256)
DECODE_CONTEXT = (512, 4096, 32768)
ROTATE_BYTES = 512 << 20  # well past any L2: each timed call reads memory the previous calls did not


def bench(fn) -> float:
    """Median seconds of fn."""
    return median_ms(fn) * 1e-3


def paged(n_seqs: int, ctx: int, copies: int, gen: torch.Generator):
    """A cache holding `copies` x n_seqs sequences of ctx tokens on shuffled pages, one block table per copy."""
    pages = -(-ctx // BLOCK_SIZE)
    num_blocks = copies * n_seqs * pages
    shape = (num_blocks, BLOCK_SIZE, N_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    v_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    perm = torch.randperm(num_blocks, generator=gen).to(device="cuda", dtype=torch.int32)
    tables = perm.view(copies, n_seqs, pages)
    return k_cache, v_cache, tables


def matmul_rate() -> float:
    """FLOP/s of an 8192^3 bfloat16 matmul (torch / cuBLAS or hipBLASLt)."""
    a = torch.randn(8192, 8192, dtype=DTYPE, device="cuda")
    b = torch.randn(8192, 8192, dtype=DTYPE, device="cuda")
    return 2 * 8192**3 / bench(lambda: a @ b)


def prefill_rows(gen: torch.Generator) -> list[str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for n in PREFILL_TOKENS:
        k_cache, v_cache, tables = paged(1, n, 1, gen)
        q = torch.randn(n, N_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
        cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        ctx = torch.tensor([n], dtype=torch.int32, device="cuda")
        scale = HEAD_DIM**-0.5

        def ours():
            return flash_attention(q, k_cache, v_cache, tables[0], cu, ctx, scale=scale, max_seqlen_q=n)

        # SDPA gets dense, head-expanded K/V (its best case): gathered outside the timing.
        k = k_cache[tables[0, 0].long()].flatten(0, 1)[:n].repeat_interleave(N_HEADS // N_KV_HEADS, 1)
        v = v_cache[tables[0, 0].long()].flatten(0, 1)[:n].repeat_interleave(N_HEADS // N_KV_HEADS, 1)
        qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))

        def sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)

        ref = sdpa()[0].transpose(0, 1).float()
        err = ((ours().float() - ref).norm() / ref.norm()).item()
        flops = 2 * n * n * N_HEADS * HEAD_DIM
        t_ours, t_sdpa = bench(ours), bench(sdpa)
        rows.append(f"| {n} | {t_ours * 1e3:.3f} | {flops / t_ours / 1e12:.1f} | {t_sdpa * 1e3:.3f} | "
                    f"{flops / t_sdpa / 1e12:.1f} | {t_sdpa / t_ours:.2f} | {err:.1e} |")
        del k_cache, v_cache, k, v, qt, kt, vt
        torch.cuda.empty_cache()
    return rows


def decode_rows(gen: torch.Generator, copy_bw: float) -> list[str]:
    rows = []
    for batch in DECODE_BATCH:
        for ctx in DECODE_CONTEXT:
            kv_bytes = 2 * batch * ctx * N_KV_HEADS * HEAD_DIM * DTYPE.itemsize
            copies = max(1, -(-ROTATE_BYTES // kv_bytes))
            free, _ = torch.cuda.mem_get_info()
            if copies * kv_bytes > 0.6 * free:
                rows.append(f"| {batch} | {ctx} | skipped: {copies * kv_bytes / 2**30:.0f} GiB of cache "
                            f"does not fit | | | |")
                continue
            k_cache, v_cache, tables = paged(batch, ctx, copies, gen)
            q = torch.randn(batch, N_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
            lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
            turn = itertools.count()

            def ours():
                return paged_decode(q, k_cache, v_cache, tables[next(turn) % copies], lens, scale=HEAD_DIM**-0.5,
                                    max_context_len=ctx)

            t = bench(ours)
            rows.append(f"| {batch} | {ctx} | {t * 1e3:.3f} | {kv_bytes / t / 1e9:.0f} | "
                        f"{kv_bytes / t / copy_bw * 100:.0f} % | {copies} |")
            del k_cache, v_cache, tables
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    require_gpu("bench/attention.py")
    gen = torch.Generator().manual_seed(0)
    runtime = f"HIP {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
    copy_bw, mm = copy_gbps() * 1e9, matmul_rate()
    lines = [
        "",
        f"{heading('Attention')}, {runtime}",
        "",
        f"{N_HEADS} heads, {N_KV_HEADS} kv heads, head_dim {HEAD_DIM}, {str(DTYPE)[6:]}, pages of {BLOCK_SIZE}. "
        f"Copy bandwidth {copy_bw / 1e9:.0f} GB/s; bf16 matmul 8192^3 {mm / 1e12:.0f} TFLOP/s.",
        "",
        "Prefill, one causal sequence (ratio = SDPA time / ggtriton time; err = relative norm vs SDPA):",
        "",
        "| tokens | ggtriton ms | TFLOP/s | SDPA flash ms | TFLOP/s | ratio | err |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *prefill_rows(gen),
        "",
        "Decode, one token per sequence (GB/s of K and V read; % of the copy bandwidth):",
        "",
        "| batch | context | ms | GB/s | of copy | cache copies |",
        "|---:|---:|---:|---:|---:|---:|",
        *decode_rows(gen, copy_bw),
    ]
    append_results("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
