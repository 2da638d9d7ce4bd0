"""`ggtriton quantize` and the quantizers against llama.cpp's quantizer (fixtures from
tests/fixtures/make_quantize_fixtures.py): the bytes of every type, the type of every tensor in every mix."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import quantize_cases as cases
from ggtriton.gguf import GGMLType, GGUFFile, dequantize
from ggtriton.gguf import quant_mix
from ggtriton.gguf.quant_mix import MIXES, plan_types
from ggtriton.gguf.quantize import quantize
from ggtriton.gguf.writer import GGUFStreamWriter, TensorData, TensorSpec, write_gguf
from ggtriton.runtime.entrypoints.cli import main


@functools.cache
def fixture() -> dict[str, np.ndarray]:
    with np.load(cases.FIXTURE) as z:
        return {k: z[k] for k in z.files}


@functools.cache
def inputs() -> dict[str, np.ndarray]:
    return cases.bytes_model()


def test_inputs_are_llamacpps():
    for name, x in inputs().items():
        assert cases.sha256(x) == str(fixture()[f"input_sha256/{name}"]), f"{name}: the random input changed"


@pytest.mark.parametrize("name", list(cases.BYTES_MODEL))
@pytest.mark.parametrize("ggml_type", list(cases.TYPE_MIXES), ids=lambda t: t.name)
def test_bytes_equal_llamacpp(ggml_type: GGMLType, name: str):
    """Every type, quantized with --pure: the type llama.cpp chose (the row's fallback) and its bytes."""
    key = f"{ggml_type.name}/{name}"
    expected_type = GGMLType(int(fixture()[f"bytes/type/{key}"]))
    x = inputs()[name]
    plan = plan_types([(name, x.shape, GGMLType.F32)], cases.plain(cases.llama_metadata(1, 1024, 8, 8, 1024)),
                      cases.TYPE_MIXES[ggml_type], pure=True)
    assert plan[name] == expected_type
    ours = quantize(x, expected_type).numpy()
    if f"bytes/sha256/{key}" in fixture():
        assert cases.sha256(ours) == str(fixture()[f"bytes/sha256/{key}"])
    else:
        ref = fixture()[f"bytes/blocks/{key}"]
        same = cases.block_digests(ours, expected_type.block_bytes) == ref
        assert same.all(), f"{expected_type.name}: {same.mean():.2%} of {same.size} blocks identical"


@functools.cache
def _real_slice(model: str, path) -> np.ndarray:
    x = cases.real_slice(path, *cases.REAL_SLICES[model])
    assert cases.sha256(x) == str(fixture()[f"real/input_sha256/{model}"]), f"{model}: the weights differ"
    return x


@pytest.mark.parametrize("model", list(cases.REAL_SLICES))
@pytest.mark.parametrize("ggml_type", list(cases.TYPE_MIXES), ids=lambda t: t.name)
def test_real_weights_bytes_equal_llamacpp(ggml_type: GGMLType, model: str, request):
    """Real weights, already on a quantization grid (dequantized, then F16): many exact ties."""
    x = _real_slice(model, request.getfixturevalue(f"{model}_path"))
    expected_type = GGMLType(int(fixture()[f"real/type/{ggml_type.name}/{model}"]))
    assert expected_type == ggml_type
    assert cases.sha256(quantize(x, ggml_type).numpy()) == str(fixture()[f"real/sha256/{ggml_type.name}/{model}"])


# Largest relative RMS error over the rows of the heavy-tailed tensor, per type: about 1.3 times what the
# quantizers reach (their outliers make it larger than on Gaussian rows); ternary types keep signs only.
_ROUND_TRIP_ERROR = {
    GGMLType.F32: 0.0, GGMLType.F16: 5e-4, GGMLType.BF16: 4e-3, GGMLType.Q8_0: 0.017, GGMLType.Q6_K: 0.048,
    GGMLType.Q5_0: 0.11, GGMLType.Q5_1: 0.09, GGMLType.Q5_K: 0.075, GGMLType.Q4_0: 0.2, GGMLType.Q4_1: 0.19,
    GGMLType.Q4_K: 0.15, GGMLType.IQ4_NL: 0.16, GGMLType.IQ4_XS: 0.16, GGMLType.Q3_K: 0.28, GGMLType.Q2_K: 0.7,
    GGMLType.TQ1_0: 0.9, GGMLType.TQ2_0: 0.9,
}


@pytest.mark.parametrize("ggml_type", list(cases.TYPE_MIXES), ids=lambda t: t.name)
def test_round_trip_is_close(ggml_type: GGMLType):
    x = inputs()["blk.0.attn_q.weight"]
    y = dequantize(quantize(x, ggml_type), ggml_type, x.shape).numpy()
    # per row, as the rows' scales span five decades
    err = np.linalg.norm(y - x, axis=1) / np.linalg.norm(x, axis=1)
    assert err.max() <= _ROUND_TRIP_ERROR[ggml_type], f"{ggml_type.name}: {err.max():.4f}"


# The IQ3_S mixes are tested in test_quantize_iq3.py.
_RUNS = {mix: (mix, False, None, None) for mix in MIXES
         if mix not in ("Q3_K", "Q4_K", "Q5_K", *cases.IQ3_MIXES)} | cases.OPTION_RUNS


@pytest.mark.parametrize("run", list(_RUNS))
@pytest.mark.parametrize("model", ["rules", "smollm2", "gemma3"])
def test_mix_types_equal_llamacpps(model: str, run: str, request):
    path = None if model == "rules" else request.getfixturevalue(f"{model}_path")
    wrong, count = cases.mix_type_mismatches(model, run, _RUNS[run], fixture(), path)
    assert not wrong, f"{len(wrong)} of {count} tensors (ours, llama.cpp's): {wrong}"


@pytest.mark.parametrize("mix", cases.RULE_MIXES)
def test_cli_writes_llamacpps_file(mix: str, tmp_path, monkeypatch, capsys):
    """The whole command, its rules and its streaming (a few rows at a time) against llama.cpp's output."""
    src, dst = tmp_path / "in.gguf", tmp_path / "out.gguf"
    cases.write_bytes_model(src)
    monkeypatch.setattr(quant_mix, "_CHUNK_ELEMENTS", 40_000)
    assert main(["quantize", str(src), str(dst), mix.lower()]) == 0
    assert mix in capsys.readouterr().err
    with GGUFFile(src) as f_in, GGUFFile(dst) as f:
        assert f.metadata["general.file_type"] == int(fixture()[f"bytes/file_type/{mix}"])
        assert f.metadata["general.quantization_version"] == 2
        assert {k: v for k, v in f.metadata.items() if not k.startswith("general.quant")} == \
               {k: v for k, v in f_in.metadata.items()} | {"general.file_type": f.metadata["general.file_type"]}
        assert list(f.tensors) == list(f_in.tensors)
        for info in f:
            assert int(info.ggml_type) == int(fixture()[f"bytes/mix/{mix}/{info.name}"][0]), info.name
            expected_sha256 = str(fixture()[f"bytes/mix_sha256/{mix}/{info.name}"])
            assert cases.sha256(f.tensor_bytes(info.name)) == expected_sha256, info.name
            x = inputs()[info.name]
            y = dequantize(f.tensor_bytes(info.name), info.ggml_type, info.shape).numpy()
            assert np.linalg.norm(y - x) <= 0.5 * np.linalg.norm(x), info.name


def test_requantize(tmp_path, capsys):
    """A quantized model: refused without --allow-requantize; with it, each tensor is dequantized, then
    quantized as a float one is."""
    src, dst = tmp_path / "q8.gguf", tmp_path / "out.gguf"
    x = inputs()["blk.0.attn_q.weight"]
    q8 = quantize(x, GGMLType.Q8_0).numpy()
    write_gguf(src, cases.llama_metadata(1, 512, 8, 8, 512),
               [TensorData("blk.0.attn_q.weight", GGMLType.Q8_0, x.shape, q8)])
    assert main(["quantize", str(src), str(dst), "Q4_K_S"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Q8_0" in err and "--allow-requantize" in err and "Traceback" not in err
    assert not dst.exists()
    assert main(["quantize", str(src), str(dst), "Q4_K_S", "--allow-requantize"]) == 0
    with GGUFFile(dst) as f:
        expected = quantize(dequantize(q8, GGMLType.Q8_0, x.shape), GGMLType.Q4_K).numpy()
        assert f.tensors["blk.0.attn_q.weight"].ggml_type == GGMLType.Q4_K
        assert np.array_equal(f.tensor_bytes("blk.0.attn_q.weight"), expected.reshape(-1))
    # the same type is copied as it is, with or without the flag
    assert main(["quantize", str(src), str(dst), "Q8_0"]) == 0
    with GGUFFile(dst) as f:
        assert np.array_equal(f.tensor_bytes("blk.0.attn_q.weight"), q8.reshape(-1))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown type", "unknown type 'Q7_K'"),
        ("unknown tensor type", "unknown tensor type 'q9'"),
        ("missing directory", "no directory"),
        ("output is a directory", "is a directory"),
        ("output is the input", "would overwrite the input"),
        ("malformed input", "in.gguf"),
        ("missing input", "in.gguf"),
        ("no fallback for the given type", "not whole blocks"),
    ],
)
def test_bad_input_is_one_line(case: str, message: str, tmp_path, capsys):
    src, dst = tmp_path / "in.gguf", tmp_path / "out.gguf"
    cases.write_bytes_model(src)
    args = [str(src), str(dst), "Q4_K_M"]
    if case == "unknown type":
        args[2] = "Q7_K"
    elif case == "unknown tensor type":
        args += ["--output-tensor-type", "q9"]
    elif case == "missing directory":
        args[1] = str(tmp_path / "nowhere" / "out.gguf")
    elif case == "output is a directory":
        args[1] = str(tmp_path)
    elif case == "output is the input":
        args[1] = str(tmp_path / "." / "in.gguf")
    elif case == "malformed input":
        src.write_bytes(b"GGUF" + bytes(range(40)))
    elif case == "missing input":
        src.unlink()
    else:  # the token embedding type is taken as given: Q4_K cannot hold rows of 96 or 40
        write_gguf(src, cases.llama_metadata(1, 96, 8, 8, 96),
                   [TensorData("token_embd.weight", GGMLType.F32, (4, 96), np.ones((4, 96), np.float32))])
        args += ["--token-embedding-type", "Q4_K"]
    before = sorted(tmp_path.iterdir())
    assert main(["quantize", *args]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert sorted(tmp_path.iterdir()) == before  # nothing written


def test_stream_writer_checks_sizes(tmp_path):
    specs = [TensorSpec("a", GGMLType.F32, (3,)), TensorSpec("b", GGMLType.Q8_0, (2, 32))]
    data = [np.arange(3, dtype=np.float32), quantize(torch.randn(2, 32), GGMLType.Q8_0).numpy()]
    write_gguf(tmp_path / "whole.gguf", {"general.alignment": 64}, [TensorData(s.name, s.ggml_type, s.shape, d)
                                                                     for s, d in zip(specs, data)])
    with open(tmp_path / "pieces.gguf", "wb") as out:
        w = GGUFStreamWriter(out, {"general.alignment": 64}, specs)
        w.write(data[0][:2])
        w.write(data[0][2:])
        w.write(data[1][0])
        with pytest.raises(ValueError, match=r"'b'.*Q8_0\[2, 32\]: 102 bytes given, it takes 68"):
            w.write(data[1])
        w.write(data[1][1])
        w.close()
        with pytest.raises(ValueError, match="after the last tensor"):
            w.write(b"x")
    assert (tmp_path / "pieces.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()
    with open(tmp_path / "short.gguf", "wb") as out:
        w = GGUFStreamWriter(out, {}, specs)
        w.write(data[0])
        with pytest.raises(ValueError, match=r"'b'.*0 of its 68 bytes written"):
            w.close()
