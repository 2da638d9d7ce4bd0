"""The GGUF type tables: tensor (ggml) types, metadata value types and file types.

Ids and names are llama.cpp's (`ggml.h`, `llama.h`); block sizes are those of its `block_*` structs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class GGMLType(enum.IntEnum):
    """Tensor element types, with llama.cpp's names and ids (`GGMLType.Q4_K == 12`)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    # 4 and 5 (Q4_2, Q4_3) were removed from the format.
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    # 31-33 (Q4_0_4_4, Q4_0_4_8, Q4_0_8_8) were removed: they are repacked in memory now.
    TQ1_0 = 34
    TQ2_0 = 35
    # 36-38 (IQ4_NL_4_4, IQ4_NL_4_8, IQ4_NL_8_8) were removed likewise.
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41

    @property
    def block_elements(self) -> int:
        return TYPE_TRAITS[self].block_elements

    @property
    def block_bytes(self) -> int:
        return TYPE_TRAITS[self].block_bytes

    @property
    def bits_per_weight(self) -> float:
        return TYPE_TRAITS[self].bits_per_weight

    @property
    def is_quantized(self) -> bool:
        return TYPE_TRAITS[self].block_elements > 1

    def row_bytes(self, n_elements: int) -> int:
        """Bytes of a row of `n_elements`; the row must hold whole blocks."""
        blck = self.block_elements
        if n_elements % blck:
            raise ValueError(f"{self.name}: row of {n_elements} elements is not a multiple of its block of {blck}")
        return n_elements // blck * self.block_bytes


@dataclass(frozen=True, slots=True)
class TypeTraits:
    block_elements: int
    block_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block_elements


# (elements per block, bytes per block). K-quants and most i-quants have 256-element super-blocks.
TYPE_TRAITS: dict[GGMLType, TypeTraits] = {
    t: TypeTraits(e, b)
    for t, (e, b) in {
        GGMLType.F32: (1, 4),
        GGMLType.F16: (1, 2),
        GGMLType.Q4_0: (32, 2 + 16),
        GGMLType.Q4_1: (32, 2 + 2 + 16),
        GGMLType.Q5_0: (32, 2 + 4 + 16),
        GGMLType.Q5_1: (32, 2 + 2 + 4 + 16),
        GGMLType.Q8_0: (32, 2 + 32),
        GGMLType.Q8_1: (32, 2 + 2 + 32),
        GGMLType.Q2_K: (256, 16 + 64 + 2 + 2),
        GGMLType.Q3_K: (256, 32 + 64 + 12 + 2),
        GGMLType.Q4_K: (256, 2 + 2 + 12 + 128),
        GGMLType.Q5_K: (256, 2 + 2 + 12 + 32 + 128),
        GGMLType.Q6_K: (256, 128 + 64 + 16 + 2),
        GGMLType.Q8_K: (256, 4 + 256 + 32),
        GGMLType.IQ2_XXS: (256, 2 + 64),
        GGMLType.IQ2_XS: (256, 2 + 64 + 8),
        GGMLType.IQ3_XXS: (256, 2 + 96),
        GGMLType.IQ1_S: (256, 2 + 32 + 16),
        GGMLType.IQ4_NL: (32, 2 + 16),
        GGMLType.IQ3_S: (256, 2 + 64 + 8 + 32 + 4),
        GGMLType.IQ2_S: (256, 2 + 64 + 8 + 8),
        GGMLType.IQ4_XS: (256, 2 + 2 + 4 + 128),
        GGMLType.I8: (1, 1),
        GGMLType.I16: (1, 2),
        GGMLType.I32: (1, 4),
        GGMLType.I64: (1, 8),
        GGMLType.F64: (1, 8),
        GGMLType.IQ1_M: (256, 32 + 16 + 8),
        GGMLType.BF16: (1, 2),
        GGMLType.TQ1_0: (256, 48 + 4 + 2),
        GGMLType.TQ2_0: (256, 64 + 2),
        GGMLType.MXFP4: (32, 1 + 16),
        GGMLType.NVFP4: (64, 4 + 32),
        GGMLType.Q1_0: (128, 2 + 16),
    }.items()
}


class GGUFValueType(enum.IntEnum):
    """Metadata value types of the GGUF key-value section."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# struct format of each fixed-size value type (little-endian).
VALUE_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "B",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}


class LlamaFileType(enum.IntEnum):
    """`general.file_type`: the quantization mix a file was made with (llama.cpp's `llama_ftype`)."""

    ALL_F32 = 0
    MOSTLY_F16 = 1
    MOSTLY_Q4_0 = 2
    MOSTLY_Q4_1 = 3
    MOSTLY_Q8_0 = 7
    MOSTLY_Q5_0 = 8
    MOSTLY_Q5_1 = 9
    MOSTLY_Q2_K = 10
    MOSTLY_Q3_K_S = 11
    MOSTLY_Q3_K_M = 12
    MOSTLY_Q3_K_L = 13
    MOSTLY_Q4_K_S = 14
    MOSTLY_Q4_K_M = 15
    MOSTLY_Q5_K_S = 16
    MOSTLY_Q5_K_M = 17
    MOSTLY_Q6_K = 18
    MOSTLY_IQ2_XXS = 19
    MOSTLY_IQ2_XS = 20
    MOSTLY_Q2_K_S = 21
    MOSTLY_IQ3_XS = 22
    MOSTLY_IQ3_XXS = 23
    MOSTLY_IQ1_S = 24
    MOSTLY_IQ4_NL = 25
    MOSTLY_IQ3_S = 26
    MOSTLY_IQ3_M = 27
    MOSTLY_IQ2_S = 28
    MOSTLY_IQ2_M = 29
    MOSTLY_IQ4_XS = 30
    MOSTLY_IQ1_M = 31
    MOSTLY_BF16 = 32
    MOSTLY_TQ1_0 = 36
    MOSTLY_TQ2_0 = 37
    MOSTLY_MXFP4_MOE = 38
    MOSTLY_NVFP4 = 39
    MOSTLY_Q1_0 = 40
    GUESSED = 1024


def file_type_name(value: int) -> str:
    """The short name llama.cpp prints for a `general.file_type` (15 -> "Q4_K_M")."""
    guessed = bool(value & LlamaFileType.GUESSED) and value != LlamaFileType.GUESSED
    base = value & ~LlamaFileType.GUESSED if guessed else value
    try:
        name = LlamaFileType(base).name
    except ValueError:
        return f"unknown ({value})"
    name = name.removeprefix("MOSTLY_")
    if name == "ALL_F32":
        name = "F32"
    return f"{name} (guessed)" if guessed else name
