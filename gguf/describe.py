"""What a GGUF file holds, summarized for people (`ggtriton inspect`) and machines (`--json`)."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from .reader import GGUFFile
from .types import GGMLType, GGUFValueType, file_type_name

# Per-architecture hyper-parameters worth showing, in the order a reader wants them.
HYPERPARAMETER_KEYS = (
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "attention.layer_norm_rms_epsilon",
    "attention.layer_norm_epsilon",
    "attention.sliding_window",
    "attention.logit_softcapping",
    "final_logit_softcapping",
    "rope.dimension_count",
    "rope.freq_base",
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scaling.original_context_length",
    "expert_count",
    "expert_used_count",
    "vocab_size",
)
# Arrays longer than this are summarized as {"type", "length"} in JSON.
JSON_ARRAY_LIMIT = 64


@dataclass(slots=True)
class TypeUsage:
    tensors: int = 0
    parameters: int = 0
    bytes: int = 0


@dataclass(slots=True)
class Summary:
    architecture: str | None
    name: str | None
    file_type: str | None
    parameters: int
    tensor_bytes: int
    file_size: int
    types: dict[GGMLType, TypeUsage]
    hyperparameters: dict[str, Any]
    tokenizer_model: str | None
    tokenizer_pre: str | None
    vocab_size: int | None
    chat_template: bool
    parts: int = 1

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.tensor_bytes / self.parameters if self.parameters else 0.0


def summarize(f: GGUFFile) -> Summary:
    md = f.metadata
    arch = md.get("general.architecture")
    types: dict[GGMLType, TypeUsage] = defaultdict(TypeUsage)
    for t in f.tensors.values():
        u = types[t.ggml_type]
        u.tensors += 1
        u.parameters += t.n_elements
        u.bytes += t.nbytes
    hparams = {k: md[f"{arch}.{k}"] for k in HYPERPARAMETER_KEYS if f"{arch}.{k}" in md}
    tokens = md.get("tokenizer.ggml.tokens")
    file_type = md.get("general.file_type")
    return Summary(
        architecture=arch,
        name=md.get("general.name"),
        file_type=file_type_name(file_type) if isinstance(file_type, int) else None,
        parameters=sum(u.parameters for u in types.values()),
        tensor_bytes=sum(u.bytes for u in types.values()),
        file_size=f.file_size,
        types=dict(sorted(types.items(), key=lambda kv: -kv[1].bytes)),
        hyperparameters=hparams,
        tokenizer_model=md.get("tokenizer.ggml.model"),
        tokenizer_pre=md.get("tokenizer.ggml.pre"),
        vocab_size=len(tokens) if isinstance(tokens, list) else None,
        chat_template=isinstance(md.get("tokenizer.chat_template"), str),
        parts=len(f.parts),
    )


def _human_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.2f} {unit}"


def _human_count(n: int) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def format_summary(f: GGUFFile, s: Summary) -> str:
    parts = f" in {s.parts} parts" if s.parts > 1 else ""
    lines = [f"{f.path.name}: GGUF v{f.version}, {_human_bytes(s.file_size)}{parts}"]
    rows = [
        ("architecture", s.architecture or "?"),
        ("name", s.name or "?"),
        ("file type", s.file_type or "?"),
        ("parameters", f"{_human_count(s.parameters)} ({s.parameters:,})"),
        ("tensor data", f"{_human_bytes(s.tensor_bytes)}, {s.bits_per_weight:.2f} bits per weight, {len(f.tensors)} tensors"),
    ]
    if s.tokenizer_model is not None:
        pre = f", pre-tokenizer {s.tokenizer_pre}" if s.tokenizer_pre else ""
        vocab = f"{s.vocab_size:,} tokens" if s.vocab_size is not None else "no vocabulary"
        rows.append(("tokenizer", f"{s.tokenizer_model}{pre}, {vocab}"))
    else:
        rows.append(("tokenizer", "none"))
    rows.append(("chat template", "present" if s.chat_template else "absent"))
    lines += [f"  {k:<14} {v}" for k, v in rows]
    if s.hyperparameters:
        lines.append("hyper-parameters")
        width = max(len(k) for k in s.hyperparameters)
        lines += [f"  {k:<{width}}  {_format_scalar(v)}" for k, v in s.hyperparameters.items()]
    lines.append("tensor types")
    lines.append(f"  {'type':<8} {'tensors':>7} {'parameters':>12} {'bytes':>12} {'share':>7}")
    total = s.tensor_bytes or 1
    for t, u in s.types.items():
        lines.append(
            f"  {t.name:<8} {u.tensors:>7} {_human_count(u.parameters):>12} {_human_bytes(u.bytes):>12} "
            f"{100 * u.bytes / total:>6.2f}%"
        )
    return "\n".join(lines)


def _format_scalar(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _json_value(value: Any, vtypes: tuple[GGUFValueType, ...]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        if len(value) > JSON_ARRAY_LIMIT:
            return {"type": vtypes[1].name if len(vtypes) > 1 else "ARRAY", "length": len(value)}
        return [_json_value(v, vtypes[1:] or (GGUFValueType.ARRAY,)) for v in value]
    return value


def to_json(f: GGUFFile) -> dict[str, Any]:
    """`{"version", "metadata", "tensors": [{"name", "type", "shape", "offset", "nbytes"}]}`, JSON-ready."""
    return {
        "version": f.version,
        "metadata": {k: _json_value(v, f.value_types[k]) for k, v in f.metadata.items()},
        "tensors": [
            {"name": t.name, "type": t.ggml_type.name, "shape": list(t.shape), "offset": t.offset, "nbytes": t.nbytes}
            | ({"part": t.part} if len(f.parts) > 1 else {})
            for t in f.tensors.values()
        ],
    }
