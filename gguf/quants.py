"""Reference dequantization of every GGUF tensor type, in torch.

A tensor's bytes are a sequence of blocks (rows hold whole blocks); each type decodes a [blocks, bytes] uint8
tensor into [blocks, elements] float32 values, vectorized over blocks. The formulas are llama.cpp's
`dequantize_row_*`, with the float32 products and sums rounded one at a time in the same order (never fused),
so the values are bit-exact with the PyPI `gguf` package's `dequantize`. The byte layouts are spelled out in
the Triton decoders of `ggtriton.kernels.blocks`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .quant_tables import GRIDS, IQ1_DELTA, IQ4NL_VALUES, KSIGNS, MXFP4_VALUES
from .types import TYPE_TRAITS, GGMLType

Tensor = torch.Tensor

# Blocks decoded at once: bounds the temporaries of a large tensor to a few hundred MB.
_CHUNK_ELEMENTS = 1 << 22


def check_size(n_bytes: int, ggml_type: int, shape: Sequence[int]) -> GGMLType:
    """The type of `n_bytes` raw bytes holding a tensor of `shape`; ValueError if unsupported or mis-sized."""
    try:
        t = GGMLType(ggml_type)
    except ValueError:
        raise ValueError(f"unknown ggml type id {ggml_type} for a tensor of shape {tuple(shape)}") from None
    if t not in DEQUANTIZERS:
        raise ValueError(f"{t.name}: dequantization is not supported (tensor of shape {tuple(shape)})")
    if not shape or any(n < 0 for n in shape):
        raise ValueError(f"{t.name}: invalid tensor shape {tuple(shape)}")
    qk, block_bytes = TYPE_TRAITS[t].block_elements, TYPE_TRAITS[t].block_bytes
    if shape[-1] % qk:
        raise ValueError(f"{t.name}: rows of a tensor of shape {tuple(shape)} do not hold whole blocks of {qk}")
    expected = int(np.prod(shape, dtype=np.int64)) // qk * block_bytes
    if n_bytes != expected:
        raise ValueError(f"{t.name}: a tensor of shape {tuple(shape)} takes {expected} bytes, got {n_bytes}")
    return t


def dequantize(raw: np.ndarray | Tensor, ggml_type: int, shape: Sequence[int]) -> Tensor:
    """Decode the raw bytes of a tensor of `ggml_type` into float32 values of `shape` (PyTorch order).

    `raw` is a uint8 numpy array (a read-only memory map view is fine) or a uint8 torch tensor on any device.
    """
    if isinstance(raw, np.ndarray):
        if raw.dtype != np.uint8:
            raise ValueError(f"raw bytes must be uint8, got {raw.dtype}")
        with warnings.catch_warnings():  # read-only views are only ever read
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(np.ascontiguousarray(raw))
    elif raw.dtype != torch.uint8:
        raise ValueError(f"raw bytes must be uint8, got {raw.dtype}")
    t = check_size(raw.numel(), ggml_type, shape)
    qk, block_bytes = TYPE_TRAITS[t].block_elements, TYPE_TRAITS[t].block_bytes
    blocks = raw.reshape(-1, block_bytes)
    out = torch.empty(blocks.shape[0], qk, dtype=torch.float32, device=raw.device)
    step = max(1, _CHUNK_ELEMENTS // qk)
    for start in range(0, blocks.shape[0], step):
        out[start : start + step] = DEQUANTIZERS[t](blocks[start : start + step], t)
    return out.reshape(tuple(shape))


# Field helpers: slices of a [blocks, bytes] tensor.


def _f16(b: Tensor) -> Tensor:
    """[n, 2k] little-endian fp16 bytes -> [n, k] float32."""
    return b.contiguous().view(torch.float16).float()


def _u16(b: Tensor) -> Tensor:
    """[n, 2k] little-endian bytes -> [n, k] int32."""
    b = b.int().reshape(b.shape[0], -1, 2)
    return b[..., 0] | b[..., 1] << 8


def _u32(b: Tensor) -> Tensor:
    """[n, 4k] little-endian bytes -> [n, k] int64."""
    b = b.long().reshape(b.shape[0], -1, 4)
    return b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24


def _fields(b: Tensor, bits: int) -> Tensor:
    """Split each byte of [..., L] into its 8 // bits fields, lowest first: [..., 8 // bits, L] uint8."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=b.device)
    return (b.unsqueeze(-2) >> shifts[:, None]) & ((1 << bits) - 1)


def _bits(b: Tensor) -> Tensor:
    """[n, L] bytes -> [n, 8 L] bits, bit k of byte i at 8 i + k."""
    return _fields(b.unsqueeze(-1), 1).reshape(b.shape[0], -1)


