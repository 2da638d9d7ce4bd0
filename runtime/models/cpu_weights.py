"""The CPU backend's weight format: fewer bytes per token than dense float32, in torch's packed CPU matmuls.

A `CpuWeight` is one or more 2-D GGUF weights of the same K stacked along N (q/k/v, gate/up: one product for all):

- "int4" (every part Q4_0, Q4_1 or Q4_K, N a multiple of 16): the file's own 4-bit values, packed by
  `aten._convert_weight_to_int4pack_for_cpu`, with one bfloat16 scale s and zero z per 32 weights, w = (q - 8) s + z:
  Q4_0 s = d, z = 0; Q4_1 s = d, z = m + 8 d; Q4_K s = d sc_j, z = 8 s - dmin m_j. 0.5625 bytes per weight.
- "int4x2" (every part Q5_0, Q5_1, Q5_K or Q8_0, N a multiple of 16): the same kernel on the file's own 5- or 8-bit
  values q (centred: -16..15 or -128..127, w = q s + z per 32 weights) split exactly into two 4-bit halves,
  q = 16 hi + lo (hi = q >> 4 in -8..7, lo = q & 15): the packed weight is [hi + 8 | lo] along a doubled K, with
  scales and zeros (16 s, 0) and (s, 8 s + z), and x is [x | x]. 1.25 bytes per weight, the scales and zeros
  rounded to bfloat16 as in "int4".
- "bf16" (any other quantized type, Q6_K among them: the kernel takes no groups of 16): the float32 values rounded to
  bfloat16, dense (oneDNN). 2 bytes per weight. (int8 with one scale per row, `aten._weight_int8pack_mm`, reads half
  of that but its requantization of Q5_0, Q6_K and Q8_0 took Gemma-3-270M's mean KL divergence against llama.cpp
  from 4.4e-3 / 5.5e-3 to 8.3e-3 / 8.9e-3.)
- "dense" (F32, F16, BF16): float32, exact.

Which format a row multiplies depends only on the row's own token, never on the rows beside it, so that a
sequence's output does not change with what it is batched with. Rows of tokens past their prompt (decode, draft
verification), and the logits rows that pick a token (the prompt's last row among them), read the packed weight,
with x rounded to bfloat16 and the sums returned in bfloat16. Other prompt rows are compute-bound: a packed weight
then multiplies a bfloat16 dense copy of its values (oneDNN; AMX where the CPU has it), made on first use. Each
kernel gives a row the same sums whatever the row count (tests/test_cpu_path.py checks it), except oneDNN's
one-row kernel, which sums in another order: a single row is multiplied as two. So the rounding differs from the
float32 reference path in: x and the output in bfloat16, the packed kinds' scales and zeros in bfloat16, and the
weights of the "bf16" kind and of prompt rows in bfloat16.

The logits (`matmul_top_exact`, for the products asked for in float32) have each row's TOP_EXACT largest sums
recomputed exactly: float32 x on the file's values of those weight rows, dequantized alone, summed in float64
(so the rows beside it cannot move a sum by more than one float32 rounding step, and rarely by that). The
bfloat16 output's rounding, 2^-9 relative, is up to 0.06 at a logit of 30, and the tokens a softmax weighs are
the top ones: on Gemma-3-270M that rounding was the largest single part of what the cpu path adds to the mean KL
divergence against llama.cpp.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from ggtriton.gguf import TYPE_TRAITS, GGMLType
from ggtriton.gguf.quants import _bits, _f16, _fields, _nibbles, _scale_min_k4
from ggtriton.gguf.quants import dequantize as dequantize_ref

from .weights import QuantWeight

INT4_TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K)
SPLIT_TYPES = (GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q5_K, GGMLType.Q8_0)
FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
_GROUP = 32  # weights per int4 scale and zero
TOP_EXACT = 64  # sums per row `matmul_top_exact` recomputes exactly
_TOP_BLOCK = 256  # columns per block whose maximum `_top_columns` ranks first
_EXACT_ELEMENTS = 1 << 18  # float64 weight values gathered at a time for the exact sums (2 MB)
_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default  # the overload itself: no per-call lookup


class CpuWeight:
    """Weights `parts` stacked along N, in the format of the module docstring; `matmul(x)` = x @ W^T."""

    def __init__(self, parts: Sequence[QuantWeight]):
        if len({w.shape[1:] for w in parts}) != 1 or any(len(w.shape) != 2 for w in parts):
            raise ValueError(f"CPU weights stack 2-D tensors of one K, got {[(w.name, w.shape) for w in parts]}")
        self.parts = list(parts)
        self.n = sum(w.shape[0] for w in parts)
        self.k = parts[0].shape[1]
        types = {w.ggml_type for w in parts}
        self._bf16: torch.Tensor | None = None
        packs = self.n % 16 == 0 and self.k % _GROUP == 0
        if types <= set(FLOAT_TYPES):
            self.kind = "dense"
            self.data, self.scales = self._values(), None
        elif packs and (types <= set(INT4_TYPES) or types <= set(SPLIT_TYPES)):
            self.kind = "int4" if types <= set(INT4_TYPES) else "int4x2"
            q, s, z = (torch.cat(t) for t in zip(*(_quants(w) for w in parts)))
            if self.kind == "int4x2":  # q = 16 hi + lo: w = (hi + 8 - 8) 16 s + (lo - 8) s + 8 s + z
                q, s, z = torch.cat([(q >> 4) + 8, q & 15], 1), torch.cat([16 * s, s], 1), torch.cat(
                    [torch.zeros_like(z), 8 * s + z], 1)
            else:
                q = q + 8
            self.data = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            # [K' / 32, N, 2]: the layout the kernel reads
            self.scales = torch.stack([s, z], -1).transpose(0, 1).to(torch.bfloat16).contiguous()
        else:
            self.kind = "bf16"
            self.data, self.scales = self._values().to(torch.bfloat16), None
            self._bf16 = self.data  # decode and prefill read the same copy

    @property
    def nbytes(self) -> int:
        """Bytes a decode step reads."""
        return self.data.nbytes + (0 if self.scales is None else self.scales.nbytes)

    def _values(self) -> torch.Tensor:
        """The float32 values of the stacked weight, [N, K] (the reference's dequantization)."""
        return torch.cat([dequantize_ref(w.raw, w.ggml_type, w.shape) for w in self.parts])

    def matmul(self, x: torch.Tensor, out_dtype: torch.dtype | None = None,
               packed: bool | torch.Tensor = False) -> torch.Tensor:
        """x [M, K] @ W^T -> [M, N] in `out_dtype` (default x's dtype). packed: which rows multiply the packed
        weight (rows past their prompt), bool [M] or one bool for all; the others multiply the dense copy."""
        out_dtype = out_dtype or x.dtype
        if self.kind == "dense":
            return (x.to(torch.float32) @ self.data.t()).to(out_dtype)
        xb = x.to(torch.bfloat16)
        if self.kind == "bf16" or packed is False:
            return self._dense_mm(xb).to(out_dtype)
        if packed is True:
            return self._packed_mm(xb).to(out_dtype)
        out = torch.empty(len(x), self.n, dtype=torch.bfloat16)
        out[packed] = self._packed_mm(xb[packed])
        out[~packed] = self._dense_mm(xb[~packed])
        return out.to(out_dtype)

    def _packed_mm(self, xb: torch.Tensor) -> torch.Tensor:
        xb = torch.cat([xb, xb], -1) if self.kind == "int4x2" else xb.contiguous()
        return _INT4_MM(xb, self.data, _GROUP, self.scales)

    def _dense_mm(self, xb: torch.Tensor) -> torch.Tensor:
        if self._bf16 is None:
            self._bf16 = self._values().to(torch.bfloat16)
        if len(xb) == 1:  # oneDNN's one-row kernel sums in another order than its many-row one
            return (torch.cat([xb, xb]) @ self._bf16.t())[:1]
        return xb @ self._bf16.t()

    def matmul_top_exact(self, x: torch.Tensor, k: int = TOP_EXACT, packed: bool | torch.Tensor = False
                         ) -> torch.Tensor:
        """x [M, K] @ W^T -> float32 [M, N] of one weight (`matmul`'s, rows `packed` as there), each row's k
        largest sums recomputed from float32 x and the exact values of those weight rows, summed in float64."""
        out = self.matmul(x, torch.float32, packed)
        if self.kind == "dense" or not len(x):
            return out
        if len(self.parts) != 1:
            raise ValueError(f"exact top sums take one weight, got {[w.name for w in self.parts]}")
        top = _top_columns(out, min(k, self.n))
        ids, inv = top.unique(return_inverse=True)  # rows shared by several x rows are dequantized once
        values = quant_rows(self.parts[0], ids).to(torch.float64)
        x64 = x.to(torch.float64)[:, :, None]
        # each row against its own k weight rows only (not every row any x row picked), in slices that stay in cache
        step = max(1, _EXACT_ELEMENTS // (top.shape[1] * self.k))
        exact = torch.cat([torch.bmm(values[inv[s: s + step]], x64[s: s + step]) for s in range(0, len(x), step)])
        return out.scatter_(1, top, exact[..., 0].to(torch.float32))


def quant_rows(w: QuantWeight, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of `w`, float32, dequantized exactly from the file's blocks of those rows only."""
    return dequantize_ref(w.raw.view(w.rows, -1)[ids], w.ggml_type, (len(ids), *w.shape[1:]))


def _top_columns(out: torch.Tensor, k: int) -> torch.Tensor:
    """Columns [M, k] of the k largest values of each row of `out` (ties: any of them). A full-row topk is slow on
    CPU (~1 ms for 262144 columns): each row's k best blocks by their maximum hold its k largest values, so the
    topk runs over those blocks only."""
    m, n = out.shape
    blocks = -(-n // _TOP_BLOCK)
    if blocks <= k:
        return out.topk(k, -1, sorted=False).indices
    padded = torch.nn.functional.pad(out, (0, blocks * _TOP_BLOCK - n), value=-torch.inf) if n % _TOP_BLOCK else out
    best = padded.view(m, blocks, _TOP_BLOCK).amax(-1).topk(k, -1, sorted=False).indices  # [M, k]
    cols = (best[..., None] * _TOP_BLOCK + torch.arange(_TOP_BLOCK)).flatten(1)
    return cols.gather(1, padded.gather(1, cols).topk(k, -1, sorted=False).indices)


def _quants(w: QuantWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int32 [N, K], s, z float32 [N, K / 32]) of a weight of INT4_TYPES (q in -8..7) or SPLIT_TYPES (q in
    -16..15 or -128..127): w = q s + z."""
    n, k = w.shape
    t = w.ggml_type
    b = w.raw.reshape(-1, TYPE_TRAITS[t].block_bytes)
    if t in (GGMLType.Q4_K, GGMLType.Q5_K):
        sc, m = _scale_min_k4(b[:, 4:16])
        s = _f16(b[:, 0:2]) * sc.float()  # [blocks, 8]
        q = _fields(b[:, -128:].reshape(-1, 4, 32), 4).reshape(-1, 8, 32)
        if t == GGMLType.Q5_K:
            q = q | _fields(b[:, 16:48], 1) << 4
        half = 8 if t == GGMLType.Q4_K else 16
        z = half * s - _f16(b[:, 2:4]) * m.float()
        q = q.int() - half
    elif t == GGMLType.Q8_0:
        s, z, q = _f16(b[:, 0:2]), 0, b[:, 2:].view(torch.int8).int()
    else:  # Q4_0, Q4_1, Q5_0, Q5_1: d, then m (_1), then the fifth bits (Q5), then the nibbles
        size = b.shape[1]
        s = _f16(b[:, 0:2])
        q = _nibbles(b[:, -16:]).int()
        if t in (GGMLType.Q5_0, GGMLType.Q5_1):
            q = q | _bits(b[:, size - 20: size - 16]).int() << 4
        half = 8 if t in (GGMLType.Q4_0, GGMLType.Q4_1) else 16
        z = 0 if t in (GGMLType.Q4_0, GGMLType.Q5_0) else _f16(b[:, 2:4]) + half * s
        q = q - half
    z = z + torch.zeros_like(s)
    return q.reshape(n, k), s.reshape(n, k // _GROUP), z.reshape(n, k // _GROUP)
