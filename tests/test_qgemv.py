"""The decode GEMV (kernels/qgemv.py) and the planar layout it reads (kernels/planar.py), against float64 references
and the PyPI-independent GGUF reference decoder, at the edges of their tiles, on `device`."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from ggtriton.gguf import TYPE_TRAITS, GGMLType
from ggtriton.gguf.quants import dequantize as dequantize_reference
from ggtriton.kernels import dequantize, gelu_mul, qmatmul, qmatmul_many, rmsnorm, silu_mul
from ggtriton.kernels.planar import MATRIX_PLANAR_TYPES, PLANAR_TYPES, RELAID_TYPES, from_planar, matrix_rows, to_planar
from ggtriton.kernels._common import arrival_counters
from ggtriton.kernels.qgemv import (_STEP, GEMV_TYPES, _perm_bytes, _perm_lanes, gemv_splits, qgemv, rows_aligned,
                                    word_layout)
from ggtriton.kernels.qmatmul import fusable, qmatmul_act, qmatmul_add_norm
from ggtriton.kernels.rmsnorm import RMS_CHUNK, PendingNorm, pending_norm_ref
from ggtriton.runtime.models.ops import Ops
from ggtriton.runtime.models.weights import QuantWeight
from quant_weights import weight

pytestmark = pytest.mark.usefixtures("poisoned_outputs")
GEMV = sorted(GEMV_TYPES)
PLANAR = sorted(PLANAR_TYPES)
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def blocks_k(ggml_type: GGMLType, blocks: int) -> int:
    return blocks * TYPE_TRAITS[ggml_type].block_elements


def layout(raw: torch.Tensor, ggml_type: GGMLType, shape: tuple[int, int]) -> torch.Tensor:
    """The bytes a model keeps for a weight: relaid for the types the GEMV reads so, else the file's."""
    return to_planar(raw, ggml_type, shape) if ggml_type in RELAID_TYPES else raw


def gemv_error(ggml_type: GGMLType, n: int, k: int, x: torch.Tensor, splits: int, denormal: bool | None,
               device: torch.device) -> float:
    """Relative error of x [M, K] times a random (n, k) weight, K cut into `splits` ranges. The product is the same
    bits when run again (the ranges are added in order), and the tile counters are back to 0."""
    raw = weight(ggml_type, n, k, device, seed=n + k)
    blocks = gemv_splits(ggml_type, n, k, 1, splits)
    out = torch.full((x.shape[0], n), torch.nan, device=device)
    words, row_bytes, _ = word_layout(raw, ggml_type, (n, k), False)
    args = (x, [words], ggml_type, [(n, k)])
    qgemv(*args, out, blocks, row_bytes=row_bytes, denormal=denormal)
    assert torch.equal(qgemv(*args, torch.empty_like(out), blocks, row_bytes=row_bytes, denormal=denormal), out)
    assert not arrival_counters(x.device).any()
    ref = x.double().cpu() @ dequantize_reference(raw, ggml_type, (n, k)).double().t()
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


# Rows of W: one, fewer than a row tile, not a multiple of it. Blocks: one, a K range crossing the 32-element types'
# steps of 8 blocks (and ending inside one), several K ranges of uneven length; odd counts, whose rows the planar
# types pad to keep aligned. Rows of x: one (the FMA loop), an
# odd count and a full tensor-core tile. Both ways of decoding fields. The 256-element types' loops step one block
# at a time, so fewer of their (8x larger) blocks cross the same edges: BLOCKS_256.
BLOCKS_256 = {11: 3, 10: 7}
EDGES = [(n, blocks, splits, m, "denormal") for n, blocks, splits in [(1, 1, 1), (13, 2, 1), (37, 11, 1), (37, 10, 3)]
         for m in (1, 5, 16)]
EDGES += [(n, blocks, splits, m, "exponent") for n, blocks, splits in [(13, 2, 1), (37, 10, 3)] for m in (1, 5)]


