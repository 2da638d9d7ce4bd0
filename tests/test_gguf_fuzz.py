"""Fuzzing the reader with mutated real headers: every outcome is a clean open or a GGUFError.

The header (metadata and tensor table) of a real model is mutated and written in front of a sparse
data section of the original size, so benign mutations still open and hostile ones must be caught:
never another exception, a MemoryError or a hang (the deadline bounds each case).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ggtriton.gguf import GGUFError, GGUFFile
from ggtriton.gguf.writer import TensorData, Typed, typed_metadata, write_gguf

FUZZ_CASES = int(os.environ.get("GGTRITON_FUZZ_CASES", "2000"))
TOKENIZER_ENTRIES = 2048
INTERESTING_U64 = [0, 1, 2, 7, 8, 31, 32, 255, 256, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**60, 2**63 - 1, 2**63,
                   2**64 - 1]
INTERESTING_U32 = [0, 1, 2, 3, 4, 5, 8, 9, 12, 13, 23, 39, 41, 42, 255, 2**31, 2**32 - 1]


class Header:
    def __init__(self, path: Path):
        f = GGUFFile(path)
        self.size = path.stat().st_size
        with open(path, "rb") as fh:
            self.raw = fh.read(f.data_offset)
        first_tensor = next(iter(f.tensors)).encode()
        # The tensor table starts at the length prefix of the first tensor's name.
        self.table_start = self.raw.rindex(struct.pack("<Q", len(first_tensor)) + first_tensor)


@pytest.fixture(scope="module")
def smollm2_header(smollm2_path, tmp_path_factory) -> Header:
    """SmolLM2's header with its tokenizer arrays cut to their first TOKENIZER_ENTRIES entries: every key, type
    and tensor as they are, without the 49k-entry arrays that are most of the parsing in each case (the gemma3
    test fuzzes a whole vocabulary)."""
    f = GGUFFile(smollm2_path)
    metadata = typed_metadata(f.metadata, f.value_types)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
        typed = metadata[key]
        metadata[key] = Typed(typed.type, typed.value[:TOKENIZER_ENTRIES], typed.item_type)
    path = tmp_path_factory.mktemp("fuzz") / "smollm2-short-vocab.gguf"
    write_gguf(path, metadata, [TensorData(t.name, t.ggml_type, t.shape, f.tensor_bytes(t.name))
                                for t in f.tensors.values()])
    f.close()
    return Header(path)


def mutations(header_len: int, table_start: int) -> st.SearchStrategy:
    # Half the positions land in the small fields around the vocabulary: the first KV entries and the
    # tensor table, where a flipped byte changes a type, a count or an offset.
    position = st.one_of(
        st.integers(0, min(4095, header_len - 1)),
        st.integers(table_start, header_len - 1),
        st.integers(0, header_len - 1),
    )
    one = st.one_of(
        st.tuples(st.just("byte"), position, st.integers(0, 255)),
        st.tuples(st.just("u64"), position, st.sampled_from(INTERESTING_U64)),
        st.tuples(st.just("u32"), position, st.sampled_from(INTERESTING_U32)),
        st.tuples(st.just("delete"), position, st.integers(1, 16)),
        st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("truncate"), position, st.just(0)),
    )
    return st.lists(one, min_size=1, max_size=3)


def apply(raw: bytes, ops) -> tuple[bytes, bool]:
    buf = bytearray(raw)
    truncated = False
    for op, pos, arg in ops:
        pos = min(pos, max(len(buf) - 1, 0))
        if op == "byte":
            buf[pos : pos + 1] = bytes([arg])
        elif op == "u64":
            buf[pos : pos + 8] = struct.pack("<Q", arg)
        elif op == "u32":
            buf[pos : pos + 4] = struct.pack("<I", arg)
        elif op == "delete":
            del buf[pos : pos + arg]
        elif op == "insert":
            buf[pos:pos] = arg
        else:
            del buf[pos:]
            truncated = True
    return bytes(buf), truncated


def check(path: Path, raw: bytes, truncated: bool, size: int) -> str:
    """Open the mutated file; returns "opened" or "refused", fails on anything else."""
    with open(path, "wb") as fh:
        fh.write(raw)
        if not truncated:
            fh.truncate(max(size, len(raw)))  # sparse: no data is written
    try:
        f = GGUFFile(path)
    except GGUFError as e:
        assert str(path) in str(e)
        return "refused"
    file_size = path.stat().st_size
    for info in f.tensors.values():
        assert info.offset + info.nbytes <= file_size
        assert f.tensor_bytes(info.name).size == info.nbytes
    f.close()
    return "opened"


@settings(max_examples=FUZZ_CASES, deadline=5000, derandomize=bool(os.environ.get("CI")),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_smollm2_header(smollm2_header, tmp_path_factory, data):
    h = smollm2_header
    ops = data.draw(mutations(len(h.raw), h.table_start))
    raw, truncated = apply(h.raw, ops)
    event(check(tmp_path_factory.getbasetemp() / "fuzz_smollm2.gguf", raw, truncated, h.size))


@settings(max_examples=max(FUZZ_CASES // 20, 10), deadline=10000, derandomize=bool(os.environ.get("CI")),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_gemma3_header(gemma3_path, tmp_path_factory, data):
    h = _gemma_header(gemma3_path)
    ops = data.draw(mutations(len(h.raw), h.table_start))
    raw, truncated = apply(h.raw, ops)
    event(check(tmp_path_factory.getbasetemp() / "fuzz_gemma3.gguf", raw, truncated, h.size))


_GEMMA: dict[Path, Header] = {}


def _gemma_header(path: Path) -> Header:
    if path not in _GEMMA:
        _GEMMA[path] = Header(path)
    return _GEMMA[path]


def test_unmutated_header_with_sparse_data_opens(smollm2_header, tmp_path):
    assert check(tmp_path / "plain.gguf", smollm2_header.raw, False, smollm2_header.size) == "opened"
    assert len(GGUFFile(tmp_path / "plain.gguf").tensors) == 272
