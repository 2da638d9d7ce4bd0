"""The op layer: the one place that picks, per op, the Triton kernel or its torch reference.

Backend "triton" runs the kernels of `ggtriton.kernels` (on a GPU, or on CPU tensors under
TRITON_INTERPRET=1); backend "torch" runs their torch references in float32, the CPU oracle; backend "cpu", the
default on CPU, is the fast CPU path: the weights in torch's packed int4 CPU format or bfloat16
(runtime/models/cpu_weights.py; generated tokens' rows and prompts' take different formats, see `linear`), q/k/v
and gate/up one product each, and the references' attention, RoPE and norms in fewer torch calls, with what is the
same for every layer made once per step (runtime/models/cpu_attention.py).
Quantized linear layers: the torch backend dequantizes each weight once, at load, and keeps it dense in
the activation dtype (a reference path: it trades memory for never dequantizing in a step); the Triton
backend multiplies with the fused dequantize-matmul kernel, which picks its own path (GEMV, split-K,
tiled GEMM, or dequantize then cuBLAS) by the number of rows. At load the Triton backend relays the
weights of the 2-byte aligned formats (Q4_0, Q5_0, Q8_0, Q6_K) into the planar layout its GEMV reads
with 16-byte loads: the same bytes, moved within each row (MXFP4's 17-byte blocks: within each matrix).

Fewer launches on the Triton backend where the matmul kernel takes them (`fuses_norm`, `gated`): an RMSNorm
between two products runs in their epilogues (`linear_add_norm` leaves a `PendingNorm`, which `linear` and
`linears` take as x), and a gated activation in the gate/up product's. Elsewhere the same calls run the
separate ops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from functools import cache, partial

import torch

from ggtriton import kernels
from ggtriton.gguf.quants import dequantize as dequantize_ref
from ggtriton.kernels.activations import gelu_mul_ref, silu_mul_ref
from ggtriton.kernels.flash_attention import flash_attention_ref
from ggtriton.kernels.moe import swiglu_oai_ref
from ggtriton.kernels.planar import MATRIX_PLANAR_TYPES, RELAID_TYPES, matrix_rows, to_planar
from ggtriton.kernels.qgemv import rows_aligned
from ggtriton.kernels.qmatmul import fusable
from ggtriton.kernels.paged_decode import paged_decode_ref
from ggtriton.kernels.rmsnorm import PendingNorm, rmsnorm_ref
from ggtriton.kernels.rope_kv_store import rope_kv_store_ref

from .cpu_attention import CpuAttention, joined_heads
from .cpu_weights import FLOAT_TYPES, INT4_TYPES, SPLIT_TYPES, CpuWeight, quant_rows
from .moe import moe_dense
from .weights import QuantWeight

BACKENDS = ("triton", "torch", "cpu")


class Ops:
    def __init__(self, backend: str, dtype: torch.dtype):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.dtype = dtype
        triton = backend == "triton"
        self._rmsnorm = kernels.rmsnorm if triton else rmsnorm_ref
        self._rope_kv_store = kernels.rope_kv_store if triton else rope_kv_store_ref
        self._prefill = kernels.flash_attention if triton else flash_attention_ref
        self._decode = kernels.paged_decode if triton else paged_decode_ref
        self._cpu: dict[tuple[QuantWeight, ...], CpuWeight] = {}  # the cpu backend's products, made on first use
        self._head_norms: dict[tuple, torch.Tensor] = {}  # the cpu backend's q and k norm weights stacked per head
        if backend == "cpu":
            attention = CpuAttention()
            self._rmsnorm, self._rope_kv_store = _rmsnorm_cpu, attention.rope_kv_store
            self._prefill = self._decode = attention.attention
        # swiglu_oai (gpt-oss) gates only experts, which the fused MoE kernel runs on the Triton backend
        self._act = {"silu": kernels.silu_mul, "gelu": kernels.gelu_mul} if triton else {
            "silu": silu_mul_ref, "gelu": gelu_mul_ref, "swiglu_oai": swiglu_oai_ref}
        if backend == "cpu":
            self._act |= {"silu": _act_mul_cpu(torch.nn.functional.silu, silu_mul_ref),
                          "gelu": _act_mul_cpu(partial(torch.nn.functional.gelu, approximate="tanh"), gelu_mul_ref)}

    # --- weights ---------------------------------------------------------------------------------

    def dequantize(self, w: QuantWeight, raw: torch.Tensor | None = None, shape: tuple[int, ...] | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
        """Values of `w` (or of `raw`, a slice of whole rows of it, of `shape`) in `dtype`."""
        raw = w.raw if raw is None else raw
        shape = w.shape if shape is None else shape
        dtype = dtype or self.dtype
        if self.backend == "triton":
            return kernels.dequantize(raw.contiguous(), w.ggml_type, shape, dtype, planar=w.planar)
        return dequantize_ref(raw, w.ggml_type, shape).to(dtype)

    def _dense(self, w: QuantWeight) -> torch.Tensor:
        """The torch backend's dense copy of `w`, made on first use."""
        if w.dense is None:
            w.dense = self.dequantize(w)
        return w.dense

    def preload(self, weights: Iterable[QuantWeight]) -> int:
        """Prepare every weight now, so no step pays for it: dense copies (torch backend), or the relaid layout
        the word decoders read (`planar.to_planar`) of the matrices and 3-D expert tensors of its types whose rows
        it keeps aligned (`qgemv.rows_aligned`; others take a copy per call) (Triton backend). Returns the bytes
        relaid."""
        relaid = 0
        for w in weights:
            if self.backend == "torch":
                self._dense(w)
            elif (self.backend == "triton" and not w.planar and w.ggml_type in RELAID_TYPES
                  and len(w.shape) in (2, 3) and rows_aligned(w.ggml_type, w.shape)):
                w.raw = to_planar(w.raw, w.ggml_type, w.shape)
                w.planar = True
                relaid += w.raw.numel()
        return relaid

    def linear(self, x: torch.Tensor | PendingNorm, w: QuantWeight, bias: QuantWeight | None = None, *,
               out_dtype: torch.dtype | None = None, generated: bool | torch.Tensor = False) -> torch.Tensor:
        """x [T, K] @ W[N, K]^T (+ bias), W in its GGUF blocks; float32 sums stored in `out_dtype` (default
        x's dtype). x is a PendingNorm only where `fuses_norm` said so. generated: which rows are tokens past
        their prompt (`ForwardBatch.generated`): the cpu backend multiplies them with the packed weights, the
        prompt's with dense copies (runtime/models/cpu_weights.py)."""
        if self.backend == "triton":
            out = kernels.qmatmul(_contiguous(x), w.raw, w.ggml_type, w.shape, out_dtype=out_dtype, planar=w.planar)
        elif self.backend == "cpu" and len(w.shape) == 2:
            cpu = self._cpu_weight((w,))
            # float32 asked for (the logits, a router's): the sums a softmax weighs most not left in bfloat16
            out = (cpu.matmul_top_exact(x, packed=generated) if out_dtype == torch.float32 else
                   cpu.matmul(x, out_dtype, generated))
        else:
            dtype = out_dtype or x.dtype
            out = x.to(dtype) @ self._dense(w).t().to(dtype)
        return self._biased(out, bias)

    def linears(self, x: torch.Tensor | PendingNorm, ws: Sequence[QuantWeight],
                biases: Sequence[QuantWeight | None] | None = None, *,
                generated: bool | torch.Tensor = False) -> list[torch.Tensor]:
        """[x @ W^T (+ bias) for each W] of q, k and v, or gate and up: one launch on the Triton backend where the
        weights share a type, K and layout and the kernel takes them together (see `kernels.qmatmul_many`). x is
        a PendingNorm only where `fuses_norm` said so; `generated` as in `linear`."""
        biases = biases or [None] * len(ws)
        if self.backend == "cpu" and (tuple(ws) in self._cpu or len({_cpu_kind(w) for w in ws}) == 1
                                      and len({w.shape[1:] for w in ws}) == 1):
            outs = self._cpu_weight(tuple(ws)).matmul(x, packed=generated).split([w.shape[0] for w in ws], dim=-1)
            return [self._biased(out, b) for out, b in zip(outs, biases)]
        if self.backend != "triton" or not _one_launch(ws):
            return [self.linear(x, w, b, generated=generated) for w, b in zip(ws, biases)]
        outs = kernels.qmatmul_many(_contiguous(x), [w.raw for w in ws], ws[0].ggml_type, [w.shape for w in ws],
                                    planar=ws[0].planar)
        return [self._biased(out, b) for out, b in zip(outs, biases)]

    def fuses_norm(self, rows: int, producer: QuantWeight, consumers: Sequence[QuantWeight] | None) -> bool:
        """Whether `linear_add_norm` may leave the RMSNorm after `producer` pending for `consumers` (the next
        products, one launch or one each; None: no product follows) at `rows` rows: the Triton backend, and
        the fused kernel's path for every weight."""
        return self.backend == "triton" and consumers is not None and all(
            fusable(w.ggml_type, rows, w.shape[0], w.shape[1], w.raw.device) for w in (producer, *consumers))

    def linear_add_norm(self, x: torch.Tensor | PendingNorm, w: QuantWeight, residual: torch.Tensor,
                        norm_weight: torch.Tensor, eps: float) -> tuple[PendingNorm, torch.Tensor]:
        """(rmsnorm(h, norm_weight) left pending, h) for h = x @ W^T + residual, in one launch; only where
        `fuses_norm` said so."""
        return kernels.qmatmul_add_norm(_contiguous(x), w.raw, w.ggml_type, w.shape, residual, norm_weight, eps,
                                        planar=w.planar)

    def gated(self, activation: str, x: torch.Tensor | PendingNorm, gate: QuantWeight, up: QuantWeight, *,
              generated: bool | torch.Tensor = False) -> torch.Tensor:
        """act(x @ gate^T) * (x @ up^T): one launch on the Triton backend where the kernel takes both weights
        together (`kernels.qmatmul_act`), else the two products and `act_mul` (`generated` as in `linear`)."""
        rows = len(x.y) if isinstance(x, PendingNorm) else len(x)
        if self.backend == "triton" and _one_launch([gate, up]) and gate.shape == up.shape and fusable(
                gate.ggml_type, rows, 2 * gate.shape[0], gate.shape[1], gate.raw.device, act=True):
            return kernels.qmatmul_act(_contiguous(x), [gate.raw, up.raw], gate.ggml_type, gate.shape, activation,
                                       planar=gate.planar)
        return self.act_mul(activation, *self.linears(x, [gate, up], generated=generated))

    def moe(self, x: torch.Tensor, router_logits: torch.Tensor, top_k: int, gate: QuantWeight, up: QuantWeight,
            down: QuantWeight, *, normalize: bool, scale: float, activation: str, gating: str = "softmax",
            biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The routed experts of a mixture of experts (runtime/models/moe.py) for x [T, hidden] and float32
        router_logits [T, n_expert]: the fused kernel over the experts' blocks on the Triton backend, which reads
        only the chosen experts (`preload` relaid every expert tensor of a planar type, or none was), the dense
        copies on the torch backend. biases: float32 gate's, up's and down's, or None."""
        if self.backend == "triton":
            return kernels.fused_moe(x.contiguous(), router_logits, top_k, gate.raw, up.raw, down.raw,
                                     (gate.ggml_type, up.ggml_type, down.ggml_type), gate.shape[1], gating=gating,
                                     normalize=normalize, scale=scale, activation=activation, biases=biases,
                                     planar=gate.planar or down.planar)
        return moe_dense(x, router_logits, top_k, self._dense(gate), self._dense(up), self._dense(down),
                         normalize=normalize, scale=scale, act_mul=self._act[activation], gating=gating,
                         biases=biases)

    def _cpu_weight(self, ws: tuple[QuantWeight, ...]) -> CpuWeight:
        """The cpu backend's product of the weights `ws` stacked, made on first use."""
        if ws not in self._cpu:
            self._cpu[ws] = CpuWeight(ws)
        return self._cpu[ws]

    def _biased(self, out: torch.Tensor, bias: QuantWeight | None) -> torch.Tensor:
        if bias is not None:
            out += self.vector(bias)
        return out

    def embedding(self, ids: torch.Tensor, w: QuantWeight) -> torch.Tensor:
        """Rows `ids` of an embedding table stored in GGUF blocks."""
        if self.backend == "torch":
            return self._dense(w)[ids]
        if self.backend == "cpu":  # only the rows looked up, dequantized exactly
            return quant_rows(w, ids)
        if w.planar and w.ggml_type in MATRIX_PLANAR_TYPES:  # rows are spread over planes: gathered per plane
            return kernels.dequantize(matrix_rows(w.raw, w.ggml_type, w.shape, ids), w.ggml_type,
                                      (len(ids), *w.shape[1:]), self.dtype, planar=True)
        rows = w.raw.view(w.rows, -1)[ids]
        return self.dequantize(w, rows, (len(ids), *w.shape[1:]))

    def vector(self, w: QuantWeight) -> torch.Tensor:
        """A small float tensor (norm weight, bias), as float32."""
        if w.dense is None:
            w.dense = self.dequantize(w, dtype=torch.float32)
        return w.dense

    # --- activations -----------------------------------------------------------------------------

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rmsnorm(x, weight, eps, residual)

    def qk_norm(self, q: torch.Tensor, k: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head RMSNorms of q [T, H_q, D] and k [T, H_k, D] (qwen3, gemma3). On the cpu backend, where k's heads
        follow q's in memory, one norm over both with the weights stacked per head: its output keeps them so, and
        RoPE then rotates them as one."""
        qk = joined_heads(q, k) if self.backend == "cpu" and q.dtype == torch.float32 else None
        if qk is None:
            return self.rmsnorm(q, q_norm, eps)[0], self.rmsnorm(k, k_norm, eps)[0]
        key = (q_norm, k_norm, q.shape[1], k.shape[1])
        if key not in self._head_norms:
            self._head_norms[key] = torch.cat([q_norm.expand(q.shape[1], -1), k_norm.expand(k.shape[1], -1)])
        return self.rmsnorm(qk, self._head_norms[key], eps)[0].split([q.shape[1], k.shape[1]], dim=1)

    def act_mul(self, activation: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self._act[activation](gate, up)

    def rope_kv_store(self, q, k, v, k_cache, v_cache, slot_mapping, positions: torch.Tensor, inv_freq: torch.Tensor,
                      neox: bool, attn_factor: float) -> None:
        """Rotate q in place; store rotated k and v in the paged cache (one launch on the Triton backend)."""
        self._rope_kv_store(q, k, v, k_cache, v_cache, slot_mapping, positions, inv_freq, neox=neox,
                            attn_factor=attn_factor)

    def attention(self, q, k_cache, v_cache, batch, *, scale: float, sliding_window: int | None,
                  soft_cap: float | None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the batch's new queries over the paged cache (their own K/V already stored); sinks:
        float32 [n_heads] attention-sink logits, or None."""
        if self.backend == "cpu":
            return self._decode(q, k_cache, v_cache, batch, scale=scale, sliding_window=sliding_window,
                                soft_cap=soft_cap, sinks=sinks)
        if batch.is_decode:
            return self._decode(q, k_cache, v_cache, batch.block_tables, batch.context_lens, scale=scale,
                                sliding_window=sliding_window, soft_cap=soft_cap, sinks=sinks)
        kwargs = {"max_seqlen_q": batch.max_seqlen_q} if self.backend == "triton" else {}
        return self._prefill(q, k_cache, v_cache, batch.block_tables, batch.cu_seqlens_q, batch.context_lens,
                             scale=scale, sliding_window=sliding_window, soft_cap=soft_cap, sinks=sinks, **kwargs)


def _cpu_kind(w: QuantWeight) -> str:
    """The `CpuWeight` kind `w` takes, by its type (those stacked into one product share it)."""
    t = w.ggml_type
    return "dense" if t in FLOAT_TYPES else "int4" if t in INT4_TYPES else "int4x2" if t in SPLIT_TYPES else "bf16"


def _rmsnorm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`rmsnorm_ref` in four torch calls, float32 (other dtypes: the reference): on CPU, torch's own rms_norm is
    about ten, and in a decode step each costs more than the arithmetic. sqrt(mean(h^2) + eps) is
    hypot(|h| / sqrt(n), sqrt(eps))."""
    if x.dtype != torch.float32:
        return rmsnorm_ref(x, weight, eps, residual)
    h = x if residual is None else x + residual
    rms = torch.hypot(torch.linalg.vector_norm(h, dim=-1, keepdim=True).div_(math.sqrt(h.shape[-1])), _root(eps))
    return torch.mul(h, weight).div_(rms), h


@cache
def _root(eps: float) -> torch.Tensor:
    """sqrt(eps) as a float32 scalar tensor, made once per eps."""
    return torch.tensor(math.sqrt(eps), dtype=torch.float32)


def _act_mul_cpu(act: Callable[[torch.Tensor], torch.Tensor],
                 reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                 ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """act(gate) * up as the reference computes it, in two torch calls where gate and up are float32 (the
    reference's checks and conversions cost more than the products of a small model's decode step)."""
    def act_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if gate.dtype != torch.float32 or gate.shape != up.shape or up.dtype != torch.float32:
            return reference(gate, up)
        return act(gate).mul_(up)
    return act_mul


def _one_launch(ws: Sequence[QuantWeight]) -> bool:
    """Whether the weights share a type, K and layout: what one launch of qgemv's kernel takes."""
    return len({(w.ggml_type, w.shape[1:], w.planar) for w in ws}) == 1


def _contiguous(x: torch.Tensor | PendingNorm) -> torch.Tensor | PendingNorm:
    """x with a contiguous last dim for the kernels (a PendingNorm's y is made so)."""
    return x if isinstance(x, PendingNorm) else x.contiguous()
