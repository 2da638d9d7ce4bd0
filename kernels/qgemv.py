"""Products of activations with a weight kept in GGUF blocks, decoded from 32-bit words: the decode step's matmul
at the bandwidth limit (1 to 16 rows of x), and GEMM tiles for more rows.

    out[m, n] = sum_k x[m, k] * W[n, k]        (x: M rows of K values; W: (N, K) in blocks of QK elements)

Decoding reads every weight byte once per token, so this loop must issue few instructions per weight byte: an
H200 SM issues 4 warp instructions per clock and must take in ~18 bytes per clock to stream HBM, so above ~0.22
warp instructions per byte the loop, not memory, sets the speed (bench/sass.py reads the count from the SASS).
What keeps it low:
- Each thread owns whole runs of a block's quants in each of its rows (R rows per thread share one set of x
  values): 16-byte loads of words, neighbouring threads on neighbouring bytes of a row. Block headers (d, dmin,
  packed scales) are loaded and decoded once per (row, block) piece a thread owns.
- A b-bit field at bit P (P + b <= 23) of a word w is turned into a float by one AND: (w & mask) read as a
  float32 is the denormal q * 2^(P - 149), exact (and up to P + b = 24: a set bit 23 is exponent 1, the same
  scale). A backend that flushes denormals (DENORMAL=False, HIP) adds the field to a float's mantissa with an
  exponent instead, and subtracts that float's base, exact too, at one FADD more per weight.
- Nibbles that index a 16-value table (IQ4_XS, MXFP4) are looked up 4 at a time by byte permutes (PRMT) from the
  table held in registers, as bytes value + offset, which then are 8-bit fields as Q8_0's (see `_lookup`).
- One row of x (BLOCK_M = 1, a GEMV): x is pre-scaled per field position by 2^(149 - S - P), so every product
  x' * f is x * q * 2^-S; one FFMA per weight accumulates it, and the block scale (times 2^S) multiplies the
  sums once per sub-block. S = 80 keeps x' finite for |x| < 2^59 and the products normal for |x| >= 2^-46.
  Offsets (q - 8, q - 32, q + 128 for int8) and K-quant mins use the per-sub-block sums of x, computed once per
  thread and shared by its rows.
- 2 to 16 rows (BLOCK_M = 16, batched decode, speculative verification): each weight is decoded once whatever M
  is, into a tile multiplied on the tensor cores (the weights the left operand, which Hopper's wgmma takes from
  registers, where the code below says so). Two ways:
  - Q4_K, Q5_K, IQ4_XS and MXFP4 (`_f16_rows`): the weights as small integers in float16, a sub-block's scale
    times its quant (exact for the K-quants; IQ4_XS rounds once to 11 bits above 2048; MXFP4: its value times the
    block's power of two relative to the largest of its step), made from the quant bytes by one byte permute (to
    1024 + q) and one HFMA2 per two weights; x's rows are scaled per block by a power of two into float16's range
    (bench/sass.py: no conversion per weight, about the cost of one row of x per byte); the block scale d (K-quants:
    and the mins, one small dot against x's sums per sub-block) applies once per block to the products.
  - The others: one FFMA per weight scales the field (by dl * 2^(149 - P), and 2^-T) and adds the offset or min,
    the tile is rounded to x's dtype, one tl.dot per field position (K = 16 to 64 elements; Q8_0 and Q5_0: one per
    step, K = 256, the fields joined in element order so that x is read as contiguous runs).
- More than 16 rows (prefill): the same decoding into tiles of BLOCK_M = 32 to 128 rows of x, program_id(2)
  picking the tile, so each weight is decoded once per BLOCK_M rows: at [128, 128] tiles the loop issues about one
  warp instruction per 1000 FLOPs (bench/sass.py), about what the tensor cores' peak allows.

Block layouts of these types in the file (little-endian; element j of a block; q its unsigned field):
    Q4_0    32 in 18 bytes: d f16 @0 | qs[16] @2, q = nibble j // 16 of qs[j % 16]               x = d * (q - 8)
    Q5_0    32 in 22 bytes: d f16 @0 | qh u32 @2 | qs[16] @6, as Q4_0 with bit j of qh on top    x = d * (q - 16)
    Q8_0    32 in 34 bytes: d f16 @0 | qs[32] int8 @2                                           x = d * qs[j]
    MXFP4   32 in 17 bytes: e u8 @0 | qs[16] @1 as Q4_0, E2M1 codes    x = 2^(e - 128) * (doubled E2M1 value of q)
            (e < 2: a subnormal scale)
    Q4_K   256 in 144 bytes: d f16 @0 | dmin f16 @2 | scales[12] @4 | qs[128] @16, q = nibble j // 32 % 2 of
            qs[j // 64 * 32 + j % 32]; sub-block i = j // 32 has a 6-bit scale and min: i < 4: scales[i] & 63,
            scales[i + 4] & 63; else (scales[i + 4] & 15) | (scales[i - 4] >> 6) << 4, (scales[i + 4] >> 4) |
            (scales[i] >> 6) << 4                                                    x = (d * scale) * q - dmin * min
    Q5_K   256 in 176 bytes: d | dmin | scales[12] @4 | qh[32] @16 | qs[128] @48, as Q4_K with bit j // 32 of
            qh[j % 32] on top
    Q6_K   256 in 210 bytes: ql[128] @0 | qh[64] @128 | scales[16] int8 @192 | d f16 @208, q = nibble j % 128 // 64
            of ql[j // 128 * 64 + j % 64] | (crumb j % 128 // 32 of qh[j // 128 * 32 + j % 32]) << 4
                                                                                    x = (d * scales[j // 16]) * (q - 32)
    IQ4_XS 256 in 136 bytes: d f16 @0 | scales_h u16 @2 | scales_l[4] @4 | qs[128] @8; sub-block i = j // 32: its
            16 bytes at qs[16 i] as Q4_0, scale = nibble i % 2 of scales_l[i // 2] | (crumb i of scales_h) << 4
                                                                               x = (d * (scale - 32)) * IQ4_NL[q]
Every path decodes them here (dequant.py's kernel too, in the store mode of `walk`): the values are the reference's,
rounded as it rounds them.

Types: Q4_K and Q5_K (16-byte aligned blocks) and IQ4_XS (8-byte aligned: 8-byte loads) read the file's layout;
Q4_0, Q5_0, Q8_0 and Q6_K read the planar layout of `planar.py` (their file blocks are 2-byte aligned), MXFP4 (17-byte
blocks) its planes per matrix. Split-K: program (pid, s) covers blocks
[s * split_blocks, (s + 1) * split_blocks) of its rows and stores float32 partial sums; the last program of a row
tile to arrive (an atomic counter per tile) adds them in range order, so a split product is one launch and the
same bits every run. Up to three weights of one type and K (q, k and v; gate and up) share a launch: the grid
spans their row tiles, each program reading its own tensor, and the outputs are columns of one result.

Fused epilogues (the loop over the weight is the same code): the residual add of a product and the sums of squares
of an RMSNorm after it (NORM_OUT, leaving a `rmsnorm.PendingNorm`), the norm's rstd scaling the rows of the next
product (NORM_IN: (y * rstd) @ W^T = rstd * (y @ W^T)), and act(gate) * up of a gate/up launch (ACT: gate tile t
and up tile t count their arrivals at one counter, and the last of their programs, over all K ranges, combines
them). A decoder layer then launches q/k/v, RoPE + KV store, attention, o, gate/up and down: 6 launches, not 9.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl
from triton import knobs
from triton.language.target_info import is_cuda

from ..gguf.quant_tables import IQ4NL_VALUES, MXFP4_VALUES
from ..gguf.types import TYPE_TRAITS, GGMLType
from ._common import ARRIVAL_COUNTERS, arrival_counters, backend, dot, f32_dot, to_bf16
from .activations import activate
from .planar import MATRIX_PLANAR_TYPES, RELAID_TYPES, from_planar, to_planar
from .rmsnorm import rms_rstd, store_sumsq

GEMV_TYPES = frozenset({GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.Q8_0, GGMLType.Q4_0,
                        GGMLType.Q5_0, GGMLType.IQ4_XS, GGMLType.MXFP4})
MAX_M = 16  # rows of x the kernel takes: one tensor-core tile

_S = tl.constexpr(80)
# 2..16 rows: the decoded weights are q * dl + bias times 2^-T, the products scaled back once at the end. The
# factor dl * 2^(149 - T - P) then stays finite for any fp16-derived dl, and the weights stay within bfloat16's
# normal range (not float16's: float16 activations decode with DENORMAL off).
_T = tl.constexpr(64)

# Autotune configs (BLOCK_N, num_warps) per backend, for one row of x and for 2..16: 4-8 rows of W per thread
# (each thread holds R rows of a 16-32-byte run in registers; more rows share more x loads). Unmeasured on a GPU;
# `_prune` keeps out those that spill on sm_90 (bench/sass.py). The interpreter's are small so tests cross row
# tiles.
_CONFIGS = {
    "cuda": [(32, 2), (64, 2), (128, 4), (256, 4)],
    "hip": [(64, 2), (128, 4)],  # unmeasured
    "interpreter": [(16, 1)],
}
_DOT_CONFIGS = {
    "cuda": [(64, 4), (128, 4), (128, 8), (256, 8)],
    "hip": [(64, 4), (128, 4)],  # unmeasured
    "interpreter": [(16, 1)],
}
# GEMM tiles (BLOCK_M, BLOCK_N, num_warps) for more than MAX_M rows of x: each weight tile is decoded once per
# BLOCK_M rows. Unmeasured on a GPU; [128, 256] tiles spill for every type but Q4_K (bench/sass.py).
_GEMM_CONFIGS = {
    "cuda": [(32, 64, 4), (64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 128, 8)],
    "hip": [(64, 64, 4), (128, 64, 4)],  # unmeasured
    "interpreter": [(32, 16, 1)],
}
_M_BUCKET_CAP = 1024  # autotune key: M rounded up to a power of two, at most this
_SPLIT_ROWS = 128  # rows per program assumed when sizing split-K
_STEP = 8  # 32-element types: blocks a program decodes per row per step
_BLOCKS_PER_STEP = tl.constexpr(_STEP)
_INTERPRETED = tl.constexpr(knobs.runtime.interpret)  # triton.jit made interpreted functions (TRITON_INTERPRET=1)
_STORE = tl.constexpr(0)  # BLOCK_M of the decoders' store mode: the dequant kernel's (dequant.py)
_IQ4NL_OFFSET = tl.constexpr(128)  # the table bytes are value + offset: IQ4_NL's values are -127..113,
_MXFP4_OFFSET = tl.constexpr(12)  # MXFP4's (doubled E2M1) -12..12


@triton.jit
def _f16(bits):
    """The float32 value of the fp16 in the low 16 bits of an int32."""
    return (bits & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _field(w, P: tl.constexpr, BITS: tl.constexpr, DENORMAL: tl.constexpr):
    """The BITS-bit unsigned field at bit P of w (P + BITS <= 23) as q * 2^(P - 149) (DENORMAL) or q."""
    bits = w & (((1 << BITS) - 1) << P)
    if DENORMAL:
        return bits.to(tl.float32, bitcast=True)
    return (bits | ((150 - P) << 23)).to(tl.float32, bitcast=True) - 2.0 ** (23 - P)


@triton.jit
def _store_weights(ptr, v, mask):
    """Store decoded weights v at ptr (mask None: all) in ptr's dtype, rounded to nearest even."""
    if ptr.dtype.element_ty == tl.bfloat16:
        v = to_bf16(v)
    else:
        v = v.to(ptr.dtype.element_ty)
    if mask is None:
        tl.store(ptr, v)
    else:
        tl.store(ptr, v, mask=mask)


@triton.jit
def _runs(acc, v, x_ptr, xm, x_stride, e, RUN: tl.constexpr, mask, BLOCK_M: tl.constexpr, F32: tl.constexpr,
          W_LEFT: tl.constexpr):
    """acc plus the weights v [BN, L * RUN], runs of RUN elements from each of e [L] (mask: None, or [L] the runs
    in range), times the rows xm of x read as contiguous runs (one tl.dot): [BN, BLOCK_M] (W_LEFT: the weights the
    tensor cores' left operand) or [BLOCK_M, BN]; or, in the store mode, v stored at x_ptr, rows xm."""
    BN: tl.constexpr = v.shape[0]
    L: tl.constexpr = e.shape[0]
    x_at = x_ptr + xm[:, None, None] * x_stride + e[None, :, None] + tl.arange(0, RUN)[None, None, :]
    m3 = None if mask is None else mask[None, :, None]
    if BLOCK_M == _STORE:
        _store_weights(x_at, tl.reshape(v, [BN, L, RUN]), m3)
    else:
        if mask is None:
            xt = tl.load(x_at)
        else:
            xt = tl.load(x_at, mask=m3, other=0.0)
        acc = _mma(acc, v, tl.reshape(xt, [xm.shape[0], L * RUN]), F32, W_LEFT)
    return acc


