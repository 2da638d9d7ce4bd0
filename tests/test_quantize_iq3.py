"""IQ3_S quantization and the IQ3_S / IQ3_M mixes against llama.cpp's quantizer (fixtures from
tests/fixtures/make_quantize_fixtures.py, in quantize_iq3_llamacpp.npz)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import quantize_cases as cases
from ggtriton.gguf import GGMLType, GGUFFile, dequantize
from ggtriton.gguf import quant_mix
from ggtriton.gguf.quant_mix import MIXES, TENSOR_TYPES, plan_types
from ggtriton.gguf.quantize import quantize
from ggtriton.runtime.entrypoints.cli import main

IQ3_S = GGMLType.IQ3_S


@functools.cache
def fixture() -> dict[str, np.ndarray]:
    with np.load(cases.IQ3_FIXTURE) as z:
        return {k: z[k] for k in z.files}


@functools.cache
def inputs() -> dict[str, np.ndarray]:
    return cases.bytes_model()


@functools.cache
def quantized(name: str, ggml_type: GGMLType) -> np.ndarray:
    return quantize(inputs()[name], ggml_type).numpy()


def test_inputs_are_llamacpps():
    for name, x in inputs().items():
        assert cases.sha256(x) == str(fixture()[f"input_sha256/{name}"]), f"{name}: the random input changed"


def test_mixes_and_type_are_offered():
    """llama.cpp's LLAMA_FTYPE_MOSTLY_IQ3_S and _IQ3_M (26, 27), both mostly IQ3_S."""
    assert {m: (int(f), t) for m, (f, t) in MIXES.items() if m.startswith("IQ3")} == \
           {"IQ3_S": (26, IQ3_S), "IQ3_M": (27, IQ3_S)}
    assert "IQ3_XS" not in MIXES  # it needs an importance matrix
    assert TENSOR_TYPES["IQ3_S"] == IQ3_S


def test_edge_input_has_zero_sub_blocks():
    """The edge-case tensor has all-zero 32-element sub-blocks before non-zero ones in a block: llama.cpp
    then writes the later sub-blocks' codes and signs into the earlier slots."""
    x = inputs()["blk.0.attn_v.weight"].reshape(-1, 8, 32)
    zero = np.abs(x).max(-1) == 0
    assert (zero[:, :-1] & ~zero[:, 1:]).sum() >= 5


@pytest.mark.parametrize("name", list(cases.BYTES_MODEL))
def test_bytes_equal_llamacpp(name: str):
    """--pure IQ3_S: the type llama.cpp chose (IQ4_NL or F16 for rows not of whole 256-blocks) and its bytes."""
    key = f"{IQ3_S.name}/{name}"
    expected_type = GGMLType(int(fixture()[f"bytes/type/{key}"]))
    x = inputs()[name]
    plan = plan_types([(name, x.shape, GGMLType.F32)], cases.plain(cases.llama_metadata(1, 1024, 8, 8, 1024)),
                      "IQ3_S", pure=True)
    assert plan[name] == expected_type
    ours = quantized(name, expected_type)
    if f"bytes/sha256/{key}" in fixture():
        assert cases.sha256(ours) == str(fixture()[f"bytes/sha256/{key}"])
    else:
        same = cases.block_digests(ours, expected_type.block_bytes) == fixture()[f"bytes/blocks/{key}"]
        assert same.all(), f"{expected_type.name}: {same.mean():.2%} of {same.size} blocks identical"


@pytest.mark.parametrize("model", list(cases.REAL_SLICES))
def test_real_weights_bytes_equal_llamacpp(model: str, request):
    x = cases.real_slice(request.getfixturevalue(f"{model}_path"), *cases.REAL_SLICES[model])
    assert cases.sha256(x) == str(fixture()[f"real/input_sha256/{model}"]), f"{model}: the weights differ"
    assert GGMLType(int(fixture()[f"real/type/IQ3_S/{model}"])) == IQ3_S
    assert cases.sha256(quantize(x, IQ3_S).numpy()) == str(fixture()[f"real/sha256/IQ3_S/{model}"])


def test_round_trip_is_close():
    """Per-row relative RMS error on the heavy-tailed rows: about 1.2 times what the quantizer reaches (0.44;
    more than Q3_K's, as each sub-block's scale is one of 16 steps of the block's and its outliers stretch it)."""
    x = inputs()["blk.0.attn_q.weight"]
    y = dequantize(quantized("blk.0.attn_q.weight", IQ3_S), IQ3_S, x.shape).numpy()
    err = np.linalg.norm(y - x, axis=1) / np.linalg.norm(x, axis=1)
    assert err.max() <= 0.53, f"{err.max():.4f}"


@pytest.mark.parametrize("run", list(cases.IQ3_RUNS))
@pytest.mark.parametrize("model", ["rules", "smollm2", "gemma3"])
def test_mix_types_equal_llamacpps(model: str, run: str, request):
    path = None if model == "rules" else request.getfixturevalue(f"{model}_path")
    wrong, count = cases.mix_type_mismatches(model, run, cases.IQ3_RUNS[run], fixture(), path)
    assert not wrong, f"{len(wrong)} of {count} tensors (ours, llama.cpp's): {wrong}"


@pytest.mark.parametrize("mix", cases.IQ3_MIXES)
def test_cli_writes_llamacpps_file(mix: str, tmp_path, monkeypatch, capsys):
    """The whole command with the mix's rules, streaming a few rows at a time, against llama.cpp's file."""
    src, dst = tmp_path / "in.gguf", tmp_path / "out.gguf"
    cases.write_bytes_model(src)
    monkeypatch.setattr(quant_mix, "_CHUNK_ELEMENTS", 40_000)
    assert main(["quantize", str(src), str(dst), mix.lower()]) == 0
    assert mix in capsys.readouterr().err
    with GGUFFile(dst) as f:
        assert f.metadata["general.file_type"] == int(fixture()[f"bytes/file_type/{mix}"]) == int(MIXES[mix][0])
        for info in f:
            assert int(info.ggml_type) == int(fixture()[f"bytes/mix/{mix}/{info.name}"][0]), info.name
            assert cases.sha256(f.tensor_bytes(info.name)) == str(fixture()[f"bytes/mix_sha256/{mix}/{info.name}"])
