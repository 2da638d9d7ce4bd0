"""Reference quantizer of IQ3_S, as llama.cpp makes it without an importance matrix (`quantize_row_iq3_s_impl`).

Each 32-element sub-block stores the magnitudes of its values as eight points of a 512-entry grid of 4-vectors
of odd levels 1..15, their signs as bits, and a 4-bit scale relative to the block's fp16 scale. The scale of a
sub-block is the best of 19 tries by x^2-weighted error; each try rounds the magnitudes to levels, and a
4-vector that is not a grid point takes the nearest of its precomputed grid neighbours (`_neighbour_table`,
llama.cpp's `iq3xs_init_impl(512)`). All sub-blocks are handled at once, in float32 torch tensors, with the
arithmetic conventions of `quantize_k`; the bytes equal llama.cpp's, including where it compacts the codes
and signs of the non-zero sub-blocks of a block to its front (a zero sub-block writes none of them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from .quant_tables import GRIDS
from .quantize import _f16_bytes
from .quantize_k import _div, _f32, _nearest_int, _sum
from .types import GGMLType

Tensor = torch.Tensor

# Levels 0..7 stand for the magnitudes 1, 3, ..., 15 of the grid points.
_MAX_LEVEL = 7
_SHIFTS = np.arange(4, dtype=np.int32) * 3


@functools.cache
def _neighbour_table() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The grid as levels [512, 4]; for each of the 4096 level 4-vectors (level k at bits 3 k) its grid index
    or -1; and the grid points at its three smallest squared distances, by distance then index, as the
    concatenation of these lists and where each list starts (4097 offsets)."""
    grid = GRIDS[GGMLType.IQ3_S].astype(np.int32)
    levels = (grid - 1) // 2
    index = np.full(4096, -1, dtype=np.int64)
    index[(levels << _SHIFTS).sum(1)] = np.arange(len(grid))
    points = 2 * (np.arange(4096, dtype=np.int32)[:, None] >> _SHIFTS & _MAX_LEVEL) + 1
    d2 = ((points[:, None, :] - grid[None]) ** 2).sum(-1)
    order = np.argsort(d2, axis=1, kind="stable")
    sorted_d2 = np.take_along_axis(d2, order, 1)
    rank = np.concatenate([np.zeros((4096, 1), np.int64), np.cumsum(np.diff(sorted_d2, axis=1) > 0, 1)], 1)
    keep = rank < 3  # a prefix of each row
    starts = np.concatenate([[0], np.cumsum(keep.sum(1))])
    return levels, index, order[keep], starts


_Tables = tuple[Tensor, Tensor, Tensor, Tensor]


def _tables(device: torch.device) -> _Tables:
    return tuple(torch.from_numpy(a).long().to(device) for a in _neighbour_table())


def _nearest_neighbour(u: Tensor, xval: Tensor, waux: Tensor, scale: Tensor, tables: _Tables) -> Tensor:
    """Grid index of the neighbour of each off-grid 4-vector u [m] nearest to xval [m, 4] at `scale` [m],
    weighted by waux (the first of equals). The candidates of all vectors are scored in one flat list."""
    levels, _, neighbours, starts = tables
    counts = starts[u + 1] - starts[u]
    seg = torch.repeat_interleave(torch.arange(len(u), device=u.device), counts)
    first_of_seg = counts.cumsum(0) - counts
    pos = torch.arange(len(seg), device=u.device)
    cand = neighbours[starts[u][seg] + pos - first_of_seg[seg]]
    diff = scale[seg, None] * (2 * levels[cand] + 1).float() - xval[seg]
    t = waux[seg] * diff * diff
    d2 = t[:, 0] + t[:, 1] + t[:, 2] + t[:, 3]
    least = torch.full_like(scale, torch.inf).scatter_reduce(0, seg, d2, "amin")
    at = torch.where(d2 == least[seg], pos, len(seg))
    first = torch.full_like(u, len(seg)).scatter_reduce(0, seg, at, "amin")
    return cand[first]


def _snap(xval: Tensor, waux: Tensor, inv: Tensor, scale: Tensor, tables: _Tables) -> tuple[Tensor, Tensor]:
    """Grid index [g, 8] of each 4-vector of xval [g, 32] rounded at 1 / inv (off-grid ones: the nearest
    neighbour at `scale`), and whether it was on the grid."""
    index = tables[1]
    g = xval.shape[0]
    lv = _nearest_int((inv[:, None] * xval - 1.0) * 0.5).clamp(0, _MAX_LEVEL).reshape(g, 8, 4)
    u = (lv << torch.tensor(_SHIFTS, device=xval.device)).sum(-1)
    gi = index[u]
    on_grid = gi >= 0
    off = ~on_grid
    if off.any():
        gi[off] = _nearest_neighbour(u[off], xval.reshape(g, 8, 4)[off], waux.reshape(g, 8, 4)[off],
                                     scale[:, None].expand(g, 8)[off], tables)
    return gi, on_grid


