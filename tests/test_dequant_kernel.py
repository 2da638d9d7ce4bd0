"""The Triton dequantization kernel against the torch reference: bit-exact float32, correctly rounded fp16 / bf16,
on `device` (the GPU, or the CPU with the kernel in the interpreter)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ggtriton.gguf import TYPE_TRAITS, GGMLType
from ggtriton.gguf.quants import DEQUANTIZERS
from ggtriton.gguf.quantize import random_blocks
from ggtriton.kernels import dequantize
from ggtriton.kernels.dequant import dequantize_ref

TYPES = list(DEQUANTIZERS)
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

# Random blocks overflow and multiply infinities by zero on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def raw_tensor(ggml_type: GGMLType, shape: tuple[int, ...], device: torch.device, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    qk = TYPE_TRAITS[ggml_type].block_elements
    n_blocks = int(np.prod(shape)) // qk
    # Mostly ordinary scales, some subnormal, negative and extreme ones.
    scales = np.concatenate([rng.standard_normal(60) / 64, [6e-8, -3e-6, 65504.0, -1.0, 0.0]])
    return torch.from_numpy(random_blocks(ggml_type, n_blocks, rng, scales).reshape(-1)).to(device)


def assert_bits_equal(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Identical bit patterns, except that any NaN matches any NaN."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    int_dtype = _INT_VIEW[ref.dtype]
    same = (ours.view(int_dtype) == ref.view(int_dtype)) | (ours.isnan() & ref.isnan())
    assert bool(same.all()), f"{int((~same).sum())} of {same.numel()} values differ"


# (rows..., blocks per row): one block, fewer blocks than a tile, a tile plus a remainder, 3-D.
# Plain float types (one element per block) get 160 times the blocks so that they also span several tiles.
LAYOUTS = [(1, 1), (3, 2), (37, 1), (5, 33), (2, 3, 5)]


def shape_of(ggml_type: GGMLType, layout: tuple[int, ...]) -> tuple[int, ...]:
    qk = TYPE_TRAITS[ggml_type].block_elements
    return (*layout[:-1], layout[-1] * (qk if qk > 1 else 160))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_kernel_matches_reference(ggml_type: GGMLType, layout: tuple[int, ...], dtype: torch.dtype, device) -> None:
    shape = shape_of(ggml_type, layout)
    raw = raw_tensor(ggml_type, shape, device, seed=len(layout) + layout[-1])
    out = torch.full(shape, float("nan"), dtype=dtype, device=device)  # poison: every element must be written
    result = dequantize(raw, ggml_type, shape, dtype, out=out)
    assert result is out
    ref = dequantize_ref(raw, ggml_type, shape)
    assert_bits_equal(out, ref.to(dtype))
    assert ref.isfinite().float().mean() > 0.5  # the test data is mostly ordinary values


@pytest.mark.usefixtures("poisoned_outputs")
def test_allocates_output(device) -> None:
    raw = raw_tensor(GGMLType.Q4_K, (2, 512), device)
    out = dequantize(raw, GGMLType.Q4_K, (2, 512), torch.bfloat16)
    assert out.shape == (2, 512) and out.dtype == torch.bfloat16 and out.device == raw.device
    assert_bits_equal(out, dequantize_ref(raw, GGMLType.Q4_K, (2, 512), torch.bfloat16))


def test_rounding_to_half_precision(device) -> None:
    # F32 values at and around the rounding boundaries of fp16 and bf16, infinities and NaN.
    values = torch.tensor(
        [1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8 + 2**-20), 65520.0, 3.4e38, 1e-40,
         float("inf"), float("-inf"), float("nan"), -0.0], dtype=torch.float32,
    )
    raw = values.view(torch.uint8).to(device)
    for dtype in (torch.float16, torch.bfloat16):
        out = dequantize(raw, GGMLType.F32, (values.numel(),), dtype)
        assert_bits_equal(out, values.to(dtype).to(device))


@pytest.mark.parametrize(
    ("ggml_type", "shape", "n_bytes", "kwargs", "match"),
    [
        (GGMLType.Q8_K, (256,), 292, {}, "Q8_K.*not supported"),
        (GGMLType.Q4_K, (2, 256), 200, {}, r"Q4_K.*\(2, 256\).*288 bytes, got 200"),
        (GGMLType.Q4_0, (40,), 18, {}, r"Q4_0.*\(40,\).*whole blocks"),
        (GGMLType.Q4_0, (32,), 18, {"dtype": torch.int8}, "Q4_0: output dtype"),
        (GGMLType.Q4_0, (32,), 18, {"out": torch.empty(31)}, r"Q4_0: out must be.*\(32,\)"),
        (GGMLType.Q4_0, (32,), 18, {"out": torch.empty(32, dtype=torch.float16)}, "Q4_0: out must be"),
    ],
)
def test_bad_input_raises(ggml_type, shape, n_bytes, kwargs, match, device) -> None:
    if "out" in kwargs:
        kwargs = {"out": kwargs["out"].to(device)}
    with pytest.raises(ValueError, match=match):
        dequantize(torch.zeros(n_bytes, dtype=torch.uint8, device=device), ggml_type, shape, **kwargs)


def test_bad_raw_raises(device) -> None:
    with pytest.raises(ValueError, match="uint8"):
        dequantize(torch.zeros(18, dtype=torch.int8, device=device), GGMLType.Q4_0, (32,))
    with pytest.raises(ValueError, match="uint8"):
        dequantize(np.zeros(18, dtype=np.uint8), GGMLType.Q4_0, (32,))
    misaligned = torch.zeros(19, dtype=torch.uint8, device=device)[1:]
    with pytest.raises(ValueError, match="Q4_0: raw bytes must be 2-byte aligned"):
        dequantize(misaligned, GGMLType.Q4_0, (32,))
