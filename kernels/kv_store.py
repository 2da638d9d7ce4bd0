"""Write new keys and values into the paged KV cache (layout: ggtriton.runtime.engine.kv_cache).

    k_cache[slot // block_size, slot % block_size] = k[t],  v_cache[...] = v[t],  slot = slot_mapping[t]

for every token t with slot_mapping[t] >= 0 (-1: skip, e.g. padding of a captured batch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_cache, check_last_dim_contiguous


@triton.jit
def _kv_store_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     k_token_stride, k_head_stride, v_token_stride, v_head_stride,
                     kc_block_stride, kc_slot_stride, kc_head_stride,
                     vc_block_stride, vc_slot_stride, vc_head_stride,
                     n_kv_heads, head_dim, block_size,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per token: all its heads at once, one contiguous row of the cache."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    blk = slot // block_size
    off = slot % block_size
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < n_kv_heads) & (d < head_dim)
    k = tl.load(k_ptr + t * k_token_stride + h * k_head_stride + d, mask=mask)
    v = tl.load(v_ptr + t * v_token_stride + h * v_head_stride + d, mask=mask)
    tl.store(k_cache_ptr + blk * kc_block_stride + off * kc_slot_stride + h * kc_head_stride + d, k, mask=mask)
    tl.store(v_cache_ptr + blk * vc_block_stride + off * vc_slot_stride + h * vc_head_stride + d, v, mask=mask)


def kv_store(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v [n_tokens, n_kv_heads, head_dim] into k_cache, v_cache at slot_mapping (int64, -1 = skip).

    k, v: the cache's dtype, last dim contiguous (views into a fused QKV output are fine).
    """
    check_kv_store_args(k, v, k_cache, v_cache, slot_mapping)
    n_tokens, n_kv_heads, head_dim = k.shape
    if n_tokens == 0:
        return
    _kv_store_kernel[(n_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        n_kv_heads, head_dim, k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(n_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )


def kv_store_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Torch reference of `kv_store` (needs caches whose first two dims merge into one, as allocated)."""
    check_kv_store_args(k, v, k_cache, v_cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]


def check_kv_store_args(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           slot_mapping: torch.Tensor) -> None:
    check_cache(k_cache, v_cache)
    if k.dim() != 3 or k.shape != v.shape or k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"k, v must be [n_tokens, {k_cache.shape[2]}, {k_cache.shape[3]}], "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.dtype != k_cache.dtype or v.dtype != k_cache.dtype:
        raise ValueError(f"k, v must have the cache dtype {k_cache.dtype}, got {k.dtype} and {v.dtype}")
    check_last_dim_contiguous(k=k, v=v)
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be int64 [{k.shape[0]}], got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    if not slot_mapping.is_contiguous():
        raise ValueError("slot_mapping must be contiguous")
