"""Synthetic GGUF files: every value type, v2 and v3, alignments and split models.

Files are written by our writer and read back by both our reader and the PyPI `gguf` package's
GGUFReader, and written by the PyPI GGUFWriter and read by ours, so neither side is its own oracle.
"""

from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ggtriton.gguf import GGMLType, GGUFError, GGUFFile, GGUFValueType
from ggtriton.gguf.writer import TensorData, Typed, write_gguf

if TYPE_CHECKING:
    import gguf as gguf_pypi

V = GGUFValueType
INT_RANGES = {
    V.UINT8: (0, 2**8 - 1), V.INT8: (-(2**7), 2**7 - 1),
    V.UINT16: (0, 2**16 - 1), V.INT16: (-(2**15), 2**15 - 1),
    V.UINT32: (0, 2**32 - 1), V.INT32: (-(2**31), 2**31 - 1),
    V.UINT64: (0, 2**64 - 1), V.INT64: (-(2**63), 2**63 - 1),
}
float32s = st.floats(width=32, allow_nan=False)
float64s = st.floats(allow_nan=False)


def scalar_values(vtype: GGUFValueType) -> st.SearchStrategy:
    if vtype in INT_RANGES:
        return st.integers(*INT_RANGES[vtype])
    return {V.FLOAT32: float32s, V.FLOAT64: float64s, V.BOOL: st.booleans(), V.STRING: st.text(max_size=40)}[vtype]


SCALAR_TYPES = [v for v in V if v is not V.ARRAY]


@st.composite
def typed_values(draw, depth: int = 0) -> Typed:
    vtype = draw(st.sampled_from(SCALAR_TYPES + ([V.ARRAY] if depth < 2 else [])))
    if vtype is not V.ARRAY:
        return Typed(vtype, draw(scalar_values(vtype)))
    item = draw(st.sampled_from(SCALAR_TYPES + ([V.ARRAY] if depth < 1 else [])))
    if item is V.ARRAY:
        inner = draw(st.sampled_from(SCALAR_TYPES))
        items = draw(st.lists(st.lists(scalar_values(inner), max_size=4), max_size=4))
        return Typed(V.ARRAY, [Typed(V.ARRAY, x, inner) for x in items], V.ARRAY)
    return Typed(V.ARRAY, draw(st.lists(scalar_values(item), max_size=20)), item)


def plain(value):
    return [plain(v) for v in value.value] if isinstance(value, Typed) and value.type is V.ARRAY else (
        value.value if isinstance(value, Typed) else value
    )


@st.composite
def tensors(draw) -> list[TensorData]:
    out = []
    names = draw(st.lists(st.text(min_size=1, max_size=24), unique=True, max_size=5))
    for name in names:
        t = draw(st.sampled_from([GGMLType.F32, GGMLType.F16, GGMLType.Q4_0, GGMLType.Q6_K, GGMLType.I8]))
        rows = draw(st.integers(1, 3))
        blocks = draw(st.integers(1, 3))
        shape = (rows, blocks * t.block_elements)
        nbytes = rows * blocks * t.block_bytes
        data = draw(st.binary(min_size=nbytes, max_size=nbytes))
        out.append(TensorData(name, t, shape, data))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    # keys of any text but the split ones, which make a file one part of several (tested below); Hypothesis draws
    # the reader's own key names among its texts
    metadata=st.dictionaries(st.text(min_size=1, max_size=30).filter(lambda k: not k.startswith("split.")),
                             typed_values(), max_size=8),
    tensor_list=tensors(),
    version=st.sampled_from([2, 3]),
    alignment=st.sampled_from([1, 8, 32, 64, 256]),
)
def test_random_files_round_trip(tmp_path, metadata, tensor_list, version, alignment):
    metadata = metadata | {"general.alignment": Typed(V.UINT32, alignment)}  # a drawn key may be this one too
    path = tmp_path / "random.gguf"
    write_gguf(path, metadata, tensor_list, version=version)
    f = GGUFFile(path)
    assert f.version == version and f.alignment == alignment
    assert f.metadata == {k: plain(v) for k, v in metadata.items()}
    for k, v in metadata.items():
        assert f.value_types[k][0] is v.type
        if v.type is V.ARRAY:
            assert f.value_types[k][1] is v.item_type
    assert list(f.tensors) == [t.name for t in tensor_list]
    for t in tensor_list:
        info = f.tensors[t.name]
        assert (info.ggml_type, info.shape, info.nbytes) == (t.ggml_type, t.shape, len(t.data))
        assert info.offset % alignment == 0
        assert f.tensor_bytes(t.name).tobytes() == t.data
    if version == 3:
        # Cross-check with the independent reader (it handles neither v2's tag nor nested arrays the same way).
        import gguf as gguf_pypi

        ref = gguf_pypi.GGUFReader(path)
        for t in ref.tensors:
            assert f.tensors[t.name].offset == t.data_offset
        for k, v in metadata.items():
            if v.type is V.ARRAY and v.item_type is V.ARRAY:
                continue
            expected = ref.fields[k].contents()
            got = f.metadata[k]
            if v.type is V.FLOAT32 or (v.type is V.ARRAY and v.item_type is V.FLOAT32):
                assert np.array_equal(np.float32(got), np.float32(expected))
            else:
                assert got == expected, k


