"""GGUF writer: synthetic files for tests and random-weight models of real shapes for GPU benchmarks.

Metadata values are typed the way llama.cpp's Python writer types them (bool -> BOOL, int -> INT32,
float -> FLOAT32, str -> STRING, list -> ARRAY of its first item's type); wrap a value in `Typed` to
choose its type, e.g. `Typed(GGUFValueType.UINT64, 7)` or `Typed(GGUFValueType.ARRAY, [1, 2], GGUFValueType.UINT8)`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

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


def _as_buffer(data: bytes | bytearray | memoryview | np.ndarray) -> memoryview:
    """The bytes of `data` without a copy (a view of a memory-mapped tensor stays one)."""
    if isinstance(data, np.ndarray):
        return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    view = memoryview(data)
    return view.cast("B") if view.nbytes else memoryview(b"")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A tensor's entry in the tensor table, its data to be written later: `shape` in PyTorch order."""

    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]


def _alignment(path: object, metadata: Mapping[str, Any], alignment: int | None) -> int:
    if alignment is None:
        a = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        alignment = a.value if isinstance(a, Typed) else a
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise ValueError(f"{path}: the alignment (general.alignment) must be a power-of-two integer, got {alignment!r}")
    return alignment


class GGUFStreamWriter:
    """Writes a GGUF file in one pass: the header (metadata and tensor table, every size known from the
    types and shapes) at once, then the tensors' data in table order, each in as many pieces as the caller
    likes, so no more than a piece of one tensor need be in memory."""

    def __init__(
        self,
        file: BinaryIO,
        metadata: Mapping[str, Any],
        tensors: Sequence[TensorSpec | TensorData],
        *,
        version: int = 3,
        alignment: int | None = None,
    ):
        self._file = file
        self._alignment = _alignment(getattr(file, "name", "GGUF output"), metadata, alignment)
        header = bytearray(GGUF_MAGIC + struct.pack("<IQQ", version, len(tensors), len(metadata)))
        for key, value in metadata.items():
            header += _string(key) + struct.pack("<I", _infer_type(value)) + encode_value(value)
        self._sizes: list[tuple[str, int]] = []
        offset = 0
        for t in tensors:
            ne = tuple(reversed(t.shape))
            n_elements = int(np.prod(t.shape, dtype=np.int64)) if t.shape else 1
            size = n_elements // TYPE_TRAITS[t.ggml_type].block_elements * TYPE_TRAITS[t.ggml_type].block_bytes
            header += _string(t.name) + struct.pack(f"<I{len(ne)}qIQ", len(ne), *ne, t.ggml_type, offset)
            self._sizes.append((f"tensor {t.name!r}: {t.ggml_type.name}{list(t.shape)}", size))
            offset += -(-size // self._alignment) * self._alignment
        file.write(header)
        file.write(b"\0" * (-len(header) % self._alignment))
        self._index = 0  # the tensor whose data comes next
        self._written = 0  # bytes of it written so far

    def write(self, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        """Append the next bytes of the current tensor's data; a tensor is done when all its bytes are in."""
        blob = _as_buffer(data)
        if not blob:
            return
        while self._index < len(self._sizes) and self._sizes[self._index][1] == 0:
            self._next()
        if self._index == len(self._sizes):
            raise ValueError(f"{len(blob)} bytes given after the last tensor's data")
        what, size = self._sizes[self._index]
        if self._written + len(blob) > size:
            raise ValueError(f"{what}: {self._written + len(blob)} bytes given, it takes {size}")
        self._file.write(blob)
        self._written += len(blob)
        if self._written == size:
            self._next()

    def _next(self) -> None:
        self._index += 1
        self._written = 0
        if self._index < len(self._sizes):  # padding between tensors, none after the last
            self._file.write(b"\0" * (-self._file.tell() % self._alignment))

    def close(self) -> None:
        """Check that every tensor's data was written."""
        while self._index < len(self._sizes) and self._sizes[self._index][1] == 0:
            self._next()
        if self._index < len(self._sizes):
            what, size = self._sizes[self._index]
            raise ValueError(f"{what}: {self._written} of its {size} bytes written")


def write_gguf(
    path: str | os.PathLike,
    metadata: Mapping[str, Any],
    tensors: Iterable[TensorData] = (),
    *,
    version: int = 3,
    alignment: int | None = None,
) -> None:
    """Write a GGUF file. `alignment` defaults to `general.alignment` in `metadata`, else 32."""
    alignment = _alignment(path, metadata, alignment)
    tensors = list(tensors)
    blobs = [_as_buffer(t.data) for t in tensors]
    for t, blob in zip(tensors, blobs):
        n_elements = int(np.prod(t.shape, dtype=np.int64)) if t.shape else 1
        traits = TYPE_TRAITS[t.ggml_type]
        expected = n_elements // traits.block_elements * traits.block_bytes
        if len(blob) != expected:
            raise ValueError(f"tensor {t.name!r}: {len(blob)} bytes given, {t.ggml_type.name}{list(t.shape)} needs {expected}")
    with open(path, "wb") as f:
        writer = GGUFStreamWriter(f, metadata, tensors, version=version, alignment=alignment)
        for blob in blobs:
            writer.write(blob)
        writer.close()
