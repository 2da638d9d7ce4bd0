"""Dequantization of a GGUF tensor's raw bytes into float32, float16 or bfloat16 values.

out[b * QK + j] = element j of block b, decoded by `blocks.decode_block` (the block layouts are documented
there). A tensor's bytes are its blocks in order (rows hold whole blocks), so the kernel works on the flat
sequence of blocks, a tile of TILE blocks per program. Float32 output is bit-exact with the reference
`ggtriton.gguf.dequantize`; float16 / bfloat16 output is that value rounded to nearest even.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..gguf.quants import check_size
from ..gguf.quants import dequantize as _gguf_dequantize
from ..gguf.types import TYPE_TRAITS, GGMLType
from ._common import FLOAT_DTYPES
from .blocks import decode_block, decode_planar, decode_table_tensor
from .planar import check_planar, from_planar

# Elements each program decodes: TILE = this // block elements.
_TILE_ELEMENTS = 4096


@triton.jit
def _to_bf16(v):
    """float32 -> bfloat16, round to nearest even (NaN stays NaN), spelled out: the interpreter's cast truncates."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits >> 16) | 0x40
    return tl.where(v != v, quiet_nan, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _dequant_kernel(raw_ptr, out_ptr, table_ptr, n_blocks, row_blocks, TYPE: tl.constexpr, QK: tl.constexpr,
                    BLOCK_BYTES: tl.constexpr, TILE: tl.constexpr, PLANAR: tl.constexpr):
    """Decode blocks [pid * TILE, pid * TILE + TILE) of raw (n_blocks blocks of BLOCK_BYTES bytes, rows of
    row_blocks; PLANAR: in the planar layout) into out."""
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * TILE + tl.arange(0, TILE)
    # Clamped so that decoding only reads valid blocks; the store is masked instead.
    src = tl.minimum(blk, n_blocks - 1)
    j = tl.arange(0, QK)
    if PLANAR:
        row_ptr = raw_ptr + (src // row_blocks * row_blocks * BLOCK_BYTES)[:, None]
        v = decode_planar(row_ptr, (src % row_blocks)[:, None], j[None, :], row_blocks, TYPE)
    else:
        v = decode_block(raw_ptr + src[:, None] * BLOCK_BYTES, j[None, :], table_ptr, TYPE)
    if out_ptr.dtype.element_ty == tl.bfloat16:
        v = _to_bf16(v)
    else:
        v = v.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + blk[:, None] * QK + j[None, :], v, mask=(blk < n_blocks)[:, None])


def dequantize(
    raw: torch.Tensor,
    ggml_type: int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    out: torch.Tensor | None = None,
    planar: bool = False,
) -> torch.Tensor:
    """Decode the raw bytes of a tensor of `ggml_type` into values of `shape` (PyTorch order) and `dtype`.

    `raw`: contiguous uint8 tensor on the device the kernel runs on (CPU under TRITON_INTERPRET=1), 2-byte
    aligned (4 for F32); `planar`: in the layout of `planar.to_planar` (its types only). `out`: optional
    contiguous tensor of `shape` and `dtype` to write into.
    """
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8 or not raw.is_contiguous():
        raise ValueError("raw must be a contiguous uint8 torch tensor")
    t = check_size(raw.numel(), ggml_type, shape)
    if planar:
        check_planar(t)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{t.name}: output dtype must be float32, float16 or bfloat16, got {dtype}")
    align = 4 if t == GGMLType.F32 else 2
    if raw.data_ptr() % align:
        raise ValueError(f"{t.name}: raw bytes must be {align}-byte aligned")
    shape = tuple(shape)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=raw.device)
    elif out.shape != shape or out.dtype != dtype or out.device != raw.device or not out.is_contiguous():
        raise ValueError(
            f"{t.name}: out must be a contiguous {dtype} tensor of shape {shape} on {raw.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    qk, block_bytes = TYPE_TRAITS[t].block_elements, TYPE_TRAITS[t].block_bytes
    n_blocks = raw.numel() // block_bytes
    if n_blocks == 0:
        return out
    table = decode_table_tensor(t, raw.device)
    tile = max(1, _TILE_ELEMENTS // qk)
    _dequant_kernel[(triton.cdiv(n_blocks, tile),)](
        raw, out, raw if table is None else table, n_blocks, max(1, shape[-1] // qk),
        TYPE=t.name, QK=qk, BLOCK_BYTES=block_bytes, TILE=tile, PLANAR=planar,
        enable_fp_fusion=False,  # keep d * q + m unfused: bit-exact with the reference
    )
    return out


def dequantize_ref(
    raw: torch.Tensor, ggml_type: int, shape: Sequence[int], dtype: torch.dtype = torch.float32, *,
    planar: bool = False,
) -> torch.Tensor:
    """Torch reference of `dequantize`: the GGUF reference dequantization, rounded to `dtype`."""
    if planar:
        raw = from_planar(raw, ggml_type, shape)
    return _gguf_dequantize(raw, ggml_type, shape).to(dtype)
