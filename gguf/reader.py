"""GGUF reader that trusts nothing.

Layout of a GGUF v2/v3 file (little-endian):

    magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x    { string key | u32 value_type | value }
    tensor_count x { string name | u32 n_dims | u64 ne[n_dims] | u32 ggml_type | u64 offset }
    padding to `general.alignment` (default 32)
    data section: each tensor at data_start + offset, offsets aligned

A string is a u64 byte length followed by UTF-8 bytes; an array is a u32 item type, a u64 count and
the items. `ne[0]` is the innermost (contiguous) dimension; `TensorInfo.shape` is PyTorch order.

Every count and length is checked against the bytes left in the file before anything is allocated,
so a malformed file raises `GGUFError` naming the file and byte offset instead of exhausting memory.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .types import TYPE_TRAITS, VALUE_FORMATS, GGMLType, GGUFValueType

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
# Arrays of arrays are legal; deeper nesting than this is refused rather than recursed into.
MAX_ARRAY_NESTING = 8
SPLIT_PATTERN = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<4sIQQ")
_NUMPY_DTYPES: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"),
    GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("<u1"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
# Fewest bytes an item of each type can occupy: bounds a count read from the file.
_MIN_ITEM_BYTES = {t: d.itemsize for t, d in _NUMPY_DTYPES.items()} | {
    GGUFValueType.STRING: 8,
    GGUFValueType.ARRAY: 4 + 8,
}
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8


class GGUFError(ValueError):
    """A GGUF file that cannot be read: names the file and, where it applies, the byte offset."""

    def __init__(self, path: str | os.PathLike, message: str, offset: int | None = None):
        self.path = str(path)
        self.offset = offset
        where = f"{self.path}" if offset is None else f"{self.path} at byte {offset}"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor of a GGUF file.

    `shape` is in PyTorch order (outermost first); `offset` is the absolute byte offset of the
    tensor's data in the file (`part`, for split models) that holds it.
    """

    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    part: int = 0

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class _Parser:
    """Sequential, bounds-checked decoding of one GGUF header from a buffer."""

    def __init__(self, path: Path, buf: mmap.mmap | bytes):
        self.path = path
        self.buf = buf
        self.size = len(buf)
        self.pos = 0

    def error(self, message: str, offset: int | None = None) -> GGUFError:
        return GGUFError(self.path, message, self.pos if offset is None else offset)

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.error(f"{what} needs {n} bytes but the file ends after {self.size - self.pos}")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def count(self, what: str, min_item_bytes: int) -> int:
        """A u64 count of items, each at least `min_item_bytes` long, that must fit in the file."""
        start = self.pos
        n = self.u64(what)
        if n * min_item_bytes > self.size - self.pos:
            raise self.error(f"{what} of {n} cannot fit in the {self.size - self.pos} bytes left", start)
        return n

    def string(self, what: str) -> str:
        start = self.pos
        n = self.count(f"{what} length", 1)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.error(f"{what} is not valid UTF-8 ({e.reason})", start + 8 + e.start) from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        try:
            vtype = GGUFValueType(vtype)
        except ValueError:
            raise self.error(f"{what} has unknown value type {vtype}", self.pos - 4) from None
        if vtype is GGUFValueType.STRING:
            return self.string(what)
        if vtype is GGUFValueType.ARRAY:
            return self.array(what, depth)
        fmt = VALUE_FORMATS[vtype]
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        if vtype is GGUFValueType.BOOL:
            if v > 1:
                raise self.error(f"{what} is a bool with byte value {v}")
            v = bool(v)
        self.pos += n
        return v

    def array(self, what: str, depth: int) -> list:
        if depth >= MAX_ARRAY_NESTING:
            raise self.error(f"{what} nests arrays more than {MAX_ARRAY_NESTING} deep")
        start = self.pos
        raw_type = self.u32(f"{what} item type")
        try:
            itype = GGUFValueType(raw_type)
        except ValueError:
            raise self.error(f"{what} has unknown array item type {raw_type}", start) from None
        n = self.count(f"{what} item count", _MIN_ITEM_BYTES[itype])
        if itype is GGUFValueType.STRING:
            return self.string_array(what, n)
        if itype is GGUFValueType.ARRAY:
            out = []
            for i in range(n):
                out.append(self.value(GGUFValueType.ARRAY, f"{what}[{i}]", depth + 1))
            return out
        dtype = _NUMPY_DTYPES[itype]
        items = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos)
        if itype is GGUFValueType.BOOL:
            bad = np.flatnonzero(items > 1)
            if bad.size:
                raise self.error(f"{what}[{bad[0]}] is a bool with byte value {items[bad[0]]}", self.pos + int(bad[0]))
            items = items.astype(bool)
        self.pos += n * dtype.itemsize
        return items.tolist()

    def string_array(self, what: str, n: int) -> list[str]:
        # The hot loop of opening a file with a 262k-token vocabulary: locals only, one
        # bounds check and one decode per item.
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        out: list[str] = [""] * n
        for i in range(n):
            if size - pos < 8:
                self.pos = pos
                raise self.error(f"{what}[{i}] length needs 8 bytes but the file ends after {size - pos}")
            (length,) = unpack(buf, pos)
            pos += 8
            if length > size - pos:
                raise self.error(f"{what}[{i}] of length {length} runs past the end of the file", pos - 8)
            try:
                out[i] = buf[pos : pos + length].decode("utf-8")
            except UnicodeDecodeError as e:
                raise self.error(f"{what}[{i}] is not valid UTF-8 ({e.reason})", pos + e.start) from None
            pos += length
        self.pos = pos
        return out