@pytest.mark.parametrize(("n", "blocks", "splits", "m", "fields"), EDGES, ids=str)
@pytest.mark.parametrize("ggml_type", GEMV, ids=lambda t: t.name)
def test_gemv_tile_edges(ggml_type: GGMLType, n: int, blocks: int, splits: int, m: int, fields: str,
                         device) -> None:
    if TYPE_TRAITS[ggml_type].block_elements == 256:
        blocks = BLOCKS_256.get(blocks, blocks)
    k = blocks_k(ggml_type, blocks)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(blocks)).to(device)
    assert gemv_error(ggml_type, n, k, x, splits, fields == "denormal", device) <= TOL[torch.float32]


@pytest.mark.parametrize(("dtype", "m"), [(torch.float32, 1), (torch.float16, 1), (torch.bfloat16, 1),
                                          (torch.float16, 7), (torch.bfloat16, 16)], ids=str)
@pytest.mark.parametrize("ggml_type", GEMV, ids=lambda t: t.name)
def test_gemv_dtypes_through_qmatmul(ggml_type: GGMLType, dtype: torch.dtype, m: int, device) -> None:
    n, k = 45, blocks_k(ggml_type, 4 if TYPE_TRAITS[ggml_type].block_elements == 256 else 2 * _STEP + 2)
    raw = weight(ggml_type, n, k, device)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    ref = x.double() @ dequantize_reference(raw, ggml_type, (n, k)).double().t().to(device)
    for planar in ([False, True] if ggml_type in PLANAR_TYPES else [False]):
        w = to_planar(raw, ggml_type, (n, k)) if planar else raw
        out = qmatmul(x, w, ggml_type, (n, k), path="gemv", planar=planar)
        assert out.dtype == dtype
        assert ((out.double() - ref).norm() / ref.norm()).item() <= TOL[dtype]


@pytest.mark.parametrize("m", [1, 3], ids=str)
@pytest.mark.parametrize("scale", [2.0**40, 2.0**-40], ids=["huge", "tiny"])
@pytest.mark.parametrize("ggml_type", [GGMLType.Q4_K, GGMLType.Q8_0], ids=lambda t: t.name)
def test_gemv_far_from_unit_activations(ggml_type: GGMLType, scale: float, m: int, device) -> None:
    # one row: x is pre-scaled by up to 2^69 and products land near 2^-80 x q; more rows: weights decode times
    # 2^-64 and products scale back. Still exact to float32 at both ends.
    k = blocks_k(ggml_type, 2 if ggml_type == GGMLType.Q4_K else 8)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(5)).to(device) * scale
    assert gemv_error(ggml_type, 9, k, x, 1, None, device) <= TOL[torch.float32]


