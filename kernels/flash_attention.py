"""Causal flash attention for prefill over a ragged batch, keys and values read from the paged KV cache.

Sequence b has q_len_b = cu_seqlens_q[b + 1] - cu_seqlens_q[b] new queries (rows cu_seqlens_q[b].. of the
packed q) at positions [ctx_b - q_len_b, ctx_b), ctx_b = context_lens[b]; its keys 0..ctx_b - 1 (a cached
prefix and the new tokens, which `kv_store` has already written) are read through its block table
(layout: ggtriton.runtime.engine.kv_cache). Query head h uses kv head h // (n_heads // n_kv_heads) (GQA, MQA).

    s_j = scale * q . k_j                          (soft-capped: s_j = cap * tanh(s_j / cap))
    out = sum_j softmax(s)_j v_j    over keys j <= pos, and j > pos - sliding_window when windowed

With attention sinks (gpt-oss), head h's learned logit sinks[h] joins the softmax's denominator and has no value:
out = sum_j e^(s_j) v_j / (sum_j e^(s_j) + e^(sinks[h])).

The softmax is online (running max m and sum l in float32, rescaled per key tile) and in base 2: the
log2(e) factor is folded into the scale so each tile costs one exp2 per logit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (LOG2E, attention_ref, backend, check_attention_options, check_paged, check_sinks, dot, f32_dot,
                      gather_pages, logit_scales, tanh)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) by padded head dim. Starting points from the usual Triton
# flash-attention shapes, not yet measured on this kernel; HIP unmeasured. Small tiles in the interpreter
# so that tests cross several key tiles and pages.
_CONFIGS = {
    "cuda": {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 4, 2)},
    "hip": {64: (128, 64, 4, 1), 128: (128, 64, 8, 1), 256: (64, 32, 4, 1)},  # unmeasured
    "interpreter": {64: (16, 32, 1, 1), 128: (16, 32, 1, 1), 256: (16, 32, 1, 1)},
}


@triton.jit
def _flash_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, cu_seqlens_q_ptr, context_lens_ptr, sinks_ptr,
    q_token_stride, q_head_stride, out_token_stride, out_head_stride,
    kc_block_stride, kc_slot_stride, kc_head_stride, vc_block_stride, vc_slot_stride, vc_head_stride,
    bt_stride, qk_scale, soft_cap, window, head_dim,
    PAGE: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SOFT_CAP: tl.constexpr, WINDOW: tl.constexpr, SINKS: tl.constexpr, F32: tl.constexpr,
):
    """One program: BLOCK_M queries of one sequence and one head against that sequence's key tiles."""
    m_block = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    ctx = tl.load(context_lens_ptr + seq)
    kv_head = head // GROUP

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < head_dim
    q_pos = ctx - q_len + offs_m
    tok = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * q_token_stride + head * q_head_stride + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    # Keys this block can see: up to its last query, from its first query's window start.
    hi = tl.minimum(ctx, ctx - q_len + (m_block + 1) * BLOCK_M)
    lo = 0
    if WINDOW:
        lo = tl.maximum(0, ctx - q_len + m_block * BLOCK_M - window + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if SINKS:  # the sink as a first key of weight 2^0 and no value: the online softmax then counts it once
        m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(sinks_ptr + head) * LOG2E
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + seq * bt_stride
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        # Each key's page is looked up on its own, so a tile may straddle pages and start mid-page.
        block = tl.load(bt_row + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        slot = offs_n % PAGE
        kv_mask = n_mask[None, :] & d_mask[:, None]
        k = tl.load(k_cache_ptr + block[None, :] * kc_block_stride + slot[None, :] * kc_slot_stride
                    + kv_head * kc_head_stride + offs_d[:, None], mask=kv_mask, other=0.0)
        s = dot(q, k, F32)
        if SOFT_CAP:
            s = tanh(s * qk_scale) * soft_cap
        else:
            s = s * qk_scale
        seen = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]
        if WINDOW:
            seen = seen & (offs_n[None, :] > q_pos[:, None] - window)
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps m = -inf; subtract 0 there instead of -inf (no NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + block[:, None] * vc_block_stride + slot[:, None] * vc_slot_stride
                    + kv_head * vc_head_stride + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, F32)
        m_i = m_new

    # Padding rows past q_len may have seen no key under a window (l = 0); they are not stored.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + tok[:, None] * out_token_stride + head * out_head_stride + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def flash_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
) -> torch.Tensor:
    """Causal prefill attention of packed queries q [total_q, n_heads, head_dim] over the paged cache.

    k_cache, v_cache: [num_blocks, block_size, n_kv_heads, head_dim], q's dtype; block_tables int32
    [batch, max_pages]; cu_seqlens_q int32 [batch + 1]; context_lens int32 [batch] (cached + new tokens).
    sinks: float32 [n_heads], the attention sinks' logits (module docstring), or None.
    max_seqlen_q: the longest q_len, if the caller knows it (else read from cu_seqlens_q: a device sync).
    Returns [total_q, n_heads, head_dim] in q's dtype.
    """
    batch = _check(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, sliding_window, soft_cap,
                   sinks)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0 or q.shape[0] == 0:
        return out
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    n_heads, head_dim = q.shape[1:]
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, num_warps, num_stages = _CONFIGS[backend(q.device)][max(64, block_d)]
    if q.element_size() == 4:  # float32 tiles take twice the shared memory: halved, they fit 99 KB GPUs
        block_m, num_stages = max(16, block_m // 2), 1
    grid = (triton.cdiv(max_seqlen_q, block_m), batch, n_heads)
    _flash_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, context_lens, q if sinks is None else sinks,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        *logit_scales(scale, soft_cap), sliding_window or 0, head_dim,
        # The page size as a constant: its // and % on every key are shifts and masks.
        PAGE=k_cache.shape[1], GROUP=n_heads // k_cache.shape[2], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        SOFT_CAP=soft_cap is not None, WINDOW=sliding_window is not None, SINKS=sinks is not None, F32=f32_dot(q),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def flash_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of `flash_attention`: one dense masked attention per sequence, float32 math."""
    batch = _check(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, sliding_window, soft_cap,
                   sinks)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    cu = cu_seqlens_q.tolist()
    for b in range(batch):
        ctx = context_lens[b : b + 1]
        k = gather_pages(k_cache, block_tables[b : b + 1], ctx)
        v = gather_pages(v_cache, block_tables[b : b + 1], ctx)
        q_b = q[cu[b] : cu[b + 1]]
        q_pos = torch.arange(int(ctx) - len(q_b), int(ctx), device=q.device)[None]
        out[cu[b] : cu[b + 1]] = attention_ref(q_b[None], k, v, q_pos, ctx, scale=scale,
                                               sliding_window=sliding_window, soft_cap=soft_cap, sinks=sinks)[0]
    return out


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
           cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, scale: float, sliding_window: int | None,
           soft_cap: float | None, sinks: torch.Tensor | None) -> int:
    """The batch size, once every argument is checked."""
    batch = block_tables.shape[0] if block_tables.dim() == 2 else -1
    check_paged(q, k_cache, v_cache, block_tables, context_lens, batch)
    check_attention_options(scale, sliding_window, soft_cap)
    check_sinks(sinks, q.shape[1], q.device)
    if cu_seqlens_q.shape != (batch + 1,) or cu_seqlens_q.dtype != torch.int32 or not cu_seqlens_q.is_contiguous():
        raise ValueError(f"cu_seqlens_q must be contiguous int32 [{batch + 1}], got {cu_seqlens_q.dtype} "
                         f"{tuple(cu_seqlens_q.shape)}")
    if cu_seqlens_q.device != q.device:
        raise ValueError(f"cu_seqlens_q is on {cu_seqlens_q.device}, q on {q.device}")
    return batch
