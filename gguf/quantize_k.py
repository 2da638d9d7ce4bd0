"""Reference quantizers of the 256-element super-block types and the non-linear 4-bit ones.

K-quants (Q2_K ... Q6_K), ternary TQ1_0 / TQ2_0 and IQ4_NL / IQ4_XS, as llama.cpp makes them without an
importance matrix (`quantize_row_*_ref`, `make_qx_quants`, `make_q3_quants`, `make_qkx2_quants`,
`quantize_row_iq4_nl_impl`). Every block is handled at once, in float32 torch tensors, with llama.cpp's
operations in its order: each sum runs over its elements one by one from the first (`_sum`), each scalar
constant is rounded to float32 before it meets a tensor, a constant divided by a tensor is divided (not
multiplied by a reciprocal), square roots are correctly rounded, `nearest_int` reads the mantissa bits of
x + 1.5 * 2^23, scales go through fp16 before they are used again. The bytes equal llama.cpp's.

Each quantizer maps [blocks, elements] float32 to [blocks, block bytes] uint8.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .quant_tables import IQ4NL_VALUES
from .quantize import _f16_bytes, _roundf
from .types import GGMLType

Tensor = torch.Tensor

# Below this largest magnitude a group counts as all zero.
_GROUP_MAX_EPS = 1e-15


def _f32(*terms: float) -> float:
    """Sum of the terms as C adds float operands left to right (each step rounded to float32)."""
    acc = np.float32(terms[0])
    for t in terms[1:]:
        acc = np.float32(acc + np.float32(t))
    return float(acc)


def _div(a: float, t: Tensor) -> Tensor:
    """a / t divided in float32 (torch computes `float / tensor` as a reciprocal times a, rounding twice)."""
    return torch.full_like(t, a) / t


def _nearest_int(x: Tensor) -> Tensor:
    """llama.cpp's `nearest_int`: halves to even, from the low mantissa bits of x + 1.5 * 2^23 (int32)."""
    bits = (x + 12582912.0).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _sum(t: Tensor) -> Tensor:
    """Sum over the last dimension, element by element from the first, in float32."""
    columns = t.movedim(-1, 0).contiguous()  # contiguous rows: each add streams instead of striding
    acc = columns[0] + 0.0  # from +0.0, as a float32 accumulator starts (-0.0 + 0.0 is +0.0)
    for column in columns[1:]:
        acc += column
    return acc


def _by_columns(x: Tensor) -> Tensor:
    """x [groups, elements] stored element-major (a transposed contiguous copy): the elementwise work on it keeps
    that layout, so that `_sum` and per-element steps read whole contiguous columns instead of copying them."""
    return x.T.contiguous().T


def _signed_absmax(x: Tensor) -> tuple[Tensor, Tensor]:
    """Largest magnitude over the last dim, and the first element that has it, with its sign."""
    i = x.abs().argmax(-1, keepdim=True)
    v = x.gather(-1, i).squeeze(-1)
    return v.abs(), v


def _to_u8(v: Tensor) -> Tensor:
    """C's conversion of an int to uint8: modulo 256."""
    return (v & 0xFF).to(torch.uint8)


def _bit_shifts(device: torch.device) -> Tensor:
    """[8, 1] shifts 0..7: bit k of a byte for the k-th of 8 rows of 32 elements."""
    return torch.arange(8, dtype=torch.uint8, device=device)[:, None]


def _pack_2bit(q: Tensor) -> Tensor:
    """[n, 256] 2-bit codes -> [n, 64]: byte 32 h + l holds elements 128 h + l + 32 k at bits 2 k."""
    q = q.to(torch.uint8).reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | q[:, :, 1] << 2 | q[:, :, 2] << 4 | q[:, :, 3] << 6).reshape(-1, 64)


