"""RMSNorm fused with the residual add.

    h = x + residual                  (h = x without a residual)
    out = h / sqrt(mean(h^2) + eps) * w

Math in float32; `out` and the new residual `h` are stored in x's dtype. Gemma's (1 + w) is not applied
here: GGUF files store those norm weights with the 1 already added. Fusing the add saves a full
read-and-write of the hidden state per norm; one program holds a whole row, so h is read once.

Split across two matmuls (no launch of its own, `PendingNorm`): the matmul whose output is added to the
residual (qgemv's epilogue) stores h, y = h * w rounded to x's dtype, and the sums of h^2 over each RMS_CHUNK
columns of a row (`store_sumsq`: one program sees only some columns); the next matmul reads y as its x and scales
its result rows by rstd (`rms_rstd`, the chunk sums added in a fixed order: the same bits every run), since
(y * rstd) @ W^T = rstd * (y @ W^T). Against this kernel, only where rstd is applied differs: x's dtype rounds
h * w * rstd here, h * w there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import check_float, check_last_dim_contiguous

RMS_CHUNK = 16  # columns per partial sum of squares of a PendingNorm (the narrowest qgemv tile)
_CHUNK = tl.constexpr(RMS_CHUNK)
_RSTD_BLOCK = tl.constexpr(64)  # chunk sums a program adds per step


@dataclass(frozen=True)
class PendingNorm:
    """rmsnorm(h, w)'s rows, stored as y = h * w (x's dtype, [M, K]) and their partial sums of h^2 (float32
    [M, cdiv(K, RMS_CHUNK)], chunk c over columns [c * RMS_CHUNK, + RMS_CHUNK)): the rows are y * rstd,
    rstd = 1 / sqrt(sum / K + eps)."""

    y: torch.Tensor
    sumsq: torch.Tensor
    eps: float


@triton.jit
def store_sumsq(sumsq_ptr, h, rows, n_rows, col0, n_cols):
    """Store a PendingNorm's sums of h^2 over each RMS_CHUNK columns of the float32 tile h [BM, BN] of an
    [n_rows, n_cols] h: rows `rows` [BM], columns col0 + [0, BN) (col0 and BN multiples of RMS_CHUNK; h 0 past
    n_cols)."""
    BM: tl.constexpr = h.shape[0]
    BC: tl.constexpr = h.shape[1] // _CHUNK
    sums = tl.sum(tl.reshape(h * h, [BM, BC, _CHUNK]), axis=2)
    c = col0 // _CHUNK + tl.arange(0, BC)
    n_chunks = tl.cdiv(n_cols, _CHUNK)
    tl.store(sumsq_ptr + rows[:, None].to(tl.int64) * n_chunks + c[None, :], sums,
             mask=(rows < n_rows)[:, None] & (c < n_chunks)[None, :])


@triton.jit
def rms_rstd(sumsq_ptr, rows, n_cols, eps):
    """rstd of rows `rows` [BM] of a PendingNorm of n_cols columns, from its chunk sums at sumsq_ptr, added in
    one fixed order."""
    n_chunks = tl.cdiv(n_cols, _CHUNK)
    acc = tl.zeros([rows.shape[0], _RSTD_BLOCK], tl.float32)
    row_ptr = sumsq_ptr + rows[:, None].to(tl.int64) * n_chunks
    for c0 in range(0, n_chunks, _RSTD_BLOCK):
        c = c0 + tl.arange(0, _RSTD_BLOCK)
        acc += tl.load(row_ptr + c[None, :], mask=(c < n_chunks)[None, :], other=0.0)
    return 1.0 / tl.sqrt(tl.sum(acc, axis=1) / n_cols + eps)


@triton.jit
def _rmsnorm_kernel(x_ptr, residual_ptr, w_ptr, out_ptr, h_ptr,
                    x_row_stride, residual_row_stride, out_row_stride, h_row_stride, n_cols, eps,
                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    h = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(h_ptr + row * h_row_stride + cols, h.to(h_ptr.dtype.element_ty), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, (h * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x (+ residual) over its last dim: returns (out, h), h = x + residual (x itself without one).

    x, residual: [..., n] of one dtype, last dim contiguous; weight: [n], any float dtype.
    """
    x2, r2 = _check(x, weight, residual)
    n_rows, n = x2.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = x if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return out, h
    block = triton.next_power_of_2(n)
    _rmsnorm_kernel[(n_rows,)](
        x2, r2 if r2 is not None else x2, weight, out, h,
        x2.stride(0), r2.stride(0) if r2 is not None else 0, n, n, n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block,
        # Enough warps that a row is ~8 elements per thread: the reduction stays in registers.
        num_warps=min(16, max(1, block // 256)),
    )
    return out, h


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `rmsnorm`."""
    _check(x, weight, residual)
    h = x.float() if residual is None else x.float() + residual.float()
    out = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps) * weight.float()
    return out.to(x.dtype), (x if residual is None else h.to(x.dtype))


def pending_norm_ref(p: PendingNorm) -> torch.Tensor:
    """The rows of `p`, y * rstd, in float32: the torch reference of what a matmul reading `p` multiplies."""
    rstd = torch.rsqrt(p.sumsq.sum(-1, keepdim=True) / p.y.shape[-1] + p.eps)
    return p.y.float() * rstd


def _check(x: torch.Tensor, weight: torch.Tensor,
           residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x and residual as [rows, n] (views where the strides allow)."""
    check_float(x=x, weight=weight)
    check_last_dim_contiguous(x=x)
    if x.dim() == 0 or weight.shape != (x.shape[-1],) or not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous [{x.shape[-1] if x.dim() else '?'}], got {tuple(weight.shape)}")
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual must match x ({x.dtype} {tuple(x.shape)}), got {residual.dtype} "
                             f"{tuple(residual.shape)}")
        check_last_dim_contiguous(residual=residual)
    n = x.shape[-1]
    return x.reshape(-1, n), None if residual is None else residual.reshape(-1, n)
