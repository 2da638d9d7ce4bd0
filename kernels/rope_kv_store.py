"""Rotary position embedding of q and k fused with the cache write of k and v: one launch where `rope` then
`kv_store` take two, reading q, k and v where the QKV product left them (strided views, no copies).

    q = rope(q)                                                     in place
    k_cache[slot // block_size, slot % block_size] = rope(k[t])     k itself is left as it is
    v_cache[...] = v[t],  slot = slot_mapping[t]

Rotation as in rope.py (same float32 angles and products); tokens with slot_mapping[t] < 0 get their q rotated
and nothing stored. A program takes one token: cos and sin are computed once per dim of a head and used by every
head of q and k. Each dim d is rotated with its partner p (d ^ 1 in the normal style, d +- rot_dim / 2 in NeoX):
x'[d] = x[d] cos - x[p] sin for the first of a pair, x[d] cos + x[p] sin for the second, so whole rows are
loaded and stored at once, dims past rot_dim kept.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kv_store import check_kv_store_args, kv_store_ref
from .rope import check_rope_args, rope_ref


@triton.jit
def _rotate_rows(src, dst, mask, d, p, rot, first, cos, sin):
    """Rows [H, D] at src rotated (dims d, partners p) and stored at dst under mask."""
    x = tl.load(src + d, mask=mask).to(tl.float32)
    xp = tl.load(src + p, mask=mask).to(tl.float32)
    y = tl.where(first, x * cos - xp * sin, x * cos + xp * sin)
    tl.store(dst + d, tl.where(rot, y, x).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kv_store_kernel(q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, positions_ptr, inv_freq_ptr,
                          q_token_stride, q_head_stride, k_token_stride, k_head_stride, v_token_stride,
                          v_head_stride, kc_block_stride, kc_slot_stride, kc_head_stride,
                          vc_block_stride, vc_slot_stride, vc_head_stride,
                          n_q_heads, n_kv_heads, head_dim, half, block_size, attn_factor,
                          NEOX: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    rot = d < 2 * half
    if NEOX:
        first = d < half
        i = tl.where(first, d, d - half)
        p = tl.where(first, d + half, d - half)
    else:
        first = d % 2 == 0
        i = d // 2
        p = d ^ 1
    p = tl.where(rot, p, d)
    theta = tl.load(positions_ptr + t).to(tl.float32) * tl.load(inv_freq_ptr + i, mask=rot, other=0.0)
    cos = tl.cos(theta) * attn_factor
    sin = tl.sin(theta) * attn_factor
    d_in = d < head_dim

    hq = tl.arange(0, BLOCK_HQ)[:, None]
    q_row = q_ptr + t * q_token_stride + hq * q_head_stride
    _rotate_rows(q_row, q_row, (hq < n_q_heads) & d_in, d, p, rot, first, cos, sin)

    slot = tl.load(slot_ptr + t)
    blk = tl.maximum(slot, 0) // block_size
    off = tl.maximum(slot, 0) % block_size
    h = tl.arange(0, BLOCK_HK)[:, None]
    mask = (h < n_kv_heads) & (d < tl.where(slot >= 0, head_dim, 0))  # nothing stored for slot -1
    _rotate_rows(k_ptr + t * k_token_stride + h * k_head_stride,
                 k_cache_ptr + blk * kc_block_stride + off * kc_slot_stride + h * kc_head_stride,
                 mask, d, p, rot, first, cos, sin)
    v = tl.load(v_ptr + t * v_token_stride + h * v_head_stride + d, mask=mask)
    tl.store(v_cache_ptr + blk * vc_block_stride + off * vc_slot_stride + h * vc_head_stride + d, v, mask=mask)


def rope_kv_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, *, neox: bool,
                  attn_factor: float = 1.0) -> None:
    """Rotate q [n_tokens, n_heads, head_dim] in place; write rope(k) and v [n_tokens, n_kv_heads, head_dim] into
    the caches at slot_mapping (int64, -1 = skip). Arguments as for `rope` and `kv_store`."""
    check_rope_args(q, k, positions, inv_freq)
    check_kv_store_args(k, v, k_cache, v_cache, slot_mapping)
    n_tokens, n_kv_heads, head_dim = k.shape
    if n_tokens == 0:
        return
    _rope_kv_store_kernel[(n_tokens,)](
        q, k, v, k_cache, v_cache, slot_mapping, positions, inv_freq,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        q.shape[1], n_kv_heads, head_dim, inv_freq.numel(), k_cache.shape[1], attn_factor,
        NEOX=neox, BLOCK_HQ=triton.next_power_of_2(q.shape[1]), BLOCK_HK=triton.next_power_of_2(n_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


def rope_kv_store_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor, positions: torch.Tensor,
                      inv_freq: torch.Tensor, *, neox: bool, attn_factor: float = 1.0) -> None:
    """Torch reference of `rope_kv_store`: `rope_ref`, then `kv_store_ref` (k left as it is)."""
    k = k.clone()
    rope_ref(q, k, positions, inv_freq, neox=neox, attn_factor=attn_factor)
    kv_store_ref(k, v, k_cache, v_cache, slot_mapping)
