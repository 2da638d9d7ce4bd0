"""Making quantized data: reference quantizers, and random blocks of any type.

`quantize` gives the bytes llama.cpp writes without an importance matrix: for the 32-element block types here
(Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, in torch; also the PyPI `gguf` package's bytes) the same float32 operations
in the same order as its `quantize_row_*_ref`, truncation where C casts, round-half-away-from-zero where it
calls `roundf`; for the super-block types (K-quants, TQ1_0, TQ2_0, IQ4_NL, IQ4_XS) those of `quantize_k`, for
IQ3_S those of `quantize_iq3`;
F32, F16 and BF16 as ggml converts floats. `random_blocks` encodes random valid blocks of every dequantizable
type directly: random bytes with chosen fp16 scales. Both make quantized tensors of any shape for tests,
benchmarks, synthetic models and `ggtriton quantize`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .quants import DEQUANTIZERS
from .types import GGMLType

Tensor = torch.Tensor


def _f16_bytes(v: Tensor) -> Tensor:
    return v.half().view(torch.uint8)


def _inverse(d: Tensor) -> Tensor:
    return torch.where(d == 0, 0.0, 1.0 / d)


def _roundf(x: Tensor) -> Tensor:
    """C `roundf`: halves away from zero."""
    a = x.abs()
    f = a.floor()
    return x.sign() * (f + (2 * (a - f)).floor())


def _pack_nibbles(q: Tensor) -> Tensor:
    """Element i in the low nibble of byte i, element 16 + i in its high nibble."""
    return (q[:, :16] & 15 | (q[:, 16:] & 15) << 4).to(torch.uint8)


def _pack_high_bits(q: Tensor) -> Tensor:
    """Bit 4 of each of the 32 elements, as a little-endian 32-bit word."""
    h = (q >> 4 & 1).reshape(-1, 4, 8) << torch.arange(8, device=q.device)
    return h.sum(-1).to(torch.uint8)


def _signed_max(blocks: Tensor) -> Tensor:
    """The element of largest magnitude (the first of equals), with its sign."""
    return blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))


def _q8_0(blocks: Tensor) -> Tensor:
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = _roundf(blocks * _inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), q], -1)


def _q4_0(blocks: Tensor) -> Tensor:
    d = _signed_max(blocks) / -8
    q = torch.trunc(blocks * _inverse(d) + 8.5).to(torch.uint8).clamp(0, 15)
    return torch.cat([_f16_bytes(d), _pack_nibbles(q)], -1)


def _q5_0(blocks: Tensor) -> Tensor:
    d = _signed_max(blocks) / -16
    q = torch.trunc(blocks * _inverse(d) + 16.5).to(torch.uint8).clamp(0, 31)
    return torch.cat([_f16_bytes(d), _pack_high_bits(q), _pack_nibbles(q)], -1)


def _affine(blocks: Tensor, levels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Scale, min and codes of a block quantized to `levels` steps above its minimum."""
    lo = blocks.amin(-1, keepdim=True)
    d = (blocks.amax(-1, keepdim=True) - lo) / levels
    q = torch.trunc((blocks - lo) * _inverse(d) + 0.5).to(torch.uint8).clamp(0, levels)
    return d, lo, q


def _q4_1(blocks: Tensor) -> Tensor:
    d, lo, q = _affine(blocks, 15)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)], -1)


def _q5_1(blocks: Tensor) -> Tensor:
    d, lo, q = _affine(blocks, 31)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _pack_high_bits(q), _pack_nibbles(q)], -1)


_QUANTIZERS = {
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q4_1: _q4_1,
    GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1,
}


def _bf16(x: Tensor) -> Tensor:
    """ggml's float -> bf16: round to nearest even; a NaN keeps its top bits, made quiet."""
    u = x.view(torch.int32).long() & 0xFFFFFFFF
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    h = torch.where(nan, u >> 16 | 64, (u + (0x7FFF + (u >> 16 & 1))) >> 16)
    return h.to(torch.int32).to(torch.int16).view(torch.uint8).reshape(-1, 2)


_FLOAT_CONVERTERS: dict[GGMLType, Callable[[Tensor], Tensor]] = {
    GGMLType.F32: lambda x: x.view(torch.uint8).reshape(-1, 4),
    GGMLType.F16: lambda x: _f16_bytes(x).reshape(-1, 2),
    GGMLType.BF16: _bf16,
}