@triton.jit
def _mma(acc, v, xt, F32: tl.constexpr, W_LEFT: tl.constexpr):
    """acc plus the weights v [BN, K] (rounded to x's dtype) times the rows of x xt [BLOCK_M, K]: [BN, BLOCK_M]
    where W_LEFT (the weights the tensor cores' left operand), else [BLOCK_M, BN]."""
    if not F32:
        v = v.to(xt.dtype)
    if W_LEFT:
        acc += dot(v, tl.trans(xt), F32)
    else:
        acc += dot(xt, tl.trans(v), F32)
    return acc


@triton.jit
def _x(x_ptr, mask, P: tl.constexpr, DENORMAL: tl.constexpr):
    """(x, x') at x_ptr (mask None: all in range): x' * _field(.., P, ..) = x * q * 2^-S."""
    if mask is None:
        x = tl.load(x_ptr).to(tl.float32)
    else:
        x = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    if DENORMAL:
        return x, x * 2.0 ** (149 - _S - P)
    return x, x * 2.0 ** (-_S)


@triton.jit
def _take(s, sx, acc, w, P: tl.constexpr, BITS: tl.constexpr, x_ptr, e, mask, dl, bias, xm, x_stride,
          DENORMAL: tl.constexpr, BLOCK_M: tl.constexpr, F32: tl.constexpr, W_LEFT: tl.constexpr = False,
          OFFSET: tl.constexpr = 0.0):
    """The weights of field position P of the words w [BN, A, B], elements e [A, B] of the block at x_ptr.

    BLOCK_M = 1: s += field * x', sx += x. Else acc [BLOCK_M, BN] += x[xm, e] @ (field * dl + bias)^T, with dl and
    bias (broadcast against w) the block's scale and offset, the weights rounded to x's dtype for tl.dot; W_LEFT:
    acc [BN, BLOCK_M] += (field * dl + bias) @ x[xm, e]^T, the weights the tensor cores' left operand.
    BLOCK_M = 0 (`_STORE`, DENORMAL off): the weights stored at x_ptr, row xm of x_stride elements, element e:
    (field - OFFSET) * dl where the type's offset OFFSET is not 0 (bias = -OFFSET * dl), else field * dl + bias,
    the reference's formula and rounding (a zero keeps the reference's sign).
    """
    f = _field(w, P, BITS, DENORMAL)
    if BLOCK_M == 1:
        x, xs = _x(x_ptr + e, mask, P, DENORMAL)
        s += f * xs[None]
        sx += x
    elif BLOCK_M == _STORE:
        v = (f - OFFSET) * dl if OFFSET != 0.0 else f * dl + bias
        _store_weights(x_ptr + xm[:, None, None] * x_stride + e[None], v, mask)
    else:
        if DENORMAL:  # weights times 2^-T (see _T)
            v = f * (dl * 2.0 ** (149 - _T - P)) + bias * 2.0 ** (-_T)
        else:
            v = f * dl + bias
        BN: tl.constexpr = v.shape[0]
        EL: tl.constexpr = v.shape[1] * v.shape[2]
        ptr = x_ptr + xm[:, None] * x_stride + tl.reshape(e, [EL])[None, :]
        if mask is None:
            xt = tl.load(ptr)
        else:
            xt = tl.load(ptr, mask=tl.reshape(tl.broadcast_to(mask, e.shape), [EL])[None, :], other=0.0)
        acc = _mma(acc, tl.reshape(v, [BN, EL]), xt, F32, W_LEFT)
    return s, sx, acc


# K-quants with 6-bit scales (Q4_K, Q5_K): a thread owns run r (elements 64r..64r+63: the low nibbles of 32 qs bytes,
# sub-block 2r, and their high nibbles, sub-block 2r+1) of one block of a row.


@triton.jit
def _k4_scale_bits(blk, r):
    """(d | dmin << 16, then the 6-bit scales of sub-blocks 2r and 2r + 1 and their mins) of the Q4_K / Q5_K block
    at int32 pointer blk [BN, 1]."""
    h = tl.load(blk)
    s0 = tl.load(blk + 1)
    s1 = tl.load(blk + 2)
    s2 = tl.load(blk + 3)
    low = r < 2  # sub-blocks 0..3: 6 bits of bytes 0..3 (scales) and 4..7 (mins); 4..7 spread over all 12 bytes
    sc = tl.where(low, s0 & 0x3F3F3F3F, (s2 & 0x0F0F0F0F) | ((s0 >> 2) & 0x30303030))
    mn = tl.where(low, s1 & 0x3F3F3F3F, ((s2 >> 4) & 0x0F0F0F0F) | ((s1 >> 2) & 0x30303030))
    shift = (r % 2) * 16
    return h, (sc >> shift) & 63, (sc >> (shift + 8)) & 63, (mn >> shift) & 63, (mn >> (shift + 8)) & 63


@triton.jit
def _k4_scales(blk, r):
    """d * scale and dmin * min of sub-blocks 2r and 2r+1 of the Q4_K / Q5_K block at int32 pointer blk [BN, 1]."""
    h, sc0, sc1, mn0, mn1 = _k4_scale_bits(blk, r)
    d = _f16(h)
    dmin = _f16(h >> 16)
    return d * sc0.to(tl.float32), d * sc1.to(tl.float32), dmin * mn0.to(tl.float32), dmin * mn1.to(tl.float32)


@triton.jit
def _k4_quarter(s0, s1, sx0, sx1, acc, q, qh, hs, x_ptr, e, dl0, b0, dl1, b1, xm, x_stride,
                DENORMAL: tl.constexpr, FIFTH: tl.constexpr, BLOCK_M: tl.constexpr, F32: tl.constexpr):
    """4 words q [BN, 4, 4] of qs (run r, bytes 4g + t): low nibbles (elements e + t; sums s0, sx0; scale dl0,
    bias b0) and high nibbles (e + 32 + t; s1, sx1, dl1, b1). FIFTH: qh [BN, 4, 4] holds the fifth bits (Q5_K), bit
    hs of the byte for lows and hs + 1 for highs, moved next to each nibble."""
    if FIFTH:
        # bit 2r (2r + 1) of each qh byte to bit 4 (bit 8) of it: the fifth bit of the low (high) nibble
        lo5 = tl.where(hs <= 4, qh << tl.maximum(4 - hs, 0), qh >> tl.maximum(hs - 4, 0))
        hi5 = tl.where(hs <= 3, qh << tl.maximum(3 - hs, 0), qh >> tl.maximum(hs - 3, 0))
        lo = (q & 0x0F0F0F0F) | (lo5 & 0x10101010)
        hi = ((q >> 4) & 0x0F0F0F0F) | (hi5 & 0x10101010)
        for t in tl.static_range(3):
            s0, sx0, acc = _take(s0, sx0, acc, lo, 8 * t, 5, x_ptr, e + t, None, dl0, b0, xm, x_stride,
                                 DENORMAL, BLOCK_M, F32)
            s1, sx1, acc = _take(s1, sx1, acc, hi, 8 * t, 5, x_ptr, e + 32 + t, None, dl1, b1, xm, x_stride,
                                 DENORMAL, BLOCK_M, F32)
        s0, sx0, acc = _take(s0, sx0, acc, lo >> 16, 8, 5, x_ptr, e + 3, None, dl0, b0, xm, x_stride,
                             DENORMAL, BLOCK_M, F32)
        s1, sx1, acc = _take(s1, sx1, acc, hi >> 16, 8, 5, x_ptr, e + 35, None, dl1, b1, xm, x_stride,
                             DENORMAL, BLOCK_M, F32)
    else:
        u = q >> 12  # nibbles at bits 20, 24, 28 to 8, 12, 16: a field must end below the exponent (bit 23)
        for t in tl.static_range(3):  # low nibbles of bytes 0..2 at bits 8t, high ones of bytes 0..1 at 8t + 4
            s0, sx0, acc = _take(s0, sx0, acc, q, 8 * t, 4, x_ptr, e + t, None, dl0, b0, xm, x_stride, DENORMAL,
                                 BLOCK_M, F32)
        for t in tl.static_range(2):
            s1, sx1, acc = _take(s1, sx1, acc, q, 8 * t + 4, 4, x_ptr, e + 32 + t, None, dl1, b1, xm, x_stride,
                                 DENORMAL, BLOCK_M, F32)
        s1, sx1, acc = _take(s1, sx1, acc, u, 8, 4, x_ptr, e + 34, None, dl1, b1, xm, x_stride, DENORMAL, BLOCK_M,
                             F32)
        s0, sx0, acc = _take(s0, sx0, acc, u, 12, 4, x_ptr, e + 3, None, dl0, b0, xm, x_stride, DENORMAL, BLOCK_M,
                             F32)
        s1, sx1, acc = _take(s1, sx1, acc, u, 16, 4, x_ptr, e + 35, None, dl1, b1, xm, x_stride, DENORMAL, BLOCK_M,
                             F32)
    return s0, s1, sx0, sx1, acc


@triton.jit
def _f16_ints(u, top):
    """The bytes of words u [A, B, W] as float16 1024 + byte, exact: [A, B, 4 W], in byte order. Their top byte is
    the constant 0x64, so one byte permute with top (0x64646464 broadcast against u, loaded: as a constant, ptxas
    would move it into a register before every permute, see `_table`) builds two of them from two bytes of u."""
    zero = tl.zeros_like(u)
    w01 = _perm(u, top, zero + 0x4140)  # bytes u0, 0x64, u1, 0x64
    w23 = _perm(u, top, zero + 0x4342)
    v = tl.join(w01, w23)
    v = tl.join(v & 0xFFFF, v >> 16)  # [.., 2, 2]: bytes (0, 1), (2, 3)
    return tl.reshape(v.to(tl.int16), [u.shape[0], u.shape[1], 4 * u.shape[2]]).to(tl.float16, bitcast=True)


@triton.jit
def _int_weights(f, s, BASE: tl.constexpr, XT: tl.constexpr):
    """(f - BASE) * s for the float16 integers f (`_f16_ints`) and scales s (float16, broadcast against f), as one
    FMA f * s - BASE * s rounded once to XT: on CUDA in float16 two at a time (one HFMA2); float32 (XT, for float32
    x) exact."""
    if XT == tl.float32:
        s = s.to(tl.float32)
        return tl.fma(f.to(tl.float32), s, -BASE * s)
    f, s = tl.broadcast(f, s)
    if not _INTERPRETED and is_cuda():
        return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [f, s, -BASE * s],
                                         dtype=tl.float16, is_pure=True, pack=2)
    return tl.fma(f, s, -BASE * s)


