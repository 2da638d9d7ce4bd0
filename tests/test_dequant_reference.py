"""The torch reference dequantization and quantizer against the PyPI `gguf` package, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ggtriton.gguf import TYPE_TRAITS, GGMLType, GGUFFile, dequantize
from ggtriton.gguf.quants import DEQUANTIZERS
from ggtriton.gguf.quantize import quantize, random_blocks

TYPES = list(DEQUANTIZERS)
QUANTIZABLE = [GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1]

# Random data overflows and multiplies infinities by zero on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def scale_pool(rng: np.random.Generator) -> np.ndarray:
    """fp16 scales: mostly ordinary, with subnormals, extremes, signed zeros and any bit pattern (inf, NaN)."""
    ordinary = rng.standard_normal(4000) * 2.0 ** rng.integers(-14, 4, 4000)
    subnormal = np.arange(1, 0x400, dtype=np.uint16).view(np.float16)
    extreme = np.array([65504, 2.0**-14, 2.0**-24, 0, 1, 2.0**15])
    any_bits = rng.integers(0, 1 << 16, 400, dtype=np.uint16).view(np.float16)
    pool = np.concatenate([ordinary, subnormal, -subnormal, extreme, -extreme, any_bits]).astype(np.float16)
    return pool


def assert_bits_equal(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    """Identical float32 bit patterns, except that any NaN matches any NaN."""
    assert ours.shape == ref.shape, what
    same = (ours.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(ours) & np.isnan(ref))
    if not same.all():
        i = np.flatnonzero(~same)
        raise AssertionError(
            f"{what}: {i.size} of {same.size} values differ, first at {i[0]}: {ours.flat[i[0]]!r} != {ref.flat[i[0]]!r}"
        )


def oracle(raw: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    import gguf as gguf_pypi

    return gguf_pypi.quants.dequantize(raw, gguf_pypi.GGMLQuantizationType(int(ggml_type)))


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_random_blocks_match_oracle(ggml_type: GGMLType) -> None:
    rng = np.random.default_rng(int(ggml_type))
    qk = TYPE_TRAITS[ggml_type].block_elements
    n_blocks = 4096 if qk > 1 else 1 << 15
    per_row = 4 if qk > 1 else 256
    raw = random_blocks(ggml_type, n_blocks, rng, scale_pool(rng)).reshape(n_blocks // per_row, -1)
    ref = oracle(raw, ggml_type)
    ours = dequantize(raw, ggml_type, ref.shape)
    assert ours.dtype == torch.float32
    assert_bits_equal(ours.numpy(), ref, ggml_type.name)
    assert np.isfinite(ref).mean() > 0.9  # the test data is mostly ordinary values


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_torch_input_and_shapes(ggml_type: GGMLType) -> None:
    rng = np.random.default_rng(1)
    qk = TYPE_TRAITS[ggml_type].block_elements
    raw = random_blocks(ggml_type, 30, rng)
    ref = oracle(raw.reshape(1, -1), ggml_type).reshape(2, 3, 5 * qk)
    ours = dequantize(torch.from_numpy(raw), ggml_type, (2, 3, 5 * qk))
    assert_bits_equal(ours.numpy(), ref, ggml_type.name)


def test_real_model_tensors_match_oracle(real_model_path) -> None:
    f = GGUFFile(real_model_path)
    checked = set()
    for info in f.tensors.values():
        raw = f.tensor_bytes(info.name).reshape(-1, info.ggml_type.row_bytes(info.shape[-1]))
        ref = oracle(raw, info.ggml_type).reshape(info.shape)
        assert_bits_equal(dequantize(raw, info.ggml_type, info.shape).numpy(), ref, info.name)
        checked.add(info.ggml_type)
    assert checked, "no tensors"


@pytest.mark.parametrize("ggml_type", QUANTIZABLE, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(32,), (1, 32), (3, 64), (5, 7, 96), (2, 0, 32), (33, 160), (400, 32)])
def test_quantize_matches_oracle(ggml_type: GGMLType, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(shape) * 100 + shape[-1])
    x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 4, (*shape[:-1], 1))).astype(np.float32)
    if x.size >= 96:
        flat = x.reshape(-1, 32)
        flat[0] = 0  # an all-zero block: d = 0 (or -0)
        flat[1] = rng.integers(-127, 128, 32) + 0.5 * rng.choice([-1, 1], 32)  # ties of roundf and trunc
        flat[1, 0] = 127
        flat[2] = np.repeat(flat[2, :1], 32)  # a constant block: max == min
    import gguf as gguf_pypi

    ours = quantize(x, ggml_type)
    ref = gguf_pypi.quants.quantize(x, gguf_pypi.GGMLQuantizationType(int(ggml_type)))
    assert ours.dtype == torch.uint8
    assert ours.shape == ref.shape
    assert np.array_equal(ours.numpy(), ref)
    if x.size:  # and it dequantizes like the oracle (which cannot take empty tensors)
        assert_bits_equal(dequantize(ours, ggml_type, shape).numpy(), oracle(ref, ggml_type), "round trip")


@pytest.mark.parametrize(
    ("ggml_type", "shape", "n_bytes", "match"),
    [
        (GGMLType.Q8_K, (1, 256), 292, "Q8_K.*not supported.*1, 256"),
        (GGMLType.I32, (4,), 16, "I32.*not supported"),
        (99, (1, 32), 18, "unknown ggml type id 99"),
        (GGMLType.Q4_K, (2, 256), 200, r"Q4_K.*\(2, 256\).*288 bytes, got 200"),
        (GGMLType.Q4_0, (3, 48), 54, r"Q4_0.*\(3, 48\).*whole blocks of 32"),
        (GGMLType.F16, (), 2, "F16.*shape"),
    ],
)
def test_bad_input_raises(ggml_type, shape, n_bytes, match) -> None:
    with pytest.raises(ValueError, match=match):
        dequantize(np.zeros(n_bytes, dtype=np.uint8), ggml_type, shape)


def test_bad_quantize_input_raises() -> None:
    with pytest.raises(ValueError, match=r"IQ2_XXS.*not supported.*\(2, 256\)"):
        quantize(np.zeros((2, 256), dtype=np.float32), GGMLType.IQ2_XXS)
    with pytest.raises(ValueError, match=r"Q8_0.*\(2, 40\).*whole blocks of 32"):
        quantize(np.zeros((2, 40), dtype=np.float32), GGMLType.Q8_0)
    with pytest.raises(ValueError, match="uint8"):
        dequantize(np.zeros(18, dtype=np.int8), GGMLType.Q4_0, (32,))
