"""Random-weight GGUF models of any supported architecture and shape, for tests and benchmarks.

The file is a complete model: metadata as llama.cpp's converter writes it, a small byte-level BPE
vocabulary (the 256 bytes, chat tokens, padding up to `vocab`), a ChatML chat template, and every
tensor its architecture reads, in `weight_type` (the experts in `expert_type`), its values near
N(0, 1/fan_in) (`random_tensor`), so that activations keep their scale through any depth: float types
hold float32 normals, block types random valid blocks written directly (no values to quantize: an
8B-shaped file takes seconds).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ggtriton.gguf import GGMLType, GGUFValueType, dequantize
from ggtriton.gguf.quantize import random_blocks
from ggtriton.gguf.writer import TensorData, Typed, write_gguf

from .models.architectures import ARCHITECTURES

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_POOL_BLOCKS = 4096  # see `random_tensor`
# A weight made later, in threads: (name, shape), in the model's weight type, or (name, shape, type)
_Pending = tuple[str, tuple[int, ...]] | tuple[str, tuple[int, ...], GGMLType]


@dataclass
class SyntheticModel:
    arch: str
    n_layers: int = 2
    hidden: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    ffn: int = 96
    vocab: int = 320
    context_length: int = 4096
    weight_type: GGMLType = GGMLType.F32
    expert_type: GGMLType | None = None  # the 3-D expert tensors' type (None: weight_type), e.g. gpt-oss's MXFP4
    rope_base: float = 10000.0
    rope_dim: int | None = None
    sliding_window: int | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    tie_embeddings: bool = True
    # Mixture of experts: experts per layer (None: 4 for the MoE architectures, 0 for a dense FFN; llama takes either)
    n_expert: int | None = None
    n_expert_used: int = 2
    expert_ffn: int = 32  # the MoE architectures' expert width (llama's experts have `ffn` rows, as llama.cpp reads)
    shared_expert_ffn: int = 48  # qwen2moe's shared expert
    seed: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)  # extra keys, e.g. rope scaling
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # extra float32 tensors, e.g. rope_freqs

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
        if self.vocab < len(SPECIAL_TOKENS) + 1:
            raise ValueError(f"vocab must hold the {len(SPECIAL_TOKENS)} special tokens and at least one other")
        moe = ARCHITECTURES[self.arch].moe
        if self.n_expert is None:
            self.n_expert = 4 if moe == "always" else 0
        if moe == "always" and self.n_expert <= 0 or not moe and self.n_expert:
            raise ValueError(f"{self.arch} takes {'a positive number of' if moe else 'no'} experts, "
                             f"got n_expert={self.n_expert}")


def _vocabulary(n: int) -> tuple[list[str], list[int]]:
    """The 256 byte tokens, then the special ones, then padding; a vocabulary too small for every byte
    (sampling tests want few tokens) has single letters and the special tokens last."""
    if n < 256 + len(SPECIAL_TOKENS):
        letters = [chr(ord("a") + i) for i in range(n - len(SPECIAL_TOKENS))]
        return letters + list(SPECIAL_TOKENS), [1] * len(letters) + [3] * len(SPECIAL_TOKENS)
    # Byte-level BPE spells byte b as a printable character (GPT-2's map).
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    tokens = [chars[b] for b in range(256)] + list(SPECIAL_TOKENS)
    types = [1] * 256 + [3] * len(SPECIAL_TOKENS)
    tokens += [f"[PAD{i}]" for i in range(n - len(tokens))]
    types += [5] * (n - len(types))
    return tokens, types


def random_tensor(shape: tuple[int, ...], t: GGMLType, rng: np.random.Generator) -> np.ndarray:
    """The data of a random tensor of `shape` (fan_in = shape[-1]) in type `t`, values near N(0, 1/fan_in):
    float32 normals for the float types; for block types, random valid blocks whose fp16 scales are sized
    from a probe of 64 blocks (random blocks with N(0, 2^-7) scales would give values of a fixed spread,
    whatever the fan-in, and activations that grow layer by layer).

    A tensor of more than `_POOL_BLOCKS` blocks draws them, with replacement, from a pool of that many:
    every block is still a random valid block, and a large tensor costs one gather (an 8B-shaped file
    takes seconds) instead of generating each of its bytes.
    """
    fan_in = shape[-1]
    if t in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        values = rng.standard_normal(shape, dtype=np.float32) * np.float32(fan_in**-0.5)
        if t == GGMLType.F16:
            return values.astype(np.float16)
        if t == GGMLType.BF16:
            return torch.from_numpy(values).bfloat16().view(torch.int16).numpy()
        return values
    n_blocks = int(np.prod(shape)) // t.block_elements
    pool_size = min(n_blocks, _POOL_BLOCKS)
    if t == GGMLType.MXFP4:
        # E8M0 scale byte e: values are e2m1 levels (|v| <= 6, ~3 typical) times 2^(e - 127)
        pool = random_blocks(t, pool_size, rng)
        pool[:, 0] = 127 + round(np.log2(1 / (3 * np.sqrt(fan_in))))
    else:
        # Scales of either sign: with positive ones, a type that adds or subtracts a block minimum (Q4_1,
        # K-quants' dmin) has values of non-zero mean, which a deep model amplifies layer after layer.
        probe_scales = (np.abs(rng.standard_normal(256)) + 0.5) * rng.choice([-1.0, 1.0], 256)
        probe = dequantize(random_blocks(t, 64, rng, probe_scales), t, (64 * t.block_elements,))
        pool = random_blocks(t, pool_size, rng, probe_scales / (float(probe.std()) * np.sqrt(fan_in)))
    if pool_size == n_blocks:
        return pool
    rows = pool.view(np.dtype((np.void, t.block_bytes))).ravel()
    return np.take(rows, rng.integers(0, pool_size, n_blocks)).view(np.uint8).reshape(n_blocks, t.block_bytes)


def _experts(p: str, m: SyntheticModel, rng: np.random.Generator) -> list[TensorData | _Pending]:
    """Layer p's mixture of experts: float32 routers (llama.cpp's quantizer keeps them so) and the 3-D expert
    weights, [n_expert, rows, columns] in PyTorch order, in the expert type (a 3-tuple: name, shape, type);
    gpt-oss's float32 router and expert biases."""
    spec = ARCHITECTURES[m.arch]
    n_ff = m.ffn if spec.moe == "optional" else m.expert_ffn
    et = m.weight_type if m.expert_type is None else m.expert_type
    out: list[TensorData | _Pending] = [
        TensorData(p + "ffn_gate_inp.weight", GGMLType.F32, (m.n_expert, m.hidden),
                   random_tensor((m.n_expert, m.hidden), GGMLType.F32, rng)),
        (p + "ffn_gate_exps.weight", (m.n_expert, n_ff, m.hidden), et),
        (p + "ffn_up_exps.weight", (m.n_expert, n_ff, m.hidden), et),
        (p + "ffn_down_exps.weight", (m.n_expert, m.hidden, n_ff), et),
    ]
    if spec.moe_biases:
        out += [TensorData(p + name, GGMLType.F32, shape, scale * rng.standard_normal(shape, dtype=np.float32))
                for name, shape, scale in (("ffn_gate_inp.bias", (m.n_expert,), 0.5),
                                           ("ffn_gate_exps.bias", (m.n_expert, n_ff), 0.1),
                                           ("ffn_up_exps.bias", (m.n_expert, n_ff), 0.1),
                                           ("ffn_down_exps.bias", (m.n_expert, m.hidden), 0.1))]
    if spec.shared_expert:
        n_sh = m.shared_expert_ffn
        out += [TensorData(p + "ffn_gate_inp_shexp.weight", GGMLType.F32, (m.hidden,),
                           random_tensor((m.hidden,), GGMLType.F32, rng)),
                (p + "ffn_gate_shexp.weight", (n_sh, m.hidden)),
                (p + "ffn_up_shexp.weight", (n_sh, m.hidden)),
                (p + "ffn_down_shexp.weight", (m.hidden, n_sh))]
    return out


