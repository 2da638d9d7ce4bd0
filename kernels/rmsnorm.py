"""RMSNorm fused with the residual add.

    h = x + residual                  (h = x without a residual)
    out = h / sqrt(mean(h^2) + eps) * w

Math in float32; `out` and the new residual `h` are stored in x's dtype. Gemma's (1 + w) is not applied
here: GGUF files store those norm weights with the 1 already added. Fusing the add saves a full
read-and-write of the hidden state per norm; one program holds a whole row, so h is read once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_float, check_last_dim_contiguous


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
