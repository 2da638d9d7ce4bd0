"""Malformed GGUF files: each gets a GGUFError (a ValueError) naming the file and the byte offset."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from ggtriton.gguf import GGMLType, GGUFError, GGUFFile, GGUFValueType
from ggtriton.gguf.writer import TensorData, write_gguf

V = GGUFValueType


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def info(name: str | bytes, ne: tuple[int, ...], ggml_type: int, offset: int) -> bytes:
    return s(name) + struct.pack(f"<I{len(ne)}qIQ", len(ne), *ne, ggml_type, offset)


def gguf_bytes(kvs=(), infos=(), data=b"", *, version=3, n_tensors=None, n_kv=None, alignment=32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(infos)
    pad = -len(head) % alignment if infos else 0
    return head + b"\0" * pad + data


def open_bytes(tmp_path, raw: bytes, name: str = "bad.gguf") -> GGUFFile:
    path = tmp_path / name
    path.write_bytes(raw)
    return GGUFFile(path)


def expect_error(tmp_path, raw: bytes, match: str, offset: int | None = None) -> GGUFError:
    with pytest.raises(GGUFError, match=match) as e:
        open_bytes(tmp_path, raw)
    assert isinstance(e.value, ValueError)
    assert str(tmp_path / "bad.gguf") in str(e.value)
    if offset is not None:
        assert e.value.offset == offset, str(e.value)
        assert f"at byte {offset}:" in str(e.value)
    return e.value


F32_ROW = np.arange(32, dtype=np.float32).tobytes()


def test_a_well_formed_handmade_file_opens(tmp_path):
    raw = gguf_bytes([kv("a", V.UINT32, struct.pack("<I", 7))], [info("t", (32,), GGMLType.F32, 0)], F32_ROW)
    f = open_bytes(tmp_path, raw)
    assert f.metadata == {"a": 7} and f.tensors["t"].shape == (32,)


@pytest.mark.parametrize(
    ("raw", "match", "offset"),
    [
        (b"", "header needs 24 bytes", 0),
        (b"GGUF\x03\x00", "header needs 24 bytes", 0),
        (b"GGML" + bytes(20), "not a GGUF file", 0),
        (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "GGUF version 1 is not supported", 4),
        (b"GGUF" + struct.pack("<IQQ", 4, 0, 0), "unsupported GGUF version 4", 4),
        (b"GGUF" + struct.pack("<IQQ", 3 << 24, 0, 0), "big-endian", 4),
        (b"GGUF" + struct.pack("<IQQ", 3, 2**60, 0), "tensor count of 1152921504606846976 cannot fit", 8),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 2**64 - 1), "key-value count of 18446744073709551615 cannot fit", 16),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**40) + bytes(8), "key #0 length of 1099511627776", 24),
    ],
)
def test_header_errors(tmp_path, raw, match, offset):
    expect_error(tmp_path, raw, match, offset)


def test_metadata_errors(tmp_path):
    first_kv = 24
    expect_error(tmp_path, gguf_bytes([kv("k", 13, b"")]), "unknown value type 13", first_kv + 9)
    expect_error(tmp_path, gguf_bytes([kv("k", V.STRING, struct.pack("<Q", 99) + b"abc")]),
                 "value of 'k' length of 99 cannot fit", first_kv + 13)
    expect_error(tmp_path, gguf_bytes([kv("k", V.ARRAY, struct.pack("<IQ", V.UINT32, 2**62))]),
                 "item count of 4611686018427387904 cannot fit", first_kv + 17)
    expect_error(tmp_path, gguf_bytes([kv("k", V.ARRAY, struct.pack("<IQ", 77, 1))]),
                 "unknown array item type 77", first_kv + 13)
    expect_error(tmp_path, gguf_bytes([kv("k", V.UINT64, b"\1\2")]), "value of 'k' needs 8 bytes", first_kv + 13)
    dup = [kv("k", V.UINT8, b"\1"), kv("k", V.UINT8, b"\2")]
    expect_error(tmp_path, gguf_bytes(dup), "duplicate metadata key 'k'", first_kv + 14)
    expect_error(tmp_path, gguf_bytes([kv("k", V.BOOL, b"\2")]), "bool with byte value 2", first_kv + 13)
    expect_error(tmp_path, gguf_bytes([kv("k", V.ARRAY, struct.pack("<IQ", V.BOOL, 3) + b"\1\0\7")]),
                 r"value of 'k'\[2\] is a bool with byte value 7", first_kv + 13 + 12 + 2)
    expect_error(tmp_path, gguf_bytes(n_kv=1), "key-value count of 1 cannot fit in the 0 bytes left", 16)


def test_invalid_utf8(tmp_path):
    first_kv = 24
    expect_error(tmp_path, gguf_bytes([kv(b"ke\xffy", V.UINT8, b"\1")]), "key #0 is not valid UTF-8", first_kv + 8 + 2)
    expect_error(tmp_path, gguf_bytes([kv("k", V.STRING, s(b"ab\xc3"))]), "value of 'k' is not valid UTF-8",
                 first_kv + 13 + 8 + 2)
    items = struct.pack("<IQ", V.STRING, 3) + s("ok") + s(b"\xed\xa0\x80") + s("z")
    expect_error(tmp_path, gguf_bytes([kv("toks", V.ARRAY, items)]), r"value of 'toks'\[1\] is not valid UTF-8",
                 first_kv + 16 + 12 + 10 + 8)
    expect_error(tmp_path, gguf_bytes([], [info(b"\x80t", (32,), GGMLType.F32, 0)], F32_ROW),
                 "tensor #0 name is not valid UTF-8", 24 + 8)


def test_string_array_truncated_inside(tmp_path):
    items = struct.pack("<IQ", V.STRING, 3) + s("ok") + struct.pack("<Q", 50) + b"short" + bytes(20)
    expect_error(tmp_path, gguf_bytes([kv("toks", V.ARRAY, items)]), r"'toks'\[1\] of length 50 runs past the end")


def test_nesting_limit(tmp_path):
    depth = 20
    payload = struct.pack("<IQ", V.UINT8, 0)
    for _ in range(depth - 1):
        payload = struct.pack("<IQ", V.ARRAY, 1) + payload
    expect_error(tmp_path, gguf_bytes([kv("deep", V.ARRAY, payload)]), "nests arrays more than 8 deep")


@pytest.mark.parametrize("alignment", [0, 3, 48])
def test_bad_alignment_value(tmp_path, alignment):
    expect_error(tmp_path, gguf_bytes([kv("general.alignment", V.UINT32, struct.pack("<I", alignment))]),
                 f"general.alignment must be a power-of-two uint32, got {alignment}")


def test_alignment_of_wrong_type(tmp_path):
    expect_error(tmp_path, gguf_bytes([kv("general.alignment", V.UINT64, struct.pack("<Q", 64))]),
                 "general.alignment must be a power-of-two uint32")


def test_tensor_info_errors(tmp_path):
    t0 = 24
    expect_error(tmp_path, gguf_bytes([], [info("t", (32,), 4, 0)], F32_ROW), "unknown ggml type id 4", t0 + 9 + 4 + 8)
    expect_error(tmp_path, gguf_bytes([], [info("t", (32,), 99, 0)], F32_ROW), "unknown ggml type id 99")
    expect_error(tmp_path, gguf_bytes([], [info("t", (1, 1, 1, 1, 1), GGMLType.F32, 0)]),
                 "has 5 dimensions; at most 4", t0 + 9)
    expect_error(tmp_path, gguf_bytes([], [info("t", (32, -1), GGMLType.F32, 0)]), "negative dimension -1", t0 + 13)
    expect_error(tmp_path, gguf_bytes([], [info("t", (2**31, 2**31, 2**31), GGMLType.F32, 0)]), "too many elements")
    expect_error(tmp_path, gguf_bytes([], [info("t", (100,), GGMLType.Q4_K, 0)]),
                 "row length 100 is not a multiple of the Q4_K block of 256")
    two = [info("t", (32,), GGMLType.F32, 0), info("t", (32,), GGMLType.F32, 128)]
    expect_error(tmp_path, gguf_bytes([], two, F32_ROW * 2), "duplicate tensor name 't'", t0 + 9 + 4 + 8 + 4 + 8)
    expect_error(tmp_path, gguf_bytes([], [info("t", (32,), GGMLType.F32, 8)], F32_ROW + bytes(8)),
                 "offset 8 is not aligned to 32")
    expect_error(tmp_path, gguf_bytes([], [info("t", (32,), GGMLType.F32, 0)], F32_ROW[:-1]), "runs past the end")
    expect_error(tmp_path, gguf_bytes([], [info("t", (32,), GGMLType.F32, 2**63)], F32_ROW), "runs past the end")
    overlap = [info("a", (32,), GGMLType.F32, 0), info("b", (16,), GGMLType.F32, 96)]
    expect_error(tmp_path, gguf_bytes([], overlap, F32_ROW + bytes(64)), "tensor 'b' data overlaps")
    expect_error(tmp_path, gguf_bytes([], n_tensors=1), "tensor count of 1 cannot fit in the 8 bytes left", 8)


def test_every_truncation_of_a_valid_file_is_an_error(tmp_path):
    path = tmp_path / "good.gguf"
    write_gguf(path, {"general.architecture": "llama", "tokens": ["a", "bb", "ccc"], "x": 1.5},
               [TensorData("w", GGMLType.Q8_0, (2, 32), bytes(range(68))), TensorData("n", GGMLType.F32, (4,), bytes(16))])
    raw = path.read_bytes()
    GGUFFile(path)
    for cut in range(len(raw)):
        with pytest.raises(GGUFError):
            open_bytes(tmp_path, raw[:cut], "cut.gguf")


def test_unopenable_paths(tmp_path):
    with pytest.raises(GGUFError, match="cannot open"):
        GGUFFile(tmp_path / "missing.gguf")
    with pytest.raises(GGUFError, match="cannot open"):
        GGUFFile(tmp_path)
