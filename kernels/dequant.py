"""Dequantization of a GGUF tensor's raw bytes into float32, float16 or bfloat16 values.

out[b * QK + j] = element j of block b (the block layouts are documented in blocks.py and qgemv.py). Float32 output
is bit-exact with the reference `ggtriton.gguf.dequantize`; float16 / bfloat16 output is that value rounded to nearest
even. Each type is decoded by the one decoder every matmul path uses for it:
- the types of `qgemv.GEMV_TYPES`: qgemv's word decoders in their store mode (`qgemv.walk`), a tile of BLOCK_N rows
  of the last dim and a range of their blocks per program, in the layout of `qgemv.word_layout` (the per-row planar
  types and MXFP4 relaid, unless given so, by a copy of the bytes: the output is 2 to 8 times their size);
- the others: the element decoders of blocks.py, a tile of TILE blocks per program over the flat sequence of blocks
  (rows hold whole blocks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..gguf.quants import check_size
from ..gguf.quants import dequantize as _gguf_dequantize
from ..gguf.types import TYPE_TRAITS, GGMLType
from ._common import FLOAT_DTYPES, backend, to_bf16
from .blocks import decode_block, decode_table_tensor
from .planar import MATRIX_PLANAR_TYPES, check_relaid, from_planar
from .qgemv import _BLOCKS_PER_STEP, _STORE, GEMV_TYPES, _value_table, _zero_acc, walk, word_layout

# Elements each program of the element decoders decodes: TILE = this // block elements.
_TILE_ELEMENTS = 4096
# The word decoders' tiles per backend: (rows, elements of each row, warps). Unmeasured on a GPU; the interpreter's
# take 64 whole rows of up to 8192 elements, in few programs (its cost is per operation, whatever the tile).
_WORD_TILES = {"cuda": (32, 1024, 4), "hip": (32, 1024, 4), "interpreter": (64, 8192, 1)}


@triton.jit
def _dequant_kernel(raw_ptr, out_ptr, table_ptr, n_blocks, TYPE: tl.constexpr, QK: tl.constexpr,
                    BLOCK_BYTES: tl.constexpr, TILE: tl.constexpr):
    """Decode blocks [pid * TILE, pid * TILE + TILE) of raw (n_blocks blocks of BLOCK_BYTES bytes) into out."""
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * TILE + tl.arange(0, TILE)
    # Clamped so that decoding only reads valid blocks; the store is masked instead.
    src = tl.minimum(blk, n_blocks - 1)
    j = tl.arange(0, QK)
    v = decode_block(raw_ptr + src[:, None] * BLOCK_BYTES, j[None, :], table_ptr, TYPE)
    if out_ptr.dtype.element_ty == tl.bfloat16:
        v = to_bf16(v)
    else:
        v = v.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + blk[:, None] * QK + j[None, :], v, mask=(blk < n_blocks)[:, None])


@triton.jit
def _dequant_words_kernel(raw_ptr, out_ptr, table_ptr, n_rows, nb, row_bytes, matrix_bytes, range_blocks,
                          TYPE: tl.constexpr, QK: tl.constexpr, BLOCK_BYTES: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows [pid0 * BLOCK_N, + BLOCK_N) of matrix pid2 (n_rows rows of nb blocks, rows row_bytes and matrices
    matrix_bytes apart in raw), blocks [pid1 * range_blocks, + range_blocks) of each, decoded into out."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows past the last decode it again and store the same values: no masks in the decoders' loads
    row = tl.minimum(n, n_rows - 1).to(tl.int64)
    matrix = tl.program_id(2).to(tl.int64)
    b0 = tl.program_id(1) * range_blocks
    walk(_zero_acc(BLOCK_N, TYPE, _STORE), raw_ptr + matrix * matrix_bytes, row * row_bytes, n_rows, b0,
         tl.minimum(b0 + range_blocks, nb), nb, out_ptr + matrix * n_rows * nb * QK, table_ptr, row, nb * QK, TYPE,
         BLOCK_BYTES, False, _STORE, True)


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
        check_relaid(t)
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
    if t in GEMV_TYPES:
        _dequantize_words(raw, t, shape, out, planar)
        return out
    table = decode_table_tensor(t, raw.device)
    tile = max(1, _TILE_ELEMENTS // qk)
    _dequant_kernel[(triton.cdiv(n_blocks, tile),)](
        raw, out, raw if table is None else table, n_blocks, TYPE=t.name, QK=qk, BLOCK_BYTES=block_bytes, TILE=tile,
        enable_fp_fusion=False,  # keep d * q + m unfused: bit-exact with the reference
    )
    return out


def _dequantize_words(raw: torch.Tensor, t: GGMLType, shape: tuple[int, ...], out: torch.Tensor,
                      planar: bool) -> None:
    """`dequantize` of a type of GEMV_TYPES into out, on the word decoders."""
    K = shape[-1]
    if planar and t in MATRIX_PLANAR_TYPES:  # planes per matrix of the last two dims
        n_rows = shape[-2] if len(shape) > 1 else 1
    else:  # rows are rows: all of them as one matrix
        n_rows = out.numel() // K
    matrices = out.numel() // (n_rows * K)
    words, row_bytes, matrix_bytes = word_layout(raw, t, (matrices, n_rows, K), planar)
    qk = TYPE_TRAITS[t].block_elements
    nb = K // qk
    rows, elements, warps = _WORD_TILES[backend(raw.device)]
    step = 1 if qk == 256 else _BLOCKS_PER_STEP
    range_blocks = triton.cdiv(max(1, elements // qk), step) * step
    _dequant_words_kernel[(triton.cdiv(n_rows, rows), triton.cdiv(nb, range_blocks), matrices)](
        words, out, _value_table(t, raw.device), n_rows, nb, row_bytes, matrix_bytes, range_blocks, TYPE=t.name,
        QK=qk, BLOCK_BYTES=TYPE_TRAITS[t].block_bytes, BLOCK_N=rows, num_warps=warps,
        enable_fp_fusion=False,  # the reference's rounding: one rounding of each exact value
    )


def dequantize_ref(
    raw: torch.Tensor, ggml_type: int, shape: Sequence[int], dtype: torch.dtype = torch.float32, *,
    planar: bool = False,
) -> torch.Tensor:
    """Torch reference of `dequantize`: the GGUF reference dequantization, rounded to `dtype`."""
    if planar:
        raw = from_planar(raw, ggml_type, shape)
    return _gguf_dequantize(raw, ggml_type, shape).to(dtype)
