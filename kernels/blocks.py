"""Element decoders of the GGUF block formats that qgemv's word decoders do not take (all but `qgemv.GEMV_TYPES`):
for those types, the one source of truth for every kernel that reads them (the dequant kernel, qmatmul's element
paths, the fused MoE kernel's fallback).

Each `decode_<type>(blk_ptr, j[, table_ptr])` turns raw blocks into float32 values: `blk_ptr` points (uint8) at
the first byte of a block, `j` is an element index inside it (0 <= j < block elements), and the two broadcast
against each other, so a [blocks, 1] tile of pointers with a [1, elements] tile of indices decodes whole
blocks while fields shared by a block are loaded once per block. Loads are unmasked: callers point at valid
blocks only (clamping out-of-range block indices). Multi-byte fields are little-endian; fp16 fields sit at
even offsets and are loaded as 16-bit words, so the raw tensor must be 2-byte aligned (4 for F32).
`decode_block(blk_ptr, j, table_ptr, TYPE)` dispatches on the type name at compile time; `decode_table(t)`
is the lookup table a type reads through `table_ptr` (None if it needs none).

The value formulas are those of llama.cpp's `dequantize_row_*`, with products and sums rounded in the same
order as the torch reference `ggtriton.gguf.quants`; launch with `enable_fp_fusion=False` to keep them
unfused where bit-exactness matters.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from ..gguf.quant_tables import GRIDS, IQ1_DELTA, IQ4NL_VALUES, KSIGNS
from ..gguf.types import GGMLType

_IQ1_DELTA = tl.constexpr(IQ1_DELTA)
# Types whose table is the 128 sign patterns followed by the grid.
_SIGNED_GRIDS = (GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ3_XXS)


@functools.cache
def decode_table_tensor(ggml_type: GGMLType, device: torch.device) -> torch.Tensor | None:
    """`decode_table(ggml_type)` as a tensor on `device`, made once per device."""
    table = decode_table(ggml_type)
    return None if table is None else torch.from_numpy(table).to(device)


def decode_table(ggml_type: GGMLType) -> np.ndarray | None:
    """The uint8 table `decode_block` reads for `ggml_type` through `table_ptr`, or None."""
    if ggml_type in GRIDS:
        grid = GRIDS[ggml_type].reshape(-1).view(np.uint8)
        return np.concatenate([KSIGNS, grid]) if ggml_type in _SIGNED_GRIDS else grid
    if ggml_type == GGMLType.IQ4_NL:
        return IQ4NL_VALUES.view(np.uint8)
    return None


# Field loads.


@triton.jit
def _u8(ptr):
    return tl.load(ptr).to(tl.int32)


@triton.jit
def _i8(ptr):
    return tl.load(ptr).to(tl.int8, bitcast=True).to(tl.int32)


@triton.jit
def _u16(ptr):
    return tl.load(ptr.to(tl.pointer_type(tl.uint16))).to(tl.int32)


@triton.jit
def _u32(ptr):
    """A 32-bit word at an even offset, as int32 (mask after shifting: the shift is arithmetic)."""
    return _u16(ptr) | _u16(ptr + 2) << 16


@triton.jit
def _f16(ptr):
    return tl.load(ptr.to(tl.pointer_type(tl.float16))).to(tl.float32)


@triton.jit
def _f(x):
    return x.to(tl.float32)


# Plain floats: a block is one element.


@triton.jit
def decode_f32(blk_ptr, j):
    """F32: 4 bytes."""
    return tl.load(blk_ptr.to(tl.pointer_type(tl.float32)))


@triton.jit
def decode_f16(blk_ptr, j):
    """F16: 2 bytes."""
    return _f16(blk_ptr)


@triton.jit
def decode_bf16(blk_ptr, j):
    """BF16: 2 bytes, the top half of a float32."""
    return (_u16(blk_ptr) << 16).to(tl.float32, bitcast=True)


# 32-element blocks with one fp16 scale d; element j is nibble j // 16 of qs[j % 16].


@triton.jit
def _nibble(qs_ptr, j):
    return (_u8(qs_ptr + j % 16) >> (j // 16 * 4)) & 15


@triton.jit
def _bit(bits_ptr, j):
    """Bit j of a little-endian bit string."""
    return (_u8(bits_ptr + j // 8) >> (j % 8)) & 1


@triton.jit
def decode_q4_1(blk_ptr, j):
    """Q4_1, 32 elements in 20 bytes: d f16 @0 | m f16 @2 | qs[16] @4.  x = d * q + m."""
    return _f16(blk_ptr) * _f(_nibble(blk_ptr + 4, j)) + _f16(blk_ptr + 2)


@triton.jit
def decode_q5_1(blk_ptr, j):
    """Q5_1, 32 elements in 24 bytes: d f16 @0 | m f16 @2 | qh u32 @4 | qs[16] @8.  x = d * q + m."""
    q = _nibble(blk_ptr + 8, j) | _bit(blk_ptr + 4, j) << 4
    return _f16(blk_ptr) * _f(q) + _f16(blk_ptr + 2)


# K-quants: 256-element super-blocks of 16 or 8 sub-blocks with their own scales.


@triton.jit
def _crumb(qs_ptr, j):
    """2-bit field of element j (of 256) in 64 bytes: two halves of 32 bytes, each byte holding 4 elements 32 apart."""
    return (_u8(qs_ptr + j // 128 * 32 + j % 32) >> (j % 128 // 32 * 2)) & 3


@triton.jit
def decode_q2_k(blk_ptr, j):
    """Q2_K, 256 elements in 84 bytes: scales[16] @0 | qs[64] @16 | d f16 @80 | dmin f16 @82.

    Sub-block j // 16 has scale byte s: low nibble scales d, high nibble scales dmin;
    x = (d * (s & 15)) * q - dmin * (s >> 4), q the 2-bit field of j (`_crumb`).
    """
    s = _u8(blk_ptr + j // 16)
    dl = _f16(blk_ptr + 80) * _f(s & 15)
    ml = _f16(blk_ptr + 82) * _f(s >> 4)
    return dl * _f(_crumb(blk_ptr + 16, j)) - ml


@triton.jit
def decode_q3_k(blk_ptr, j):
    """Q3_K, 256 elements in 110 bytes: hmask[32] @0 | qs[64] @32 | scales[12] @96 | d f16 @108.

    Sub-block i = j // 16 has a 6-bit scale: low 4 bits = nibble i // 8 of scales[i % 8], high 2 bits =
    bits 2 (i // 4) of scales[8 + i % 4]; it is stored + 32. q = 2-bit field of j (`_crumb`) - 4 unless
    bit j // 32 of hmask[j % 32] is set. x = (d * (scale - 32)) * q.
    """
    i = j // 16
    lo = (_u8(blk_ptr + 96 + i % 8) >> (i // 8 * 4)) & 15
    hi = (_u8(blk_ptr + 104 + i % 4) >> (i // 4 * 2)) & 3
    dl = _f16(blk_ptr + 108) * _f((lo | hi << 4) - 32)
    h = (_u8(blk_ptr + j % 32) >> (j // 32)) & 1
    return dl * _f(_crumb(blk_ptr + 32, j) - ((h ^ 1) << 2))


# Ternary formats: x = d * (q - 1).


@triton.jit
def decode_tq1_0(blk_ptr, j):
    """TQ1_0, 256 elements in 54 bytes: qs[48] @0 | qh[4] @48 | d f16 @52.

    Each byte holds 5 (qh: 4) base-3 digits as a fixed-point fraction; digit k of byte b is
    ((b * 3^k) mod 256) * 3 >> 8. Elements 0..159: digit j // 32 of qs[j % 32]; 160..239: digit (j - 160) // 16
    of qs[32 + j % 16]; 240..255: digit (j - 240) // 4 of qh[j % 4].
    """
    off = tl.where(j < 160, j % 32, tl.where(j < 240, 32 + j % 16, 48 + j % 4))
    k = tl.where(j < 160, j // 32, tl.where(j < 240, (j - 160) // 16, (j - 240) // 4))
    pow3 = tl.where(k == 0, 1, tl.where(k == 1, 3, tl.where(k == 2, 9, tl.where(k == 3, 27, 81))))
    q = (((_u8(blk_ptr + off) * pow3) & 255) * 3 >> 8) - 1
    return _f16(blk_ptr + 52) * _f(q)


@triton.jit
def decode_tq2_0(blk_ptr, j):
    """TQ2_0, 256 elements in 66 bytes: qs[64] @0 (2-bit fields, `_crumb`) | d f16 @64."""
    return _f16(blk_ptr + 64) * _f(_crumb(blk_ptr, j) - 1)


# Non-linear 4-bit codebooks (table: 16 int8 values).


@triton.jit
def _value(table_ptr, q):
    return _f(_i8(table_ptr + q))


@triton.jit
def decode_iq4_nl(blk_ptr, j, table_ptr):
    """IQ4_NL, 32 elements in 18 bytes: d f16 @0 | qs[16] @2 (nibbles as Q4_0).  x = d * values[q]."""
    return _f16(blk_ptr) * _value(table_ptr, _nibble(blk_ptr + 2, j))


# I-quants: groups of 8 (IQ3: 4) values from a grid of lattice points, each with a sign.
# Tables: IQ2_XXS, IQ2_XS, IQ3_XXS: the 128 sign patterns (byte p: bit k negates value k) then the grid;
# the others: the grid alone. Grid entry g, coordinate k is byte g * width + k.


@triton.jit
def _signed(v, pattern, j):
    # a product by -1, not `-v`: Triton 3.6 lowers negation to 0 - v, which makes -0.0 of 0.0 a +0.0
    return v * tl.where(((pattern >> (j % 8)) & 1) != 0, -1.0, 1.0)


@triton.jit
def decode_iq2_xxs(blk_ptr, j, table_ptr):
    """IQ2_XXS, 256 elements in 66 bytes: d f16 @0 | 8 groups of 32 elements, 8 bytes each @2 + 8 ib.

    A group holds 4 grid indices (bytes 0..3, one per 8 elements) and a u32 (bytes 4..7): bits 7l..7l+6 select
    the sign pattern of the l-th 8 elements, bits 28..31 the scale s. x = (d * (0.5 + s) * 0.25) * grid, signed.
    """
    g_ptr = blk_ptr + 2 + j // 32 * 8
    aux = _u32(g_ptr + 4)
    db = _f16(blk_ptr) * (0.5 + _f((aux >> 28) & 15)) * 0.25
    sub = j % 32 // 8
    v = db * _f(_u8(table_ptr + 128 + _u8(g_ptr + sub) * 8 + j % 8))
    return _signed(v, _u8(table_ptr + ((aux >> (7 * sub)) & 127)), j)


@triton.jit
def decode_iq2_xs(blk_ptr, j, table_ptr):
    """IQ2_XS, 256 elements in 74 bytes: d f16 @0 | qs[32] u16 @2 | scales[8] @66.

    qs[j // 8]: bits 0..8 grid index, bits 9..15 sign pattern. Sub-block i = j // 16 has scale s = nibble i % 2
    of scales[i // 2]. x = (d * (0.5 + s) * 0.25) * grid, signed.
    """
    q = _u16(blk_ptr + 2 + j // 8 * 2)
    i = j // 16
    s = (_u8(blk_ptr + 66 + i // 2) >> (i % 2 * 4)) & 15
    db = _f16(blk_ptr) * (0.5 + _f(s)) * 0.25
    v = db * _f(_u8(table_ptr + 128 + (q & 511) * 8 + j % 8))
    return _signed(v, _u8(table_ptr + (q >> 9)), j)


@triton.jit
def decode_iq2_s(blk_ptr, j, table_ptr):
    """IQ2_S, 256 elements in 82 bytes: d f16 @0 | qs[32] @2 | signs[32] @34 | qh[8] @66 | scales[8] @74.

    Grid index of the k-th 8 elements (k = j // 8): qs[k] | (bits 2 (k % 4) of qh[k // 4]) << 8; sign: bit j of
    signs. Scales as IQ2_XS. x = (d * (0.5 + s) * 0.25) * grid, signed.
    """
    k = j // 8
    g = _u8(blk_ptr + 2 + k) | ((_u8(blk_ptr + 66 + k // 4) >> (k % 4 * 2)) & 3) << 8
    i = j // 16
    s = (_u8(blk_ptr + 74 + i // 2) >> (i % 2 * 4)) & 15
    db = _f16(blk_ptr) * (0.5 + _f(s)) * 0.25
    v = db * _f(_u8(table_ptr + g * 8 + j % 8))
    return _signed(v, _u8(blk_ptr + 34 + k), j)


@triton.jit
def decode_iq3_xxs(blk_ptr, j, table_ptr):
    """IQ3_XXS, 256 elements in 98 bytes: d f16 @0 | qs[64] @2 (grid index of each 4 elements) | aux u32[8] @66.

    aux[j // 32]: bits 7l..7l+6 sign pattern of the l-th 8 elements of the group, bits 28..31 scale s.
    x = (d * (0.5 + s) * 0.5) * grid, signed.
    """
    aux = _u32(blk_ptr + 66 + j // 32 * 4)
    db = _f16(blk_ptr) * (0.5 + _f((aux >> 28) & 15)) * 0.5
    v = db * _f(_u8(table_ptr + 128 + _u8(blk_ptr + 2 + j // 4) * 4 + j % 4))
    return _signed(v, _u8(table_ptr + ((aux >> (7 * (j % 32 // 8))) & 127)), j)


@triton.jit
def decode_iq3_s(blk_ptr, j, table_ptr):
    """IQ3_S, 256 elements in 110 bytes: d f16 @0 | qs[64] @2 | qh[8] @66 | signs[32] @74 | scales[4] @106.

    Grid index of the k-th 4 elements (k = j // 4): qs[k] | (bit k of qh) << 8; sign: bit j of signs. Sub-block
    i = j // 32 has s = nibble i % 2 of scales[i // 2]. x = (d * (1 + 2 s)) * grid, signed.
    """
    k = j // 4
    g = _u8(blk_ptr + 2 + k) | _bit(blk_ptr + 66, k) << 8
    i = j // 32
    s = (_u8(blk_ptr + 106 + i // 2) >> (i % 2 * 4)) & 15
    db = _f16(blk_ptr) * _f(1 + 2 * s)
    v = db * _f(_u8(table_ptr + g * 4 + j % 4))
    return _signed(v, _u8(blk_ptr + 74 + j // 8), j)


@triton.jit
def decode_iq1_s(blk_ptr, j, table_ptr):
    """IQ1_S, 256 elements in 50 bytes: d f16 @0 | qs[32] @2 | qh u16[8] @34 (grid values -1, 0, 1).

    qh[j // 32]: bits 3l..3l+2 top bits of the l-th grid index (low byte: qs[j // 8]), bits 12..14 scale s,
    bit 15 the sign of delta. x = (d * (2 s + 1)) * (grid + delta), delta = +-0.125.
    """
    h = _u16(blk_ptr + 34 + j // 32 * 2)
    dl = _f16(blk_ptr) * _f(2 * ((h >> 12) & 7) + 1)
    delta = tl.where((h & 0x8000) != 0, -_IQ1_DELTA, _IQ1_DELTA)
    g = _u8(blk_ptr + 2 + j // 8) | ((h >> (3 * (j % 32 // 8))) & 7) << 8
    return dl * (_f(_i8(table_ptr + g * 8 + j % 8)) + delta)


@triton.jit
def decode_iq1_m(blk_ptr, j, table_ptr):
    """IQ1_M, 256 elements in 56 bytes: qs[32] @0 | qh[16] @32 | scales u16[4] @48 (grid values -1, 0, 1).

    The fp16 super-scale d is the top nibbles of the 4 scale words (word w gives bits 4w..4w+3). Sub-block
    i = j // 16 has s = bits 3 (i % 4) of scales[i // 4]. qh nibble k % 2 of qh[k // 2] (k = j // 8): bits 0..2 top
    bits of grid index k (low byte qs[k]), bit 3 the sign of delta. x = (d * (2 s + 1)) * (grid + delta).
    """
    d_bits = (
        (_u16(blk_ptr + 48) >> 12)
        | (_u16(blk_ptr + 50) >> 12) << 4
        | (_u16(blk_ptr + 52) >> 12) << 8
        | (_u16(blk_ptr + 54) >> 12) << 12
    )
    d = d_bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    i = j // 16
    s = (_u16(blk_ptr + 48 + i // 4 * 2) >> (i % 4 * 3)) & 7
    dl = d * _f(2 * s + 1)
    k = j // 8
    h = (_u8(blk_ptr + 32 + k // 2) >> (k % 2 * 4)) & 15
    delta = tl.where((h & 8) != 0, -_IQ1_DELTA, _IQ1_DELTA)
    g = _u8(blk_ptr + k) | (h & 7) << 8
    return dl * (_f(_i8(table_ptr + g * 8 + j % 8)) + delta)


@triton.jit
def decode_block(blk_ptr, j, table_ptr, TYPE: tl.constexpr):
    """Element j of the block at blk_ptr of the GGUF type named TYPE (a `GGMLType` name), as float32."""
    if TYPE == "F32":
        v = decode_f32(blk_ptr, j)
    elif TYPE == "F16":
        v = decode_f16(blk_ptr, j)
    elif TYPE == "BF16":
        v = decode_bf16(blk_ptr, j)
    elif TYPE == "Q4_1":
        v = decode_q4_1(blk_ptr, j)
    elif TYPE == "Q5_1":
        v = decode_q5_1(blk_ptr, j)
    elif TYPE == "Q2_K":
        v = decode_q2_k(blk_ptr, j)
    elif TYPE == "Q3_K":
        v = decode_q3_k(blk_ptr, j)
    elif TYPE == "TQ1_0":
        v = decode_tq1_0(blk_ptr, j)
    elif TYPE == "TQ2_0":
        v = decode_tq2_0(blk_ptr, j)
    elif TYPE == "IQ4_NL":
        v = decode_iq4_nl(blk_ptr, j, table_ptr)
    elif TYPE == "IQ2_XXS":
        v = decode_iq2_xxs(blk_ptr, j, table_ptr)
    elif TYPE == "IQ2_XS":
        v = decode_iq2_xs(blk_ptr, j, table_ptr)
    elif TYPE == "IQ2_S":
        v = decode_iq2_s(blk_ptr, j, table_ptr)
    elif TYPE == "IQ3_XXS":
        v = decode_iq3_xxs(blk_ptr, j, table_ptr)
    elif TYPE == "IQ3_S":
        v = decode_iq3_s(blk_ptr, j, table_ptr)
    elif TYPE == "IQ1_S":
        v = decode_iq1_s(blk_ptr, j, table_ptr)
    else:
        tl.static_assert(TYPE == "IQ1_M", "unsupported GGUF block type")
        v = decode_iq1_m(blk_ptr, j, table_ptr)
    return v
