"""The type tables against the PyPI `gguf` package's constants."""

from __future__ import annotations

import pytest

from ggtriton.gguf import TYPE_TRAITS, GGMLType, GGUFValueType, LlamaFileType, file_type_name


def test_every_ggml_type_matches_oracle_ids_and_names():
    import gguf as gguf_pypi

    ours = {t.name: int(t) for t in GGMLType}
    ref = {t.name: int(t) for t in gguf_pypi.GGMLQuantizationType}
    assert ours == ref


@pytest.mark.parametrize("t", list(GGMLType), ids=lambda t: t.name)
def test_block_sizes_match_oracle(t):
    import gguf as gguf_pypi

    blck, size = gguf_pypi.GGML_QUANT_SIZES[gguf_pypi.GGMLQuantizationType(int(t))]
    assert t.block_elements == blck
    if t is GGMLType.Q8_1:
        # ggml's block_q8_1 is fp16 d, fp16 s, 32 x int8 = 36 bytes; the Python package still lists
        # 40, the size of an older float32 layout. Q8_1 only exists as an activation format.
        assert (size, t.block_bytes) == (40, 36)
    else:
        assert t.block_bytes == size


def test_value_and_file_types_match_oracle():
    import gguf as gguf_pypi

    assert {v.name: int(v) for v in GGUFValueType} == {v.name: int(v) for v in gguf_pypi.GGUFValueType}
    assert {v.name: int(v) for v in LlamaFileType} == {v.name: int(v) for v in gguf_pypi.LlamaFileType}


@pytest.mark.parametrize(
    ("value", "name"),
    [(0, "F32"), (1, "F16"), (3, "Q4_1"), (15, "Q4_K_M"), (18, "Q6_K"), (30, "IQ4_XS"), (32, "BF16"),
     (38, "MXFP4_MOE"), (1024 | 15, "Q4_K_M (guessed)"), (5, "unknown (5)"), (999, "unknown (999)")],
)
def test_file_type_names(value, name):
    assert file_type_name(value) == name


def test_bits_per_weight_and_rows():
    assert GGMLType.Q4_K.bits_per_weight == 4.5
    assert GGMLType.Q4_0.bits_per_weight == 4.5
    assert GGMLType.Q6_K.bits_per_weight == 6.5625
    assert GGMLType.MXFP4.bits_per_weight == 4.25
    assert GGMLType.F16.bits_per_weight == 16
    assert GGMLType.Q4_K.row_bytes(4096) == 16 * 144
    assert not GGMLType.BF16.is_quantized and GGMLType.IQ2_XXS.is_quantized
    with pytest.raises(ValueError, match="Q4_K: row of 100 elements"):
        GGMLType.Q4_K.row_bytes(100)
    assert set(TYPE_TRAITS) == set(GGMLType)
