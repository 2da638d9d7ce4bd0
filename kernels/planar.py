"""A lossless relayout of the GGUF formats whose blocks are only 2-byte aligned, so quants load as 16-byte vectors.

Q4_0, Q5_0, Q8_0 (18, 22, 34-byte blocks) and Q6_K (210 bytes) put an fp16 scale at an even offset of each block,
which leaves the quants of most blocks off 4-byte boundaries. The planar layout keeps every byte of a row and only
moves them: each row becomes the concatenation of its blocks' fields, field by field (a "plane" per field), so a
row of nb blocks is

    Q4_0:  qs[nb x 16] | d[nb x 2]
    Q5_0:  qs[nb x 16] | qh[nb x 4] | d[nb x 2]
    Q8_0:  qs[nb x 32] | d[nb x 2]
    Q6_K:  ql[nb x 128] | qh[nb x 64] | scales[nb x 16] | d[nb x 2]

Rows keep their size and order, so a row slice is still whole rows, and the quant planes start at the row start
(16-byte aligned whenever the row size is a multiple of 16, as for K a multiple of 256). The file is read as it is;
the relayout is a copy made on the device when a weight is loaded (`to_planar`), undone by `from_planar`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..gguf.quants import check_size
from ..gguf.types import TYPE_TRAITS, GGMLType

# (field offset in the file's block, field bytes), in plane order.
PLANES: dict[GGMLType, tuple[tuple[int, int], ...]] = {
    GGMLType.Q4_0: ((2, 16), (0, 2)),
    GGMLType.Q5_0: ((6, 16), (2, 4), (0, 2)),
    GGMLType.Q8_0: ((2, 32), (0, 2)),
    GGMLType.Q6_K: ((0, 128), (128, 64), (192, 16), (208, 2)),
}
PLANAR_TYPES = frozenset(PLANES)


def check_planar(t: GGMLType) -> None:
    """Raise a ValueError naming the type unless it has a planar layout."""
    if t not in PLANES:
        raise ValueError(f"{t.name} has no planar layout (only {', '.join(p.name for p in PLANES)})")


def _blocks(raw: torch.Tensor, ggml_type: int, shape: Sequence[int]) -> tuple[GGMLType, int, int]:
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8 or not raw.is_contiguous():
        raise ValueError("raw must be a contiguous uint8 torch tensor")
    t = check_size(raw.numel(), ggml_type, shape)
    check_planar(t)
    traits = TYPE_TRAITS[t]
    rows = 1
    for s in shape[:-1]:
        rows *= s
    return t, rows, shape[-1] // traits.block_elements


def to_planar(raw: torch.Tensor, ggml_type: int, shape: Sequence[int]) -> torch.Tensor:
    """The planar copy of a tensor's raw GGUF bytes (same size, same device)."""
    t, rows, nb = _blocks(raw, ggml_type, shape)
    blocks = raw.view(rows, nb, TYPE_TRAITS[t].block_bytes)
    return torch.cat([blocks[:, :, o:o + n].reshape(rows, nb * n) for o, n in PLANES[t]], dim=1).view(-1)


def from_planar(planar: torch.Tensor, ggml_type: int, shape: Sequence[int]) -> torch.Tensor:
    """The file's bytes back from `to_planar`'s layout."""
    t, rows, nb = _blocks(planar, ggml_type, shape)
    out = torch.empty((rows, nb, TYPE_TRAITS[t].block_bytes), dtype=torch.uint8, device=planar.device)
    view = planar.view(rows, -1)
    start = 0
    for o, n in PLANES[t]:
        out[:, :, o:o + n] = view[:, start:start + nb * n].view(rows, nb, n)
        start += nb * n
    return out.view(-1)
