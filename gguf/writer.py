"""GGUF writer: synthetic files for tests and random-weight models of real shapes for GPU benchmarks.

Metadata values are typed the way llama.cpp's Python writer types them (bool -> BOOL, int -> INT32,
float -> FLOAT32, str -> STRING, list -> ARRAY of its first item's type); wrap a value in `Typed` to
choose its type, e.g. `Typed(GGUFValueType.UINT64, 7)` or `Typed(GGUFValueType.ARRAY, [1, 2], GGUFValueType.UINT8)`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .reader import DEFAULT_ALIGNMENT, GGUF_MAGIC
from .types import TYPE_TRAITS, VALUE_FORMATS, GGMLType, GGUFValueType


@dataclass(frozen=True, slots=True)
class Typed:
    """A metadata value with an explicit type (and item type, for arrays)."""

    type: GGUFValueType
    value: Any
    item_type: GGUFValueType | None = None


@dataclass(frozen=True, slots=True)
class TensorData:
    """A tensor to write: `shape` in PyTorch order, `data` its raw GGUF bytes."""

    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]
    data: bytes | bytearray | memoryview | np.ndarray


def typed_metadata(metadata: Mapping[str, Any], value_types: Mapping[str, tuple[GGUFValueType, ...]]) -> dict[str, Any]:
    """A read file's metadata (`GGUFFile.metadata`, `.value_types`) with the types it was stored with."""
    out = {}
    for key, value in metadata.items():
        types = value_types[key]
        out[key] = Typed(types[0], value, types[1] if len(types) > 1 else None)
    return out


def _infer_type(value: Any) -> GGUFValueType:
    if isinstance(value, Typed):
        return value.type
    if isinstance(value, bool):
        return GGUFValueType.BOOL
    if isinstance(value, int):
        return GGUFValueType.INT32
    if isinstance(value, float):
        return GGUFValueType.FLOAT32
    if isinstance(value, str):
        return GGUFValueType.STRING
    if isinstance(value, (list, tuple)):
        return GGUFValueType.ARRAY
    raise TypeError(f"cannot store a {type(value).__name__} in GGUF metadata")


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def encode_value(value: Any, vtype: GGUFValueType | None = None) -> bytes:
    """The bytes of one metadata value (without its type tag)."""
    item_type = None
    if isinstance(value, Typed):
        vtype, item_type, value = value.type, value.item_type, value.value
    vtype = GGUFValueType(vtype if vtype is not None else _infer_type(value))
    if vtype is GGUFValueType.STRING:
        return _string(value)
    if vtype is GGUFValueType.ARRAY:
        items = list(value)
        if item_type is None:
            item_type = _infer_type(items[0]) if items else GGUFValueType.UINT8
        item_type = GGUFValueType(item_type)
        head = struct.pack("<IQ", item_type, len(items))
        if item_type in VALUE_FORMATS:
            fmt = VALUE_FORMATS[item_type]
            return head + struct.pack(f"<{len(items)}{fmt}", *items)
        return head + b"".join(encode_value(v, item_type) for v in items)
    return struct.pack("<" + VALUE_FORMATS[vtype], value)


def _as_bytes(data: bytes | bytearray | memoryview | np.ndarray) -> bytes:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).tobytes()
    return bytes(data)


def write_gguf(
    path: str | os.PathLike,
    metadata: Mapping[str, Any],
    tensors: Iterable[TensorData] = (),
    *,
    version: int = 3,
    alignment: int | None = None,
) -> None:
    """Write a GGUF file. `alignment` defaults to `general.alignment` in `metadata`, else 32."""
    if alignment is None:
        a = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        alignment = a.value if isinstance(a, Typed) else a
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise ValueError(f"{path}: the alignment (general.alignment) must be a power-of-two integer, got {alignment!r}")
    tensors = list(tensors)
    header = bytearray()
    header += GGUF_MAGIC + struct.pack("<IQQ", version, len(tensors), len(metadata))
    for key, value in metadata.items():
        header += _string(key) + struct.pack("<I", _infer_type(value)) + encode_value(value)
    offset = 0
    blobs = []
    for t in tensors:
        ne = tuple(reversed(t.shape))
        traits = TYPE_TRAITS[t.ggml_type]
        n_elements = int(np.prod(t.shape, dtype=np.int64)) if t.shape else 1
        expected = n_elements // traits.block_elements * traits.block_bytes
        blob = _as_bytes(t.data)
        if len(blob) != expected:
            raise ValueError(f"tensor {t.name!r}: {len(blob)} bytes given, {t.ggml_type.name}{list(t.shape)} needs {expected}")
        header += _string(t.name) + struct.pack(f"<I{len(ne)}qIQ", len(ne), *ne, t.ggml_type, offset)
        blobs.append((offset, blob))
        offset += -(-len(blob) // alignment) * alignment
    with open(path, "wb") as f:
        f.write(header)
        data_start = -(-len(header) // alignment) * alignment
        f.write(b"\0" * (data_start - len(header)))
        for off, blob in blobs:
            f.seek(data_start + off)
            f.write(blob)
        if blobs:
            f.truncate(data_start + blobs[-1][0] + len(blobs[-1][1]))
