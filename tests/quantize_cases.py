"""The random models of the quantization tests, rebuilt from seeds: tests/fixtures/make_quantize_fixtures.py
has llama.cpp quantize them, tests/test_quantize.py quantizes the same ones and compares."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from ggtriton.gguf import GGMLType, GGUFFile, GGUFValueType, dequantize
from ggtriton.gguf.quant_mix import plan_types
from ggtriton.gguf.writer import TensorData, Typed, write_gguf

FIXTURE = Path(__file__).parent / "fixtures" / "quantize_llamacpp.npz"

# The types llama.cpp quantizes without an importance matrix, each with the mix whose main type it is.
TYPE_MIXES: dict[GGMLType, str] = {
    GGMLType.Q4_0: "Q4_0", GGMLType.Q4_1: "Q4_1", GGMLType.Q5_0: "Q5_0", GGMLType.Q5_1: "Q5_1",
    GGMLType.Q8_0: "Q8_0", GGMLType.Q2_K: "Q2_K", GGMLType.Q3_K: "Q3_K_M", GGMLType.Q4_K: "Q4_K_M",
    GGMLType.Q5_K: "Q5_K_M", GGMLType.Q6_K: "Q6_K", GGMLType.TQ1_0: "TQ1_0", GGMLType.TQ2_0: "TQ2_0",
    GGMLType.IQ4_NL: "IQ4_NL", GGMLType.IQ4_XS: "IQ4_XS", GGMLType.F16: "F16", GGMLType.BF16: "BF16",
    GGMLType.F32: "F32",
}

# Mixes run with their rules on the random model (its tensors' bytes compared whole).
RULE_MIXES = ("Q2_K", "Q3_K_M", "Q4_K_M", "IQ4_XS")

# The IQ3_S mixes: their fixtures (bytes of IQ3_S, types of every mix run, whole files of the random model) are
# in a file of their own, made by the same script.
IQ3_FIXTURE = Path(__file__).parent / "fixtures" / "quantize_iq3_llamacpp.npz"
IQ3_MIXES = ("IQ3_S", "IQ3_M")
IQ3_TYPE_MIXES = {GGMLType.IQ3_S: "IQ3_S"}


def llama_metadata(n_layer: int, n_embd: int, n_head: int, n_head_kv: int, n_ff: int) -> dict[str, Any]:
    u32 = GGUFValueType.UINT32
    return {
        "general.architecture": "llama",
        "general.name": "random",
        "llama.block_count": Typed(u32, n_layer),
        "llama.context_length": Typed(u32, 256),
        "llama.embedding_length": Typed(u32, n_embd),
        "llama.feed_forward_length": Typed(u32, n_ff),
        "llama.attention.head_count": Typed(u32, n_head),
        "llama.attention.head_count_kv": Typed(u32, n_head_kv),
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
    }


def plain(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata as a reader returns it: the values without their types."""
    return {k: v.value if isinstance(v, Typed) else v for k, v in metadata.items()}