@pytest.mark.parametrize("m", [2, 5, 16], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("ggml_type", [GGMLType.Q4_K, GGMLType.Q5_K], ids=lambda t: t.name)
def test_k_quants_at_2_to_16_rows_multiply_exactly(ggml_type: GGMLType, dtype: torch.dtype, m: int, device) -> None:
    # 2..16 rows of 16-bit x: the weights are exact integers, and each row of x is scaled into float16 by a power of
    # two per block, so every product is exact and only float32 sums round (rounding the weights to x's dtype, as
    # the other types do at these rows, gives ~1e-3 with float16 x, and with bfloat16 x on a GPU), wherever x's values
    # lie: here 2^-30..2^30 in one block (float16 x: its whole range), and rows far apart.
    n, k = 37, blocks_k(ggml_type, 3)
    gen = torch.Generator().manual_seed(m)
    span = 30 if dtype == torch.bfloat16 else 14
    x = torch.randn(m, k, generator=gen) * 2.0 ** torch.randint(-span, span + 1, (m, k), generator=gen)
    x[0] *= 2.0**-40 if dtype == torch.bfloat16 else 1.0
    x = x.to(device, dtype)
    raw = weight(ggml_type, n, k, device, seed=m)
    out = torch.full((m, n), torch.nan, device=device)
    qgemv(x, [raw], ggml_type, [(n, k)], out, k // 256)
    ref = x.double().cpu() @ dequantize_reference(raw, ggml_type, (n, k)).double().t()
    for row in range(m):  # each row on its own scale
        err = (out[row].double().cpu() - ref[row]).norm() / ref[row].norm()
        assert err <= 1e-6, (row, err.item())


# Nibbles that index a 16-value table (IQ4_XS: 8 sub-blocks of a 256-element block, the file's layout; MXFP4: 32-element
# blocks, 8 to a step, in planes per matrix). Rows of W: one, fewer than a row tile and not a multiple of one. Blocks:
# one, a K range ending inside a step, and past two steps. Rows of x: one (the FMA loop), odd counts up to a full
# tensor-core tile, and GEMM tiles (33, 40), in each x dtype (float16's 2..16 rows decode with an exponent).
TABLE_TYPES = [GGMLType.IQ4_XS, GGMLType.MXFP4]
TABLE_EDGES = [(n, blocks, m, dtype) for n, blocks in [(1, 1), (19, 2), (45, 17)]
               for m, dtype in [(1, torch.float32), (1, torch.bfloat16), (3, torch.float16), (9, torch.float32),
                                (15, torch.bfloat16), (33, torch.float32), (40, torch.float16)]]


@pytest.mark.parametrize(("n", "blocks", "m", "dtype"), TABLE_EDGES, ids=str)
@pytest.mark.parametrize("ggml_type", TABLE_TYPES, ids=lambda t: t.name)
def test_table_types_at_tile_edges(ggml_type: GGMLType, n: int, blocks: int, m: int, dtype: torch.dtype,
                                   device) -> None:
    if ggml_type == GGMLType.IQ4_XS:
        blocks = (blocks + 7) // 8  # 256-element blocks: 1, 1, 3
    k = blocks_k(ggml_type, blocks)
    raw = weight(ggml_type, n, k, device, seed=n + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device, dtype)
    out = qmatmul(x, raw, ggml_type, (n, k), path="gemv" if m <= 16 else "gemm")
    assert out.shape == (m, n) and out.dtype == dtype
    ref = x.double() @ dequantize_reference(raw, ggml_type, (n, k)).double().t().to(device)
    assert ((out.double() - ref).norm() / ref.norm()).item() <= TOL[dtype]


@pytest.mark.parametrize(("m", "scales"), [(1, (0, 1, 2, 200)), (5, (0, 1, 2, 200)), (33, (0, 1, 2, 160))],
                         ids=str)
def test_mxfp4_scale_edges(m: int, scales: tuple[int, ...], device) -> None:
    # E8M0 bytes 0 and 1 (subnormal scales 2^-128, 2^-127), 2 (the first normal one) and large ones among ordinary
    # scales, in the blocks of each row; one row of x multiplies the block sums by the scale, so any scale whose
    # products float32 holds does; 2..16 rows take each block's scale relative to the largest of its 8-block step
    # (the ordinary ones beside 200 fall more than 2^24 below it and are left out, a change of 2^-70 here); GEMM
    # tiles scale each weight by 2^(e - 128 - 64 + 149 - P) first, which float32 holds for e below 171
    n, blocks = 11, 12
    raw = weight(GGMLType.MXFP4, n, blocks_k(GGMLType.MXFP4, blocks), device, seed=m)
    e = raw.view(n * blocks, 17)[:, 0]
    for i, scale in enumerate(scales):
        e[i::7] = scale
    k = blocks_k(GGMLType.MXFP4, blocks)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device)
    out = qmatmul(x, raw, GGMLType.MXFP4, (n, k), path="gemv" if m <= 16 else "gemm")
    ref = x.double() @ dequantize_reference(raw, GGMLType.MXFP4, (n, k)).double().t().to(device)
    assert torch.isfinite(out).all()
    assert ((out.double() - ref).norm() / ref.norm()).item() <= TOL[torch.float32]


def test_rows_of_odd_blocks_are_padded_per_call(device) -> None:
    # 2-byte aligned blocks: an odd count leaves relaid rows 2 bytes off a word, so a model keeps such a weight in the
    # file's layout and each product relays it with rows padded to 16 bytes; a relaid one is taken back first
    assert not rows_aligned(GGMLType.Q8_0, (5, 32 * 3)) and rows_aligned(GGMLType.Q8_0, (5, 32 * 4))
    assert rows_aligned(GGMLType.Q4_K, (5, 256)) and not rows_aligned(GGMLType.Q4_1, (5, 256))
    assert not rows_aligned(GGMLType.MXFP4, (2, 3, 64)) and rows_aligned(GGMLType.MXFP4, (3, 64))
    shape = (5, 96)
    raw = weight(GGMLType.Q8_0, *shape, device)
    words, row_bytes, matrix_bytes = word_layout(raw, GGMLType.Q8_0, shape, False)
    assert (row_bytes, matrix_bytes, words.numel()) == (112, 560, 560) and words.data_ptr() % 16 == 0
    assert torch.equal(words.view(5, 112)[:, :102], to_planar(raw, GGMLType.Q8_0, shape).view(5, 102))
    relaid = word_layout(to_planar(raw, GGMLType.Q8_0, shape), GGMLType.Q8_0, shape, True)[0]
    assert torch.equal(relaid, words)
    ref = dequantize_reference(raw, GGMLType.Q8_0, shape).double().t().to(device)
    for m, path in [(1, "gemv"), (5, "gemv"), (17, "gemm")]:
        x = torch.randn(m, 96, generator=torch.Generator().manual_seed(m)).to(device)
        out = qmatmul(x, raw, GGMLType.Q8_0, shape, path=path)
        assert ((out.double() - x.double() @ ref).norm() / (x.double() @ ref).norm()).item() <= 1e-5
    with pytest.raises(ValueError, match="Q4_1: path 'gemv' takes up to 16 rows of x and a weight of"):
        qmatmul(torch.randn(1, 256, device=device), weight(GGMLType.Q4_1, 5, 256, device), GGMLType.Q4_1, (5, 256),
                path="gemv")


@pytest.mark.parametrize("ggml_type", PLANAR, ids=lambda t: t.name)
def test_planar_keeps_every_byte(ggml_type: GGMLType, device) -> None:
    shape = (6, blocks_k(ggml_type, 3))
    raw = weight(ggml_type, *shape, device)
    planar = to_planar(raw, ggml_type, shape)
    assert planar.shape == raw.shape and not torch.equal(planar, raw)
    assert torch.equal(torch.sort(planar.view(6, -1), dim=1).values, torch.sort(raw.view(6, -1), dim=1).values)
    assert torch.equal(from_planar(planar, ggml_type, shape), raw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ggml_type", PLANAR, ids=lambda t: t.name)
def test_planar_dequantize_and_row_slices(ggml_type: GGMLType, dtype: torch.dtype, device) -> None:
    shape = (7, blocks_k(ggml_type, 3))
    raw = weight(ggml_type, *shape, device)
    planar = to_planar(raw, ggml_type, shape)
    ref = dequantize_reference(raw, ggml_type, shape).to(dtype).to(device)
    assert torch.equal(dequantize(planar, ggml_type, shape, dtype, planar=True), ref)
    rows = planar.view(7, -1)[[5, 0, 5]].reshape(-1)  # whole rows stay whole rows: an embedding lookup
    assert torch.equal(dequantize(rows, ggml_type, (3, shape[1]), dtype, planar=True), ref[[5, 0, 5]])


@pytest.mark.parametrize("path", ["gemm", "dequant"])
@pytest.mark.parametrize("ggml_type", PLANAR, ids=lambda t: t.name)
def test_planar_on_every_other_path(ggml_type: GGMLType, path: str, device) -> None:
    shape = (20, blocks_k(ggml_type, 4))
    raw = weight(ggml_type, *shape, device)
    x = torch.randn(5, shape[1], generator=torch.Generator().manual_seed(2)).to(device)
    out = qmatmul(x, to_planar(raw, ggml_type, shape), ggml_type, shape, path=path, planar=True)
    ref = x.double() @ dequantize_reference(raw, ggml_type, shape).double().t().to(device)
    assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-5
    # the element decoders' paths do not take the types of the word decoders
    with pytest.raises(ValueError, match=f"{ggml_type.name} is decoded by qgemv's word decoders"):
        qmatmul(x, raw, ggml_type, shape, path="skinny" if path == "gemm" else "splitk")


@pytest.mark.parametrize("shape", [(5, 96), (3, 7, 64), (96,)], ids=str)
def test_mxfp4_planes_per_matrix(shape: tuple[int, ...], device) -> None:
    # each matrix (a 2-D weight; each expert of a 3-D one) becomes its quants, row after row, then its scales: the
    # same bytes, every row's quants 16-byte aligned within the matrix; the dequant kernel reads it in place, or (the
    # experts of (3, 7, 64), 7 * 34 bytes each: the second starts 2 bytes off a word) padded
    rows = 1
    for s in shape[:-1]:
        rows *= s
    raw = weight(GGMLType.MXFP4, rows, shape[-1], device)
    planar = to_planar(raw, GGMLType.MXFP4, shape)
    assert torch.equal(from_planar(planar, GGMLType.MXFP4, shape), raw)
    per_matrix = shape[-2] if len(shape) > 1 else 1
    matrices = planar.view(rows // per_matrix, -1)
    blocks = raw.view(rows // per_matrix, -1, 17)
    nb = shape[-1] // 32
    assert torch.equal(matrices[:, :per_matrix * nb * 16], blocks[:, :, 1:].reshape(rows // per_matrix, -1))
    assert torch.equal(matrices[:, per_matrix * nb * 16:], blocks[:, :, 0])
    assert GGMLType.MXFP4 in MATRIX_PLANAR_TYPES and GGMLType.MXFP4 not in PLANAR_TYPES
    ref = dequantize_reference(raw, GGMLType.MXFP4, shape).to(device)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(dequantize(planar, GGMLType.MXFP4, shape, dtype, planar=True), ref.to(dtype))


@pytest.mark.parametrize("m", [1, 16, 1024], ids=str)
def test_mxfp4_matrix_relaid_once_at_load(m: int, device, monkeypatch) -> None:
    # a 2-D MXFP4 weight (outside the experts): relaid into its planes once when a model loads it, then read in
    # place by the word decoders (1 and 16 rows) and the dequant kernel (1024 rows): no copy per product; an
    # embedding's rows are taken back to the file's bytes
    n, k = 21, 96
    raw = weight(GGMLType.MXFP4, n, k, device, seed=m)
    w = QuantWeight("w", raw.clone(), GGMLType.MXFP4, (n, k))
    ops = Ops("triton", torch.float32)
    assert ops.preload([w]) == raw.numel() and w.planar
    assert torch.equal(w.raw, to_planar(raw, GGMLType.MXFP4, (n, k)))
    def copy(*args):
        raise AssertionError("a relaid weight was relaid again")
    for name in ("planar", "qmatmul", "qgemv", "dequant"):  # every module of the product's path that could relay
        module = importlib.import_module(f"ggtriton.kernels.{name}")
        for relay in ("to_planar", "from_planar"):
            if hasattr(module, relay):
                monkeypatch.setattr(module, relay, copy)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device)
    reference = dequantize_reference(raw, GGMLType.MXFP4, (n, k))
    out = ops.linear(x, w)
    ref = x.double() @ reference.double().t().to(device)
    assert ((out.double() - ref).norm() / ref.norm()).item() <= TOL[torch.float32]
    ids = torch.tensor([20, 0, 7, 7], device=device)
    assert torch.equal(ops.embedding(ids, w), reference.to(device)[ids])
    with pytest.raises(ValueError, match="matrix_rows takes a 2-D weight of MXFP4, got Q8_0"):
        matrix_rows(weight(GGMLType.Q8_0, 2, 64, device), GGMLType.Q8_0, (2, 64), ids[:1])


def test_planar_bad_input(device) -> None:
    raw = weight(GGMLType.Q4_K, 2, 256, device)
    with pytest.raises(ValueError, match="Q4_K has no planar layout"):
        to_planar(raw, GGMLType.Q4_K, (2, 256))
    with pytest.raises(ValueError, match="Q4_K has no planar layout"):
        dequantize(raw, GGMLType.Q4_K, (2, 256), planar=True)
    with pytest.raises(ValueError, match=r"Q8_0: a tensor of shape \(2, 64\) takes 136 bytes, got 100"):
        to_planar(raw[:100], GGMLType.Q8_0, (2, 64))


@pytest.mark.parametrize("m", [1, 6, 37], ids=str)  # 37: GEMM tiles
@pytest.mark.parametrize("ggml_type", [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0], ids=lambda t: t.name)
def test_many_weights_in_one_launch(ggml_type: GGMLType, m: int, device) -> None:
    # q, k and v of unequal heights (none a multiple of the row tile): one launch over the three tensors as they
    # are, into views of one output
    k = blocks_k(ggml_type, 4 if ggml_type == GGMLType.Q8_0 else 2)
    shapes = [(40, k), (9, k), (23, k)]
    raws = [weight(ggml_type, *s, device, seed=i) for i, s in enumerate(shapes)]
    planar = ggml_type in PLANAR_TYPES
    ws = [to_planar(r, ggml_type, s) if planar else r for r, s in zip(raws, shapes)]
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device)
    outs = qmatmul_many(x, ws, ggml_type, shapes, planar=planar)
    assert [o.shape for o in outs] == [(m, n) for n, _ in shapes]
    assert len({o.untyped_storage().data_ptr() for o in outs}) == 1  # one output tensor: one launch wrote it
    for out, raw, shape in zip(outs, raws, shapes):
        ref = x.double() @ dequantize_reference(raw, ggml_type, shape).double().t().to(device)
        assert ((out.double() - ref).norm() / ref.norm()).item() <= TOL[torch.float32]


def test_many_weights_fall_back_to_one_launch_each(device) -> None:
    shapes = [(20, 64), (12, 64)]
    raws = [weight(GGMLType.Q4_1, *s, device, seed=i) for i, s in enumerate(shapes)]
    x = torch.randn(3, 64, device=device)
    outs = qmatmul_many(x, raws, GGMLType.Q4_1, shapes)  # no word decoder for Q4_1: one qmatmul each
    for out, raw, shape in zip(outs, raws, shapes):
        assert torch.allclose(out, qmatmul(x, raw, GGMLType.Q4_1, shape))
    with pytest.raises(ValueError, match="one to three weights"):
        qmatmul_many(x, raws * 2, GGMLType.Q4_1, shapes * 2)
    with pytest.raises(ValueError, match=r"x must be \[M, 32\]"):
        qmatmul_many(x, raws, GGMLType.Q4_1, [(20, 64), (24, 32)])


# Fused epilogues: rmsnorm between two products (the residual add and the norm's sums of squares in the first one's,
# the rstd scaling in the second's) and act(gate) * up in a gate/up product. M = 37: GEMM tiles.
FUSED_TYPES = [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0]


def rms64(h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = h.double()
    return h / (h.square().mean(-1, keepdim=True) + eps).sqrt() * w.double()


def fused_k(ggml_type: GGMLType) -> int:
    return blocks_k(ggml_type, 2 if TYPE_TRAITS[ggml_type].block_elements == 256 else 6)


@pytest.mark.parametrize(("m", "dtype"), [(1, torch.float32), (5, torch.float32), (37, torch.float32),
                                          (1, torch.bfloat16), (16, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("ggml_type", FUSED_TYPES, ids=lambda t: t.name)
def test_add_norm_in_the_epilogue(ggml_type: GGMLType, m: int, dtype: torch.dtype, device) -> None:
    # 45 columns: a partial row tile and a partial last chunk of sums of squares. h is the same bits as the product
    # and the rmsnorm kernel's residual add; the pending rows are rmsnorm's up to where rstd is applied.
    n, k = 45, fused_k(ggml_type)
    gen = torch.Generator().manual_seed(m)
    raw = weight(ggml_type, n, k, device, seed=1)
    planar = ggml_type in PLANAR_TYPES
    w = layout(raw, ggml_type, (n, k))
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    residual = torch.randn(m, n, generator=gen).to(device, dtype)
    norm_w = (torch.rand(n, generator=gen) + 0.5).to(device)
    assert fusable(ggml_type, m, n, k, x.device)
    p, h = qmatmul_add_norm(x, w, ggml_type, (n, k), residual, norm_w, 1e-5, planar=planar)
    assert p.y.shape == h.shape == (m, n) and p.y.dtype == h.dtype == dtype
    assert p.sumsq.shape == (m, -(-n // RMS_CHUNK)) and p.eps == 1e-5
    a = qmatmul(x, w, ggml_type, (n, k), planar=planar)
    assert torch.equal(h, rmsnorm(a, norm_w, 1e-5, residual)[1])
    again, h2 = qmatmul_add_norm(x, w, ggml_type, (n, k), residual, norm_w, 1e-5, planar=planar)
    assert torch.equal(h2, h) and torch.equal(again.y, p.y) and torch.equal(again.sumsq, p.sumsq)
    assert not arrival_counters(x.device).any()
    h_ref = x.double() @ dequantize_reference(raw, ggml_type, (n, k)).double().t().to(device) + residual.double()
    assert ((h.double() - h_ref).norm() / h_ref.norm()).item() <= TOL[dtype]
    ref = rms64(h_ref, norm_w, 1e-5)
    assert ((pending_norm_ref(p).double() - ref).norm() / ref.norm()).item() <= TOL[dtype]


@pytest.mark.parametrize(("m", "splits"), [(1, 1), (1, 2), (5, 2), (16, 1), (37, 1)], ids=str)
@pytest.mark.parametrize("ggml_type", FUSED_TYPES, ids=lambda t: t.name)
def test_pending_norm_as_x(ggml_type: GGMLType, m: int, splits: int, device) -> None:
    # a producer's PendingNorm read by q, k and v of unequal heights in one launch, and by one weight with K split
    # into ranges: the rows' rstd scales each range's sums
    hidden = fused_k(ggml_type)
    gen = torch.Generator().manual_seed(m)
    x0 = torch.randn(m, hidden, generator=gen).to(device)
    residual = torch.randn(m, hidden, generator=gen).to(device)
    norm_w = (torch.rand(hidden, generator=gen) + 0.5).to(device)
    raw0 = weight(ggml_type, hidden, hidden, device, seed=7)
    planar = ggml_type in PLANAR_TYPES
    p, h = qmatmul_add_norm(x0, layout(raw0, ggml_type, (hidden, hidden)), ggml_type, (hidden, hidden), residual,
                            norm_w, 1e-6, planar=planar)
    x = rms64(h, norm_w, 1e-6)
    shapes = [(40, hidden), (9, hidden), (23, hidden)]
    raws = [weight(ggml_type, *s, device, seed=i) for i, s in enumerate(shapes)]
    ws = [layout(r, ggml_type, s) for r, s in zip(raws, shapes)]
    outs = qmatmul_many(p, ws, ggml_type, shapes, planar=planar)
    if m <= 16:
        outs[0] = qmatmul(p, ws[0], ggml_type, shapes[0], path="gemv", split_k=splits, planar=planar)
    assert not arrival_counters(x.device).any()
    for out, raw, shape in zip(outs, raws, shapes):
        ref = x @ dequantize_reference(raw, ggml_type, shape).double().t().to(device)
        assert ((out.double() - ref).norm() / ref.norm()).item() <= TOL[torch.float32]


@pytest.mark.parametrize(("dtype", "m", "blocks", "act"), [
    (torch.float32, 1, 1, "silu"), (torch.bfloat16, 1, 3, "silu"), (torch.float32, 5, 3, "gelu"),
    (torch.bfloat16, 16, 1, "gelu"), (torch.float32, 37, 3, "silu"), (torch.bfloat16, 37, 3, "silu")], ids=str)
@pytest.mark.parametrize("ggml_type", FUSED_TYPES, ids=lambda t: t.name)
def test_act_in_the_gate_up_epilogue(ggml_type: GGMLType, dtype: torch.dtype, m: int, blocks: int, act: str,
                                     device) -> None:
    # 37 rows per weight: partial row tiles; 3 blocks: K ranges (one SM's worth of programs splits K), whose sums
    # the last of both tiles' programs adds. The same bits as the two products and the activation kernel.
    n, k = 37, blocks_k(ggml_type, blocks if TYPE_TRAITS[ggml_type].block_elements == 256 else 8 * blocks)
    gen = torch.Generator().manual_seed(blocks)
    raws = [weight(ggml_type, n, k, device, seed=s) for s in (2, 3)]
    ws = [layout(r, ggml_type, (n, k)) for r in raws]
    planar = ggml_type in PLANAR_TYPES
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    out = qmatmul_act(x, ws, ggml_type, (n, k), act, planar=planar)
    assert out.shape == (m, n) and out.dtype == dtype
    assert not arrival_counters(x.device).any()
    gate, up = qmatmul_many(x, ws, ggml_type, [(n, k)] * 2, planar=planar)
    assert torch.equal(out, (silu_mul if act == "silu" else gelu_mul)(gate, up))
    g, u = (x.double() @ dequantize_reference(r, ggml_type, (n, k)).double().t().to(device) for r in raws)
    a = torch.nn.functional.silu(g) if act == "silu" else torch.nn.functional.gelu(g, approximate="tanh")
    ref = a * u
    # 16-bit x: the product of two products, each rounded to 16 bits
    assert ((out.double() - ref).norm() / ref.norm()).item() <= TOL[dtype] * (1 if dtype == torch.float32 else 2)


def test_fused_bad_input(device) -> None:
    k = 256
    raw = weight(GGMLType.Q4_K, 32, k, device)
    x = torch.randn(2, k, device=device)
    with pytest.raises(ValueError, match="'silu' or 'gelu'"):
        qmatmul_act(x, [raw, raw], GGMLType.Q4_K, (32, k), "relu")
    with pytest.raises(ValueError, match="sumsq must be contiguous float32"):
        qmatmul(PendingNorm(x, torch.zeros(2, 3, device=device), 1e-6), raw, GGMLType.Q4_K, (32, k))
    with pytest.raises(ValueError, match=r"residual must be contiguous torch.float32 \[2, 32\]"):
        qmatmul_add_norm(x, raw, GGMLType.Q4_K, (32, k), x, torch.ones(32, device=device), 1e-6)
    q4_1 = weight(GGMLType.Q4_1, 32, k, device)  # no word decoder: no fused product
    assert not fusable(GGMLType.Q4_1, 2, 32, k, x.device)
    with pytest.raises(ValueError, match="Q4_1: no fused product"):
        qmatmul_add_norm(x, q4_1, GGMLType.Q4_1, (32, k), torch.zeros(2, 32, device=device),
                         torch.ones(32, device=device), 1e-6)
    p = PendingNorm(x, torch.zeros(2, k // RMS_CHUNK, device=device), 1e-6)
    with pytest.raises(ValueError, match="Q4_1: path 'splitk' takes no PendingNorm"):
        qmatmul(p, q4_1, GGMLType.Q4_1, (32, k))


@triton.jit
def _permute_kernel(a_ptr, b_ptr, s_ptr, lanes_ptr, bytes_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    a, b, s = tl.load(a_ptr + i), tl.load(b_ptr + i), tl.load(s_ptr + i)
    tl.store(lanes_ptr + i, _perm_lanes(a, b, s))
    tl.store(bytes_ptr + i, _perm_bytes(a, b, s))


def test_both_byte_permute_emulations_are_prmt(device):
    """The interpreter's byte permute (four bytes at once) and HIP's (byte by byte) against prmt.b32's definition
    in numpy, on random words and selectors, sign-replicating selector bits included."""
    g = np.random.default_rng(5)
    a, b, s = (g.integers(-2**31, 2**31, 4096, dtype=np.int64).astype(np.int32) for _ in range(3))
    pair = (b.astype(np.uint32).astype(np.uint64) << 32) | a.astype(np.uint32)
    want = np.zeros(4096, np.uint32)
    for k in range(4):
        sel = (s.astype(np.uint32) >> (4 * k)) & 15
        byte = (pair >> (8 * (sel & 7)).astype(np.uint64)) & 0xFF
        byte = np.where(sel < 8, byte, np.where(byte < 128, 0, 0xFF)).astype(np.uint32)
        want |= byte << np.uint32(8 * k)
    args = [torch.from_numpy(v).to(device) for v in (a, b, s)]
    lanes, by_bytes = (torch.full((4096,), -1, dtype=torch.int32, device=device) for _ in range(2))
    _permute_kernel[(1,)](*args, lanes, by_bytes, N=4096)
    assert np.array_equal(lanes.cpu().numpy().view(np.uint32), want)
    assert np.array_equal(by_bytes.cpu().numpy().view(np.uint32), want)
