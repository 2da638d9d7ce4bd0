"""Paged decode attention: one new query per sequence over its whole paged context, split-K.

Sequence b's query q[b] sits at position ctx_b - 1 (ctx_b = context_lens[b], the new token included,
already written by `kv_store`) and attends to keys j in [lo_b, ctx_b), lo_b = max(0, ctx_b - window)
when windowed, read through its block table (layout: ggtriton.runtime.engine.kv_cache):

    s_j = scale * q . k_j                          (soft-capped: s_j = cap * tanh(s_j / cap))
    out = sum_j softmax(s)_j v_j

With attention sinks (gpt-oss), head h's learned logit sinks[h] joins the softmax's denominator and has no value:
out = sum_j e^(s_j) v_j / (sum_j e^(s_j) + e^(sinks[h])).

Decode is bound by reading the cache, so the work is cut two ways to fill the GPU and read each page once:
- GQA: one program takes all n_heads / n_kv_heads query heads of a kv head, as the rows of one
  [group, head_dim] x [head_dim, BLOCK_N] dot, so a K/V tile is loaded once for its whole group.
- Split-K (flash-decoding): the key range is cut into up to `num_splits` chunks, one program each; a
  program stores its normalised partial output o_s and log-sum-exp lse_s (base 2), and the last program of
  its (sequence, kv head) to finish, found by an atomic counter, combines them in split order:
  out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M), M = max_s lse_s. One launch either way; with one
  split the program writes the output directly. A sink is counted once: in the combine, as one more term
  2^(sink - M) of the denominator (M then the max over it too), or, with one split, as the first key.
  Each sequence cuts its own key range, read on the device, into min(num_splits, span / min_split_keys)
  splits (the rest stay empty). So the split count depends on the batch alone, never on a bound of the
  lengths: a CUDA graph captured for any length spreads a short context over as many SMs as eager
  decode does, and no launch reads the lengths back to the host.
A sequence with context length 0 (batch padding) gets a zero output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (ARRIVAL_COUNTERS, LOG2E, arrival_counters, attention_ref, backend, check_attention_options,
                      check_paged, check_sinks, dot, f32_dot, gather_pages, logit_scales, sm_count, tanh)

# Fewest keys a split gets: below this the reduce and the partial round trip cost more than they save.
# Small in the interpreter, so that tests cross several splits on short contexts.
_MIN_SPLIT_KEYS = {"cuda": 256, "hip": 256, "interpreter": 16}
_MAX_SPLITS = 64

# (BLOCK_N, num_warps, num_stages): starting points, not yet measured; HIP unmeasured. Small key tiles
# in the interpreter so that tests cross several tiles and pages per split.
_CONFIGS = {"cuda": (64, 4, 3), "hip": (64, 4, 1), "interpreter": (16, 1, 1)}


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, o_ptr, lse_ptr, out_ptr, count_ptr, block_tables_ptr, context_lens_ptr, sinks_ptr,
    q_seq_stride, q_head_stride, o_seq_stride, o_head_stride, o_split_stride, lse_seq_stride, lse_head_stride,
    out_seq_stride, out_head_stride,
    kc_block_stride, kc_slot_stride, kc_head_stride, vc_block_stride, vc_slot_stride, vc_head_stride,
    bt_stride, qk_scale, soft_cap, window, min_split_keys, head_dim,
    PAGE: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SOFT_CAP: tl.constexpr, WINDOW: tl.constexpr, SINKS: tl.constexpr, F32: tl.constexpr, WRITE_LSE: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """One program: the query-head group of one kv head of one sequence, over one split of its keys. With
    WRITE_LSE (several splits) it stores its partial output and log-sum-exp, and the last split of the group to
    finish (counted at count_ptr) combines them all into out."""
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)
    lo = 0
    if WINDOW:
        lo = tl.maximum(0, ctx - window)
    span = ctx - lo
    # This sequence's own split length, whole key tiles; splits past its last one stay empty.
    splits = tl.maximum(1, tl.minimum(tl.num_programs(2), tl.cdiv(span, min_split_keys)))
    split_len = tl.cdiv(tl.cdiv(span, splits), BLOCK_N) * BLOCK_N
    start = lo + split * split_len
    end = tl.minimum(ctx, start + split_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < head_dim
    heads = kv_head * GROUP + offs_g
    q = tl.load(q_ptr + seq * q_seq_stride + heads[:, None] * q_head_stride + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    if SINKS:
        sink = tl.load(sinks_ptr + heads, mask=g_mask, other=0.0) * LOG2E
        if not WRITE_LSE:  # one split: the sink as a first key of weight 2^0 and no value
            m_i = sink
            l_i = tl.full([BLOCK_G], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + seq * bt_stride
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        block = tl.load(bt_row + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        slot = offs_n % PAGE
        k = tl.load(k_cache_ptr + block[None, :] * kc_block_stride + slot[None, :] * kc_slot_stride
                    + kv_head * kc_head_stride + offs_d[:, None], mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        s = dot(q, k, F32)
        if SOFT_CAP:
            s = tanh(s * qk_scale) * soft_cap
        else:
            s = s * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + block[:, None] * vc_block_stride + slot[:, None] * vc_slot_stride
                    + kv_head * vc_head_stride + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, F32)
        m_i = m_new

    # An empty split (past the context, or a padding sequence) leaves l = 0: output 0, lse = -inf. Its
    # partial output is not stored (the reduce skips splits with lse = -inf): no traffic for empty splits.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_mask = g_mask[:, None] & d_mask[None, :]
    if WRITE_LSE:
        o_mask = o_mask & ~empty[:, None]
    tl.store(o_ptr + seq * o_seq_stride + heads[:, None] * o_head_stride + split * o_split_stride + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=o_mask)
    if WRITE_LSE:
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        lse_row = lse_ptr + seq * lse_seq_stride + heads * lse_head_stride
        tl.store(lse_row + split, lse, mask=g_mask)
        tl.debug_barrier()  # every thread's partial results stored before the arrival is counted
        counter = count_ptr + seq * tl.num_programs(1) + kv_head
        num_splits = tl.num_programs(2)
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
            # Weigh each split's output by 2^(lse_s - max lse); .cg loads: from L2, where the other splits stored
            offs_s = tl.arange(0, BLOCK_S)
            lse_all = tl.load(lse_row[:, None] + offs_s[None, :], mask=g_mask[:, None] & (offs_s < num_splits)[None, :],
                              other=float("-inf"), cache_modifier=".cg")
            m = tl.max(lse_all, 1)
            if SINKS:
                m = tl.maximum(m, sink)
            m = tl.where(m == float("-inf"), 0.0, m)
            total = tl.zeros([BLOCK_G], tl.float32)
            if SINKS:
                total = tl.exp2(sink - m)
            acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
            o_row = o_ptr + seq * o_seq_stride + heads[:, None] * o_head_stride + offs_d[None, :]
            for s in range(num_splits):
                lse_s = tl.load(lse_row + s, mask=g_mask, other=float("-inf"), cache_modifier=".cg")
                w = tl.exp2(lse_s - m)
                o_s = tl.load(o_row + s * o_split_stride, mask=(g_mask & (lse_s > float("-inf")))[:, None]
                              & d_mask[None, :], other=0.0, cache_modifier=".cg")
                acc += w[:, None] * o_s
                total += w
            out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
            tl.store(out_ptr + seq * out_seq_stride + heads[:, None] * out_head_stride + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
            tl.store(counter, 0)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Decode attention of q [batch, n_heads, head_dim] (one token per sequence) over the paged cache.

    k_cache, v_cache: [num_blocks, block_size, n_kv_heads, head_dim], q's dtype; block_tables int32
    [batch, max_pages]; context_lens int32 [batch] (the new token included). sinks: float32 [n_heads], the
    attention sinks' logits (module docstring), or None. num_splits: most splits a
    sequence's keys are cut into (each of at least 256 keys); by default enough programs for ~2 per SM at
    the batch size rounded up to a power of two. The launch depends on the shapes only (no length is read
    back), so a CUDA graph can capture it.
    Returns [batch, n_heads, head_dim] in q's dtype.
    """
    _check(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window, soft_cap, sinks, num_splits)
    batch, n_heads, head_dim = q.shape
    n_kv_heads = k_cache.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    be = backend(q.device)
    block_n, num_warps, num_stages = _CONFIGS[be]
    if q.element_size() == 4:  # float32 tiles take twice the shared memory: one stage fits 99 KB GPUs
        num_stages = 1
    if num_splits is None:
        # Sized for the batch rounded up to a power of two, as CUDA graphs pad it: a sequence then gets the
        # same splits, and the same bits, replayed in a graph or run eagerly.
        padded = triton.next_power_of_2(batch)
        num_splits = min(_MAX_SPLITS, triton.cdiv(2 * sm_count(q.device), padded * n_kv_heads))
    block_d = max(16, triton.next_power_of_2(head_dim))
    group = n_heads // n_kv_heads
    if num_splits == 1:
        o, lse = out, out  # lse is not written with one split
    else:
        o = torch.empty((batch, n_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((batch, n_heads, num_splits), dtype=torch.float32, device=q.device)
    if num_splits > 1 and batch * n_kv_heads > ARRIVAL_COUNTERS:
        raise ValueError(f"paged_decode splits at most {ARRIVAL_COUNTERS} (sequence, kv head) pairs, got "
                         f"{batch * n_kv_heads}")
    _paged_decode_kernel[(batch, n_kv_heads, num_splits)](
        q, k_cache, v_cache, o, lse, out, arrival_counters(q.device), block_tables, context_lens,
        q if sinks is None else sinks,
        q.stride(0), q.stride(1), o.stride(0), o.stride(1), o.stride(2) if num_splits > 1 else 0,
        lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        *logit_scales(scale, soft_cap), sliding_window or 0, _MIN_SPLIT_KEYS[be], head_dim,
        # tl.dot needs at least 16 rows: small groups are padded with masked rows.
        PAGE=k_cache.shape[1], GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_D=block_d,
        SOFT_CAP=soft_cap is not None, WINDOW=sliding_window is not None, SINKS=sinks is not None, F32=f32_dot(q),
        # One tile of log-sum-exps for every split count: one compiled kernel for all batch sizes.
        WRITE_LSE=num_splits > 1, BLOCK_S=_MAX_SPLITS, num_warps=num_warps, num_stages=num_stages,
    )
    return out


def paged_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of `paged_decode`: the whole batch as one padded, masked attention, float32 math."""
    _check(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window, soft_cap, sinks, None)
    if q.shape[0] == 0:
        return torch.empty_like(q)
    k = gather_pages(k_cache, block_tables, context_lens)
    v = gather_pages(v_cache, block_tables, context_lens)
    q_pos = (context_lens.long() - 1)[:, None]
    out = attention_ref(q[:, None], k, v, q_pos, context_lens, scale=scale, sliding_window=sliding_window,
                        soft_cap=soft_cap, sinks=sinks)
    return out[:, 0].to(q.dtype)



def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
           context_lens: torch.Tensor, scale: float, sliding_window: int | None, soft_cap: float | None,
           sinks: torch.Tensor | None, num_splits: int | None) -> None:
    check_paged(q, k_cache, v_cache, block_tables, context_lens, q.shape[0] if q.dim() == 3 else -1)
    check_attention_options(scale, sliding_window, soft_cap)
    check_sinks(sinks, q.shape[1], q.device)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
