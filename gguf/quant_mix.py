"""Quantization mixes: which type each tensor of a model gets, and the quantized model written tensor by tensor.

The mixes are llama-quantize's (`Q4_K_M`, `Q3_K_S`, ...) and their per-tensor rules llama.cpp's
(`llama_tensor_get_type`): norms, biases and other 1-D tensors are left as they are; the output matrix (and
the token embedding when it doubles as the output) gets Q6_K or Q8_0; the `_M` and `_L` mixes raise
attn_v and ffn_down by layer position; a row that does not hold whole blocks of the chosen type falls back to
a type with smaller blocks, or to F16. Rules that hold only with an importance matrix are not here: every
type is quantized without one.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from .quantize import quantize, quantizer
from .quants import dequantize
from .reader import GGUFFile, TensorInfo
from .types import GGMLType, GGUFValueType, LlamaFileType
from .writer import GGUFStreamWriter, TensorSpec, Typed, typed_metadata

T = GGMLType
F = LlamaFileType

# llama-quantize's mix names, with the file type each writes and the type of most of its tensors (not those
# that need an importance matrix, such as IQ3_XS, which gives attn_q and attn_k IQ3_XXS).
MIXES: dict[str, tuple[LlamaFileType, GGMLType]] = {
    "Q4_0": (F.MOSTLY_Q4_0, T.Q4_0),
    "Q4_1": (F.MOSTLY_Q4_1, T.Q4_1),
    "Q5_0": (F.MOSTLY_Q5_0, T.Q5_0),
    "Q5_1": (F.MOSTLY_Q5_1, T.Q5_1),
    "TQ1_0": (F.MOSTLY_TQ1_0, T.TQ1_0),
    "TQ2_0": (F.MOSTLY_TQ2_0, T.TQ2_0),
    "Q2_K": (F.MOSTLY_Q2_K, T.Q2_K),
    "Q3_K": (F.MOSTLY_Q3_K_M, T.Q3_K),
    "Q3_K_S": (F.MOSTLY_Q3_K_S, T.Q3_K),
    "Q3_K_M": (F.MOSTLY_Q3_K_M, T.Q3_K),
    "Q3_K_L": (F.MOSTLY_Q3_K_L, T.Q3_K),
    "IQ3_S": (F.MOSTLY_IQ3_S, T.IQ3_S),
    "IQ3_M": (F.MOSTLY_IQ3_M, T.IQ3_S),
    "IQ4_NL": (F.MOSTLY_IQ4_NL, T.IQ4_NL),
    "IQ4_XS": (F.MOSTLY_IQ4_XS, T.IQ4_XS),
    "Q4_K": (F.MOSTLY_Q4_K_M, T.Q4_K),
    "Q4_K_S": (F.MOSTLY_Q4_K_S, T.Q4_K),
    "Q4_K_M": (F.MOSTLY_Q4_K_M, T.Q4_K),
    "Q5_K": (F.MOSTLY_Q5_K_M, T.Q5_K),
    "Q5_K_S": (F.MOSTLY_Q5_K_S, T.Q5_K),
    "Q5_K_M": (F.MOSTLY_Q5_K_M, T.Q5_K),
    "Q6_K": (F.MOSTLY_Q6_K, T.Q6_K),
    "Q8_0": (F.MOSTLY_Q8_0, T.Q8_0),
    "F16": (F.MOSTLY_F16, T.F16),
    "BF16": (F.MOSTLY_BF16, T.BF16),
    "F32": (F.ALL_F32, T.F32),
}

# Types a tensor can be given (--output-tensor-type, --token-embedding-type): those with a quantizer.
TENSOR_TYPES: dict[str, GGMLType] = {t.name: t for t in GGMLType if quantizer(t) is not None}

# A row not made of whole blocks of a 256-element type takes this type of 32-element blocks instead.
_FALLBACK = {
    T.IQ3_S: T.IQ4_NL,
    T.IQ4_XS: T.IQ4_NL,
    T.Q2_K: T.Q4_0,
    T.Q3_K: T.Q4_0,
    T.TQ1_0: T.Q4_0,
    T.TQ2_0: T.Q4_0,
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
}

# Matrices left as they are whatever the mix: small, or not weights that a matmul reads.
_NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger",
    "a.rvq.codebook", "mm.a.code_embd",
)

# Depths at which llama.cpp takes an architecture's model for its 70B size (attn_v gets more bits).
_70B_LAYERS = {"llama": 80, "qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}

_LAYER = re.compile(r"blk\.([+-]?\d+)")


class _Role(enum.Enum):
    OUTPUT = enum.auto()
    TOKEN_EMBD = enum.auto()
    ATTN_V = enum.auto()  # also the fused QKV and the MLA kv_b matrices
    ATTN_K = enum.auto()
    ATTN_Q = enum.auto()
    ATTN_OUTPUT = enum.auto()
    FFN_DOWN = enum.auto()
    OTHER = enum.auto()


def _role(name: str) -> _Role:
    if name == "output.weight":
        return _Role.OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return _Role.TOKEN_EMBD
    for part, role in (("attn_qkv.weight", _Role.ATTN_V), ("attn_kv_b.weight", _Role.ATTN_V),
                       ("attn_v.weight", _Role.ATTN_V), ("attn_k.weight", _Role.ATTN_K),
                       ("attn_q.weight", _Role.ATTN_Q), ("attn_output.weight", _Role.ATTN_OUTPUT),
                       ("ffn_down", _Role.FFN_DOWN)):
        if part in name:
            return role
    return _Role.OTHER


def _n_dims(shape: tuple[int, ...]) -> int:
    """ggml's dimension count: up to the last of its (innermost-first) dims that is not 1."""
    ne = tuple(reversed(shape))
    return max((i + 1 for i, n in enumerate(ne) if n > 1), default=1)