def _nibbles(b: Tensor) -> Tensor:
    """[n, L] bytes -> [n, 2 L]: the low nibbles of all bytes, then the high ones."""
    return _fields(b, 4).reshape(b.shape[0], -1)


def _scale_nibbles(b: Tensor) -> Tensor:
    """[n, L] bytes -> [n, 2 L] nibbles, byte i giving 2 i (low) and 2 i + 1 (high)."""
    return _fields(b.unsqueeze(-1), 4).reshape(b.shape[0], -1)


@functools.cache
def _table(name: str, device: torch.device) -> Tensor:
    if name == "ksigns":
        # Sign factors (+1 / -1) of each of the 128 patterns, [128, 8].
        return 1.0 - 2.0 * _bits(torch.from_numpy(KSIGNS)[:, None]).float().to(device)
    values = {"iq4nl": IQ4NL_VALUES, "mxfp4": MXFP4_VALUES}.get(name)
    if values is None:
        values = GRIDS[GGMLType[name]]
    return torch.from_numpy(values).float().to(device)


# Plain floats: a block is one element.


def _float(b: Tensor, t: GGMLType) -> Tensor:
    if t == GGMLType.F32:
        return b.contiguous().view(torch.float32)
    if t == GGMLType.F16:
        return _f16(b)
    return (b.contiguous().view(torch.int16).int() << 16).view(torch.float32)


# 32-element blocks with one scale: x = d * q (+ m).


def _legacy(b: Tensor, t: GGMLType) -> Tensor:
    d = _f16(b[:, 0:2])
    if t == GGMLType.Q8_0:
        return b[:, 2:].view(torch.int8).float() * d
    if t in (GGMLType.Q4_0, GGMLType.Q4_1):
        q = _nibbles(b[:, -16:])
    else:  # Q5_0, Q5_1: a fifth bit per element from the 32-bit qh
        qh = b[:, 2:6] if t == GGMLType.Q5_0 else b[:, 4:8]
        q = _nibbles(b[:, -16:]) | _bits(qh) << 4
    if t in (GGMLType.Q4_0, GGMLType.Q5_0):
        return d * (q.float() - (8 if t == GGMLType.Q4_0 else 16))
    return d * q.float() + _f16(b[:, 2:4])


def _q2_k(b: Tensor, t: GGMLType) -> Tensor:
    n = b.shape[0]
    sc = b[:, 0:16].int()
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (sc & 15).float())[..., None]
    ml = (dmin * (sc >> 4).float())[..., None]
    q = _fields(b[:, 16:80].reshape(n, 2, 32), 2).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, 256)


def _q3_k(b: Tensor, t: GGMLType) -> Tensor:
    n = b.shape[0]
    s = b[:, 96:108]
    sc = (_fields(s[:, :8], 4).reshape(n, 16) | _fields(s[:, 8:], 2).reshape(n, 16) << 4).float() - 32
    dl = (_f16(b[:, 108:110]) * sc)[..., None]
    ql = _fields(b[:, 32:96].reshape(n, 2, 32), 2).reshape(n, 16, 16)
    qh = _fields(b[:, 0:32], 1).reshape(n, 16, 16)
    # a clear high bit subtracts 4
    return (dl * (ql.float() - ((qh ^ 1) << 2).float())).reshape(n, 256)


def _scale_min_k4(s: Tensor) -> tuple[Tensor, Tensor]:
    """The eight 6-bit scales and mins of Q4_K / Q5_K from their 12 bytes."""
    s = s.int()
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([lo & 63, (hi & 15) | (lo >> 6) << 4], -1)
    m = torch.cat([mid & 63, (hi >> 4) | (mid >> 6) << 4], -1)
    return sc, m


def _q45_k(b: Tensor, t: GGMLType) -> Tensor:
    n = b.shape[0]
    sc, m = _scale_min_k4(b[:, 4:16])
    dl = (_f16(b[:, 0:2]) * sc.float())[..., None]
    ml = (_f16(b[:, 2:4]) * m.float())[..., None]
    q = _fields(b[:, -128:].reshape(n, 4, 32), 4).reshape(n, 8, 32)
    if t == GGMLType.Q5_K:
        q = q | _fields(b[:, 16:48], 1) << 4
    return (dl * q.float() - ml).reshape(n, 256)