def _qx_quants(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """Symmetric codes in [0, 2 nmax) and scale of each group (rows of x), weighted by x^2, trying 19 scales."""
    x = _by_columns(x)
    amax, vmax = _signed_absmax(x)
    zero = amax < _GROUP_MAX_EPS
    vmax = torch.where(zero, 1.0, vmax)
    x2 = x * x

    def codes_and_sums(iscale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        lv = _nearest_int(iscale[:, None] * x).clamp(-nmax, nmax - 1)
        lf = lv.float()
        return lv, _sum(x2 * x * lf), _sum(x2 * lf * lf)

    lv, sumlx, suml2 = codes_and_sums(_div(-nmax, vmax))
    scale = torch.where(suml2 != 0, sumlx / suml2, 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        try_lv, try_lx, try_l2 = codes_and_sums(_div(-_f32(nmax, np.float32(0.1) * np.float32(step)), vmax))
        better = (try_l2 > 0) & (try_lx * try_lx > best * try_l2)
        lv = torch.where(better[:, None], try_lv, lv)
        scale = torch.where(better, try_lx / try_l2, scale)
        best = torch.where(better, scale * try_lx, best)
    codes = torch.where(zero[:, None], 0, lv + nmax)
    return codes, torch.where(zero, 0.0, scale)


def _q3_quants(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """Symmetric codes in [0, 2 nmax) and scale of each group, refined element by element (5 passes)."""
    x = _by_columns(x)
    amax, vmax = _signed_absmax(x)
    zero = amax < _GROUP_MAX_EPS
    vmax = torch.where(zero, 1.0, vmax)
    w = x * x
    wx = w * x
    lv = _nearest_int(_div(-nmax, vmax)[:, None] * x).clamp(-nmax, nmax - 1)
    lf = lv.float()
    sumlx, suml2 = _sum(wx * lf), _sum(w * lf * lf)
    # A pass that changes nothing leaves the state as it was, so the passes after it change nothing either:
    # running all five equals stopping early.
    for _ in range(5):
        for i in range(x.shape[1]):
            li = lv[:, i].float()
            slx = sumlx - wx[:, i] * li
            sl2 = suml2 - w[:, i] * li * li
            new_l = _nearest_int(x[:, i] * sl2 / slx).clamp(-nmax, nmax - 1)
            nf = new_l.float()
            slx = slx + wx[:, i] * nf
            sl2 = sl2 + w[:, i] * nf * nf
            take = (sumlx - wx[:, i] * li > 0) & (new_l != lv[:, i]) & (sl2 > 0)
            take &= slx * slx * suml2 > sumlx * sumlx * sl2
            lv[:, i] = torch.where(take, new_l, lv[:, i])
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    return torch.where(zero[:, None], 0, lv + nmax), torch.where(zero, 0.0, scale)


def _qkx2_quants(
    x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Affine codes in [0, nmax], scale and min (negated) of each group, searching nstep + 1 scales for the
    smallest weighted error (absolute with `use_mad`, else squared)."""
    x, w = _by_columns(x), _by_columns(w)
    lo = x.amin(-1).clamp(max=0.0)
    hi = x.amax(-1)
    flat = hi == lo
    # flat groups get codes 0 and scale 0 at the end; give them a harmless minimum meanwhile
    minimum = torch.where(flat, hi - 1.0, lo)
    sum_w, sum_x = _sum(w), _sum(w * x)

    def error(scale: Tensor, minimum: Tensor, lf: Tensor) -> Tensor:
        diff = scale[:, None] * lf + minimum[:, None] - x
        return _sum(w * (diff.abs() if use_mad else diff * diff))

    iscale = _div(nmax, hi - minimum)
    scale = _div(1.0, iscale)
    codes = _nearest_int(iscale[:, None] * (x - minimum[:, None])).clamp(0, nmax)
    best_error = error(scale, minimum, codes.float())
    for step in range(nstep + 1):
        # each try starts from the best minimum found so far
        iscale = _div(_f32(rmin, np.float32(rdelta) * np.float32(step), nmax), hi - minimum)
        try_codes = _nearest_int(iscale[:, None] * (x - minimum[:, None])).clamp(0, nmax)
        lf = try_codes.float()
        wl = w * lf
        sum_l, sum_l2, sum_xl = _sum(wl), _sum(wl * lf), _sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        try_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        try_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = try_min > 0
        try_scale = torch.where(positive, sum_xl / sum_l2, try_scale)
        try_min = torch.where(positive, 0.0, try_min)
        cur_error = error(try_scale, try_min, lf)
        better = (det > 0) & (cur_error < best_error)
        codes = torch.where(better[:, None], try_codes, codes)
        best_error = torch.where(better, cur_error, best_error)
        scale = torch.where(better, try_scale, scale)
        minimum = torch.where(better, try_min, minimum)
    codes = torch.where(flat[:, None], 0, codes)
    return codes, torch.where(flat, 0.0, scale), torch.where(flat, -lo, -minimum)


def _requantize(x: Tensor, d: Tensor, dm: Tensor | None, lo: int, hi: int, codes: Tensor) -> Tensor:
    """Codes of x under the stored group scales d (and mins dm): clamp(nearest(x [+ dm]) / d); groups whose
    scale is zero keep the codes they had."""
    safe = torch.where(d == 0, 1.0, d)
    num = x if dm is None else x + dm[:, None]
    new = _nearest_int(num / safe[:, None]).clamp(lo, hi)
    return torch.where((d == 0)[:, None], codes, new - lo)


def _max_positive(v: Tensor) -> Tensor:
    """The largest value of each row, or 0 if none is positive."""
    return v.amax(-1).clamp(min=0.0)


def _q2_k(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    x = blocks.reshape(-1, 16)
    codes, scales, mins = _qkx2_quants(x, x.abs(), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
    max_scale, max_min = _max_positive(scales), _max_positive(mins)
    has_scale, has_min = max_scale > 0, max_min > 0
    inv_scale = _div(15.0, torch.where(has_scale, max_scale, 1.0))
    inv_min = _div(15.0, torch.where(has_min, max_min, 1.0))
    ls = torch.where(has_scale[:, None], _nearest_int(inv_scale[:, None] * scales), 0)
    lm = torch.where(has_min[:, None], _nearest_int(inv_min[:, None] * mins), 0)
    packed = _to_u8(ls) | _to_u8(lm << 4)
    d = torch.where(has_scale, max_scale / 15.0, 0.0).half()
    dmin = torch.where(has_min, max_min / 15.0, 0.0).half()
    sub_d = (d.float()[:, None] * (packed & 0xF).float()).reshape(-1)
    sub_m = (dmin.float()[:, None] * (packed >> 4).float()).reshape(-1)
    codes = _requantize(x, sub_d, sub_m, 0, 3, codes).reshape(n, 256)
    return torch.cat([packed, _pack_2bit(codes), _f16_bytes(d[:, None]), _f16_bytes(dmin[:, None])], -1)


def _q3_k(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    x = blocks.reshape(-1, 16)
    codes, scales = _q3_quants(x, 4)
    scales = scales.reshape(n, 16)
    amax, max_scale = _signed_absmax(scales)
    has_scale = amax > 0
    iscale = _div(-32.0, torch.where(has_scale, max_scale, 1.0))
    ls = _nearest_int(iscale[:, None] * scales)
    ls = ((ls + 128 & 0xFF) - 128).clamp(-32, 31) + 32  # through int8, as C stores it
    ls = torch.where(has_scale[:, None], ls, 0)
    low = (ls & 0xF).to(torch.uint8)
    high = (ls >> 4).to(torch.uint8).reshape(n, 4, 4)  # [group of 4 (j // 4), j % 4]
    scale_bytes = torch.cat([low[:, :8] | low[:, 8:] << 4,
                             high[:, 0] | high[:, 1] << 2 | high[:, 2] << 4 | high[:, 3] << 6], -1)
    d = torch.where(has_scale, _div(1.0, iscale), 0.0).half()
    sub_d = (d.float()[:, None] * (ls - 32).float()).reshape(-1)
    codes = _requantize(x, sub_d, None, -4, 3, codes).reshape(n, 256)
    hmask = (codes > 3).to(torch.uint8).reshape(n, 8, 32) << _bit_shifts(codes.device)
    hmask = hmask.sum(1, dtype=torch.uint8)
    return torch.cat([hmask, _pack_2bit(codes & 3), scale_bytes, _f16_bytes(d[:, None])], -1)


def _k_scales(scales: Tensor, mins: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """6-bit scales and mins of Q4_K / Q5_K: their 12 packed bytes, the fp16 d and dmin, and per group
    the stored scale and min as floats."""
    max_scale, max_min = _max_positive(scales), _max_positive(mins)
    inv_scale = torch.where(max_scale > 0, _div(63.0, torch.where(max_scale > 0, max_scale, 1.0)), 0.0)
    inv_min = torch.where(max_min > 0, _div(63.0, torch.where(max_min > 0, max_min, 1.0)), 0.0)
    ls = _to_u8(_nearest_int(inv_scale[:, None] * scales)).clamp(max=63)
    lm = _to_u8(_nearest_int(inv_min[:, None] * mins)).clamp(max=63)
    packed = torch.cat([ls[:, :4] | (ls[:, 4:] >> 4) << 6,
                        lm[:, :4] | (lm[:, 4:] >> 4) << 6,
                        (ls[:, 4:] & 0xF) | (lm[:, 4:] & 0xF) << 4], -1)
    d, dmin = (max_scale / 63.0).half(), (max_min / 63.0).half()
    return packed, d, dmin, d.float()[:, None] * ls.float(), dmin.float()[:, None] * lm.float()


def _qk_affine(blocks: Tensor, nmax: int, rmin: float, nstep: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Q4_K / Q5_K: header bytes (d, dmin, scales) and the [n, 256] codes in [0, nmax]."""
    n = blocks.shape[0]
    x = blocks.reshape(-1, 32)
    # sqrt in float64 rounds to the correctly rounded float32 root, as sqrtf gives (torch's float32 sqrt may not)
    av_x = torch.sqrt((_sum(x * x) / 32.0).double()).float()
    codes, scales, mins = _qkx2_quants(x, av_x[:, None] + x.abs(), nmax, rmin, 0.1, nstep, False)
    packed, d, dmin, sub_d, sub_m = _k_scales(scales.reshape(n, 8), mins.reshape(n, 8))
    codes = _requantize(x, sub_d.reshape(-1), sub_m.reshape(-1), 0, nmax, codes).reshape(n, 256)
    return torch.cat([_f16_bytes(d[:, None]), _f16_bytes(dmin[:, None]), packed], -1), codes


def _pack_k_nibbles(q: Tensor) -> Tensor:
    """[n, 256] -> [n, 128]: byte 32 c + l holds element 64 c + l (low nibble) and 64 c + 32 + l (high)."""
    q = q.to(torch.uint8).reshape(-1, 4, 2, 32)
    return (q[:, :, 0] & 0xF | (q[:, :, 1] & 0xF) << 4).reshape(-1, 128)


def _q4_k(blocks: Tensor) -> Tensor:
    head, codes = _qk_affine(blocks, 15, -1.0, 20)
    return torch.cat([head, _pack_k_nibbles(codes)], -1)


def _q5_k(blocks: Tensor) -> Tensor:
    head, codes = _qk_affine(blocks, 31, -0.5, 15)
    high = (codes >> 4).to(torch.uint8).reshape(-1, 8, 32) << _bit_shifts(codes.device)
    return torch.cat([head, high.sum(1, dtype=torch.uint8), _pack_k_nibbles(codes)], -1)


def _q6_k(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    x = blocks.reshape(-1, 16)
    codes, scales = _qx_quants(x, 32)
    scales = scales.reshape(n, 16)
    amax, max_scale = _signed_absmax(scales)
    live = amax >= _GROUP_MAX_EPS
    iscale = _div(-128.0, torch.where(live, max_scale, 1.0))
    d = torch.where(live, _div(1.0, iscale), 0.0).half()
    ls = _nearest_int(iscale[:, None] * scales).clamp(max=127)
    ls = torch.where(live[:, None], ls, 0)
    sub_d = (d.float()[:, None] * ls.float()).reshape(-1)
    codes = _requantize(x, sub_d, None, -32, 31, codes).reshape(n, 256)
    codes = torch.where(live[:, None], codes, 0).to(torch.uint8).reshape(n, 2, 4, 32)
    low = codes & 0xF
    ql = torch.cat([low[:, :, 0] | low[:, :, 2] << 4, low[:, :, 1] | low[:, :, 3] << 4], -1).reshape(n, 128)
    hi = codes >> 4
    qh = (hi[:, :, 0] | hi[:, :, 1] << 2 | hi[:, :, 2] << 4 | hi[:, :, 3] << 6).reshape(n, 64)
    return torch.cat([ql, qh, ls.to(torch.int8).view(torch.uint8), _f16_bytes(d[:, None])], -1)


def _ternary(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Trits in {0, 1, 2} (for -1, 0, 1) of x / absmax, rounded half away from zero, and the fp16 absmax."""
    d = blocks.abs().amax(-1)
    inv = torch.where(d == 0, 0.0, _div(1.0, torch.where(d == 0, 1.0, d)))
    return (_roundf(blocks * inv[:, None]) + 1).to(torch.int32), d.half()


def _pack_trits(t: Tensor) -> Tensor:
    """[n, k, m] trits -> [n, m] bytes: the base-3 number of the k trits (the first most significant), scaled to
    a byte rounding up (k = 4 appends a zero trit)."""
    q = torch.zeros(t.shape[0], t.shape[2], dtype=torch.int32, device=t.device)
    for k in range(t.shape[1]):
        q = q * 3 + t[:, k]
    if t.shape[1] == 4:
        q = q * 3
    return ((q * 256 + 242) // 243).to(torch.uint8)


def _tq1_0(blocks: Tensor) -> Tensor:
    trits, d = _ternary(blocks)
    qs = torch.cat([_pack_trits(trits[:, :160].reshape(-1, 5, 32)),
                    _pack_trits(trits[:, 160:240].reshape(-1, 5, 16))], -1)
    qh = _pack_trits(trits[:, 240:].reshape(-1, 4, 4))
    return torch.cat([qs, qh, _f16_bytes(d[:, None])], -1)


def _tq2_0(blocks: Tensor) -> Tensor:
    trits, d = _ternary(blocks)
    t = trits.to(torch.uint8).reshape(-1, 2, 4, 32)
    qs = (t[:, :, 0] | t[:, :, 1] << 2 | t[:, :, 2] << 4 | t[:, :, 3] << 6).reshape(-1, 64)
    return torch.cat([qs, _f16_bytes(d[:, None])], -1)


_IQ4_LEVELS = torch.from_numpy(IQ4NL_VALUES.astype(np.float32))


def _iq4_index(v: Tensor) -> Tensor:
    """Index of the IQ4 level nearest to v (the upper one of two equally near)."""
    levels = _IQ4_LEVELS.to(v.device)
    upper = torch.searchsorted(levels, v.contiguous(), right=True).clamp(1, 15)
    below, above = levels[upper - 1], levels[upper]
    return torch.where(v - below < above - v, upper - 1, upper)


def _iq4_groups(x: Tensor) -> Tensor:
    """Scale of each 32-element group (rows of x) for the IQ4 levels, the best of 16 tries by weighted x^2 error."""
    x = _by_columns(x)
    amax, vmax = _signed_absmax(x)
    zero = amax < _GROUP_MAX_EPS
    vmax = torch.where(zero, 1.0, vmax)
    w = x * x

    def sums(inv_scale: Tensor) -> tuple[Tensor, Tensor]:
        q = _IQ4_LEVELS.to(x.device)[_iq4_index(inv_scale[:, None] * x)]
        wq = w * q
        return _sum(wq * x), _sum(wq * q)

    d = -vmax / float(IQ4NL_VALUES[0])
    sumqx, sumq2 = sums(_div(1.0, d))
    d = torch.where(sumq2 > 0, sumqx / sumq2, 0.0)
    best = d * sumqx
    for step in range(-7, 8):
        sumqx, sumq2 = sums(_div(step + int(IQ4NL_VALUES[0]), vmax))
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / sumq2, d)
        best = torch.where(better, d * sumqx, best)
    return torch.where(zero, 0.0, d)


def _pack_iq4(codes: Tensor) -> Tensor:
    """[n, k * 32] level indices -> [n, k * 16]: in each 32, element j low and element 16 + j high."""
    c = codes.to(torch.uint8).reshape(codes.shape[0], -1, 2, 16)
    return (c[:, :, 0] | c[:, :, 1] << 4).reshape(codes.shape[0], -1)


def _iq4_nl(blocks: Tensor) -> Tensor:
    d = _iq4_groups(blocks)
    inv = torch.where(d == 0, 0.0, _div(1.0, torch.where(d == 0, 1.0, d)))
    codes = _iq4_index(inv[:, None] * blocks)
    return torch.cat([_f16_bytes(d[:, None].half()), _pack_iq4(codes)], -1)


def _iq4_xs(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    x = blocks.reshape(-1, 32)
    scales = _iq4_groups(x).reshape(n, 8)
    _, max_scale = _signed_absmax(scales)
    d = -max_scale / 32.0
    inv = torch.where(d == 0, 0.0, _div(1.0, torch.where(d == 0, 1.0, d)))
    ls = _nearest_int(inv[:, None] * scales).clamp(-32, 31)
    dl = (d[:, None] * ls.float()).reshape(-1)
    inv_dl = torch.where(dl == 0, 0.0, _div(1.0, torch.where(dl == 0, 1.0, dl)))
    codes = _iq4_index(inv_dl[:, None] * x).reshape(n, 256)
    ls = (ls + 32).to(torch.uint8)
    low = ls & 0xF
    high = (ls >> 4).to(torch.int32) << 2 * torch.arange(8, dtype=torch.int32, device=ls.device)
    high = high.sum(-1, dtype=torch.int32)
    scales_h = torch.stack([high & 0xFF, high >> 8], -1).to(torch.uint8)
    return torch.cat([_f16_bytes(d[:, None].half()), scales_h, low[:, 0::2] | low[:, 1::2] << 4, _pack_iq4(codes)], -1)


QUANTIZERS: dict[GGMLType, Callable[[Tensor], Tensor]] = {
    GGMLType.Q2_K: _q2_k,
    GGMLType.Q3_K: _q3_k,
    GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k,
    GGMLType.Q6_K: _q6_k,
    GGMLType.TQ1_0: _tq1_0,
    GGMLType.TQ2_0: _tq2_0,
    GGMLType.IQ4_NL: _iq4_nl,
    GGMLType.IQ4_XS: _iq4_xs,
}
