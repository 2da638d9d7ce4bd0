"""A lossless relayout of the GGUF formats whose blocks are not 4-byte aligned, so quants load as 16-byte vectors.

Q4_0, Q5_0, Q8_0 (18, 22, 34-byte blocks) and Q6_K (210 bytes) put an fp16 scale at an even offset of each block,
which leaves the quants of most blocks off 4-byte boundaries. The planar layout keeps every byte of a row and only
moves them: each row becomes the concatenation of its blocks' fields, field by field (a "plane" per field), so a
row of nb blocks is

    Q4_0:  qs[nb x 16] | d[nb x 2]
    Q5_0:  qs[nb x 16] | qh[nb x 4] | d[nb x 2]
    Q8_0:  qs[nb x 32] | d[nb x 2]
    Q6_K:  ql[nb x 128] | qh[nb x 64] | scales[nb x 16] | d[nb x 2]

Rows keep their size and order, so a row slice is still whole rows, and the quant planes start at the row start
(16-byte aligned whenever the row size is a multiple of 16, as for K a multiple of 256). qgemv's word decoders, the
only decoders of these types, read these (`PLANAR_TYPES`).

MXFP4 (17-byte blocks: an E8M0 scale byte, then 16 bytes of nibbles) has rows of odd size when they hold an odd
count of blocks and only 2-byte aligned ones unless they hold a multiple of 4 (gpt-oss's 2880-element rows hold 90),
so no layout within rows aligns its quants. Its planes are per matrix (the last two dims of the shape: the whole tensor
of a 2-D weight, each expert of a 3-D one), N rows of nb blocks becoming

    MXFP4: qs[N x nb x 16] | e[N x nb]

so that every row's quants start 16-byte aligned (from an aligned matrix). Rows are no longer contiguous: an
embedding's rows are gathered plane by plane (`matrix_rows`). `RELAID_TYPES`: the types the word decoders read relaid,
from weights relaid once by a model at load (`check_relaid`), or per call (`qgemv.word_layout`, which also pads rows
or matrices that would start unaligned: the `stride` of `to_planar`).

The file is read as it is; the relayout is a copy made on the device when a weight is loaded (`to_planar`), undone
by `from_planar`.
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
# Planes per matrix (see the module docstring): (field offset, field bytes), in plane order.
MATRIX_PLANES: dict[GGMLType, tuple[tuple[int, int], ...]] = {GGMLType.MXFP4: ((1, 16), (0, 1))}
MATRIX_PLANAR_TYPES = frozenset(MATRIX_PLANES)
RELAID_TYPES = PLANAR_TYPES | MATRIX_PLANAR_TYPES


def check_relaid(t: GGMLType) -> None:
    """Raise a ValueError naming the type unless it has a relaid layout (`to_planar`, per row or per matrix)."""
    if t not in RELAID_TYPES:
        raise ValueError(f"{t.name} has no planar layout (only {', '.join(p.name for p in PLANES | MATRIX_PLANES)})")


def _blocks(raw: torch.Tensor, ggml_type: int, shape: Sequence[int]) -> tuple[GGMLType, int, int, int]:
    """(type, groups, rows per group, blocks per row): the groups whose bytes a plane spans (rows: each row a group;
    matrices: each matrix, of its rows)."""
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8 or not raw.is_contiguous():
        raise ValueError("raw must be a contiguous uint8 torch tensor")
    t = check_size(raw.numel(), ggml_type, shape)
    check_relaid(t)
    rows = 1
    for s in shape[:-1]:
        rows *= s
    nb = shape[-1] // TYPE_TRAITS[t].block_elements
    if t in MATRIX_PLANES:
        per_matrix = shape[-2] if len(shape) > 1 else 1
        return t, rows // per_matrix if per_matrix else 0, per_matrix, nb
    return t, rows, 1, nb


def _planes(t: GGMLType) -> tuple[tuple[int, int], ...]:
    return PLANES.get(t) or MATRIX_PLANES[t]


def to_planar(raw: torch.Tensor, ggml_type: int, shape: Sequence[int], stride: int | None = None) -> torch.Tensor:
    """The planar copy of a tensor's raw GGUF bytes (same size, same device): per row for `PLANAR_TYPES`, per matrix
    for `MATRIX_PLANAR_TYPES`. stride: bytes from one row (matrix) to the next, at least its size, the rest zeros:
    a copy whose rows start aligned whatever their size, for one call of the word decoders (`from_planar` and the
    size checks take only the unpadded layout)."""
    t, groups, rows, nb = _blocks(raw, ggml_type, shape)
    size = rows * nb * TYPE_TRAITS[t].block_bytes
    blocks = raw.view(groups, rows * nb, TYPE_TRAITS[t].block_bytes)
    planes = [blocks[:, :, o:o + n].reshape(groups, rows * nb * n) for o, n in _planes(t)]
    if stride is not None and stride != size:
        if stride < size:
            raise ValueError(f"{t.name}: a stride of {stride} bytes is below the {size} of a row or matrix")
        planes.append(raw.new_zeros(groups, stride - size))
    return torch.cat(planes, dim=1).view(-1)


def from_planar(planar: torch.Tensor, ggml_type: int, shape: Sequence[int]) -> torch.Tensor:
    """The file's bytes back from `to_planar`'s layout."""
    t, groups, rows, nb = _blocks(planar, ggml_type, shape)
    out = torch.empty((groups, rows * nb, TYPE_TRAITS[t].block_bytes), dtype=torch.uint8, device=planar.device)
    view = planar.view(groups, -1)
    start = 0
    for o, n in _planes(t):
        out[:, :, o:o + n] = view[:, start:start + rows * nb * n].view(groups, rows * nb, n)
        start += rows * nb * n
    return out.view(-1)


def matrix_rows(planar: torch.Tensor, ggml_type: int, shape: Sequence[int], rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (indices) of a 2-D weight of `shape` in `to_planar`'s planes per matrix, as a matrix of their own
    in that layout (each plane's rows gathered)."""
    t, _, n, nb = _blocks(planar, ggml_type, shape)
    if t not in MATRIX_PLANES or len(shape) != 2:
        raise ValueError(f"matrix_rows takes a 2-D weight of {', '.join(p.name for p in MATRIX_PLANES)}, got "
                         f"{t.name} {tuple(shape)}")
    planes = []
    start = 0
    for _, size in MATRIX_PLANES[t]:
        planes.append(planar[start:start + n * nb * size].view(n, nb * size)[rows].reshape(-1))
        start += n * nb * size
    return torch.cat(planes)