def quantizer(ggml_type: int) -> Callable[[Tensor], Tensor] | None:
    """The function taking [blocks, block elements] float32 to [blocks, block bytes] uint8 for a type, or None."""
    from .quantize_iq3 import QUANTIZERS as IQ3_QUANTIZERS  # both built on this module's helpers
    from .quantize_k import QUANTIZERS

    t = GGMLType(ggml_type)
    return _QUANTIZERS.get(t) or QUANTIZERS.get(t) or IQ3_QUANTIZERS.get(t) or _FLOAT_CONVERTERS.get(t)


def quantize(data: np.ndarray | Tensor, ggml_type: int) -> Tensor:
    """Quantize `data` (rows of whole blocks, last dim) to uint8 of shape (*shape[:-1], row bytes)."""
    t = GGMLType(ggml_type)
    x = torch.as_tensor(data).float().contiguous()
    to_blocks = quantizer(t)
    if to_blocks is None:
        raise ValueError(f"{t.name}: quantization is not supported (tensor of shape {tuple(x.shape)})")
    qk = t.block_elements
    if x.ndim == 0 or x.shape[-1] % qk:
        raise ValueError(f"{t.name}: rows of a tensor of shape {tuple(x.shape)} do not hold whole blocks of {qk}")
    shape = (*x.shape[:-1], x.shape[-1] // qk * t.block_bytes)
    if x.numel() == 0:
        return torch.empty(shape, dtype=torch.uint8, device=x.device)
    return to_blocks(x.reshape(-1, qk)).reshape(shape)


# Offsets of the fp16 scale fields of each type's block (IQ1_M spreads its scale over four nibbles).
_F16_FIELDS: dict[GGMLType, tuple[int, ...]] = {
    GGMLType.F16: (0,),
    GGMLType.Q4_0: (0,),
    GGMLType.Q4_1: (0, 2),
    GGMLType.Q5_0: (0,),
    GGMLType.Q5_1: (0, 2),
    GGMLType.Q8_0: (0,),
    GGMLType.Q2_K: (80, 82),
    GGMLType.Q3_K: (108,),
    GGMLType.Q4_K: (0, 2),
    GGMLType.Q5_K: (0, 2),
    GGMLType.Q6_K: (208,),
    GGMLType.IQ1_S: (0,),
    GGMLType.IQ2_XXS: (0,),
    GGMLType.IQ2_XS: (0,),
    GGMLType.IQ2_S: (0,),
    GGMLType.IQ3_XXS: (0,),
    GGMLType.IQ3_S: (0,),
    GGMLType.IQ4_NL: (0,),
    GGMLType.IQ4_XS: (0,),
    GGMLType.TQ1_0: (52,),
    GGMLType.TQ2_0: (64,),
}


def random_blocks(
    ggml_type: int, n_blocks: int, rng: np.random.Generator, scales: np.ndarray | None = None
) -> np.ndarray:
    """[n_blocks, block bytes] uint8: random bytes, each fp16 scale drawn from `scales` (default: N(0, 2^-7)).

    Other fields stay random: every bit pattern of them is valid (MXFP4's E8M0 scale byte spans 2^-127 to 2^128).
    """
    t = GGMLType(ggml_type)
    if t not in DEQUANTIZERS:
        raise ValueError(f"{t.name}: no block layout to fill")
    blocks = rng.integers(0, 256, size=(n_blocks, t.block_bytes), dtype=np.uint8)

    def draw() -> np.ndarray:
        v = rng.choice(scales, n_blocks) if scales is not None else rng.standard_normal(n_blocks) / 128
        return v.astype(np.float16).view(np.uint16)

    for offset in _F16_FIELDS.get(t, ()):
        blocks[:, offset : offset + 2] = draw().view(np.uint8).reshape(n_blocks, 2)
    if t == GGMLType.IQ1_M:
        d = draw()
        for w in range(4):  # nibble w of d is the top nibble of the scale word at 48 + 2 w
            hi = blocks[:, 49 + 2 * w]
            blocks[:, 49 + 2 * w] = hi & 0x0F | ((d >> (4 * w)) & 0x0F).astype(np.uint8) << 4
    return blocks