@dataclass(frozen=True, slots=True)
class _Part:
    """One parsed GGUF file (a whole model, or one part of a split model)."""

    path: Path
    buf: mmap.mmap | bytes
    version: int
    metadata: dict[str, Any]
    value_types: dict[str, tuple[GGUFValueType, ...]]
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int


def _map(path: Path) -> mmap.mmap | bytes:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return b""
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise GGUFError(path, f"cannot open: {e.strerror or e}") from None


def _parse_part(path: Path, part_index: int) -> _Part:
    buf = _map(path)
    p = _Parser(path, buf)
    p.need(_HEADER.size, "header")
    magic, version, n_tensors, n_kv = _HEADER.unpack_from(buf, 0)
    if magic != GGUF_MAGIC:
        raise p.error(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})", 0)
    if version == 1:
        raise p.error("GGUF version 1 is not supported (it predates 64-bit counts); re-convert the model with a current llama.cpp", 4)
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise p.error(f"unsupported GGUF version {version}{hint}; versions 2 and 3 are supported", 4)
    p.pos = 8
    n_tensors = p.count("tensor count", _MIN_TENSOR_INFO_BYTES)
    n_kv = p.count("metadata key-value count", _MIN_KV_BYTES)

    metadata: dict[str, Any] = {}
    value_types: dict[str, tuple[GGUFValueType, ...]] = {}
    for i in range(n_kv):
        key_offset = p.pos
        key = p.string(f"metadata key #{i}")
        if key in metadata:
            raise p.error(f"duplicate metadata key {key!r}", key_offset)
        type_offset = p.pos
        vtype = p.u32(f"value type of {key!r}")
        metadata[key] = p.value(vtype, f"value of {key!r}")
        vt = GGUFValueType(vtype)
        if vt is GGUFValueType.ARRAY:
            (item_type,) = _U32.unpack_from(buf, type_offset + 4)
            value_types[key] = (vt, GGUFValueType(item_type))
        else:
            value_types[key] = (vt,)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if "general.alignment" in metadata and (
        value_types["general.alignment"] != (GGUFValueType.UINT32,) or alignment <= 0 or alignment & (alignment - 1)
    ):
        raise p.error(f"general.alignment must be a power-of-two uint32, got {alignment!r}", None)

    raw_infos = []
    names: set[str] = set()
    for i in range(n_tensors):
        info_offset = p.pos
        name = p.string(f"tensor #{i} name")
        if name in names:
            raise p.error(f"duplicate tensor name {name!r}", info_offset)
        names.add(name)
        n_dims = p.u32(f"tensor {name!r} dimension count")
        if n_dims > MAX_DIMS:
            raise p.error(f"tensor {name!r} has {n_dims} dimensions; at most {MAX_DIMS} are allowed", p.pos - 4)
        p.need(8 * n_dims, f"tensor {name!r} dimensions")
        ne = struct.unpack_from(f"<{n_dims}q", buf, p.pos)
        dims_offset = p.pos
        p.pos += 8 * n_dims
        type_id = p.u32(f"tensor {name!r} type")
        try:
            ggml_type = GGMLType(type_id)
        except ValueError:
            raise p.error(f"tensor {name!r} has unknown ggml type id {type_id}", p.pos - 4) from None
        rel_offset = p.u64(f"tensor {name!r} offset")
        traits = TYPE_TRAITS[ggml_type]
        n_elements = 1
        for d in ne:
            if d < 0:
                raise p.error(f"tensor {name!r} has negative dimension {d}", dims_offset)
            n_elements *= d
        if n_elements >= 2**63:
            raise p.error(f"tensor {name!r} shape {list(ne)} has too many elements", dims_offset)
        if n_dims and ne[0] % traits.block_elements:
            raise p.error(
                f"tensor {name!r}: row length {ne[0]} is not a multiple of the {ggml_type.name} block of "
                f"{traits.block_elements}",
                dims_offset,
            )
        nbytes = n_elements // traits.block_elements * traits.block_bytes
        if rel_offset % alignment:
            raise p.error(f"tensor {name!r} data offset {rel_offset} is not aligned to {alignment}", p.pos - 8)
        raw_infos.append((name, ggml_type, tuple(reversed(ne)), rel_offset, nbytes, info_offset))

    data_offset = -(-p.pos // alignment) * alignment
    data_size = max(p.size - data_offset, 0)
    spans = sorted((rel, nbytes, name) for name, _, _, rel, nbytes, _ in raw_infos)
    end = 0
    for rel, nbytes, name in spans:
        if rel + nbytes > data_size:
            raise p.error(
                f"tensor {name!r} data [{data_offset + rel}, {data_offset + rel + nbytes}) runs past the end of the "
                f"file ({p.size} bytes)",
                data_offset + rel,
            )
        if rel < end:
            raise p.error(f"tensor {name!r} data overlaps the tensor before it", data_offset + rel)
        end = rel + nbytes
    tensors = [
        TensorInfo(name, t, shape, data_offset + rel, nbytes, part_index) for name, t, shape, rel, nbytes, _ in raw_infos
    ]
    return _Part(path, buf, version, metadata, value_types, tensors, alignment, data_offset)


def _split_info(part: _Part) -> tuple[int, int]:
    """(split.no, split.count) of a part; (0, 1) for a file that is not split."""
    md = part.metadata
    no, count = md.get("split.no", 0), md.get("split.count", 1)
    for key, v in (("split.no", no), ("split.count", count)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise GGUFError(part.path, f"{key} must be an integer, got {v!r}")
    if count < 1 or not 0 <= no < count:
        raise GGUFError(part.path, f"split.no {no} / split.count {count} are inconsistent")
    return no, count


class GGUFFile:
    """A GGUF model, mapped read-only once; tensor data is served as zero-copy views.

    Opening the first part of a split model (`name-00001-of-00003.gguf`) opens every part and
    presents one tensor map; metadata comes from the first part.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        first = _parse_part(self.path, 0)
        no, count = _split_info(first)
        parts = [first]
        if no != 0:
            raise GGUFError(self.path, f"this is part {no + 1} of a {count}-part split model; open the first part")
        if count > 1:
            parts += self._open_other_parts(first, count)
        self._parts = parts
        self.version: int = first.version
        self.metadata: dict[str, Any] = first.metadata
        self.value_types: dict[str, tuple[GGUFValueType, ...]] = first.value_types
        self.alignment: int = first.alignment
        self.tensors: dict[str, TensorInfo] = {}
        for part in parts:
            for t in part.tensors:
                if t.name in self.tensors:
                    raise GGUFError(part.path, f"tensor {t.name!r} appears in more than one part")
                self.tensors[t.name] = t
        if count > 1:
            expected = first.metadata.get("split.tensors.count")
            if expected is not None and expected != len(self.tensors):
                raise GGUFError(
                    self.path, f"split.tensors.count is {expected} but the {count} parts hold {len(self.tensors)} tensors"
                )

    def _open_other_parts(self, first: _Part, count: int) -> list[_Part]:
        m = SPLIT_PATTERN.match(self.path.name)
        if not m or int(m["count"]) != count or int(m["no"]) != 1:
            raise GGUFError(
                self.path,
                f"split.count is {count} but the file name does not follow NAME-00001-of-{count:05d}.gguf, "
                "so the other parts cannot be found",
            )
        parts = []
        for no in range(1, count):
            part_path = self.path.with_name(f"{m['prefix']}-{no + 1:05d}-of-{count:05d}.gguf")
            if not part_path.exists():
                raise GGUFError(self.path, f"split part {no + 1} of {count} is missing: {part_path}")
            part = _parse_part(part_path, no)
            got = _split_info(part)
            if got != (no, count):
                raise GGUFError(part_path, f"expected split.no {no} of split.count {count}, found {got[0]} of {got[1]}")
            if part.version != first.version:
                raise GGUFError(part_path, f"GGUF version {part.version} differs from the first part's {first.version}")
            parts.append(part)
        return parts

    @property
    def parts(self) -> list[Path]:
        """Paths of the files this model was read from (one unless split)."""
        return [p.path for p in self._parts]

    @property
    def data_offset(self) -> int:
        """Absolute offset of the (first part's) data section."""
        return self._parts[0].data_offset

    @property
    def file_size(self) -> int:
        """Bytes on disk over all parts."""
        return sum(len(p.buf) for p in self._parts)

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw bytes of a tensor as a read-only uint8 view into the mapped file (no copy)."""
        try:
            info = self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None
        return np.frombuffer(self._parts[info.part].buf, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def __repr__(self) -> str:
        arch = self.metadata.get("general.architecture", "?")
        return f"GGUFFile({str(self.path)!r}, v{self.version}, {arch}, {len(self.tensors)} tensors)"

    def close(self) -> None:
        """Unmap the file(s). Views handed out keep their mapping alive until they are dropped."""
        for part in self._parts:
            if isinstance(part.buf, mmap.mmap):
                try:
                    part.buf.close()
                except BufferError:
                    pass

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