def _q6_k(b: Tensor, t: GGMLType) -> Tensor:
    n = b.shape[0]
    dl = (_f16(b[:, 208:210]) * b[:, 192:208].view(torch.int8).float())[..., None]
    ql = _fields(b[:, 0:128].reshape(n, 2, 64), 4).reshape(n, 256)
    qh = _fields(b[:, 128:192].reshape(n, 2, 32), 2).reshape(n, 256)
    q = (ql | qh << 4).reshape(n, 16, 16).float() - 32
    return (dl * q).reshape(n, 256)


# Ternary: x = d * (q - 1).


def _tq1_0(b: Tensor, t: GGMLType) -> Tensor:
    n = b.shape[0]
    pow3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32, device=b.device)

    def digits(qs: Tensor, k: int) -> Tensor:
        """Digit i of each byte, i < k, as byte * 3^i modulo 256 (read from the top: * 3 >> 8): [n, k * L]."""
        return ((qs.int()[:, None, :] * pow3[:k, None]) & 255).reshape(n, -1)

    x = torch.cat([digits(b[:, 0:32], 5), digits(b[:, 32:48], 5), digits(b[:, 48:52], 4)], -1)
    q = ((x * 3) >> 8) - 1
    return _f16(b[:, 52:54]) * q.float()


def _tq2_0(b: Tensor, t: GGMLType) -> Tensor:
    n = b.shape[0]
    q = _fields(b[:, 0:64].reshape(n, 2, 32), 2).reshape(n, 256).float() - 1
    return _f16(b[:, 64:66]) * q


# Non-linear codebooks.


def _iq4_nl(b: Tensor, t: GGMLType) -> Tensor:
    return _f16(b[:, 0:2]) * _table("iq4nl", b.device)[_nibbles(b[:, 2:18]).int()]


def _iq4_xs(b: Tensor, t: GGMLType) -> Tensor:
    n = b.shape[0]
    sh = _u16(b[:, 2:4])
    hi = (sh >> torch.arange(0, 16, 2, dtype=torch.int32, device=b.device)) & 3
    sc = (_scale_nibbles(b[:, 4:8]) | hi << 4) - 32
    dl = (_f16(b[:, 0:2]) * sc.float())[..., None]
    q = _fields(b[:, 8:136].reshape(n, 8, 16), 4).reshape(n, 8, 32).int()
    return (dl * _table("iq4nl", b.device)[q]).reshape(n, 256)


def _mxfp4(b: Tensor, t: GGMLType) -> Tensor:
    e = b[:, 0:1].int()
    # E8M0 scale, halved: 2^(e - 128), subnormal for e < 2.
    d = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23).view(torch.float32)
    return d * _table("mxfp4", b.device)[_nibbles(b[:, 1:17]).int()]


# I-quants: groups of 8 (or 4) values from a lattice grid, with signs.


def _iq2_xxs(b: Tensor, t: GGMLType) -> Tensor:
    n = b.shape[0]
    w = b[:, 2:66].reshape(n, 8, 8)  # 8 groups of 32: 4 grid bytes, then a 32-bit word of scale and signs
    aux = _u32(w[..., 4:8])  # [n, 8]
    db = (_f16(b[:, 0:2]) * (0.5 + (aux >> 28).float()) * 0.25)[..., None, None]
    signs = (aux[..., None] >> torch.tensor([0, 7, 14, 21], device=b.device)) & 127
    grid = _table(t.name, b.device)[w[..., 0:4].int()]  # [n, 8, 4, 8]
    return (db * grid * _table("ksigns", b.device)[signs]).reshape(n, 256)


def _iq2_xs(b: Tensor, t: GGMLType) -> Tensor:
    n = b.shape[0]
    qs = _u16(b[:, 2:66])  # 9-bit grid index, 7-bit sign index
    db = (_f16(b[:, 0:2]) * (0.5 + _scale_nibbles(b[:, 66:74]).float()) * 0.25)[..., None, None]
    grid = _table(t.name, b.device)[qs & 511].reshape(n, 16, 2, 8)
    signs = _table("ksigns", b.device)[qs >> 9].reshape(n, 16, 2, 8)
    return (db * grid * signs).reshape(n, 256)


def _iq2_s(b: Tensor, t: GGMLType) -> Tensor:
    n = b.shape[0]
    db = (_f16(b[:, 0:2]) * (0.5 + _scale_nibbles(b[:, 74:82]).float()) * 0.25)[..., None, None]
    idx = b[:, 2:34].int() | _fields(b[:, 66:74].unsqueeze(-1), 2).reshape(n, 32).int() << 8
    grid = _table(t.name, b.device)[idx].reshape(n, 16, 2, 8)
    signs = 1.0 - 2.0 * _bits(b[:, 34:66]).float().reshape(n, 16, 2, 8)
    return (db * grid * signs).reshape(n, 256)


