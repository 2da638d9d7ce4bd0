"""The reader against the PyPI `gguf` package's GGUFReader on the two real test models."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest

from ggtriton.gguf import GGMLType, GGUFFile, GGUFValueType

if TYPE_CHECKING:
    import gguf as gguf_pypi

_ORACLES: dict = {}


def _oracle(path) -> gguf_pypi.GGUFReader:
    # GGUFReader takes seconds on a large vocabulary: read each model once per session.
    import gguf as gguf_pypi

    if path not in _ORACLES:
        _ORACLES[path] = gguf_pypi.GGUFReader(path)
    return _ORACLES[path]


@pytest.fixture(scope="module")
def pair(real_model_path):
    return GGUFFile(real_model_path), _oracle(real_model_path)


def test_metadata_equals_oracle(pair):
    ours, ref = pair
    ref_fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(ref_fields)
    assert ours.version == ref.fields["GGUF.version"].contents()
    for key, field in ref_fields.items():
        value, types = ours.metadata[key], ours.value_types[key]
        assert [int(t) for t in types] == [int(t) for t in field.types], key
        expected = field.contents()
        if types[0] is GGUFValueType.ARRAY and types[1] is GGUFValueType.FLOAT32:
            np.testing.assert_array_equal(np.array(value, np.float32), np.array(expected, np.float32), err_msg=key)
        else:
            assert value == expected, key


def test_tensor_table_equals_oracle(pair):
    ours, ref = pair
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    assert ours.alignment == ref.alignment
    assert ours.data_offset == ref.data_offset
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.ggml_type == GGMLType(int(t.tensor_type))
        assert info.shape == tuple(int(d) for d in reversed(t.shape))
        assert info.offset == t.data_offset
        assert info.nbytes == t.n_bytes
        assert info.n_elements == t.n_elements


def test_tensor_bytes_equal_oracle(pair):
    ours, ref = pair
    for t in ref.tensors:
        view = ours.tensor_bytes(t.name)
        assert view.dtype == np.uint8 and view.shape == (t.n_bytes,)
        assert not view.flags.writeable
        assert np.array_equal(view, np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)), t.name


def test_tensor_bytes_are_zero_copy(real_model_path):
    f = GGUFFile(real_model_path)
    name = next(iter(f.tensors))
    a, b = f.tensor_bytes(name), f.tensor_bytes(name)
    # Both views share the one mapping of the file.
    assert a.base is not None and np.shares_memory(a, b)
    with pytest.raises(KeyError, match="no tensor named"):
        f.tensor_bytes("no.such.tensor")