def _heavy_tailed(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Gaussian with a log-normal spread, rows scaled over five decades, and one outlier in ~200 at 20-60x."""
    x = rng.standard_normal(shape) * np.exp(0.8 * rng.standard_normal(shape))
    x *= 10.0 ** rng.uniform(-3, 2, (shape[0], 1))
    outliers = rng.random(shape) < 0.005
    x[outliers] *= rng.uniform(20, 60, outliers.sum())
    return x.astype(np.float32)


def _on_grid(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Multiples of 1/64, as dequantized weights are: many exact ties when quantized again."""
    k = np.round(rng.standard_t(4, shape) * 12)
    return (k / 64).astype(np.float32)


def _edge_groups(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Random rows with groups that take the quantizers' special paths: all zero, below 1e-15, constant,
    all positive, all negative."""
    x = _heavy_tailed(rng, shape).reshape(-1, 16)
    n = x.shape[0]
    kind = rng.integers(0, 6, n)
    x[kind == 0] = 0
    x[kind == 1] *= 1e-20
    x[kind == 2] = x[kind == 2, :1]
    x[kind == 3] = np.abs(x[kind == 3])
    x[kind == 4] = -np.abs(x[kind == 4])
    return x.reshape(shape)


# name: (shape, maker, seed). The shapes cover rows of whole 256-blocks, rows of 32-blocks only (the
# 256-block types fall back) and rows of neither (F16).
BYTES_MODEL: dict[str, tuple[tuple[int, int], Any, int]] = {
    "blk.0.attn_q.weight": ((48, 512), _heavy_tailed, 1),
    "blk.0.attn_k.weight": ((24, 768), _on_grid, 2),
    "blk.0.attn_v.weight": ((16, 1024), _edge_groups, 3),
    "blk.0.attn_output.weight": ((20, 96), _heavy_tailed, 4),
    "blk.0.ffn_gate.weight": ((6, 40), _heavy_tailed, 5),
    "blk.0.ffn_down.weight": ((192, 1024), _heavy_tailed, 6),
}
LARGE = {"blk.0.ffn_down.weight"}  # compared by digest of the whole tensor, not block by block
NORM = "blk.0.attn_norm.weight"


def bytes_model() -> dict[str, np.ndarray]:
    tensors = {name: maker(np.random.default_rng(seed), shape) for name, (shape, maker, seed) in BYTES_MODEL.items()}
    tensors[NORM] = (1 + 0.1 * np.random.default_rng(7).standard_normal(1024)).astype(np.float32)
    return tensors


def write_bytes_model(path: Path) -> None:
    tensors = [TensorData(name, GGMLType.F32, x.shape, x) for name, x in bytes_model().items()]
    write_gguf(path, llama_metadata(1, 1024, 8, 8, 1024), tensors)


# A model for the mix rules alone (llama.cpp is given random data; the rules read names and shapes): 16
# layers, so that every position rule (first 1/16, 1/8, every third layer) picks some; 4 query heads per
# K/V head; its own output matrix; rows of whole 256-blocks except the token embedding's 288.
RULES_LAYERS, RULES_EMBD, RULES_FF, RULES_VOCAB = 16, 256, 512, 64


def rules_model_metadata() -> dict[str, Any]:
    return llama_metadata(RULES_LAYERS, RULES_EMBD, 8, 2, RULES_FF)


def rules_model_shapes() -> dict[str, tuple[int, ...]]:
    kv = RULES_EMBD // 4
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (RULES_VOCAB, 288)}
    for i in range(RULES_LAYERS):
        p = f"blk.{i}."
        shapes |= {p + "attn_norm.weight": (RULES_EMBD,), p + "attn_q.weight": (RULES_EMBD, RULES_EMBD),
                   p + "attn_k.weight": (kv, RULES_EMBD), p + "attn_v.weight": (kv, RULES_EMBD),
                   p + "attn_output.weight": (RULES_EMBD, RULES_EMBD), p + "ffn_norm.weight": (RULES_EMBD,),
                   p + "ffn_gate.weight": (RULES_FF, RULES_EMBD), p + "ffn_up.weight": (RULES_FF, RULES_EMBD),
                   p + "ffn_down.weight": (RULES_EMBD, RULES_FF)}
    shapes |= {"output_norm.weight": (RULES_EMBD,), "output.weight": (RULES_VOCAB, RULES_EMBD)}
    return shapes


# Slices of real weights (rows of a tensor of each bundled model, whole 256-blocks), as llama.cpp reads them
# from the models dequantized to F16: quantized to every type with --pure. SmolLM2's rows hold a block whose
# Q4_K bytes depend on the last bit of a square root.
REAL_SLICES: dict[str, tuple[str, int, int]] = {
    "smollm2": ("blk.12.ffn_down.weight", 352, 64),
    "gemma3": ("blk.3.ffn_down.weight", 0, 64),
}


def real_slice(path: Path, name: str, first_row: int, rows: int) -> np.ndarray:
    with GGUFFile(path) as f:
        info = f.tensors[name]
        row_bytes = info.ggml_type.row_bytes(info.shape[-1])
        raw = f.tensor_bytes(name)[first_row * row_bytes : (first_row + rows) * row_bytes]
        return dequantize(raw, info.ggml_type, (rows, info.shape[-1])).half().float().numpy()


# Options of the mix runs besides the plain ones: (name, pure, output type, token embedding type).
OPTION_RUNS: dict[str, tuple[str, bool, GGMLType | None, GGMLType | None]] = {
    "Q4_K_M+pure": ("Q4_K_M", True, None, None),
    "Q3_K_S+output_q4_0": ("Q3_K_S", False, GGMLType.Q4_0, None),
    "Q5_K_S+embd_q8_0": ("Q5_K_S", False, None, GGMLType.Q8_0),
    "TQ2_0+output_q8_0+embd_f16": ("TQ2_0", False, GGMLType.Q8_0, GGMLType.F16),
}


# The mix runs of the IQ3_S fixture: the mixes, and IQ3_S given to the output matrix of another mix.
IQ3_RUNS: dict[str, tuple[str, bool, GGMLType | None, GGMLType | None]] = {
    **{mix: (mix, False, None, None) for mix in IQ3_MIXES},
    "IQ3_M+pure": ("IQ3_M", True, None, None),
    "Q4_K_M+output_iq3_s": ("Q4_K_M", False, GGMLType.IQ3_S, None),
}


def block_digests(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    """A 32-bit digest of each block of a tensor's bytes."""
    blocks = np.ascontiguousarray(raw).reshape(-1, block_bytes)
    return np.array([int.from_bytes(hashlib.blake2b(b.tobytes(), digest_size=4).digest(), "little")
                     for b in blocks], dtype=np.uint32)


def sha256(raw: np.ndarray | bytes) -> str:
    return hashlib.sha256(np.ascontiguousarray(raw).tobytes() if isinstance(raw, np.ndarray) else raw).hexdigest()


@functools.cache
def real_model_tensors(path) -> tuple[list[tuple[str, tuple[int, ...], GGMLType]], dict]:
    """The model as the fixture gave it to llama.cpp: its quantized tensors dequantized to F16."""
    with GGUFFile(path) as f:
        tensors = [(t.name, t.shape, GGMLType.F16 if t.ggml_type.is_quantized else t.ggml_type) for t in f]
        return tensors, dict(f.metadata)


def mix_type_mismatches(model: str, run: str, spec: tuple, stored: dict[str, np.ndarray],
                        model_path: Path | None) -> tuple[dict[str, tuple[str, str]], int]:
    """For the run `run` (mix, pure, output type, embedding type) on `model` ("rules": the rules model, else the real
    model at model_path): the tensors whose chosen type is not llama.cpp's (name: (ours, llama.cpp's)), and how
    many tensors there are."""
    if model == "rules":
        metadata = plain(rules_model_metadata())
        tensors = [(name, shape, GGMLType.F32) for name, shape in rules_model_shapes().items()]
    else:
        tensors, metadata = real_model_tensors(model_path)
    names = [str(n) for n in stored[f"mix/{model}/names"]]
    assert [name for name, _, _ in tensors] == names
    mix, pure, output_type, embedding_type = spec
    ours = plan_types(tensors, metadata, mix, pure=pure, output_type=output_type, embedding_type=embedding_type)
    expected = dict(zip(names, (GGMLType(int(t)) for t in stored[f"mix/{model}/{run}"])))
    return {n: (ours[n].name, expected[n].name) for n in names if ours[n] != expected[n]}, len(names)
