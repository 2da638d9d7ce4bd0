"""The quantized matmul kernels against x @ dequantize(W)^T in float64, every GGUF type on every path, on
`device` (the GPU, or the CPU with the kernels in the interpreter)."""

from __future__ import annotations

import pytest
import torch

from ggtriton.gguf import TYPE_TRAITS, GGMLType
from ggtriton.gguf.quants import DEQUANTIZERS, dequantize
from ggtriton.kernels import qmatmul
from ggtriton.kernels._common import backend
from ggtriton.kernels.qgemv import GEMV_TYPES
from ggtriton.kernels.qmatmul import _DISPATCH, PATHS, _choose_path, qmatmul_ref
from quant_weights import weight

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
N = 40  # not a multiple of any BLOCK_N

pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def check(device: torch.device, ggml_type: GGMLType, m: int, k: int, dtype: torch.dtype, path: str | None,
          **kwargs) -> None:
    raw = weight(ggml_type, N, k, device, seed=m + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(device, dtype)
    if path == "gemv" and not (m <= 16 and ggml_type in GEMV_TYPES):
        with pytest.raises(ValueError, match=f"{ggml_type.name}: path 'gemv' takes up to 16 rows of x"):
            qmatmul(x, raw, ggml_type, (N, k), path=path, **kwargs)
        return
    if path in ("skinny", "splitk") and ggml_type in GEMV_TYPES:  # the element decoders' paths: not these types
        with pytest.raises(ValueError, match=f"{ggml_type.name} is decoded by qgemv's word decoders"):
            qmatmul(x, raw, ggml_type, (N, k), path=path, **kwargs)
        return
    out = qmatmul(x, raw, ggml_type, (N, k), path=path, **kwargs)
    assert out.shape == (m, N) and out.dtype == dtype and out.device == x.device
    ref = x.double() @ dequantize(raw, ggml_type, (N, k)).double().t()
    err = ((out.double() - ref).norm() / ref.norm()).item()  # NaN (an unwritten element) fails too
    assert err <= TOL[dtype], f"relative error {err:.3g}"


def many_blocks_k(ggml_type: GGMLType) -> int:
    """A K of several blocks that spans several K tiles and ends in a partial one where blocks allow it."""
    qk = TYPE_TRAITS[ggml_type].block_elements
    return {1: 200, 32: 13 * 32}.get(qk, 3 * qk)


def split_kwargs(path: str) -> dict:
    return {"split_k": 3} if path in ("splitk", "gemv") else {}


# Every type on every path, each dtype with its own M: 1 (the GEMV branch), 3 (padded tl.dot), 17 (two M tiles).
@pytest.mark.parametrize(("dtype", "m"), [(torch.float32, 1), (torch.float16, 3), (torch.bfloat16, 17)], ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ggml_type", list(DEQUANTIZERS), ids=lambda t: t.name)
def test_every_type_every_path(ggml_type: GGMLType, path: str, dtype: torch.dtype, m: int, device) -> None:
    qk = TYPE_TRAITS[ggml_type].block_elements
    check(device, ggml_type, m, max(160, 2 * qk), dtype, path, **split_kwargs(path))


# The awkward shapes on one type per block size: M around the skinny / tile limits, K of one block and many.
@pytest.mark.parametrize("k_blocks", ["one", "many"])
@pytest.mark.parametrize(
    ("m", "dtype"),
    [(1, torch.bfloat16), (3, torch.float32), (16, torch.float16), (17, torch.float32), (64, torch.bfloat16)],
    ids=str,
)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ggml_type", [GGMLType.Q4_0, GGMLType.Q4_K, GGMLType.F16], ids=lambda t: t.name)
def test_shapes(ggml_type: GGMLType, path: str, m: int, dtype: torch.dtype, k_blocks: str, device) -> None:
    k = TYPE_TRAITS[ggml_type].block_elements if k_blocks == "one" else many_blocks_k(ggml_type)
    check(device, ggml_type, m, k, dtype, path, **split_kwargs(path))


def test_gemm_past_one_group(device) -> None:
    # More M tiles than GROUP_M: the grouped program order wraps into a second, shorter group.
    check(device, GGMLType.Q8_0, 300, 64, torch.float16, "gemm")


@pytest.mark.parametrize("m", [1, 16, 17], ids=str)
def test_default_path(m: int, device) -> None:
    check(device, GGMLType.Q4_K, m, 512, torch.float16, None)


def test_choose_path() -> None:
    cpu = torch.device("cpu")
    th = _DISPATCH[backend(cpu)]
    skinny_m, gemm_m = th["skinny_max_m"], th["dequant_min_m"] - 1
    assert _choose_path(GGMLType.Q4_K, 1, 40, 512, cpu) == "gemv"
    assert _choose_path(GGMLType.Q4_K, skinny_m, 40, 512, cpu) == "gemv"
    assert _choose_path(GGMLType.Q8_0, 1, 40, 32 * 3, cpu) == "gemv"  # rows of 102 bytes: padded per call
    assert _choose_path(GGMLType.Q4_1, 1, 40, 512, cpu) == "splitk"  # one row tile: K splits fill the "SMs"
    assert _choose_path(GGMLType.Q4_1, skinny_m, 40, 64, cpu) == "skinny"  # one K tile: nothing to split
    assert _choose_path(GGMLType.Q4_1, skinny_m, th["split_max_n"] + 1, 4096, cpu) == "skinny"
    assert _choose_path(GGMLType.Q4_K, skinny_m + 1, 4096, 4096, cpu) == "gemm"
    assert _choose_path(GGMLType.Q4_K, gemm_m, 4096, 4096, cpu) == "gemm"
    assert _choose_path(GGMLType.Q4_K, gemm_m + 1, 4096, 4096, cpu) == "dequant"
    assert _choose_path(GGMLType.BF16, th["float_dequant_min_m"], 4096, 4096, cpu) == "dequant"


def test_split_k_is_deterministic(device) -> None:
    raw = weight(GGMLType.Q3_K, N, 1024, device)
    x = torch.randn(5, 1024, device=device)
    a = qmatmul(x, raw, GGMLType.Q3_K, (N, 1024), path="splitk", split_k=4)
    b = qmatmul(x, raw, GGMLType.Q3_K, (N, 1024), path="splitk", split_k=4)
    assert torch.equal(a, b)


def test_reference(device) -> None:
    raw = weight(GGMLType.Q5_K, N, 256, device)
    x = torch.randn(3, 256, device=device)
    ref = x.double() @ dequantize(raw, GGMLType.Q5_K, (N, 256)).double().t()
    out = qmatmul_ref(x, raw, GGMLType.Q5_K, (N, 256))
    assert out.dtype == torch.float32 and ((out.double() - ref).norm() / ref.norm()).item() <= 1e-6


def test_empty(device) -> None:
    raw = weight(GGMLType.Q4_0, N, 32, device)
    assert qmatmul(torch.randn(0, 32, device=device), raw, GGMLType.Q4_0, (N, 32)).shape == (0, N)
    no_k = torch.zeros(0, dtype=torch.uint8, device=device)
    out = qmatmul(torch.randn(2, 0, device=device), no_k, GGMLType.Q4_0, (N, 0))
    assert torch.equal(out, torch.zeros(2, N, device=device))


@pytest.mark.parametrize(
    ("x_shape", "dtype", "shape", "kwargs", "match"),
    [
        ((2, 32), torch.float32, (N, 64), {}, r"x must be \[M, 64\]"),
        ((64,), torch.float32, (N, 64), {}, r"x must be \[M, 64\]"),
        ((2, 64), torch.int32, (N, 64), {}, "x must be float32, float16 or bfloat16"),
        ((2, 64), torch.float32, (2, N, 32), {}, "must be 2-D"),
        ((2, 64), torch.float32, (N, 64), {"path": "gemm2"}, "path must be one of"),
        ((17, 64), torch.float32, (N, 64), {"path": "gemv"}, "path 'gemv' takes up to 16 rows of x"),
        ((2, 64), torch.float32, (N, 64), {"path": "skinny", "split_k": 2}, "split_k"),
        ((2, 64), torch.float32, (N, 64), {"path": "splitk", "split_k": 0}, "split_k"),
    ],
)
def test_bad_input_raises(x_shape, dtype, shape, kwargs, match, device) -> None:
    raw = weight(GGMLType.Q4_0, N, 64, device)
    with pytest.raises(ValueError, match=match):
        qmatmul(torch.ones(x_shape, dtype=dtype, device=device), raw, GGMLType.Q4_0, shape, **kwargs)


def test_bad_raw_raises(device) -> None:
    x = torch.randn(2, 64, device=device)
    raw = weight(GGMLType.Q4_0, N, 64, device)
    with pytest.raises(ValueError, match=r"Q4_0: a tensor of shape \(40, 64\) takes 1440 bytes, got 700"):
        qmatmul(x, raw[:700], GGMLType.Q4_0, (N, 64))
    with pytest.raises(ValueError, match="uint8"):
        qmatmul(x, raw.view(torch.int8), GGMLType.Q4_0, (N, 64))
    misaligned = torch.zeros(1441, dtype=torch.uint8, device=device)[1:]
    with pytest.raises(ValueError, match="2-byte aligned"):
        qmatmul(x, misaligned, GGMLType.Q4_0, (N, 64))
    with pytest.raises(ValueError, match="contiguous last dim"):
        qmatmul(torch.randn(64, 2, device=device).t(), raw, GGMLType.Q4_0, (N, 64))


def test_planar_needs_a_planar_type(device) -> None:
    raw = weight(GGMLType.Q4_1, N, 64, device)
    with pytest.raises(ValueError, match="Q4_1 has no planar layout"):
        qmatmul(torch.randn(1, 64, device=device), raw, GGMLType.Q4_1, (N, 64), planar=True)