def _quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return (_n_dims(shape) >= 2 and name.endswith("weight")
            and name not in ("position_embd.weight", "token_types.weight")
            and not any(part in name for part in _NEVER_QUANTIZED))


def _layer(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m[1]) if m else None


def _more_bits(i: int, n: int) -> bool:
    """The layers a mix gives more bits: the first and last eighth and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _first(metadata: Mapping[str, Any], key: str, default: int) -> int:
    v = metadata.get(key, default)
    if isinstance(v, list):  # one value per layer: the rules read layer 0's
        return int(v[0]) if v else default
    return int(v)


@dataclass
class _Model:
    """What the rules read from a model, and the counters they advance tensor by tensor."""

    arch: str
    n_layer: int
    n_gqa: int
    n_expert: int
    is_70b: bool
    tied_embeddings: bool
    n_attn_v: int
    i_attn_v: int = 0
    i_ffn_down: int = 0

    @classmethod
    def read(cls, metadata: Mapping[str, Any], names: Iterable[str]) -> _Model:
        arch = str(metadata.get("general.architecture", ""))
        n_layer = _first(metadata, f"{arch}.block_count", 0)
        n_head = _first(metadata, f"{arch}.attention.head_count", 0)
        n_head_kv = _first(metadata, f"{arch}.attention.head_count_kv", n_head)
        n_expert = _first(metadata, f"{arch}.expert_count", 0)
        names = list(names)
        is_70b = n_layer == _70B_LAYERS.get(arch) and not (arch == "llama" and (n_expert == 8 or n_head == n_head_kv))
        return cls(arch=arch, n_layer=n_layer, n_gqa=n_head // n_head_kv if n_head_kv else 0, n_expert=n_expert,
                   is_70b=is_70b, tied_embeddings="output.weight" not in names,
                   n_attn_v=sum(_role(n) is _Role.ATTN_V for n in names))

    def ffn_layer(self, counter: int, name: str) -> int:
        if self.n_expert <= 1:
            return counter
        layer = _layer(name)
        if layer is None or not 0 <= layer < self.n_layer:
            raise ValueError(f"tensor {name!r}: no layer number in [0, {self.n_layer}) in its name")
        return layer


def _mix_rule(m: _Model, file_type: LlamaFileType, t: GGMLType, name: str, row: int,
              output_type: GGMLType | None) -> GGMLType:
    """The type the mix gives a quantizable tensor whose default is `t` (before any fallback)."""
    role = _role(name)
    falcon = m.arch == "falcon"
    if role is _Role.OUTPUT or (m.tied_embeddings and role is _Role.TOKEN_EMBD):
        if output_type is not None:
            return output_type
        if falcon or row % t.block_elements:
            return T.Q8_0
        return t if t == T.Q8_0 else T.Q6_K
    if role is _Role.TOKEN_EMBD:
        return T.Q4_K if file_type in (F.MOSTLY_TQ1_0, F.MOSTLY_TQ2_0) else t
    if role is _Role.ATTN_V:
        i, n = m.i_attn_v, m.n_attn_v
        m.i_attn_v += 1
        if file_type == F.MOSTLY_Q2_K:
            t = T.Q4_K if m.n_gqa >= 4 else T.Q3_K
        elif file_type == F.MOSTLY_Q3_K_M:
            t = T.Q5_K if i < 2 else T.Q4_K
        elif file_type == F.MOSTLY_Q3_K_L:
            t = T.Q5_K
        elif (file_type == F.MOSTLY_IQ3_S and m.n_gqa >= 4) or file_type == F.MOSTLY_IQ3_M:
            t = T.Q4_K
        elif file_type in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and m.n_gqa >= 4:
            t = T.Q5_K
        elif file_type in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and _more_bits(i, n):
            t = T.Q6_K
        elif file_type == F.MOSTLY_Q4_K_S and i < 4:
            t = T.Q5_K
        if m.is_70b and t in (T.Q3_K, T.Q4_K):  # 8 heads share attn_v: more bits cost little
            t = T.Q5_K
        return T.Q8_0 if m.n_expert == 8 else t
    if role is _Role.ATTN_K:
        return T.Q8_0 if m.n_expert == 8 else t
    if role is _Role.FFN_DOWN:
        i, n = m.ffn_layer(m.i_ffn_down, name), m.n_layer
        m.i_ffn_down += 1
        if file_type == F.MOSTLY_Q2_K:
            return T.Q3_K
        if file_type == F.MOSTLY_Q3_K_M:
            return T.Q5_K if i < n // 16 else T.Q4_K if not falcon or _more_bits(i, n) else T.Q3_K
        if file_type == F.MOSTLY_IQ3_M and (i < n // 8 or (m.n_expert == 8 and _more_bits(i, n))):
            return T.Q4_K
        if file_type == F.MOSTLY_Q3_K_L:
            return T.Q4_K if falcon else T.Q5_K
        if file_type == F.MOSTLY_Q4_K_M:
            if falcon:
                return T.Q6_K if i < n // 16 else T.Q5_K if _more_bits(i, n) else T.Q4_K
            return T.Q6_K if _more_bits(i, n) else t
        if i < n // 8 and file_type in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS):
            return T.Q5_K
        if file_type == F.MOSTLY_Q5_K_M:
            return T.Q6_K if _more_bits(i, n) else t
        if file_type == F.MOSTLY_Q4_K_S and not falcon and i < n // 8:
            return T.Q5_K
        return t
    if role is _Role.ATTN_OUTPUT:
        if falcon:
            return T.Q4_K if file_type == F.MOSTLY_Q3_K_L else t
        if m.n_expert == 8:
            raised = (F.MOSTLY_Q2_K, F.MOSTLY_Q3_K_S, F.MOSTLY_Q3_K_M, F.MOSTLY_IQ4_NL, F.MOSTLY_Q4_K_S,
                      F.MOSTLY_Q4_K_M, F.MOSTLY_IQ4_XS, F.MOSTLY_IQ3_S, F.MOSTLY_IQ3_M)
            return T.Q5_K if file_type in raised else t
        return {F.MOSTLY_Q2_K: T.Q3_K, F.MOSTLY_Q3_K_M: T.Q4_K, F.MOSTLY_Q3_K_L: T.Q5_K,
                F.MOSTLY_IQ3_M: T.Q4_K}.get(file_type, t)
    return t


def _fallback(row: int, t: GGMLType) -> GGMLType:
    if row % t.block_elements == 0:
        return t
    t = _FALLBACK.get(t, t)
    return t if row % t.block_elements == 0 else T.F16


def _sort_key(name: str) -> tuple[int, bytes]:
    """llama.cpp visits the tensors by layer number (none first), then by name."""
    layer = _layer(name)
    return (-1 if layer is None else layer, name.encode())


def plan_types(
    tensors: Iterable[tuple[str, tuple[int, ...], GGMLType]],
    metadata: Mapping[str, Any],
    mix: str,
    *,
    pure: bool = False,
    output_type: GGMLType | None = None,
    embedding_type: GGMLType | None = None,
) -> dict[str, GGMLType]:
    """The type each tensor (name, shape in PyTorch order, current type) gets in `mix`, in the given order.

    `pure`: every quantizable tensor gets the mix's type (or its fallback); `output_type` and `embedding_type`
    override the output matrix's and the token embedding's."""
    file_type, default = MIXES[mix]
    tensors = list(tensors)
    model = _Model.read(metadata, (name for name, _, _ in tensors))
    chosen: dict[str, GGMLType] = {}
    for name, shape, current in sorted(tensors, key=lambda x: _sort_key(x[0])):
        role = _role(name)
        if not _quantizable(name, shape):
            t = current
        elif embedding_type is not None and role is _Role.TOKEN_EMBD:
            t = embedding_type
        elif output_type is not None and role is _Role.OUTPUT:
            t = output_type
        elif not default.is_quantized:
            t = default
        else:
            row = shape[-1]
            t = default if pure else _mix_rule(model, file_type, default, name, row, output_type)
            t = _fallback(row, t)
        chosen[name] = t
    return {name: chosen[name] for name, _, _ in tensors}


def plan_model(
    f: GGUFFile,
    mix: str,
    *,
    pure: bool = False,
    output_type: GGMLType | None = None,
    embedding_type: GGMLType | None = None,
    allow_requantize: bool = False,
) -> dict[str, GGMLType]:
    """`plan_types` for a model file; ValueError if a tensor cannot be made its type (a quantized one without
    `allow_requantize`, or one of a type that has no float values)."""
    plan = plan_types(((t.name, t.shape, t.ggml_type) for t in f), f.metadata, mix, pure=pure,
                      output_type=output_type, embedding_type=embedding_type)
    for info in f:
        target = plan[info.name]
        if target == info.ggml_type:
            continue
        if row_error := _row_error(info, target):
            raise ValueError(row_error)
        if info.ggml_type.is_quantized and not allow_requantize:
            raise ValueError(f"{f.path}: tensor {info.name!r} is {info.ggml_type.name}: requantizing it to "
                             f"{target.name} loses accuracy twice; pass --allow-requantize to do it anyway")
        if not info.ggml_type.is_quantized and info.ggml_type not in (T.F32, T.F16, T.BF16):
            raise ValueError(f"{f.path}: tensor {info.name!r} is {info.ggml_type.name}, which cannot be converted "
                             f"to {target.name}")
    return plan


def _row_error(info: TensorInfo, target: GGMLType) -> str | None:
    row = info.shape[-1] if info.shape else 1
    if row % target.block_elements:
        return f"tensor {info.name!r}: rows of {row} are not whole blocks of {target.block_elements} ({target.name})"
    return None


def output_metadata(f: GGUFFile, mix: str) -> dict[str, Any]:
    """The input's metadata, less its split keys, with the quantization version and the mix's file type last."""
    md = typed_metadata(f.metadata, f.value_types)
    for key in ("split.no", "split.count", "split.tensors.count", "general.quantization_version", "general.file_type"):
        md.pop(key, None)
    md["general.quantization_version"] = Typed(GGUFValueType.UINT32, 2)
    md["general.file_type"] = Typed(GGUFValueType.UINT32, int(MIXES[mix][0]))
    return md


# Elements converted at once: bounds the temporaries of the quantizers to some tens of MB.
_CHUNK_ELEMENTS = 1 << 20


def write_quantized(f: GGUFFile, out: BinaryIO, mix: str, plan: Mapping[str, GGMLType]) -> Iterator[TensorInfo]:
    """Write `f` with each tensor in its `plan` type to `out`, streaming: a few rows of one tensor in memory
    at a time. Yields each input tensor once it is written."""
    writer = GGUFStreamWriter(out, output_metadata(f, mix), [TensorSpec(t.name, plan[t.name], t.shape) for t in f])
    for info in f:
        raw = f.tensor_bytes(info.name)
        target = plan[info.name]
        if target == info.ggml_type:
            writer.write(raw)
        else:
            row = info.shape[-1]
            n_rows = info.n_elements // row if row else 0
            row_bytes = info.ggml_type.row_bytes(row)
            step = max(1, _CHUNK_ELEMENTS // max(row, 1))
            for start in range(0, n_rows, step):
                rows = min(step, n_rows - start)
                x = dequantize(raw[start * row_bytes : (start + rows) * row_bytes], info.ggml_type, (rows, row))
                writer.write(np.asarray(quantize(x, target)))
        yield info
    writer.close()
