"""Gated activations of a feed-forward block: act(gate) * up.

    silu_mul: out = gate * sigmoid(gate) * up
    gelu_mul: out = 0.5 * gate * (1 + tanh(sqrt(2 / pi) * (gate + 0.044715 * gate^3))) * up   (llama.cpp's gelu)

Convention: two inputs, gate and up, each [..., d]. A fused gate-up projection's output [n, 2 * d] is
passed as its two halves `x[:, :d], x[:, d:]` (views, no copy); separate projections pass their outputs.
Math in float32, output in the inputs' dtype. `activate` is the activation itself, which qgemv's gate/up product
applies in its epilogue too (the same bits as this kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_float, check_last_dim_contiguous, tanh

_BLOCK = 1024


@triton.jit
def activate(g, ACT: tl.constexpr):
    """silu(g) (ACT "silu") or llama.cpp's tanh gelu (ACT "gelu") of float32 g."""
    if ACT == "silu":
        return g / (1.0 + tl.exp(-g))
    return 0.5 * g * (1.0 + tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))


@triton.jit
def _act_mul_kernel(gate_ptr, up_ptr, out_ptr, gate_row_stride, up_row_stride, out_row_stride, n_cols,
                    ACT: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, j): columns [j * BLOCK, (j + 1) * BLOCK) of one row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, (activate(g, ACT) * u).to(out_ptr.dtype.element_ty), mask=mask)


def _act_mul(act: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g2, u2 = _check(gate, up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n_rows, n = g2.shape
    if out.numel():
        block = min(_BLOCK, triton.next_power_of_2(n))
        _act_mul_kernel[(n_rows, triton.cdiv(n, block))](
            g2, u2, out, g2.stride(0), u2.stride(0), n, n, ACT=act, BLOCK=block,
        )
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate, up [..., d] (same shape and dtype, last dim contiguous); returns [..., d]."""
    return _act_mul("silu", gate, up)


def gelu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up for gate, up [..., d] (same shape and dtype, last dim contiguous); returns [..., d]."""
    return _act_mul("gelu", gate, up)


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Torch reference of `silu_mul`."""
    _check(gate, up)
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)


def gelu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Torch reference of `gelu_mul` (torch's tanh-approximate gelu is the same formula)."""
    _check(gate, up)
    return (torch.nn.functional.gelu(gate.float(), approximate="tanh") * up.float()).to(gate.dtype)


def _check(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate and up as [rows, d] (views where the strides allow)."""
    check_float(gate=gate, up=up)
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.dim() == 0:
        raise ValueError(f"gate and up must have one shape and dtype, got {gate.dtype} {tuple(gate.shape)} "
                         f"and {up.dtype} {tuple(up.shape)}")
    check_last_dim_contiguous(gate=gate, up=up)
    d = gate.shape[-1]
    return gate.reshape(-1, d), up.reshape(-1, d)