def finish(w: gguf_pypi.GGUFWriter) -> None:
    """Write out everything added to a reference writer."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_every_value_type_from_the_reference_writer(tmp_path):
    import gguf as gguf_pypi

    path = tmp_path / "all_types.gguf"
    w = gguf_pypi.GGUFWriter(path, "llama")
    values = {
        V.UINT8: 255, V.INT8: -128, V.UINT16: 65535, V.INT16: -32768, V.UINT32: 2**32 - 1, V.INT32: -(2**31),
        V.FLOAT32: 1.5, V.BOOL: True, V.STRING: "héllo, wörld 🦙", V.UINT64: 2**64 - 1, V.INT64: -(2**63),
        V.FLOAT64: math.pi,
    }
    for vtype, value in values.items():
        w.add_key_value(f"test.{vtype.name.lower()}", value, gguf_pypi.GGUFValueType(int(vtype)))
        w.add_key_value(f"test.array.{vtype.name.lower()}", [value, value], gguf_pypi.GGUFValueType.ARRAY,
                        sub_type=gguf_pypi.GGUFValueType(int(vtype)))
    w.add_tensor("weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    finish(w)

    f = GGUFFile(path)
    assert f.version == 3 and f.metadata["general.architecture"] == "llama"
    for vtype, value in values.items():
        assert f.metadata[f"test.{vtype.name.lower()}"] == value
        assert f.value_types[f"test.{vtype.name.lower()}"] == (vtype,)
        assert f.metadata[f"test.array.{vtype.name.lower()}"] == [value, value]
        assert f.value_types[f"test.array.{vtype.name.lower()}"] == (V.ARRAY, vtype)
    weight = f.tensor_bytes("weight").view(np.float32).reshape(f.tensors["weight"].shape)
    assert np.array_equal(weight, np.arange(64, dtype=np.float32).reshape(2, 32))


def test_nested_arrays(tmp_path):
    nested = Typed(V.ARRAY, [Typed(V.ARRAY, [1, 2, 3], V.UINT16), Typed(V.ARRAY, ["a", "bc"], V.STRING),
                             Typed(V.ARRAY, [], V.FLOAT64)], V.ARRAY)
    path = tmp_path / "nested.gguf"
    write_gguf(path, {"nested": nested})
    f = GGUFFile(path)
    assert f.metadata["nested"] == [[1, 2, 3], ["a", "bc"], []]
    assert f.value_types["nested"] == (V.ARRAY, V.ARRAY)


@pytest.mark.parametrize("alignment", [64, 4096])
def test_custom_alignment_from_the_reference_writer(tmp_path, alignment):
    import gguf as gguf_pypi

    path = tmp_path / "aligned.gguf"
    w = gguf_pypi.GGUFWriter(path, "llama")
    w.add_custom_alignment(alignment)
    rng = np.random.default_rng(alignment)
    arrays = {f"t{i}": rng.standard_normal((3, 7 + i)).astype(np.float32) for i in range(3)}
    for name, a in arrays.items():
        w.add_tensor(name, a)
    finish(w)
    f = GGUFFile(path)
    assert f.alignment == alignment and f.data_offset % alignment == 0
    for name, a in arrays.items():
        info = f.tensors[name]
        assert info.offset % alignment == 0 and info.shape == a.shape
        assert np.array_equal(f.tensor_bytes(name).view(np.float32).reshape(a.shape), a)


def _reference_split(tmp_path, n_tensors: int, per_part: int) -> dict[str, np.ndarray]:
    import gguf as gguf_pypi

    rng = np.random.default_rng(n_tensors)
    arrays = {f"blk.{i}.weight": rng.standard_normal((2, 16 * (i + 1))).astype(np.float32) for i in range(n_tensors)}
    w = gguf_pypi.GGUFWriter(tmp_path / "model.gguf", "llama", split_max_tensors=per_part)
    w.add_name("split test")
    for name, a in arrays.items():
        w.add_tensor(name, a)
    finish(w)
    return arrays


def test_split_model_from_the_reference_writer(tmp_path):
    arrays = _reference_split(tmp_path, n_tensors=5, per_part=2)
    parts = sorted(tmp_path.glob("model-*-of-00003.gguf"))
    assert len(parts) == 3
    f = GGUFFile(parts[0])
    assert f.parts == parts
    assert f.metadata["general.name"] == "split test"
    assert list(f.tensors) == list(arrays)
    assert [f.tensors[n].part for n in arrays] == [0, 0, 1, 1, 2]
    for name, a in arrays.items():
        assert np.array_equal(f.tensor_bytes(name).view(np.float32).reshape(a.shape), a)
    with pytest.raises(GGUFError, match="part 2 of a 3-part split model; open the first part"):
        GGUFFile(parts[1])


def _write_split(tmp_path, count: int, *, tensors_count: int | None = None, overrides: dict | None = None,
                 duplicate: bool = False):
    """A split model written by our writer; `overrides` maps part index -> metadata replacing the split keys."""
    paths = []
    for no in range(count):
        md = {"split.no": Typed(V.UINT16, no), "split.count": Typed(V.UINT16, count),
              "split.tensors.count": Typed(V.INT32, count if tensors_count is None else tensors_count)}
        md |= (overrides or {}).get(no, {})
        name = "w.0" if duplicate else f"w.{no}"
        data = np.full(32, no, np.float32)
        path = tmp_path / f"m-{no + 1:05d}-of-{count:05d}.gguf"
        write_gguf(path, md, [TensorData(name, GGMLType.F32, (32,), data)])
        paths.append(path)
    return paths


def test_split_model_from_our_writer(tmp_path):
    paths = _write_split(tmp_path, 4)
    f = GGUFFile(paths[0])
    assert len(f.tensors) == 4 and f.parts == paths
    for no in range(4):
        assert np.array_equal(f.tensor_bytes(f"w.{no}").view(np.float32), np.full(32, no, np.float32))


def test_split_model_errors(tmp_path):
    (tmp_path / "a").mkdir()
    paths = _write_split(tmp_path / "a", 3)
    paths[2].unlink()
    with pytest.raises(GGUFError, match="split part 3 of 3 is missing"):
        GGUFFile(paths[0])

    (tmp_path / "b").mkdir()
    paths = _write_split(tmp_path / "b", 3, overrides={1: {"split.no": Typed(V.UINT16, 2)}})
    with pytest.raises(GGUFError, match="expected split.no 1 of split.count 3, found 2 of 3"):
        GGUFFile(paths[0])

    (tmp_path / "c").mkdir()
    paths = _write_split(tmp_path / "c", 2, tensors_count=5)
    with pytest.raises(GGUFError, match="split.tensors.count is 5 but the 2 parts hold 2 tensors"):
        GGUFFile(paths[0])

    (tmp_path / "d").mkdir()
    paths = _write_split(tmp_path / "d", 2, duplicate=True)
    with pytest.raises(GGUFError, match="tensor 'w.0' appears in more than one part"):
        GGUFFile(paths[0])

    (tmp_path / "e").mkdir()
    paths = _write_split(tmp_path / "e", 2)
    renamed = paths[0].rename(tmp_path / "e" / "renamed.gguf")
    with pytest.raises(GGUFError, match="does not follow NAME-00001-of-00002.gguf"):
        GGUFFile(renamed)

    (tmp_path / "f").mkdir()
    paths = _write_split(tmp_path / "f", 2, overrides={0: {"split.no": Typed(V.UINT16, 3)}})
    with pytest.raises(GGUFError, match="split.no 3 / split.count 2 are inconsistent"):
        GGUFFile(paths[0])


def test_big_endian_file_is_refused_clearly(tmp_path):
    import gguf as gguf_pypi

    path = tmp_path / "be.gguf"
    w = gguf_pypi.GGUFWriter(path, "llama", endianess=gguf_pypi.GGUFEndian.BIG)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(GGUFError, match="big-endian"):
        GGUFFile(path)


def test_file_without_tensors_or_metadata(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    f = GGUFFile(path)
    assert f.metadata == {} and f.tensors == {} and f.version == 3


@pytest.mark.parametrize("alignment", [0, 24, "32", True, -8])
def test_writer_refuses_a_bad_alignment(tmp_path, alignment):
    metadata = {"general.alignment": Typed(V.STRING if isinstance(alignment, str) else V.INT32, alignment)}
    with pytest.raises(ValueError, match="must be a power-of-two integer"):
        write_gguf(tmp_path / "bad.gguf", metadata, [])