def _iq3_xxs(b: Tensor, t: GGMLType) -> Tensor:
    n = b.shape[0]
    aux = _u32(b[:, 66:98])  # [n, 8]: scale and signs of each group of 32
    db = (_f16(b[:, 0:2]) * (0.5 + (aux >> 28).float()) * 0.5)[..., None, None]
    signs = (aux[..., None] >> torch.tensor([0, 7, 14, 21], device=b.device)) & 127
    grid = _table(t.name, b.device)[b[:, 2:66].int()].reshape(n, 8, 4, 8)
    return (db * grid * _table("ksigns", b.device)[signs]).reshape(n, 256)


def _iq3_s(b: Tensor, t: GGMLType) -> Tensor:
    n = b.shape[0]
    db = (_f16(b[:, 0:2]) * (1 + 2 * _scale_nibbles(b[:, 106:110])).float())[..., None, None]
    idx = b[:, 2:66].int() | _bits(b[:, 66:74]).int() << 8
    grid = _table(t.name, b.device)[idx].reshape(n, 8, 4, 8)
    signs = 1.0 - 2.0 * _bits(b[:, 74:106]).float().reshape(n, 8, 4, 8)
    return (db * grid * signs).reshape(n, 256)


def _iq1_s(b: Tensor, t: GGMLType) -> Tensor:
    n = b.shape[0]
    qh = _u16(b[:, 34:50])  # [n, 8]: 3 index bits for each of 4 sub-groups, 3-bit scale, delta sign
    dl = (_f16(b[:, 0:2]) * (2 * ((qh >> 12) & 7) + 1).float())[..., None, None]
    delta = torch.where((qh & 0x8000) != 0, -IQ1_DELTA, IQ1_DELTA)[..., None, None]
    hi = (qh[..., None] >> torch.tensor([0, 3, 6, 9], device=b.device)) & 7
    grid = _table(t.name, b.device)[b[:, 2:34].int().reshape(n, 8, 4) | hi << 8]
    return (dl * (grid + delta)).reshape(n, 256)


def _iq1_m(b: Tensor, t: GGMLType) -> Tensor:
    n = b.shape[0]
    sc = _u16(b[:, 48:56])  # [n, 4]: 3-bit scales, and the fp16 super-scale in their top nibbles
    d_bits = (sc[:, 0] >> 12) | (sc[:, 1] >> 12) << 4 | (sc[:, 2] >> 12) << 8 | (sc[:, 3] >> 12) << 12
    d = _f16(torch.stack([d_bits & 255, d_bits >> 8], -1).to(torch.uint8))
    s = (sc[..., None] >> torch.tensor([0, 3, 6, 9], device=b.device)) & 7
    dl = (d * (2 * s.reshape(n, 16) + 1).float())[..., None]  # [n, 16, 1]
    qh = _fields(b[:, 32:48].unsqueeze(-1), 4).reshape(n, 32).int()
    grid = _table(t.name, b.device)[b[:, 0:32].int() | (qh & 7) << 8]  # [n, 32, 8]
    delta = torch.where((qh & 8) != 0, -IQ1_DELTA, IQ1_DELTA)[..., None]
    return (dl * (grid + delta).reshape(n, 16, 16)).reshape(n, 256)


DEQUANTIZERS: dict[GGMLType, Callable[[Tensor, GGMLType], Tensor]] = {
    GGMLType.F32: _float,
    GGMLType.F16: _float,
    GGMLType.BF16: _float,
    GGMLType.Q4_0: _legacy,
    GGMLType.Q4_1: _legacy,
    GGMLType.Q5_0: _legacy,
    GGMLType.Q5_1: _legacy,
    GGMLType.Q8_0: _legacy,
    GGMLType.Q2_K: _q2_k,
    GGMLType.Q3_K: _q3_k,
    GGMLType.Q4_K: _q45_k,
    GGMLType.Q5_K: _q45_k,
    GGMLType.Q6_K: _q6_k,
    GGMLType.IQ1_S: _iq1_s,
    GGMLType.IQ1_M: _iq1_m,
    GGMLType.IQ2_XXS: _iq2_xxs,
    GGMLType.IQ2_XS: _iq2_xs,
    GGMLType.IQ2_S: _iq2_s,
    GGMLType.IQ3_XXS: _iq3_xxs,
    GGMLType.IQ3_S: _iq3_s,
    GGMLType.IQ4_NL: _iq4_nl,
    GGMLType.IQ4_XS: _iq4_xs,
    GGMLType.TQ1_0: _tq1_0,
    GGMLType.TQ2_0: _tq2_0,
    GGMLType.MXFP4: _mxfp4,
}
