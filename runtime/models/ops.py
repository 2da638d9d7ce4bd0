"""The op layer: the one place that picks, per op, the Triton kernel or its torch reference.

Backend "triton" runs the kernels of `ggtriton.kernels` (on a GPU, or on CPU tensors under
TRITON_INTERPRET=1); backend "torch" runs their torch references, and is the CPU path of the engine.
Quantized linear layers: the torch backend dequantizes each weight once, at load, and keeps it dense in
the activation dtype (a reference path: it trades memory for never dequantizing in a step); the Triton
backend multiplies with the fused dequantize-matmul kernel, which picks its own path (GEMV, split-K,
tiled GEMM, or dequantize then cuBLAS) by the number of rows. At load the Triton backend relays the
weights of the 2-byte aligned formats (Q4_0, Q5_0, Q8_0, Q6_K) into the planar layout its GEMV reads
with 16-byte loads: the same bytes, moved within each row.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ggtriton import kernels
from ggtriton.gguf.quants import dequantize as dequantize_ref
from ggtriton.kernels.activations import gelu_mul_ref, silu_mul_ref
from ggtriton.kernels.flash_attention import flash_attention_ref
from ggtriton.kernels.planar import PLANAR_TYPES, to_planar
from ggtriton.kernels.qgemv import gemv_fits
from ggtriton.kernels.paged_decode import paged_decode_ref
from ggtriton.kernels.rmsnorm import rmsnorm_ref
from ggtriton.kernels.rope_kv_store import rope_kv_store_ref

from .weights import QuantWeight

BACKENDS = ("triton", "torch")


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
        self._act = {"silu": kernels.silu_mul, "gelu": kernels.gelu_mul} if triton else {
            "silu": silu_mul_ref, "gelu": gelu_mul_ref}

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
        """Prepare every weight now, so no step pays for it: dense copies (torch backend), or the planar layout
        of the matrices the GEMV reads in it (Triton backend). Returns the bytes relaid."""
        relaid = 0
        for w in weights:
            if self.backend == "torch":
                self._dense(w)
            elif not w.planar and w.ggml_type in PLANAR_TYPES and len(w.shape) == 2 and \
                    gemv_fits(w.ggml_type, w.shape[1]):
                w.raw = to_planar(w.raw, w.ggml_type, w.shape)
                w.planar = True
                relaid += w.raw.numel()
        return relaid

    def linear(self, x: torch.Tensor, w: QuantWeight, bias: QuantWeight | None = None, *,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x [T, K] @ W[N, K]^T (+ bias), W in its GGUF blocks; float32 sums stored in `out_dtype` (default
        x's dtype)."""
        if self.backend == "triton":
            out = kernels.qmatmul(x.contiguous(), w.raw, w.ggml_type, w.shape, out_dtype=out_dtype, planar=w.planar)
        else:
            dtype = out_dtype or x.dtype
            out = x.to(dtype) @ self._dense(w).t().to(dtype)
        return self._biased(out, bias)

    def linears(self, x: torch.Tensor, ws: Sequence[QuantWeight],
                biases: Sequence[QuantWeight | None] | None = None) -> list[torch.Tensor]:
        """[x @ W^T (+ bias) for each W] of q, k and v, or gate and up: one launch on the Triton backend where the
        weights share a type, K and layout and the kernel takes them together (see `kernels.qmatmul_many`)."""
        biases = biases or [None] * len(ws)
        if self.backend != "triton" or len({(w.ggml_type, w.shape[1:], w.planar) for w in ws}) != 1:
            return [self.linear(x, w, b) for w, b in zip(ws, biases)]
        outs = kernels.qmatmul_many(x.contiguous(), [w.raw for w in ws], ws[0].ggml_type, [w.shape for w in ws],
                                    planar=ws[0].planar)
        return [self._biased(out, b) for out, b in zip(outs, biases)]

    def _biased(self, out: torch.Tensor, bias: QuantWeight | None) -> torch.Tensor:
        if bias is not None:
            out += self.vector(bias)
        return out

    def embedding(self, ids: torch.Tensor, w: QuantWeight) -> torch.Tensor:
        """Rows `ids` of an embedding table stored in GGUF blocks."""
        if self.backend == "torch":
            return self._dense(w)[ids]
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


    def act_mul(self, activation: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self._act[activation](gate, up)

    def rope_kv_store(self, q, k, v, k_cache, v_cache, slot_mapping, positions: torch.Tensor, inv_freq: torch.Tensor,
                      neox: bool, attn_factor: float) -> None:
        """Rotate q in place; store rotated k and v in the paged cache (one launch on the Triton backend)."""
        self._rope_kv_store(q, k, v, k_cache, v_cache, slot_mapping, positions, inv_freq, neox=neox,
                            attn_factor=attn_factor)

    def attention(self, q, k_cache, v_cache, batch, *, scale: float, sliding_window: int | None,
                  soft_cap: float | None) -> torch.Tensor:
        """Attention of the batch's new queries over the paged cache (their own K/V already stored)."""
        if batch.is_decode:
            return self._decode(q, k_cache, v_cache, batch.block_tables, batch.context_lens, scale=scale,
                                sliding_window=sliding_window, soft_cap=soft_cap)
        kwargs = {"max_seqlen_q": batch.max_seqlen_q} if self.backend == "triton" else {}
        return self._prefill(q, k_cache, v_cache, batch.block_tables, batch.cu_seqlens_q, batch.context_lens,
                             scale=scale, sliding_window=sliding_window, soft_cap=soft_cap, **kwargs)