def write_synthetic_model(path: str | os.PathLike, m: SyntheticModel) -> None:
    """Write the model `m` describes to `path`."""
    spec = ARCHITECTURES[m.arch]
    rng = np.random.default_rng(m.seed)
    a = m.arch
    tokens, types = _vocabulary(m.vocab)
    md: dict[str, Any] = {
        "general.architecture": a,
        # not the architecture's name: llama.cpp special-cases some vocabularies by model name
        "general.name": "synthetic model",
        f"{a}.block_count": Typed(GGUFValueType.UINT32, m.n_layers),
        f"{a}.context_length": Typed(GGUFValueType.UINT32, m.context_length),
        f"{a}.embedding_length": Typed(GGUFValueType.UINT32, m.hidden),
        f"{a}.feed_forward_length": Typed(GGUFValueType.UINT32, m.ffn),
        f"{a}.attention.head_count": Typed(GGUFValueType.UINT32, m.n_heads),
        f"{a}.attention.head_count_kv": Typed(GGUFValueType.UINT32, m.n_kv_heads),
        f"{a}.attention.key_length": Typed(GGUFValueType.UINT32, m.head_dim),
        f"{a}.attention.value_length": Typed(GGUFValueType.UINT32, m.head_dim),
        f"{a}.attention.layer_norm_rms_epsilon": 1e-6,
        f"{a}.rope.freq_base": float(m.rope_base),
        f"{a}.rope.dimension_count": Typed(GGUFValueType.UINT32, m.rope_dim or m.head_dim),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": Typed(GGUFValueType.ARRAY, types, GGUFValueType.INT32),
        "tokenizer.ggml.merges": Typed(GGUFValueType.ARRAY, [], GGUFValueType.STRING),
        "tokenizer.ggml.bos_token_id": Typed(GGUFValueType.UINT32, tokens.index("<|endoftext|>")),
        "tokenizer.ggml.eos_token_id": Typed(GGUFValueType.UINT32, tokens.index("<|im_end|>")),
        "tokenizer.chat_template": CHATML,
    }
    if m.sliding_window:
        md[f"{a}.attention.sliding_window"] = Typed(GGUFValueType.UINT32, m.sliding_window)
    if m.attn_softcap:
        md[f"{a}.attn_logit_softcapping"] = float(m.attn_softcap)
    if m.final_softcap:
        md[f"{a}.final_logit_softcapping"] = float(m.final_softcap)
    if m.n_expert:
        md[f"{a}.expert_count"] = Typed(GGUFValueType.UINT32, m.n_expert)
        md[f"{a}.expert_used_count"] = Typed(GGUFValueType.UINT32, m.n_expert_used)
        if spec.moe == "always":
            md[f"{a}.expert_feed_forward_length"] = Typed(GGUFValueType.UINT32, m.expert_ffn)
        if spec.shared_expert:
            md[f"{a}.expert_shared_feed_forward_length"] = Typed(GGUFValueType.UINT32, m.shared_expert_ffn)
    md |= m.metadata

    wt = m.weight_type
    q, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    # The weights, (name, shape) here, are made below; the small float tensors now, from `rng`.
    out: list[TensorData | _Pending] = [("token_embd.weight", (m.vocab, m.hidden))]

    def norm(name: str, n: int) -> TensorData:
        return TensorData(name, GGMLType.F32, (n,), 1 + 0.1 * rng.standard_normal(n, dtype=np.float32))

    for i in range(m.n_layers):
        p = f"blk.{i}."
        out.append(norm(p + "attn_norm.weight", m.hidden))
        if spec.fused_qkv:
            out.append((p + "attn_qkv.weight", (q + 2 * kv, m.hidden)))
        else:
            out += [(p + "attn_q.weight", (q, m.hidden)),
                    (p + "attn_k.weight", (kv, m.hidden)),
                    (p + "attn_v.weight", (kv, m.hidden))]
        if spec.qkv_bias:
            out += [TensorData(p + f"attn_{n}.bias", GGMLType.F32, (size,),
                               0.1 * rng.standard_normal(size, dtype=np.float32))
                    for n, size in (("q", q), ("k", kv), ("v", kv))]
        if spec.qk_norm:
            out += [norm(p + "attn_q_norm.weight", m.head_dim), norm(p + "attn_k_norm.weight", m.head_dim)]
        out.append((p + "attn_output.weight", (m.hidden, q)))
        if spec.attn_output_bias:
            out.append(TensorData(p + "attn_output.bias", GGMLType.F32, (m.hidden,),
                                  0.1 * rng.standard_normal(m.hidden, dtype=np.float32)))
        if spec.attn_sinks:
            out.append(TensorData(p + "attn_sinks.weight", GGMLType.F32, (m.n_heads,),
                                  rng.standard_normal(m.n_heads, dtype=np.float32)))
        if spec.post_norms:
            out.append(norm(p + "post_attention_norm.weight", m.hidden))
        out.append(norm(p + spec.ffn_norm + ".weight", m.hidden))
        if m.n_expert:
            out += _experts(p, m, rng)
        elif spec.fused_gate_up:
            out += [(p + "ffn_up.weight", (2 * m.ffn, m.hidden)), (p + "ffn_down.weight", (m.hidden, m.ffn))]
        else:
            out += [(p + "ffn_gate.weight", (m.ffn, m.hidden)),
                    (p + "ffn_up.weight", (m.ffn, m.hidden)),
                    (p + "ffn_down.weight", (m.hidden, m.ffn))]
        if spec.post_norms:
            out.append(norm(p + "post_ffw_norm.weight", m.hidden))
    out.append(norm("output_norm.weight", m.hidden))
    if not m.tie_embeddings:
        out.append(("output.weight", (m.vocab, m.hidden)))
    out += [TensorData(name, GGMLType.F32, v.shape, v.astype(np.float32)) for name, v in m.tensors.items()]

    # Each weight from its own seed, in threads (numpy's generators release the GIL while they fill
    # an array): the same file whatever the thread count, in seconds for 8B shapes on a many-core host.
    todo = [x for x in out if isinstance(x, tuple)]

    def make(item: _Pending, seed: np.random.SeedSequence) -> TensorData:
        name, shape, t = item if len(item) == 3 else (*item, wt)
        return TensorData(name, t, shape, random_tensor(shape, t, np.random.default_rng(seed)))

    with ThreadPoolExecutor() as pool:
        made = iter(pool.map(make, todo, np.random.SeedSequence(m.seed).spawn(len(todo))))
        write_gguf(path, md, [next(made) if isinstance(x, tuple) else x for x in out])