def _sums(w: Tensor, xval: Tensor, gi: Tensor, levels: Tensor) -> tuple[Tensor, Tensor]:
    q = (2 * levels[gi].reshape(gi.shape[0], 32) + 1).float()
    return _sum(w * xval * q), _sum(w * q * q)


def _sub_blocks(x: Tensor, tables: _Tables) -> tuple[Tensor, Tensor, Tensor]:
    """Grid index [g, 8], scale [g] and whether it is not all zero, of each 32-element sub-block x [g, 32]."""
    levels = tables[0]
    w = x * x
    # sqrt in float64 rounds to the correctly rounded float32 root, as sqrtf gives
    waux = torch.sqrt(w.double()).float()
    xval = torch.where(x < 0, -x, x)
    vmax = xval.amax(-1)
    live = vmax != 0
    vmax = torch.where(live, vmax, 1.0)
    scale = vmax / 15.0
    best = torch.zeros_like(scale)
    gi = torch.zeros(x.shape[0], 8, dtype=torch.long, device=x.device)  # levels 0: grid point 0
    on_grid = torch.zeros(x.shape[0], 8, dtype=torch.bool, device=x.device)
    for step in range(-9, 10):
        inv = _div(_f32(15, np.float32(step) * np.float32(0.2)), vmax)
        try_gi, try_on = _snap(xval, waux, inv, _div(1.0, inv), tables)
        sumqx, sumq2 = _sums(w, xval, try_gi, levels)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        scale = torch.where(better, sumqx / sumq2, scale)
        best = torch.where(better, scale * sumqx, best)
        gi = torch.where(better[:, None], try_gi, gi)
        on_grid = torch.where(better[:, None], try_on, on_grid)
    # a sub-block whose best try left the grid is rounded again at its best scale
    redo = (~on_grid).any(1) & (scale > 0)
    safe = torch.where(redo, scale, 1.0)
    redo_gi, _ = _snap(xval, waux, _div(1.0, safe), safe, tables)
    sumqx, sumq2 = _sums(w, xval, redo_gi, levels)
    gi = torch.where(redo[:, None], redo_gi, gi)
    scale = torch.where(redo & (sumq2 > 0), sumqx / sumq2, scale)
    return gi, torch.where(live, scale, 0.0), live


def _to_front(v: Tensor, keep: Tensor) -> Tensor:
    """v [n, 8, k] with the rows where keep [n, 8] moved to the front, in order, and the rest zero."""
    n, m, k = v.shape
    dest = torch.where(keep, keep.long().cumsum(1) - 1, m)
    out = torch.zeros(n, m + 1, k, dtype=v.dtype, device=v.device)
    out.scatter_(1, dest[..., None].expand(n, m, k), v)
    return out[:, :m]


def _iq3_s(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    x = blocks.reshape(-1, 32)
    gi, scales, live = _sub_blocks(x, _tables(x.device))
    gi, scales, live = gi.reshape(n, 8, 8), scales.reshape(n, 8), live.reshape(n, 8)
    bit = torch.arange(8, device=x.device)
    qs = _to_front((gi & 255).to(torch.uint8), live).reshape(n, 64)
    qh = torch.where(live, ((gi >> 8) << bit).sum(-1), 0).to(torch.uint8)
    signs = ((x < 0).long().reshape(n, 8, 4, 8) << bit).sum(-1).to(torch.uint8)
    signs = _to_front(signs, live).reshape(n, 32)
    max_scale = scales.amax(-1)
    has = max_scale > 0
    d = max_scale / 31.0
    inv = _div(1.0, torch.where(has, d, 1.0))
    ls = _nearest_int((inv[:, None] * scales - 1.0) * 0.5).clamp(0, 15)
    ls = torch.where(has[:, None], ls, 0).to(torch.uint8)
    d16 = torch.where(has, d * _f32(1.033), 0.0).half()
    return torch.cat([_f16_bytes(d16[:, None]), qs, qh, signs, ls[:, 0::2] | ls[:, 1::2] << 4], -1)


QUANTIZERS: dict[GGMLType, Callable[[Tensor], Tensor]] = {GGMLType.IQ3_S: _iq3_s}