@triton.jit
def _x_scales(xt):
    """(2^-j [BLOCK_M, 1], 2^j [BLOCK_M]) for rows xt [BLOCK_M, K] (float32): j brings each row's largest value to
    [2^9, 2^10), where float16 holds bfloat16's and float16's values exactly down to 2^-14, 2^-23 of the largest
    (any power of two from 2^-126 to 2^126: zeros, infinities and NaN keep their meaning)."""
    big = (tl.max(tl.abs(xt), axis=1).to(tl.int32, bitcast=True) >> 23) - 127  # exponent of the largest
    j = tl.minimum(tl.maximum(big - 9, -126), 126)
    return ((127 - j) << 23).to(tl.float32, bitcast=True)[:, None], ((127 + j) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _k4_rows(acc, w_ptr, row, b, x_ptr, table_ptr, xm, x_stride, BLOCK_BYTES: tl.constexpr, DENORMAL: tl.constexpr,
             FIFTH: tl.constexpr, F32: tl.constexpr):
    """acc [BN, BLOCK_M] plus Q4_K or Q5_K (FIFTH) block b of rows `row` (byte offsets [BN]) times 2..16 rows xm
    of x, as float16 products that are exact (bench/sass.py: no conversion or rounding per weight, one HFMA2 and
    one byte permute per two weights):
    - the weights are the integers scale * q (at most 63 * 31 < 2^11, exact in float16): a byte permute makes
      1024 + q, and one FMA (1024 + q) * scale - 1024 * scale, rounded once;
    - each row of x is scaled by a power of two 2^-j that brings its largest value in the block to [2^9, 2^10),
      then rounded to float16: bfloat16 and float16 values are exact there down to 2^-14, 2^-23 of the largest;
    - acc += 2^j * (d * (W @ x^T) - dmin * (mins @ sums^T)): the mins' term is one K = 16 dot of the 6-bit mins
      against the sums of x per sub-block, each sum as two float16 (high and low parts, 22 bits). So no multiply
      per sub-block is needed.
    Two dots of K = 128 keep half the weights live at once. float32 x: the same integers against x in float32
    (`dot`'s F32). DENORMAL: acc times 2^-T, as the other decoders'."""
    BN: tl.constexpr = row.shape[0]
    BLOCK_M: tl.constexpr = xm.shape[0]
    XT: tl.constexpr = tl.float32 if x_ptr.dtype.element_ty == tl.float32 else tl.float16
    blk = (w_ptr + row[:, None] + b * BLOCK_BYTES).to(tl.pointer_type(tl.int32))  # [BN, 1], 16-byte aligned
    xb = x_ptr + b * 256 + xm[:, None] * x_stride
    xt = tl.load(xb + tl.arange(0, 256)[None, :]).to(tl.float32)
    scale, inverse = _x_scales(xt)
    sums = tl.sum(tl.reshape(xt, [BLOCK_M, 8, 32]), axis=2) * scale  # [BLOCK_M, 8]: per sub-block
    sums_hi = sums.to(XT)
    sums = tl.reshape(tl.join(sums_hi, (sums - sums_hi.to(tl.float32)).to(XT)), [BLOCK_M, 16])
    g = tl.arange(0, 8)[None, None, :]
    top = tl.load(table_ptr + 40 + g)  # `_value_table`'s 0x64646464
    if FIFTH:
        qh = tl.load(blk[:, :, None] + 4 + g)  # byte j: the fifth bits of elements j + 32 i, bit i
    p = tl.zeros([BN, BLOCK_M], tl.float32)
    for half in tl.static_range(2):  # runs 2 half and 2 half + 1
        r = 2 * half + tl.arange(0, 2)[None, :, None]
        q = tl.load(blk[:, :, None] + (4 + 8 * FIFTH) + 8 * r + g)  # [BN, 2, 8]: byte i of run r: 64r + i, + 32
        lo = q & 0x0F0F0F0F
        hi = (q >> 4) & 0x0F0F0F0F
        if FIFTH:  # bit 2r (2r + 1) of each qh byte to bit 4 of it: the fifth bit of the low (high) nibble
            hs = 2 * r
            lo |= tl.where(hs <= 4, qh << tl.maximum(4 - hs, 0), qh >> tl.maximum(hs - 4, 0)) & 0x10101010
            hi |= tl.where(hs <= 3, qh << tl.maximum(3 - hs, 0), qh >> tl.maximum(hs - 3, 0)) & 0x10101010
        _, sc0, sc1, _, _ = _k4_scale_bits(blk, 2 * half + tl.arange(0, 2)[None, :])  # [BN, 2]
        s0 = sc0.to(tl.float16)[:, :, None]
        s1 = sc1.to(tl.float16)[:, :, None]
        w = tl.join(_int_weights(_f16_ints(lo, top), s0, 1024.0, XT),
                    _int_weights(_f16_ints(hi, top), s1, 1024.0, XT))
        w = tl.reshape(tl.permute(w, [0, 1, 3, 2]), [BN, 128])  # element order
        xs = (tl.load(xb + 128 * half + tl.arange(0, 128)[None, :]).to(tl.float32) * scale).to(XT)
        p += dot(w, tl.trans(xs), F32)
    h, _, _, mn0, mn1 = _k4_scale_bits(blk, tl.arange(0, 4)[None, :])  # [BN, 4]: sub-blocks 2r, 2r + 1
    mins = tl.reshape(tl.join(mn0, mn1), [BN, 8]).to(XT)  # sub-block 2r + half
    mins = tl.reshape(tl.join(mins, mins), [BN, 16])
    d = _f16(h)
    dmin = _f16(h >> 16)
    if DENORMAL:  # see _T
        d *= 2.0 ** (-_T)
        dmin *= 2.0 ** (-_T)
    return acc + (d * p - dmin * dot(mins, tl.trans(sums), F32)) * inverse[None, :]


@triton.jit
def _k4_block(acc, w_ptr, row, b, x_ptr, xm, x_stride, BLOCK_BYTES: tl.constexpr, DENORMAL: tl.constexpr,
              FIFTH: tl.constexpr, BLOCK_M: tl.constexpr, F32: tl.constexpr):
    """acc plus Q4_K (144-byte blocks) or Q5_K (176, FIFTH) block b of rows `row` (byte offsets [BN]) times x:
    [BN, 4] sums (BLOCK_M = 1), or [BLOCK_M, BN] products (GEMM tiles; 2..16 rows: `_k4_rows`)."""
    r = tl.arange(0, 4)
    g = tl.arange(0, 4)
    blk = (w_ptr + row[:, None] + b * BLOCK_BYTES).to(tl.pointer_type(tl.int32))  # [BN, 1], 16-byte aligned
    qs_at = 4 + 8 * FIFTH  # word offset of qs: after d, dmin, scales (and qh)
    # Tiles are loaded 2-D, [BN, 16] with 4 contiguous words per thread, so that every Triton orders rows last,
    # then split: word 4r + g of `run_word` is word g of run r (+ 4: words 4..7 of the run).
    i = tl.arange(0, 16)
    run_word = (i // 4 * 8 + i % 4)[None, :]
    BN: tl.constexpr = row.shape[0]
    q0 = tl.reshape(tl.load(blk + qs_at + run_word), [BN, 4, 4])
    q1 = tl.reshape(tl.load(blk + qs_at + 4 + run_word), [BN, 4, 4])
    h0 = q0
    h1 = q1
    if FIFTH:
        qh_word = (i % 4)[None, :]  # qh words 0..3 (bytes 0..15), the same for every run; 4..7 at + 4
        h0 = tl.reshape(tl.load(blk + 4 + qh_word), [BN, 4, 4])
        h1 = tl.reshape(tl.load(blk + 8 + qh_word), [BN, 4, 4])
    e = (r[:, None] * 64 + g[None, :] * 4)  # [4, 4]: element of the low nibble of byte 0 of each word
    xb = x_ptr + b * 256
    hs = (2 * r)[None, :, None]
    dl0, dl1, ml0, ml1 = _k4_scales(blk, r[None, :])
    d0 = dl0[:, :, None]
    d1 = dl1[:, :, None]
    b0 = -ml0[:, :, None]
    b1 = -ml1[:, :, None]
    zero = tl.zeros([BN, 4, 4], tl.float32)
    zx = tl.zeros([4, 4], tl.float32)
    s0, s1, sx0, sx1, acc = _k4_quarter(zero, zero, zx, zx, acc, q0, h0, hs, xb, e, d0, b0, d1, b1, xm, x_stride,
                                        DENORMAL, FIFTH, BLOCK_M, F32)
    s0, s1, sx0, sx1, acc = _k4_quarter(s0, s1, sx0, sx1, acc, q1, h1, hs, xb, e + 16, d0, b0, d1, b1, xm,
                                        x_stride, DENORMAL, FIFTH, BLOCK_M, F32)
    if BLOCK_M == 1:
        acc += ((2.0 ** _S) * (dl0 * tl.sum(s0, axis=2) + dl1 * tl.sum(s1, axis=2))
                - ml0 * tl.sum(sx0, axis=1)[None, :] - ml1 * tl.sum(sx1, axis=1)[None, :])
    return acc


# Q6_K, planar: a thread owns 16 ql bytes (half h of the block, bytes 16a..16a+15 of it: the low nibbles of
# elements 128h + 16a + i, sub-block 8h + a, and the high nibbles of 128h + 64 + 16a + i, sub-block 8h + 4 + a)
# and the 16 qh bytes holding their top 2 bits (crumb a // 2, and 2 + a // 2, of qh byte 32h + 16 (a % 2) + i).


@triton.jit
def _q6_k_block(acc, w_ptr, row, b, nb, x_ptr, xm, x_stride, DENORMAL: tl.constexpr, BLOCK_M: tl.constexpr,
                F32: tl.constexpr):
    """acc plus Q6_K block b of rows `row` (byte offsets [BN]) times x: [BN, 8] sums (threads h, a; BLOCK_M = 1),
    or [BN, BLOCK_M] products (the weights the left operand)."""
    c = tl.arange(0, 8)
    half = c // 4
    a = c % 4
    g = tl.arange(0, 4)
    base = w_ptr + row[:, None]  # [BN, 1] uint8
    # 2-D tiles of 4 contiguous words per thread (see _k4_block), split into [BN, 8 threads, 4 words]
    BN: tl.constexpr = row.shape[0]
    i = tl.arange(0, 32)
    ql_ptr = (base + b * 128).to(tl.pointer_type(tl.int32))
    qh_ptr = (base + nb * 128 + b * 64).to(tl.pointer_type(tl.int32))
    ql = tl.reshape(tl.load(ql_ptr + i[None, :]), [BN, 8, 4])
    qh_word = (i // 16 * 8 + i // 4 % 2 * 4 + i % 4)[None, :]  # thread (h, a): words 8h + 4 (a % 2) + g
    qh = tl.reshape(tl.load(qh_ptr + qh_word), [BN, 8, 4])
    crumb = (2 * (a // 2))[None, :, None]  # bit of each qh byte holding the low elements' top 2 bits
    e = (128 * half + 16 * a)[:, None] + 4 * g[None, :]  # [8, 4]: element of the low nibble of byte 0 of a word
    xb = x_ptr + b * 256
    sc_ptr = base + nb * 192 + b * 16 + (8 * half + a)[None, :]
    sc0 = tl.load(sc_ptr.to(tl.pointer_type(tl.int8))).to(tl.float32)
    sc1 = tl.load((sc_ptr + 4).to(tl.pointer_type(tl.int8))).to(tl.float32)
    d = tl.load((base + nb * 208 + b * 2).to(tl.pointer_type(tl.float16))).to(tl.float32)
    dl0 = (d * sc0)[:, :, None]
    dl1 = (d * sc1)[:, :, None]
    s0 = tl.zeros(ql.shape, tl.float32)
    s1 = tl.zeros(ql.shape, tl.float32)
    sx0 = tl.zeros([8, 4], tl.float32)
    sx1 = tl.zeros([8, 4], tl.float32)
    # 6-bit values in bytes: the low elements' top bits (at `crumb`) moved to bits 4..5, the high ones' (crumb + 4)
    lo = (ql & 0x0F0F0F0F) | ((qh << (4 - crumb)) & 0x30303030)
    hi = ((ql >> 4) & 0x0F0F0F0F) | ((qh >> crumb) & 0x30303030)
    for t in tl.static_range(3):
        s0, sx0, acc = _take(s0, sx0, acc, lo, 8 * t, 6, xb, e + t, None, dl0, -32.0 * dl0, xm, x_stride,
                             DENORMAL, BLOCK_M, F32, True, 32.0)
        s1, sx1, acc = _take(s1, sx1, acc, hi, 8 * t, 6, xb, e + 64 + t, None, dl1, -32.0 * dl1, xm, x_stride,
                             DENORMAL, BLOCK_M, F32, True, 32.0)
    s0, sx0, acc = _take(s0, sx0, acc, lo >> 16, 8, 6, xb, e + 3, None, dl0, -32.0 * dl0, xm, x_stride,
                         DENORMAL, BLOCK_M, F32, True, 32.0)
    s1, sx1, acc = _take(s1, sx1, acc, hi >> 16, 8, 6, xb, e + 67, None, dl1, -32.0 * dl1, xm, x_stride,
                         DENORMAL, BLOCK_M, F32, True, 32.0)
    if BLOCK_M == 1:
        scale = 2.0 ** _S
        acc += d * (sc0 * (scale * tl.sum(s0, axis=2) - 32.0 * tl.sum(sx0, axis=1)[None, :])
                    + sc1 * (scale * tl.sum(s1, axis=2) - 32.0 * tl.sum(sx1, axis=1)[None, :]))
    return acc


# 32-element types, planar: a thread owns 16 quant bytes of a row (Q4_0, Q5_0: one block; Q8_0: half a block), and
# a step covers U such units. Neighbouring units are neighbouring 16 bytes of the plane: one contiguous row tile.


@triton.jit
def _q32_nibbles(q, base, nb, blk, m2, g, TYPE: tl.constexpr):
    """(low, high) nibbles of the Q4_0 / Q5_0 quant words q [BN, U, 4] as bytes (Q5_0: the fifth bit from the qh
    plane at bit 4 of each), blocks blk [U] of the rows at base [BN, 1] (m2: blocks in range)."""
    lo = q & 0x0F0F0F0F
    hi = (q >> 4) & 0x0F0F0F0F
    if TYPE == "Q5_0":
        qh_ptr = (base + nb * 16 + blk[None, :] * 4).to(tl.pointer_type(tl.int32))
        qh = tl.load(qh_ptr, mask=m2, other=0)[:, :, None]
        # bits 4g..4g+3 (16 + 4g..) of qh, the fifth bits of word g's low (high) nibbles, spread to bit 8t + 4 of
        # byte t by a multiply: bit t lands on t + 4 + 7k for k = 0..3, and k = t is the one the mask keeps
        lo |= (((qh >> (4 * g)[None, None, :]) & 15) * 0x2040810) & 0x10101010
        hi |= (((qh >> (16 + 4 * g)[None, None, :]) & 15) * 0x2040810) & 0x10101010
    return lo, hi


@triton.jit
def _q32_block(acc, w_ptr, row, b, b_end, nb, x_ptr, xm, x_stride, TYPE: tl.constexpr, U: tl.constexpr,
               DENORMAL: tl.constexpr, BLOCK_M: tl.constexpr, F32: tl.constexpr):
    """acc plus the U units from block b of Q4_0 / Q5_0 / Q8_0 rows `row` (byte offsets [BN], nb blocks each),
    blocks from b_end on left out, times x: [BN, U] sums (BLOCK_M = 1), or [BLOCK_M, BN] products."""
    PER_BLOCK: tl.constexpr = 2 if TYPE == "Q8_0" else 1  # units per block
    u = tl.arange(0, U)
    g = tl.arange(0, 4)
    blk = b + u // PER_BLOCK
    b_in = blk < b_end
    base = w_ptr + row[:, None]
    m2 = b_in[None, :]
    words = tl.arange(0, 4 * U)
    qs_ptr = (base + b * (16 * PER_BLOCK)).to(tl.pointer_type(tl.int32))
    q = tl.load(qs_ptr + words[None, :], mask=(b + words // (4 * PER_BLOCK) < b_end)[None, :],
                other=0)
    q = tl.reshape(q, [row.shape[0], U, 4])
    km = b_in[:, None]
    s = tl.zeros([row.shape[0], U, 4], tl.float32)
    sx = tl.zeros([U, 4], tl.float32)
    OFFSET: tl.constexpr = 128.0 if TYPE == "Q8_0" else 16.0 if TYPE == "Q5_0" else 8.0  # q - OFFSET: signed
    d_at = nb * (32 if TYPE == "Q8_0" else 20 if TYPE == "Q5_0" else 16)
    d = tl.load((base + d_at + 2 * blk[None, :]).to(tl.pointer_type(tl.float16)), mask=m2, other=0.0).to(tl.float32)
    dl = d[:, :, None]
    bias = -OFFSET * dl
    if _runs_of_x(TYPE, BLOCK_M):
        # the fields of a step decoded into one tile in element order: one dot (or store), x read as contiguous runs
        if TYPE == "Q8_0":  # unit u: elements 16u..16u+15, byte 4g + t element 4g + t
            v = _byte_fields(q ^ -0x7F7F7F80, 8, dl, OFFSET, DENORMAL)  # 0x80808080: int8 q to q + 128, unsigned
            RUN: tl.constexpr = 16
            e = b * 32 + 16 * u
        else:  # unit u: block b + u, byte 4g + t its elements 4g + t (low nibble) and 16 + 4g + t (high)
            lo, hi = _q32_nibbles(q, base, nb, blk, m2, g, TYPE)
            v = tl.join(_byte_fields(lo, 5, dl, OFFSET, DENORMAL), _byte_fields(hi, 5, dl, OFFSET, DENORMAL))
            v = tl.permute(v, [0, 1, 4, 2, 3])  # [BN, U, 2 (high), 4 (g), 4 (t)]
            RUN: tl.constexpr = 32
            e = blk * 32
        acc = _runs(acc, tl.reshape(v, [row.shape[0], U * RUN]), x_ptr, xm, x_stride, e, RUN, b_in, BLOCK_M, F32,
                    w_left(TYPE, BLOCK_M))
    elif TYPE == "Q8_0":
        e = (b * 32 + 16 * u)[:, None] + 4 * g[None, :]  # [U, 4]: element of byte 0 of word g
        q = q ^ -0x7F7F7F80  # 0x80808080: int8 q to q + 128, unsigned
        v = q >> 16
        s, sx, acc = _take(s, sx, acc, q, 0, 8, x_ptr, e, km, dl, bias, xm, x_stride, DENORMAL, BLOCK_M, F32,
                           False, OFFSET)
        s, sx, acc = _take(s, sx, acc, q, 8, 8, x_ptr, e + 1, km, dl, bias, xm, x_stride, DENORMAL, BLOCK_M, F32,
                           False, OFFSET)
        s, sx, acc = _take(s, sx, acc, v, 0, 8, x_ptr, e + 2, km, dl, bias, xm, x_stride, DENORMAL, BLOCK_M, F32,
                           False, OFFSET)
        s, sx, acc = _take(s, sx, acc, v, 8, 8, x_ptr, e + 3, km, dl, bias, xm, x_stride, DENORMAL, BLOCK_M, F32,
                           False, OFFSET)
    else:
        e = (blk * 32)[:, None] + 4 * g[None, :]  # byte 4g + t holds elements 4g + t and 16 + 4g + t
        if TYPE == "Q5_0":
            lo, hi = _q32_nibbles(q, base, nb, blk, m2, g, TYPE)
            for t in tl.static_range(3):
                s, sx, acc = _take(s, sx, acc, lo, 8 * t, 5, x_ptr, e + t, km, dl, bias, xm, x_stride, DENORMAL,
                                   BLOCK_M, F32, False, OFFSET)
                s, sx, acc = _take(s, sx, acc, hi, 8 * t, 5, x_ptr, e + 16 + t, km, dl, bias, xm, x_stride,
                                   DENORMAL, BLOCK_M, F32, False, OFFSET)
            s, sx, acc = _take(s, sx, acc, lo >> 16, 8, 5, x_ptr, e + 3, km, dl, bias, xm, x_stride, DENORMAL,
                               BLOCK_M, F32, False, OFFSET)
            s, sx, acc = _take(s, sx, acc, hi >> 16, 8, 5, x_ptr, e + 19, km, dl, bias, xm, x_stride, DENORMAL,
                               BLOCK_M, F32, False, OFFSET)
        else:
            v = q >> 12  # nibbles at bits 20, 24, 28 to 8, 12, 16: a field must end below the exponent (bit 23)
            for t in tl.static_range(3):  # low nibbles of bytes 0..2 at bits 8t, high ones of bytes 0..1 at 8t + 4
                s, sx, acc = _take(s, sx, acc, q, 8 * t, 4, x_ptr, e + t, km, dl, bias, xm, x_stride, DENORMAL,
                                   BLOCK_M, F32, False, OFFSET)
            for t in tl.static_range(2):
                s, sx, acc = _take(s, sx, acc, q, 8 * t + 4, 4, x_ptr, e + 16 + t, km, dl, bias, xm, x_stride,
                                   DENORMAL, BLOCK_M, F32, False, OFFSET)
            s, sx, acc = _take(s, sx, acc, v, 8, 4, x_ptr, e + 18, km, dl, bias, xm, x_stride, DENORMAL, BLOCK_M,
                               F32, False, OFFSET)
            s, sx, acc = _take(s, sx, acc, v, 12, 4, x_ptr, e + 3, km, dl, bias, xm, x_stride, DENORMAL, BLOCK_M,
                               F32, False, OFFSET)
            s, sx, acc = _take(s, sx, acc, v, 16, 4, x_ptr, e + 19, km, dl, bias, xm, x_stride, DENORMAL, BLOCK_M,
                               F32, False, OFFSET)
    if BLOCK_M == 1:
        acc += d * (2.0 ** _S * tl.sum(s, axis=2) - OFFSET * tl.sum(sx, axis=1)[None, :])
    return acc


# Nibbles that index a 16-value table (IQ4_XS, MXFP4): the table, as bytes u = value + offset, is held in four
# registers, and a byte permute (PRMT) looks up four nibbles at once: two permutes pick from each half of the table by
# the low 3 bits of each nibble, a third keeps, per byte, the half its nibble's top bit names. One word of 8 nibbles
# becomes two words of 4 looked-up bytes in 11 instructions (9 for MXFP4's table, see `_lookup`), whose byte fields
# `_take` then reads as Q8_0's quants (one AND and one FMA per weight at one row of x, the offset taken out with the
# sums of x): ~3.4 instructions per weight, where a gather from a table in memory takes ~11 (and shared memory or L1
# would serve at most 32 lookups per clock per SM, about the rate HBM brings 4.25-bit weights). The table words come
# from memory (`_value_table`; loop-invariant loads, made once per program): as constants, ptxas would move one into a
# register before every permute.


@triton.jit
def _perm(a, b, s):
    """PTX's prmt.b32 (one PRMT): byte k of the result is byte s[4k+2:4k] of {b, a} (a: bytes 0..3, b: 4..7), or
    where s[4k+3] is set, that byte's top bit repeated 8 times. Elsewhere in shifts: on HIP byte by byte, in the
    interpreter the four bytes at once (about a third of the interpreted operations)."""
    if not _INTERPRETED and is_cuda():
        r = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, s], dtype=tl.int32,
                                      is_pure=True, pack=1)
    elif _INTERPRETED:
        r = _perm_lanes(a, b, s)
    else:
        r = _perm_bytes(a, b, s)
    return r


@triton.jit
def _perm_bytes(a, b, s):
    """`_perm` in shifts, one result byte after another."""
    r = tl.zeros_like(a)
    for k in tl.static_range(4):
        sel = (s >> (4 * k)) & 15
        byte = (tl.where((sel & 7) < 4, a, b) >> ((sel & 3) * 8)) & 0xFF
        r |= tl.where(sel < 8, byte, tl.where(byte < 128, 0, 0xFF)) << (8 * k)
    return r


@triton.jit
def _perm_lanes(a, b, s):
    """`_perm` in shifts, the four result bytes along a new last axis, then summed (disjoint bits: an OR)."""
    a, s = tl.broadcast(a, s)
    b, s = tl.broadcast(b, s)
    a, s = tl.broadcast(a, s)
    RANK: tl.constexpr = len(s.shape)
    k = tl.arange(0, 4)
    sel = (tl.expand_dims(s, RANK) >> (4 * k)) & 15
    byte = (tl.where((sel & 7) < 4, tl.expand_dims(a, RANK), tl.expand_dims(b, RANK)) >> ((sel & 3) * 8)) & 0xFF
    byte = tl.where(sel < 8, byte, tl.where(byte < 128, 0, 0xFF)) << (8 * k)
    return tl.sum(byte, RANK)


@triton.jit
def _byte(r, K: tl.constexpr):
    """Byte K of words r alone at the bottom of a word (as a float32: that byte times 2^-149): one byte permute on
    CUDA (a shift and an AND elsewhere)."""
    if not _INTERPRETED and is_cuda():
        zero = tl.zeros_like(r)
        v = _perm(r, zero, zero + (0x4440 + K))
    else:
        v = (r >> (8 * K)) & 0xFF
    return v


@triton.jit
def _table(table_ptr, lanes):
    """The words of `_value_table` for lanes (any shape, e.g. [L]; each lane its own copy: uniform values would be
    kept in uniform registers, and moved to a register before every permute)."""
    c = lanes % 8
    return (tl.load(table_ptr + c), tl.load(table_ptr + 8 + c), tl.load(table_ptr + 16 + c),
            tl.load(table_ptr + 24 + c), tl.load(table_ptr + 32 + c))


@triton.jit
def _lookup(q, tab, SMALL: tl.constexpr):
    """(r0, r1) for words q of 8 nibbles: byte k of r0 (r1) is u[nibble k (4 + k) of q], for the table words tab
    (`_table`, broadcast against q: the bytes u as 4 words, then 0x32103210). SMALL: every u < 128, so that a
    permute of one half of the table gives 0 (its byte's top bit repeated) where a nibble's top bit names the other
    half, and an OR merges the halves: 9 instructions per word, not 11."""
    lo0, lo1, hi0, hi1, order = tab
    if SMALL:
        flip = q ^ -0x77777778  # 0x88888888: top bits flipped, the high half's picks where they were set
        r0 = _perm(lo0, lo1, q) | _perm(hi0, hi1, flip)
        r1 = _perm(lo0, lo1, q >> 16) | _perm(hi0, hi1, flip >> 16)
    else:
        s0 = q & 0x77777777  # the nibbles' low 3 bits: bytes of a table half
        s1 = s0 >> 16
        half = ((q >> 1) & 0x44444444) | order  # byte k of the low half's pick or (top bit set) of the high half's
        r0 = _perm(_perm(lo0, lo1, s0), _perm(hi0, hi1, s0), half)
        r1 = _perm(_perm(lo0, lo1, s1), _perm(hi0, hi1, s1), half >> 16)
    return r0, r1


@triton.jit
def _take_bytes(s, sx, acc, r, x_ptr, el, mask, dl, bias, xm, x_stride, DENORMAL: tl.constexpr,
                BLOCK_M: tl.constexpr, F32: tl.constexpr):
    """`_take` of the 4 bytes of words r, elements el + (0, 16, 1, 17): fields at bits 0, 8, 16 and 24 (the last
    two moved to 0 and 8 when the fields take an exponent, which must not overlap)."""
    s, sx, acc = _take(s, sx, acc, r, 0, 8, x_ptr, el, mask, dl, bias, xm, x_stride, DENORMAL, BLOCK_M, F32)
    s, sx, acc = _take(s, sx, acc, r, 8, 8, x_ptr, el + 16, mask, dl, bias, xm, x_stride, DENORMAL, BLOCK_M, F32)
    if DENORMAL:  # a field ending at bit 23 sets the exponent's lowest bit: still q * 2^(P - 149)
        s, sx, acc = _take(s, sx, acc, r, 16, 8, x_ptr, el + 1, mask, dl, bias, xm, x_stride, DENORMAL, BLOCK_M,
                           F32)
        top = (r.to(tl.uint32, bitcast=True) >> 24).to(tl.int32, bitcast=True)
        s, sx, acc = _take(s, sx, acc, top, 0, 8, x_ptr, el + 17, mask, dl, bias, xm, x_stride, DENORMAL, BLOCK_M,
                           F32)
    else:
        v = r >> 16
        s, sx, acc = _take(s, sx, acc, v, 0, 8, x_ptr, el + 1, mask, dl, bias, xm, x_stride, DENORMAL, BLOCK_M,
                           F32)
        s, sx, acc = _take(s, sx, acc, v, 8, 8, x_ptr, el + 17, mask, dl, bias, xm, x_stride, DENORMAL, BLOCK_M,
                           F32)
    return s, sx, acc


@triton.jit
def _dot_weights(r, P: tl.constexpr, BITS: tl.constexpr, dl, OFFSET: tl.constexpr, DENORMAL: tl.constexpr):
    """The BITS-bit fields at bits P and P + 8 of words r as weights (u - OFFSET) * dl for tl.dot or a store,
    [.., 2]: times 2^-T where DENORMAL (see _T)."""
    if DENORMAL:
        f0 = _byte(r, P // 8).to(tl.float32, bitcast=True) * (dl * 2.0 ** (149 - _T))
        f1 = _byte(r, P // 8 + 1).to(tl.float32, bitcast=True) * (dl * 2.0 ** (149 - _T))
        bias = dl * (-OFFSET * 2.0 ** (-_T))
        v = tl.join(f0 + bias, f1 + bias)
    else:  # as the reference rounds: u - OFFSET exact, one product
        w = r >> P
        v = tl.join((_field(w, 0, BITS, DENORMAL) - OFFSET) * dl, (_field(w, 8, BITS, DENORMAL) - OFFSET) * dl)
    return v


@triton.jit
def _byte_fields(r, BITS: tl.constexpr, dl, OFFSET: tl.constexpr, DENORMAL: tl.constexpr):
    """The BITS-bit fields at the start of each byte of words r [BN, U, 4], in byte order, as `_dot_weights`:
    [BN, U, 4, 4]."""
    v = tl.join(_dot_weights(r, 0, BITS, dl, OFFSET, DENORMAL), _dot_weights(r, 16, BITS, dl, OFFSET, DENORMAL))
    return tl.reshape(tl.permute(v, [0, 1, 2, 4, 3]), [r.shape[0], r.shape[1], 4, 4])


@triton.jit
def _table_units(acc, rows, off, L: tl.constexpr, n_units, e, dl, tab, x_ptr, xm, x_stride, OFFSET: tl.constexpr,
                 SMALL: tl.constexpr, WIDE: tl.constexpr, DENORMAL: tl.constexpr, BLOCK_M: tl.constexpr,
                 F32: tl.constexpr):
    """acc plus L units of 16 bytes of table-indexed nibbles of rows [BN] (laid out as Q4_0's quants: byte j holds
    elements j and 16 + j of the unit), times x. Unit j of a row at word off + 4j from rows [BN, 1], int32 pointers
    (loop-invariant: a row's address then takes one 64-bit add per step); n_units: None, or the units in range, units
    from it on reading unit n_units - 1 (no masks, nor the zeroing and predicates they take: their scales must be 0);
    e [L]: each unit's first element; dl [BN, L]: its scale; tab: `_table` [L]; OFFSET, SMALL: the table's (see
    `_lookup`); WIDE: units 16-byte aligned (one 16-byte load per unit and row, else two 8-byte ones). [BN, L] sums
    (BLOCK_M = 1), or [BN, BLOCK_M] products (the weights the tensor cores' left operand, see `w_left`); or the
    weights stored (`_STORE`, see `_take`)."""
    BN: tl.constexpr = rows.shape[0]
    if BLOCK_M == 1:
        # words g = 0..3 of each unit as 4 tensors [BN, L] (loaded together, split in registers): one FMA chain per
        # row and unit. [BN, 4L] or [BN, 2L] tiles of 4 or 2 contiguous words per thread, so that every Triton orders
        # rows last.
        if WIDE:
            k = tl.arange(0, 4 * L)
            unit = k // 4
            if n_units is not None:
                unit = tl.minimum(unit, n_units - 1)
            q02, q13 = tl.split(tl.reshape(tl.load(rows + (off + unit * 4 + k % 4)[None, :]), [BN, L, 2, 2]))
            q0, q2 = tl.split(q02)
            q1, q3 = tl.split(q13)
        else:
            k = tl.arange(0, 2 * L)
            unit = k // 2
            if n_units is not None:
                unit = tl.minimum(unit, n_units - 1)
            pair = rows + (off + unit * 4 + k % 2)[None, :]
            q0, q1 = tl.split(tl.reshape(tl.load(pair), [BN, L, 2]))
            q2, q3 = tl.split(tl.reshape(tl.load(pair + 2), [BN, L, 2]))
        t2 = (tab[0][None, :], tab[1][None, :], tab[2][None, :], tab[3][None, :], tab[4][None, :])
        s = tl.zeros([BN, L], tl.float32)
        sx = tl.zeros([L], tl.float32)
        r0, r1 = _lookup(q0, t2, SMALL)  # bytes 0, 1 of word 0 (elements e, e + 16, e + 1, e + 17); bytes 2, 3
        s, sx, acc = _take_bytes(s, sx, acc, r0, x_ptr, e, None, dl, dl, xm, x_stride, DENORMAL, BLOCK_M, F32)
        s, sx, acc = _take_bytes(s, sx, acc, r1, x_ptr, e + 2, None, dl, dl, xm, x_stride, DENORMAL, BLOCK_M, F32)
        r0, r1 = _lookup(q1, t2, SMALL)
        s, sx, acc = _take_bytes(s, sx, acc, r0, x_ptr, e + 4, None, dl, dl, xm, x_stride, DENORMAL, BLOCK_M, F32)
        s, sx, acc = _take_bytes(s, sx, acc, r1, x_ptr, e + 6, None, dl, dl, xm, x_stride, DENORMAL, BLOCK_M, F32)
        r0, r1 = _lookup(q2, t2, SMALL)
        s, sx, acc = _take_bytes(s, sx, acc, r0, x_ptr, e + 8, None, dl, dl, xm, x_stride, DENORMAL, BLOCK_M, F32)
        s, sx, acc = _take_bytes(s, sx, acc, r1, x_ptr, e + 10, None, dl, dl, xm, x_stride, DENORMAL, BLOCK_M, F32)
        r0, r1 = _lookup(q3, t2, SMALL)
        s, sx, acc = _take_bytes(s, sx, acc, r0, x_ptr, e + 12, None, dl, dl, xm, x_stride, DENORMAL, BLOCK_M, F32)
        s, sx, acc = _take_bytes(s, sx, acc, r1, x_ptr, e + 14, None, dl, dl, xm, x_stride, DENORMAL, BLOCK_M, F32)
        acc += dl * (2.0 ** _S * s - OFFSET * sx[None, :])
    else:  # 2..16 rows of x, or the store mode
        words = tl.arange(0, 4 * L)
        unit = words // 4
        if n_units is not None:
            unit = tl.minimum(unit, n_units - 1)
        q = tl.reshape(tl.load(rows + (off + unit * 4 + words % 4)[None, :]), [BN, L, 4])
        t3 = (tab[0][None, :, None], tab[1][None, :, None], tab[2][None, :, None], tab[3][None, :, None],
              tab[4][None, :, None])
        r0, r1 = _lookup(q, t3, SMALL)  # byte 2c + h of r0 (c = 0, 1) and of r1 (c = 2, 3): element 16h + 4g + c
        d3 = dl[:, :, None]
        # the 8 byte fields of word g as [BN, L, 4 (g), 2 (h), 2 (c % 2), 2 (c // 2)], then elements in order: one
        # dot of K = 32 L per call, x read as contiguous runs of 32
        v = tl.join(
            tl.join(_dot_weights(r0, 0, 8, d3, OFFSET, DENORMAL), _dot_weights(r0, 16, 8, d3, OFFSET, DENORMAL)),
            tl.join(_dot_weights(r1, 0, 8, d3, OFFSET, DENORMAL), _dot_weights(r1, 16, 8, d3, OFFSET, DENORMAL)))
        v = tl.reshape(tl.permute(v, [0, 1, 3, 2, 5, 4]), [BN, L * 32])
        mask = None
        if BLOCK_M == _STORE and n_units is not None:  # the products read clamped units, whose scales are 0
            mask = tl.arange(0, L) < n_units
        acc = _runs(acc, v, x_ptr, xm, x_stride, e, 32, mask, BLOCK_M, F32, True)
    return acc


# IQ4_XS (136-byte blocks, 8-byte aligned, the file's layout): d f16 @0 | scales_h u16 @2 | scales_l[4] @4 | qs[128]
# @8, 8 sub-blocks of 32 elements whose 16 qs bytes hold them as Q4_0's do; a nibble indexes IQ4_NL's 16 values. A
# thread owns one sub-block of a row (8-byte loads: the qs of a block start 8 bytes after a multiple of 8).


@triton.jit
def _iq4_xs_block(acc, w_ptr, row, b, x_ptr, table_ptr, xm, x_stride, DENORMAL: tl.constexpr,
                  BLOCK_M: tl.constexpr, F32: tl.constexpr):
    """acc plus IQ4_XS block b of rows `row` (byte offsets [BN]) times x: [BN, 8] sums (BLOCK_M = 1), or
    [BN, BLOCK_M] products."""
    i = tl.arange(0, 8)
    blk = (w_ptr + row[:, None] + b * 136).to(tl.pointer_type(tl.int32))  # [BN, 1]
    h0 = tl.load(blk)  # d | scales_h << 16
    h1 = tl.load(blk + 1)  # scales_l: nibble i is the low 4 bits of sub-block i's scale
    scale = ((h1 >> (4 * i)[None, :]) & 15) | (((h0 >> (16 + 2 * i)[None, :]) & 3) << 4)
    dl = _f16(h0) * (scale - 32).to(tl.float32)  # [BN, 8]
    rows = (w_ptr + row[:, None]).to(tl.pointer_type(tl.int32))
    return _table_units(acc, rows, b * 34 + 2, 8, None, b * 256 + 32 * i, dl, _table(table_ptr, i), x_ptr, xm,
                        x_stride, _IQ4NL_OFFSET, False, False, DENORMAL, BLOCK_M, F32)


@triton.jit
def _iq4_xs_rows(acc, w_ptr, row, b, x_ptr, table_ptr, xm, x_stride, DENORMAL: tl.constexpr, F32: tl.constexpr):
    """acc [BN, BLOCK_M] plus IQ4_XS block b of rows `row` (byte offsets [BN]) times 2..16 rows xm of x, as
    `_k4_rows` does (no mins): the weights are the sub-block's signed scale ls times the IQ4_NL value,
    (1024 + u) * ls - 1152 * ls from the looked-up bytes u = value + 128 in one HFMA2 per two, rounded once to
    float16 (exact up to 2048 in magnitude, 11 bits above), against x scaled per block into float16;
    acc += 2^j * d * (W @ x^T)."""
    BN: tl.constexpr = row.shape[0]
    BLOCK_M: tl.constexpr = xm.shape[0]
    XT: tl.constexpr = tl.float32 if x_ptr.dtype.element_ty == tl.float32 else tl.float16
    i = tl.arange(0, 8)
    blk = (w_ptr + row[:, None] + b * 136).to(tl.pointer_type(tl.int32))  # [BN, 1]
    h0 = tl.load(blk)  # d | scales_h << 16
    h1 = tl.load(blk + 1)  # scales_l: nibble i is the low 4 bits of sub-block i's scale
    ls = (((h1 >> (4 * i)[None, :]) & 15) | (((h0 >> (16 + 2 * i)[None, :]) & 3) << 4)) - 32
    ls = ls.to(tl.float16)[:, :, None]  # [BN, 8, 1]
    q = tl.load(blk[:, :, None] + 2 + 4 * i[None, :, None] + tl.arange(0, 4)[None, None, :])  # [BN, 8, 4]
    r0, r1 = _lookup(q, _table(table_ptr, i[None, :, None]), False)
    u = tl.reshape(tl.join(r0, r1), [BN, 8, 8])  # word 2g + c: the bytes of elements 4g + 2c + (0, 16, 1, 17)
    top = tl.load(table_ptr + 40 + tl.arange(0, 8)[None, None, :])  # `_value_table`'s 0x64646464
    # k = 32i + 8g + 2t + h: element 32i + 16h + 4g + t
    w = tl.reshape(_int_weights(_f16_ints(u, top), ls, 1152.0, XT), [BN, 256])
    xt = tl.load(x_ptr + b * 256 + xm[:, None] * x_stride + tl.arange(0, 256)[None, :]).to(tl.float32)
    scale, inverse = _x_scales(xt)
    xs = tl.reshape(tl.permute(tl.reshape((xt * scale).to(XT), [BLOCK_M, 8, 2, 4, 4]), [0, 1, 3, 4, 2]),
                    [BLOCK_M, 256])  # w's order
    d = _f16(h0)
    if DENORMAL:  # see _T
        d *= 2.0 ** (-_T)
    return acc + d * dot(w, tl.trans(xs), F32) * inverse[None, :]


# MXFP4, planar per matrix (planar.py: qs[N x nb x 16] | e[N x nb]): a thread owns the 16 qs bytes of one block (32
# elements as Q4_0's, E2M1 codes indexing the doubled values) of a row, one 16-byte load, and a step covers U blocks.


@triton.jit
def _mxfp4_block(acc, w_ptr, qrow, erow, b, b_end, x_ptr, table_ptr, xm, x_stride, U: tl.constexpr,
                 DENORMAL: tl.constexpr, BLOCK_M: tl.constexpr, F32: tl.constexpr):
    """acc plus the U blocks from block b of MXFP4 rows (qs at byte offsets qrow [BN], E8M0 scales at erow [BN]),
    blocks from b_end on left out, times x: [BN, U] sums (BLOCK_M = 1), or [BN, BLOCK_M] products."""
    u = tl.arange(0, U)
    blk = tl.minimum(b + u, b_end - 1)  # blocks past the range read the last one, with a scale of 0
    ev = tl.load(w_ptr + erow[:, None] + blk[None, :]).to(tl.int32)
    # 2^(e - 128) (the doubled E2M1 values with a halved scale; e < 2 gives a subnormal scale), as blocks.py
    d = tl.where(ev < 2, 0x00200000 << ev, (ev - 1) << 23).to(tl.float32, bitcast=True)
    d = tl.where((b + u < b_end)[None, :], d, 0.0)
    rows = (w_ptr + qrow[:, None]).to(tl.pointer_type(tl.int32))  # 16-byte aligned
    return _table_units(acc, rows, b * 4, U, b_end - b, 32 * blk, d, _table(table_ptr, u), x_ptr, xm, x_stride,
                        _MXFP4_OFFSET, True, True, DENORMAL, BLOCK_M, F32)


@triton.jit
def _mxfp4_rows(acc, w_ptr, qrow, erow, b, b_end, x_ptr, table_ptr, xm, x_stride, DENORMAL: tl.constexpr,
                F32: tl.constexpr):
    """acc [BN, BLOCK_M] plus the 8 blocks from block b of MXFP4 rows (qs at byte offsets qrow [BN], E8M0 scales at
    erow [BN]), blocks from b_end on left out, times 2..16 rows xm of x, as `_iq4_xs_rows` does: each block's
    values v times 2^k, k its scale's exponent less the largest of the row's 8 (k >= -24: float16 holds v * 2^k
    exactly; a block further below is left out, 2^-24 of the largest), as (1024 + u) * 2^k - 1036 * 2^k from the
    looked-up bytes u = v + 12, one HFMA2 per two; acc += 2^j * 2^(largest - 128) * (W @ x^T)."""
    BN: tl.constexpr = qrow.shape[0]
    BLOCK_M: tl.constexpr = xm.shape[0]
    XT: tl.constexpr = tl.float32 if x_ptr.dtype.element_ty == tl.float32 else tl.float16
    top_e = tl.max(_mxfp4_exponents(w_ptr, erow, b, b_end, tl.arange(0, _BLOCKS_PER_STEP)), axis=1)[:, None]
    e = b * 32 + tl.arange(0, 256)
    xt = tl.load(x_ptr + xm[:, None] * x_stride + e[None, :], mask=(e < b_end * 32)[None, :], other=0.0)
    scale, inverse = _x_scales(xt.to(tl.float32))
    rows = (w_ptr + qrow[:, None]).to(tl.pointer_type(tl.int32))  # 16-byte aligned
    top = tl.load(table_ptr + 40 + tl.arange(0, 8)[None, None, :])  # `_value_table`'s 0x64646464
    p = tl.zeros([BN, BLOCK_M], tl.float32)
    for half in tl.static_range(2):  # 4 blocks at a time: half the weights live at once
        i = 4 * half + tl.arange(0, 4)
        k = _mxfp4_exponents(w_ptr, erow, b, b_end, i) - top_e
        s = tl.where((b + i < b_end)[None, :] & (k >= -24), ((127 + k) << 23).to(tl.float32, bitcast=True), 0.0)
        # loaded 2-D, [BN, 16] with 4 contiguous words per thread, so that every Triton orders rows last (see
        # _k4_block)
        words = tl.arange(0, 16)
        q = tl.load(rows + (4 * tl.minimum(b + 4 * half + words // 4, b_end - 1) + words % 4)[None, :])
        r0, r1 = _lookup(tl.reshape(q, [BN, 4, 4]), _table(table_ptr, i[None, :, None]), True)
        u = tl.reshape(tl.join(r0, r1), [BN, 4, 8])  # as `_iq4_xs_rows`'
        w = _int_weights(_f16_ints(u, top), s.to(tl.float16)[:, :, None], 1024.0 + _MXFP4_OFFSET, XT)
        eh = b * 32 + 128 * half + tl.arange(0, 128)
        xh = tl.load(x_ptr + xm[:, None] * x_stride + eh[None, :], mask=(eh < b_end * 32)[None, :], other=0.0)
        xs = tl.reshape(tl.permute(tl.reshape((xh.to(tl.float32) * scale).to(XT), [BLOCK_M, 4, 2, 4, 4]),
                                   [0, 1, 3, 4, 2]), [BLOCK_M, 128])  # w's order
        p += dot(tl.reshape(w, [BN, 128]), tl.trans(xs), F32)
    # 2^(largest - 128), as `_mxfp4_block`'s scales (below 2: a subnormal)
    d = tl.where(top_e < 2, 0x00200000 << top_e, (top_e - 1) << 23).to(tl.float32, bitcast=True)
    if DENORMAL:  # see _T
        d *= 2.0 ** (-_T)
    return acc + d * p * inverse[None, :]


@triton.jit
def _mxfp4_exponents(w_ptr, erow, b, b_end, i):
    """The E8M0 scale bytes of blocks b + i [L] of the MXFP4 rows whose scales are at erow [BN]: [BN, L], 0 from
    b_end on."""
    blk = tl.minimum(b + i, b_end - 1)
    return tl.where((b + i < b_end)[None, :], tl.load(w_ptr + erow[:, None] + blk[None, :]).to(tl.int32), 0)


@triton.constexpr_function
def lanes(type_name: str) -> int:
    """The per-thread sums of a row of W at one row of x (BLOCK_M = 1: acc [BN, lanes]): the threads sharing a
    256-element block (K-quants: runs of 64 or 32 elements; IQ4_XS: sub-blocks), else the 16-byte units of a step
    (32-element types: a block each, Q8_0 two)."""
    return {"Q4_K": 4, "Q5_K": 4, "Q6_K": 8, "IQ4_XS": 8, "Q8_0": 2 * _STEP}.get(type_name, _STEP)


@triton.constexpr_function
def w_left(type_name: str, block_m: int) -> bool:
    """Whether a type's weights are the tensor cores' left operand at block_m (2+) rows of x (acc [BN, BLOCK_M]),
    else the right (acc [BLOCK_M, BN]): Q6_K's and the table types', Q8_0's and Q5_0's up to MAX_M rows, and the
    float16 integers of `_f16_rows` (bench/sass.py: fewer instructions; Hopper's wgmma then takes them from
    registers)."""
    return (type_name in ("Q6_K", "IQ4_XS", "MXFP4") or type_name in ("Q8_0", "Q5_0") and block_m <= MAX_M
            or _f16_rows(type_name, block_m))


@triton.constexpr_function
def _f16_rows(type_name: str, block_m: int) -> bool:
    """Whether a type's loop at block_m rows of x multiplies float16 integer weights (a sub-block's scale times its
    quants) by x scaled per block into float16, and scales the products once per block after (`_k4_rows`,
    `_iq4_xs_rows`, `_mxfp4_rows`): Q4_K, Q5_K, IQ4_XS and MXFP4 at 2..16 rows (bench/sass.py: one byte permute
    and one HFMA2 per two weights, no conversion; GEMM tiles keep the scaled weights, whose x needs no
    conversion)."""
    return type_name in ("Q4_K", "Q5_K", "IQ4_XS", "MXFP4") and 1 < block_m <= MAX_M


@triton.constexpr_function
def _runs_of_x(type_name: str, block_m: int) -> bool:
    """Whether the 32-element types' loop at block_m rows of x (or in the store mode) decodes a step's weights into
    one tile in element order, multiplied by one tl.dot with x read as contiguous runs: up to MAX_M rows
    (bench/sass.py: Q8_0 1.24x the one-row loop per byte, where a dot per byte position takes 1.54x); GEMM tiles
    keep a dot per byte position (in one tile the decoded weights spill)."""
    return type_name in ("Q8_0", "Q5_0") and block_m != 1 and block_m <= MAX_M


@triton.constexpr_function
def _table_stages(block_m: int) -> int | None:
    """Pipeline stages of the table types' loops: their tl.dot reads contiguous x runs, which Triton stages through
    shared memory, [BLOCK_M, 256] per stage; GEMM tiles take 2 to stay within an SM's shared memory, the others the
    launch's (None)."""
    return None if block_m <= MAX_M else 2


@triton.jit
def _zero_acc(BN: tl.constexpr, TYPE: tl.constexpr, BLOCK_M: tl.constexpr):
    """The zero accumulator of the word decoders for BN rows of W of type TYPE and BLOCK_M rows of x (the store
    mode's is not read)."""
    if BLOCK_M <= 1:
        acc = tl.zeros([BN, lanes(TYPE)], tl.float32)
    elif w_left(TYPE, BLOCK_M):
        acc = tl.zeros([BN, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BN], tl.float32)
    return acc


@triton.jit
def walk(acc, w_ptr, row, n_rows, b0, b1, nb, x_ptr, table_ptr, xm, x_stride, TYPE: tl.constexpr,
         BLOCK_BYTES: tl.constexpr, DENORMAL: tl.constexpr, BLOCK_M: tl.constexpr, F32: tl.constexpr):
    """acc plus blocks [b0, b1) of the rows of W at byte offsets `row` [BN] from w_ptr (nb blocks a row; MXFP4: rows
    of its planes per matrix of n_rows rows, `row` a multiple of nb * BLOCK_BYTES) times the rows xm of x (x_stride
    apart): the loop every product over the word decoders runs (BLOCK_M 1, 16 or a GEMM tile; see `_zero_acc`), and
    with BLOCK_M = `_STORE` (DENORMAL off) the dequant kernel's, storing the weights at x_ptr, rows xm."""
    if (TYPE == "Q4_K" or TYPE == "Q5_K") and _f16_rows(TYPE, BLOCK_M):
        for b in range(b0, b1):
            acc = _k4_rows(acc, w_ptr, row, b, x_ptr, table_ptr, xm, x_stride, BLOCK_BYTES, DENORMAL, TYPE == "Q5_K",
                           F32)
    elif TYPE == "Q4_K" or TYPE == "Q5_K":
        for b in range(b0, b1):
            acc = _k4_block(acc, w_ptr, row, b, x_ptr, xm, x_stride, BLOCK_BYTES, DENORMAL, TYPE == "Q5_K", BLOCK_M,
                            F32)
    elif TYPE == "IQ4_XS" and _f16_rows(TYPE, BLOCK_M):
        for b in range(b0, b1):
            acc = _iq4_xs_rows(acc, w_ptr, row, b, x_ptr, table_ptr, xm, x_stride, DENORMAL, F32)
    elif TYPE == "IQ4_XS":
        for b in tl.range(b0, b1, num_stages=_table_stages(BLOCK_M)):
            acc = _iq4_xs_block(acc, w_ptr, row, b, x_ptr, table_ptr, xm, x_stride, DENORMAL, BLOCK_M, F32)
    elif TYPE == "Q6_K":
        for b in range(b0, b1):
            acc = _q6_k_block(acc, w_ptr, row, b, nb, x_ptr, xm, x_stride, DENORMAL, BLOCK_M, F32)
    elif TYPE == "MXFP4":  # the qs plane (nb * 16 bytes a row), then the scales' (nb)
        n_nb = row // BLOCK_BYTES
        erow = n_rows.to(tl.int64) * nb * 16 + n_nb
        if _f16_rows(TYPE, BLOCK_M):
            for b in range(b0, b1, _BLOCKS_PER_STEP):
                acc = _mxfp4_rows(acc, w_ptr, n_nb * 16, erow, b, b1, x_ptr, table_ptr, xm, x_stride, DENORMAL, F32)
        else:
            for b in tl.range(b0, b1, _BLOCKS_PER_STEP, num_stages=_table_stages(BLOCK_M)):
                acc = _mxfp4_block(acc, w_ptr, n_nb * 16, erow, b, b1, x_ptr, table_ptr, xm, x_stride, lanes(TYPE),
                                   DENORMAL, BLOCK_M, F32)
    else:
        for b in range(b0, b1, _BLOCKS_PER_STEP):
            acc = _q32_block(acc, w_ptr, row, b, b1, nb, x_ptr, xm, x_stride, TYPE, lanes(TYPE), DENORMAL, BLOCK_M,
                             F32)
    return acc


@triton.jit(do_not_specialize=["M", "m_bucket", "split_blocks"])
def _qgemv_kernel(x_ptr, w0_ptr, w1_ptr, w2_ptr, table_ptr, out_ptr, part_ptr, count_ptr, residual_ptr, norm_w_ptr,
                  h_ptr, sumsq_ptr, eps, M, m_bucket, N0, N1, N2, nb, x_row_stride, row_bytes, split_blocks,
                  SPLIT: tl.constexpr, TYPE: tl.constexpr, BLOCK_BYTES: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, DENORMAL: tl.constexpr, F32: tl.constexpr, NORM_IN: tl.constexpr,
                  NORM_OUT: tl.constexpr, ACT: tl.constexpr):
    """out[m, n] = x[m] . row n of [W0; W1; W2] (N0 + N1 + N2 rows: up to three weights of one type and K, each
    its own tensor), for rows m of x in tile program_id(2). SPLIT: program (pid, s) covers blocks
    [s * split_blocks, + split_blocks) of the nb in a row, its partial sums in part[s], the tile's count of
    arrived ranges at count_ptr (0 before and after). m_bucket is not read: it is the autotune key standing for M.
    Fused (see `_store` and `_finish`): NORM_IN, x is a PendingNorm's y, out's rows times its rstd (chunk sums
    at sumsq_ptr); NORM_OUT, out is a PendingNorm of x . W0 + residual; ACT, out [M, N0] = act(x . W0) * (x . W1).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    m_first = tl.program_id(2) * BLOCK_M
    # program pid takes a row tile of one weight: W0's tiles first, then W1's, then W2's
    tiles0 = tl.cdiv(N0, BLOCK_N)
    tiles01 = tiles0 + tl.cdiv(N1, BLOCK_N)
    in1 = pid >= tiles0
    in2 = pid >= tiles01
    w_ptr = tl.where(in2, w2_ptr, tl.where(in1, w1_ptr, w0_ptr))
    n_weight = tl.where(in2, N2, tl.where(in1, N1, N0))
    n_first = tl.where(in2, N0 + N1, tl.where(in1, N0, 0))  # the weight's first column of out
    tile = pid - tl.where(in2, tiles01, tl.where(in1, tiles0, 0))  # row tile within its weight
    n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows of W past the weight's last read that row, and rows of x past M row M - 1: the loads need no masks (nor
    # the predicate registers masks take), and those rows are not stored
    row = tl.minimum(n, n_weight - 1).to(tl.int64) * row_bytes
    xm = tl.minimum(m_first + tl.arange(0, BLOCK_M), M - 1).to(tl.int64)
    b0 = split * split_blocks
    b1 = tl.minimum(b0 + split_blocks, nb)
    acc = walk(_zero_acc(BLOCK_N, TYPE, BLOCK_M), w_ptr, row, n_weight, b0, b1, nb, x_ptr, table_ptr, xm,
               x_row_stride, TYPE, BLOCK_BYTES, DENORMAL, BLOCK_M, F32)
    W_LEFT: tl.constexpr = w_left(TYPE, BLOCK_M)
    QK: tl.constexpr = 32 if TYPE == "Q4_0" or TYPE == "Q5_0" or TYPE == "Q8_0" or TYPE == "MXFP4" else 256
    m = m_first + tl.arange(0, BLOCK_M)
    # the tile's rows of x and columns of out as index tiles that broadcast to its shape
    if BLOCK_M == 1:  # one row of x: 1-D, as light on registers as the loop
        res = tl.sum(acc, axis=1)
        m2 = m
        n2 = n
        if NORM_IN:  # linear in x: the row's rstd scales the sums of this range
            res *= rms_rstd(sumsq_ptr, xm, nb * QK, eps)
    else:
        if DENORMAL:
            acc *= 2.0 ** _T
        res = acc
        if NORM_IN:
            rstd = rms_rstd(sumsq_ptr, xm, nb * QK, eps)
        if W_LEFT:
            m2 = m[None, :]
            n2 = n[:, None]
            if NORM_IN:
                res *= rstd[None, :]
        else:
            m2 = m[:, None]
            n2 = n[None, :]
            if NORM_IN:
                res *= rstd[:, None]
    if ACT != "":  # gate tile t and up tile t meet at counter t of their row tile
        counter = count_ptr + tile + tl.program_id(2) * tiles0
    else:
        counter = count_ptr + pid + tl.program_id(2) * tl.num_programs(0)
    _finish(res, m, m2, n2, n_first, n_weight, tile * BLOCK_N, M, N0 + N1 + N2, N0, out_ptr, part_ptr, counter,
            residual_ptr, norm_w_ptr, h_ptr, sumsq_ptr, SPLIT, NORM_OUT, ACT, W_LEFT)


@triton.jit
def _finish(res, m, m2, n2, n_first, n_weight, col0, M, N, N0, out_ptr, part_ptr, counter, residual_ptr, norm_w_ptr,
            h_ptr, sumsq_ptr, SPLIT: tl.constexpr, NORM_OUT: tl.constexpr, ACT: tl.constexpr,
            W_LEFT: tl.constexpr):
    """Store res, the tile [rows m2, columns n_first + n2] of the [M, N] product (`_store`); or with SPLIT or ACT,
    store it in part[program_id(1)] and count its arrival: the program that arrives last at the counter (all K
    ranges; with ACT, of both the gate and the up tile) adds all ranges in range order (the same bits every run,
    no second launch), stores the result (ACT: act(gate) * up, each rounded to out's dtype first, as separate
    launches round them) and sets the counter back to 0."""
    mask = (m2 < M) & (n2 < n_weight)
    offs = m2.to(tl.int64) * N + n_first + n2
    if SPLIT or ACT != "":
        numel = M * N
        tl.store(part_ptr + tl.program_id(1).to(tl.int64) * numel + offs, res, mask=mask)
        tl.debug_barrier()  # every thread's partial sums stored before the arrival is counted
        splits = tl.num_programs(1)
        arrivals = 2 * splits if ACT != "" else splits
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == arrivals - 1:
            if ACT != "":
                gate_offs = offs - n_first
                dt = out_ptr.dtype.element_ty
                g = _sum_parts(part_ptr, gate_offs, mask, numel, splits).to(dt).to(tl.float32)
                u = _sum_parts(part_ptr, gate_offs + N0, mask, numel, splits).to(dt).to(tl.float32)
                tl.store(out_ptr + m2.to(tl.int64) * N0 + n2, (activate(g, ACT) * u).to(dt), mask=mask)
            else:
                _store(_sum_parts(part_ptr, offs, mask, numel, splits), m, m2, n2, offs, mask, col0, M, N, out_ptr,
                       residual_ptr, norm_w_ptr, h_ptr, sumsq_ptr, NORM_OUT, W_LEFT)
            tl.store(counter, 0)
    else:
        _store(res, m, m2, n2, offs, mask, col0, M, N, out_ptr, residual_ptr, norm_w_ptr, h_ptr, sumsq_ptr, NORM_OUT,
               W_LEFT)


@triton.jit
def _sum_parts(part_ptr, offs, mask, numel, splits):
    """The sum of the K ranges' partial sums at offs, in range order."""
    total = tl.zeros(offs.shape, tl.float32)
    for s in range(splits):  # .cg: from L2, where the other programs' stores are
        total += tl.load(part_ptr + s * numel + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def _store(res, m, m2, n2, offs, mask, col0, M, N, out_ptr, residual_ptr, norm_w_ptr, h_ptr, sumsq_ptr,
           NORM_OUT: tl.constexpr, W_LEFT: tl.constexpr):
    """out[offs] = res in out's dtype; NORM_OUT (one weight, N columns, the tile's from col0): h = that + residual,
    stored at h_ptr, and out = h * norm_w with the sums of h^2 per chunk of columns (a PendingNorm, see
    rmsnorm.py)."""
    dt = out_ptr.dtype.element_ty
    if NORM_OUT:
        h = res.to(dt).to(tl.float32) + tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = tl.where(mask, h, 0.0)
        tl.store(h_ptr + offs, h.to(dt), mask=mask)
        w = tl.load(norm_w_ptr + n2, mask=n2 < N, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (h * w).to(dt), mask=mask)
        if m.shape[0] == 1:  # the tile as [rows, columns]
            store_sumsq(sumsq_ptr, h[None, :], m, M, col0, N)
        elif W_LEFT:
            store_sumsq(sumsq_ptr, tl.trans(h), m, M, col0, N)
        else:
            store_sumsq(sumsq_ptr, h, m, M, col0, N)
    else:
        tl.store(out_ptr + offs, res.to(dt), mask=mask)


# GEMM tiles (BLOCK_M, BLOCK_N) that spill on sm_90 for these types (bench/sass.py, Triton 3.9 or 3.6). Q8_0's
# [128, 128] tile keeps its 8 bytes under 3.6, MXFP4's its 20 under 3.9: every smaller tile issues ~1.7x (MXFP4:
# 2x) the instructions per FLOP.
_GEMM_SPILLS = {(32, 64): {"Q4_K"}, (64, 128): {"Q6_K", "Q8_0", "Q5_0", "IQ4_XS", "MXFP4"},
                (128, 64): {"Q6_K", "Q8_0", "Q4_0", "Q5_0", "IQ4_XS", "MXFP4"}}


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The configs that do not spill on sm_90 (bench/sass.py). One row of x: 256 rows of W only for Q4_K, Q5_K,
    IQ4_XS and MXFP4 (whose loops, at 16 rows of W per thread, issue the fewest instructions per byte), 32 too for
    IQ4_XS and MXFP4. 2..16 rows of x: more than 16 rows of W per warp only for Q4_K, Q5_K, Q6_K, Q4_0, IQ4_XS and
    MXFP4 (the float16 loops of the last two issue the fewest per byte at 256 rows, whose share of x's scaling per
    block is the smallest). GEMM tiles: those of _GEMM_SPILLS left out."""
    t, block_m = kwargs["TYPE"], kwargs.get("BLOCK_M")
    if block_m is None:  # GEMM tiles
        return [c for c in configs if t not in _GEMM_SPILLS.get((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]), ())]
    if block_m == 1:
        low, high = (32, 256) if t in ("IQ4_XS", "MXFP4") else (64, 256 if t in ("Q4_K", "Q5_K") else 128)
        return [c for c in configs if low <= c.kwargs["BLOCK_N"] <= high] or configs[:1]
    per_warp = 256 if t in ("Q4_K", "Q5_K", "Q6_K", "Q4_0", "IQ4_XS", "MXFP4") else 16
    return [c for c in configs if c.kwargs["BLOCK_N"] <= per_warp * c.num_warps] or configs[:1]


@functools.cache
def _tuned(be: str, block_m: int | None):
    """The autotuned kernel for one row of x (block_m 1), 2..16 rows (MAX_M) or a GEMM (None: BLOCK_M tuned)."""
    if block_m is None:
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w) for m, n, w in _GEMM_CONFIGS[be]]
    else:
        configs = [triton.Config({"BLOCK_N": n}, num_warps=w) for n, w in (_CONFIGS if block_m == 1 else
                                                                             _DOT_CONFIGS)[be]]
    # cache_results: the timings persist in Triton's cache folder (see cache.py): a second start skips tuning.
    return triton.autotune(configs, key=["m_bucket", "N0", "N1", "N2", "nb", "TYPE"],
                           prune_configs_by={"early_config_prune": _prune}, cache_results=True)(_qgemv_kernel)


@functools.cache
def _value_table(ggml_type: GGMLType, device: torch.device) -> torch.Tensor:
    """The table words the decoders read (int32 [6, 8] on `device`, 8 copies of each): for IQ4_XS and MXFP4 (`_table`)
    the 16 bytes value + offset as 4 words and the permute constant, zeros for other types; then `_f16_ints`'s top
    bytes, 0x64646464."""
    words = np.zeros((6, 8), np.int32)
    words[5] = 0x64646464
    table = {GGMLType.IQ4_XS: (IQ4NL_VALUES, _IQ4NL_OFFSET), GGMLType.MXFP4: (MXFP4_VALUES, _MXFP4_OFFSET)}
    if ggml_type in table:
        values, offset = table[ggml_type]
        words[:4] = (values.astype(np.int32) + offset.value).astype(np.uint8).view(np.int32)[:, None]
        words[4] = 0x32103210
    return torch.from_numpy(words).to(device)


def rows_aligned(ggml_type: GGMLType, shape: Sequence[int]) -> bool:
    """Whether a weight of this type and `shape` ((N, K), or (E, N, K) experts) keeps every row 4-byte aligned for
    the word loads in the layout the decoders read unpadded: the file's (Q4_K, Q5_K, IQ4_XS: always), or `to_planar`'s
    (the per-row planar types: rows of an even count of blocks; MXFP4: its matrices' starts). Such weights are relaid
    once at load; others take a padded copy per call (`word_layout`)."""
    traits = TYPE_TRAITS[ggml_type]
    row_bytes = shape[-1] // traits.block_elements * traits.block_bytes
    if ggml_type in MATRIX_PLANAR_TYPES:  # one matrix, or matrices of whole words
        return math.prod(shape[:-2]) <= 1 or shape[-2] * row_bytes % 4 == 0
    return ggml_type in GEMV_TYPES and row_bytes % 4 == 0


def word_layout(raw: torch.Tensor, ggml_type: GGMLType, shape: Sequence[int], planar: bool
                ) -> tuple[torch.Tensor, int, int]:
    """(bytes, row stride, matrix stride) the word decoders read for the weight `raw` of `shape` ((N, K) or
    (E, N, K); planar: relaid by `to_planar`): `RELAID_TYPES` relaid here unless given so, each row (MXFP4: matrix)
    padded to 16 bytes where `rows_aligned` fails (a copy per call); 16-byte aligned (a fresh tensor has 256)."""
    traits = TYPE_TRAITS[ggml_type]
    n_rows, K = shape[-2] if len(shape) > 1 else 1, shape[-1]
    row_bytes = K // traits.block_elements * traits.block_bytes
    matrix_bytes = n_rows * row_bytes
    if ggml_type in RELAID_TYPES and not (planar and rows_aligned(ggml_type, shape)):
        if planar:
            raw = from_planar(raw, ggml_type, shape)
        if ggml_type in MATRIX_PLANAR_TYPES:
            matrix_bytes = triton.cdiv(matrix_bytes, 16) * 16
            raw = to_planar(raw, ggml_type, shape, matrix_bytes)
        else:
            row_bytes = triton.cdiv(row_bytes, 16) * 16
            matrix_bytes = n_rows * row_bytes
            raw = to_planar(raw, ggml_type, shape, row_bytes)
    return (raw.clone() if raw.data_ptr() % 16 else raw), row_bytes, matrix_bytes


def gemv_splits(ggml_type: GGMLType, N: int, K: int, sms: int, splits: int | None = None) -> int:
    """Blocks per K range of a split product: enough ranges for two programs per SM (or `splits` ranges), at most
    16, the 32-element types' ranges whole steps of _BLOCKS_PER_STEP blocks."""
    nb = K // TYPE_TRAITS[ggml_type].block_elements
    if splits is None:
        splits = max(1, min(16, triton.cdiv(2 * sms, triton.cdiv(N, _SPLIT_ROWS))))
    step = 1 if TYPE_TRAITS[ggml_type].block_elements == 256 else _STEP
    return triton.cdiv(triton.cdiv(nb, min(splits, nb)), step) * step


def act_fits(M: int, N0: int, device: torch.device) -> bool:
    """Whether a gate/up product (`qgemv`'s act) of M rows of x and N0 rows per weight finds an arrival counter for
    each pair of tiles, at the smallest tiles of the backend's configs."""
    be = backend(device)
    if M > MAX_M:
        tiles = triton.cdiv(N0, min(c[1] for c in _GEMM_CONFIGS[be])) * triton.cdiv(M, min(c[0] for c in
                                                                                          _GEMM_CONFIGS[be]))
    else:
        tiles = triton.cdiv(N0, min(c[0] for c in (_CONFIGS if M == 1 else _DOT_CONFIGS)[be]))
    return tiles <= ARRIVAL_COUNTERS


def qgemv(x: torch.Tensor, raws: Sequence[torch.Tensor], ggml_type: GGMLType, shapes: Sequence[tuple[int, int]],
          out: torch.Tensor, split_blocks: int, *, row_bytes: int | None = None, denormal: bool | None = None,
          norm_in: tuple[torch.Tensor, float] | None = None,
          norm_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
          act: str | None = None) -> torch.Tensor:
    """out = x [M, K] @ [W0; W1; W2]^T for one to three weights (one launch), K cut into ranges of split_blocks
    blocks (as many as nb / split_blocks: see `gemv_splits`).

    x: any number of rows (more than MAX_M: GEMM tiles, in one range), last dim contiguous. Weights Wi of
    `shapes[i]` (Ni, K), of one type in GEMV_TYPES, as `raws[i]` bytes in `word_layout`'s layout, rows row_bytes
    apart (default: unpadded); qgemv makes no copy. out: [M, sum Ni], any float dtype. denormal: the field decoding
    (default: the backend's, see the module docstring). Arguments are checked by `qmatmul`, the public entry
    point. Split launches count their arrivals in `arrival_counters`. Fused variants (rmsnorm.PendingNorm):
    - norm_in (sumsq, eps): x is a PendingNorm's y, sumsq its chunk sums; out's rows are scaled by its rstd.
    - norm_out (residual, norm_w, h, sumsq), one weight: h = x @ W0^T rounded to out's dtype, + residual (both
      [M, N0], out's dtype) is stored in h, and out [M, N0] with sumsq [M, cdiv(N0, RMS_CHUNK)] float32 are the
      PendingNorm of rmsnorm(h, norm_w).
    - act ("silu" or "gelu"), two weights of one shape (gate, up): out [M, N0] = act(gate) * up, each product
      rounded to out's dtype first (as `activations.silu_mul` of the two products); see `act_fits`.
    """
    if not 1 <= len(raws) <= 3 or len(shapes) != len(raws):
        raise ValueError(f"qgemv takes one to three weights with a shape each, got {len(raws)} and {len(shapes)}")
    if act is not None and (len(shapes) != 2 or shapes[0] != shapes[1] or norm_out is not None):
        raise ValueError(f"qgemv's act takes two weights of one shape (gate, up), got {list(shapes)}")
    if norm_out is not None and (len(shapes) != 1 or norm_in is not None):
        raise ValueError("qgemv's norm_out takes one weight, and no norm_in")
    M = x.shape[0]
    K = shapes[0][1]
    traits = TYPE_TRAITS[ggml_type]
    nb = K // traits.block_elements
    splits = triton.cdiv(nb, split_blocks)
    be = backend(x.device)
    ws = [*raws, raws[0], raws[0]][:3]
    ns = [*(s[0] for s in shapes), 0, 0][:3]
    block_m = 1 if M == 1 else MAX_M if M <= MAX_M else None
    if splits > 1 and (block_m is None or sum(triton.cdiv(n, 16) for n in ns) > ARRIVAL_COUNTERS):
        raise ValueError(f"qgemv splits K for at most {MAX_M} rows of x and {16 * ARRIVAL_COUNTERS} rows of W, got "
                         f"{M} and {sum(ns)}")
    if act is not None and not act_fits(M, ns[0], x.device):
        raise ValueError(f"qgemv's act has too few arrival counters for {M} rows of x and {ns[0]} rows per weight")
    part = torch.empty((splits, M, sum(ns)), dtype=torch.float32, device=x.device) if splits > 1 or act else out
    residual, norm_w, h, sumsq = norm_out or (out, out, out, norm_in[0] if norm_in else out)
    tile = {} if block_m is None else {"BLOCK_M": block_m}
    _tuned(be, block_m)[lambda meta: (sum(triton.cdiv(n, meta["BLOCK_N"]) for n in ns), splits,
                                      triton.cdiv(M, meta["BLOCK_M"]))](
        x, *ws, _value_table(ggml_type, x.device), out, part, arrival_counters(x.device), residual, norm_w, h, sumsq,
        norm_in[1] if norm_in else 0.0, M, min(triton.next_power_of_2(M), _M_BUCKET_CAP), *ns, nb, x.stride(0),
        row_bytes or nb * traits.block_bytes, split_blocks,
        SPLIT=splits > 1, TYPE=ggml_type.name, BLOCK_BYTES=traits.block_bytes,
        DENORMAL=be != "hip" and (M == 1 or x.dtype != torch.float16) if denormal is None else denormal,
        F32=f32_dot(x), NORM_IN=norm_in is not None, NORM_OUT=norm_out is not None, ACT=act or "", **tile,
    )
    return out
