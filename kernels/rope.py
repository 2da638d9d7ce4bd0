"""Rotary position embedding, in place on q and k, and the frequency tables of its scaling variants.

For a token at position p and pair i < rot_dim / 2 of every head (theta_i = p * inv_freq[i], float32):

    x1' = (x1 cos theta_i - x2 sin theta_i) * attn_factor
    x2' = (x2 cos theta_i + x1 sin theta_i) * attn_factor

with the pair (x1, x2) = (x[2i], x[2i + 1]) in llama.cpp's "normal" style and (x[i], x[i + rot_dim / 2])
in the NeoX style. Dims past rot_dim (partial rotary) are left as they are. Every scaling variant is a
different `inv_freq` table (see `rope_inv_freq`) plus YaRN's `attn_factor` (its mscale, which llama.cpp
folds into cos and sin the same way).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import check_float, check_last_dim_contiguous


@triton.jit
def _rotate(x_ptr, tok, token_stride, head_stride, n_heads, half, cos, sin,
            NEOX: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate the pairs of all heads of one token; cos, sin: [1, BLOCK_HALF]."""
    h = tl.arange(0, BLOCK_H)[:, None]
    i = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < n_heads) & (i < half)
    if NEOX:
        i1 = i
        i2 = i + half
    else:
        i1 = 2 * i
        i2 = 2 * i + 1
    base = x_ptr + tok * token_stride + h * head_stride
    x1 = tl.load(base + i1, mask=mask).to(tl.float32)
    x2 = tl.load(base + i2, mask=mask).to(tl.float32)
    tl.store(base + i1, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(base + i2, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, positions_ptr, inv_freq_ptr, q_token_stride, q_head_stride,
                 k_token_stride, k_head_stride, n_q_heads, n_k_heads, half, attn_factor,
                 NEOX: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One program per token: cos and sin are computed once and used for all heads of q and k."""
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.float32)
    i = tl.arange(0, BLOCK_HALF)
    theta = pos * tl.load(inv_freq_ptr + i, mask=i < half, other=0.0)
    cos = (tl.cos(theta) * attn_factor)[None, :]
    sin = (tl.sin(theta) * attn_factor)[None, :]
    _rotate(q_ptr, tok, q_token_stride, q_head_stride, n_q_heads, half, cos, sin, NEOX, BLOCK_HQ, BLOCK_HALF)
    _rotate(k_ptr, tok, k_token_stride, k_head_stride, n_k_heads, half, cos, sin, NEOX, BLOCK_HK, BLOCK_HALF)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, *, neox: bool,
         attn_factor: float = 1.0) -> None:
    """Rotate q [n_tokens, n_heads, head_dim] and k [n_tokens, n_kv_heads, head_dim] in place.

    positions: int32 or int64 [n_tokens]; inv_freq: float32 [rot_dim / 2], rot_dim <= head_dim; neox: NeoX
    (halves) or llama.cpp normal (adjacent pairs) style. q, k: one float dtype, last dim contiguous (views
    into a fused QKV output are fine).
    """
    check_rope_args(q, k, positions, inv_freq)
    if q.shape[0] == 0:
        return
    half = inv_freq.numel()
    _rope_kernel[(q.shape[0],)](
        q, k, positions, inv_freq, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q.shape[1], k.shape[1], half, attn_factor,
        NEOX=neox, BLOCK_HQ=triton.next_power_of_2(q.shape[1]), BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half),
    )


def rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, *, neox: bool,
             attn_factor: float = 1.0) -> None:
    """Torch reference of `rope` (same float32 angles)."""
    check_rope_args(q, k, positions, inv_freq)
    half = inv_freq.numel()
    theta = positions.to(torch.float32)[:, None, None] * inv_freq
    cos, sin = torch.cos(theta) * attn_factor, torch.sin(theta) * attn_factor
    for x in (q, k):
        rot = x[..., : 2 * half]
        x1, x2 = (rot[..., :half], rot[..., half:]) if neox else (rot[..., 0::2], rot[..., 1::2])
        a, b = x1.float(), x2.float()
        y1, y2 = a * cos - b * sin, b * cos + a * sin  # both before writing: a, b may alias x1, x2
        x1.copy_(y1)
        x2.copy_(y2)


def rope_inv_freq(
    rot_dim: int,
    base: float,
    *,
    scaling: str = "none",
    factor: float = 1.0,
    original_context: int = 0,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    freq_factors: torch.Tensor | None = None,
    attn_factor: float = 1.0,
) -> tuple[torch.Tensor, float]:
    """(inv_freq float32 [rot_dim / 2], attn_factor) for `rope`, computed in float64.

    f_i = base^(-2i / rot_dim), then by `scaling`:
    - "none":   f_i.
    - "linear": f_i / factor.
    - "yarn" (llama.cpp's rope_yarn, ext_factor 1): corr(b) = rot_dim * ln(original_context / (2 pi b)) /
      (2 ln base); lo = max(0, floor(corr(beta_fast))), hi = min(rot_dim - 1, ceil(corr(beta_slow)));
      ramp_i = 1 - clamp((i - lo) / max(0.001, hi - lo), 0, 1);
      f_i = f_i / factor * (1 - ramp_i) + f_i * ramp_i; attn_factor *= 1 + 0.1 ln(factor).
    - "llama3": wavelength w_i = 2 pi / f_i; w_i < original_context / high_freq_factor: f_i;
      w_i > original_context / low_freq_factor: f_i / factor; between, with
      t = (original_context / w_i - low_freq_factor) / (high_freq_factor - low_freq_factor):
      (1 - t) f_i / factor + t f_i.
    freq_factors (a GGUF `rope_freqs` tensor, [rot_dim / 2]): f_i /= freq_factors[i], after the above.
    """
    if rot_dim <= 0 or rot_dim % 2:
        raise ValueError(f"rot_dim must be positive and even, got {rot_dim}")
    i = torch.arange(rot_dim // 2, dtype=torch.float64)
    f = base ** (-2 * i / rot_dim)
    if scaling == "linear":
        f = f / factor
    elif scaling == "yarn":
        def corr(b: float) -> float:
            return rot_dim * math.log(original_context / (2 * math.pi * b)) / (2 * math.log(base))
        lo = max(0.0, math.floor(corr(beta_fast)))
        hi = min(rot_dim - 1.0, math.ceil(corr(beta_slow)))
        ramp = 1 - ((i - lo) / max(0.001, hi - lo)).clamp(0, 1)
        f = f / factor * (1 - ramp) + f * ramp
        attn_factor *= 1 + 0.1 * math.log(factor)
    elif scaling == "llama3":
        wavelen = 2 * math.pi / f
        t = ((original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0, 1)
        f = (1 - t) * f / factor + t * f
    elif scaling != "none":
        raise ValueError(f"unknown rope scaling {scaling!r}: expected none, linear, yarn or llama3")
    if freq_factors is not None:
        if freq_factors.shape != (rot_dim // 2,):
            raise ValueError(f"freq_factors must be [{rot_dim // 2}], got {tuple(freq_factors.shape)}")
        f = f / freq_factors.double().cpu()
    return f.float(), attn_factor


def check_rope_args(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> None:
    check_float(q=q, k=k)
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.dtype != k.dtype:
        raise ValueError(f"q, k must be [n_tokens, heads, head_dim] of one dtype, got {q.dtype} {tuple(q.shape)} "
                         f"and {k.dtype} {tuple(k.shape)}")
    check_last_dim_contiguous(q=q, k=k)
    if positions.shape != (q.shape[0],) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32/int64 [{q.shape[0]}], got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    if inv_freq.dtype != torch.float32 or inv_freq.dim() != 1 or not 0 < 2 * inv_freq.numel() <= q.shape[2]:
        raise ValueError(f"inv_freq must be float32 [rot_dim / 2] with rot_dim <= {q.shape[2]}, got "
                         f"{inv_freq.dtype} {tuple(inv_freq.shape)}")
    if not positions.is_contiguous() or not inv_freq.is_contiguous():
        raise ValueError("positions and inv_freq must be contiguous")

