"""Matrix product of activations with a weight kept in its GGUF blocks.

    out[m, n] = sum_k x[m, k] * W[n, k],   W[n, k] = element k % QK of block k // QK of row n

x: [M, K] float32, float16 or bfloat16 (last dim contiguous). W: (N, K) as `raw` uint8 bytes, rows of K / QK
whole blocks of BLOCK_BYTES bytes (row n starts at byte n * K / QK * BLOCK_BYTES). Each type is decoded by one
decoder on every path, the dequant kernel's too: the types of `qgemv.GEMV_TYPES` by qgemv's word decoders, the others
by the element decoders of blocks.py (block layouts are documented there and in qgemv.py). Sums are float32; out is
[M, N] in x's dtype, or in `out_dtype` (float32 logits from bfloat16 activations).

Paths, picked by `_choose_path` from per-backend thresholds (or forced with `path=`):
- "gemv" (M <= 16, the types of `qgemv.GEMV_TYPES`): the decode step's product, a kernel of its own (qgemv.py)
  that decodes 32-bit words of whole blocks and streams the weight at the bandwidth limit, one FMA per weight for
  one row of x, tensor cores for 2..16; K is split into ranges when N alone makes too few programs, their partial
  sums added in range order by the last program of each row tile to finish (one launch).
- "skinny" (small M, the other types: decode, small batches, speculative verification). A program owns BLOCK_N rows
  of W over the whole K range and all M rows of x (padded to 16 rows for tl.dot; M = 1 multiplies and sums in
  float32 instead, a GEMV, as no tensor-core tile is that thin), so each weight byte is read and decoded once per
  call whatever M is: the path is bound by reading W.
- "splitk": the skinny path with K cut into ranges, one program per (rows, range), when N alone makes too few
  programs to fill the GPU. Each range writes float32 partial sums; a second kernel adds them in range order
  (deterministic, no atomics).
- "gemm": tiled GEMM over [BLOCK_M, BLOCK_N] output tiles; each W tile is decoded once per K step to x's dtype
  and fed to tl.dot, so its decoding is shared by BLOCK_M rows of x. The types of `qgemv.GEMV_TYPES` run on
  qgemv's word decoders with M tiles of 32 to 128 rows (a fraction of the instructions per FLOP of the element
  decoders, bench/sass.py); the others in grouped order (GROUP_M tiles along M share a column of W tiles, which
  then comes from L2).
- "dequant": the dequant kernel, then torch.mm on the dense weight (cuBLAS / hipBLASLt): for large M, where
  decoding W once per M tile costs more than writing it dense once.
"skinny", "splitk" and the other types' "gemm" are one kernel, `_qmatmul_kernel`, with different tiles and grids.

Weights of the types in `planar.RELAID_TYPES` may come relaid (`planar=True`, `planar.to_planar`), the layout
qgemv's word decoders read with 16-byte loads; given the file's layout, or relaid rows that would not start 4-byte
aligned, the word paths take a copy per call (`qgemv.word_layout`).

Fused into the products on qgemv's word decoders (where `fusable` says so; the callers fall back to separate
launches elsewhere): the RMSNorm between two matmuls (`qmatmul_add_norm` adds the residual and leaves a
`rmsnorm.PendingNorm`, which `qmatmul` / `qmatmul_many` take as x), and the gated activation of a gate/up pair
(`qmatmul_act`). Their epilogues only: the loop over the weight is the same code.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..gguf.quants import check_size
from ..gguf.quants import dequantize as _gguf_dequantize
from ..gguf.types import TYPE_TRAITS, GGMLType
from ._common import FLOAT_DTYPES, backend, check_float, check_last_dim_contiguous, dot, f32_dot, sm_count
from .blocks import decode_block, decode_table_tensor
from .dequant import dequantize
from .planar import check_relaid, from_planar
from .qgemv import GEMV_TYPES, MAX_M, act_fits, gemv_splits, qgemv, word_layout
from .rmsnorm import RMS_CHUNK, PendingNorm

PATHS = ("gemv", "skinny", "splitk", "gemm", "dequant")
_FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)

# Dispatch thresholds per backend. CUDA: initial values, to be measured with bench/qmatmul.py (`--path`
# times one path at every M); HIP unmeasured. The interpreter follows CUDA so that CPU runs take the GPU's paths.
#   skinny_max_m: largest M for the skinny paths (one M tile of 16 rows: W read once).
#   split_max_n: largest N whose skinny call splits K (N / 64 row tiles fill at most one wave of 132 H100 SMs).
#   dequant_min_m: smallest M for dequantize + torch.mm; float_dequant_min_m: the same for F32/F16/BF16 weights,
#   whose "dequantization" is a cast, cheap next to cuBLAS's lead over a Triton GEMM.
_CUDA_DISPATCH = {"skinny_max_m": 16, "split_max_n": 8192, "dequant_min_m": 1024, "float_dequant_min_m": 128}
_DISPATCH = {
    "cuda": _CUDA_DISPATCH,
    "hip": {"skinny_max_m": 16, "split_max_n": 8192, "dequant_min_m": 1024, "float_dequant_min_m": 128},  # unmeasured
    "interpreter": _CUDA_DISPATCH,
}

# Autotune configs. Skinny: (BLOCK_N, BLOCK_K, num_warps, num_stages), BLOCK_M set by the launcher. GEMM:
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). CUDA: initial values, to be measured; HIP unmeasured.
# BLOCK_K stays at 32..64 in the GEMM: the decoded fp32 tile lives in registers beside the accumulator.
# One small config in the interpreter (it cannot time configs), small enough that tests cross tile edges.
_SKINNY_CONFIGS = {
    "cuda": [(32, 256, 4, 3), (64, 128, 4, 3), (64, 256, 8, 3), (128, 64, 4, 4)],
    "hip": [(32, 256, 4, 1), (64, 128, 4, 1), (64, 256, 8, 1), (128, 64, 4, 1)],  # unmeasured
    "interpreter": [(32, 64, 1, 1)],
}
_GEMM_CONFIGS = {
    "cuda": [(32, 64, 64, 4, 4), (64, 128, 64, 4, 3), (128, 128, 32, 8, 3), (128, 256, 32, 8, 3)],
    "hip": [(32, 64, 64, 4, 1), (64, 128, 64, 4, 1), (128, 128, 32, 8, 1), (128, 256, 32, 8, 1)],  # unmeasured
    "interpreter": [(32, 32, 64, 1, 1)],
}
_M_BUCKET_CAP = 1024  # autotune key: M rounded up to a power of two, at most this (larger M tunes alike)
_MAX_SPLITS = 16
_SPLIT_ROWS = 64  # rows per skinny program assumed when sizing split-K (the configs' middle BLOCK_N)
_GROUP_M = 8


@triton.jit(do_not_specialize=["M", "m_bucket"])
def _qmatmul_kernel(
    x_ptr, raw_ptr, table_ptr, out_ptr, M, N, K, m_bucket, x_row_stride, w_row_stride, out_row_stride,
    out_split_stride, split_len,
    TYPE: tl.constexpr, QK: tl.constexpr, BLOCK_BYTES: tl.constexpr, F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[split] tile (pid_m, pid_n) = sum of x[m, k] W[n, k] over k in [split * split_len, + split_len).

    m_bucket is not read: it is the autotune key standing for M. split_len is K or a multiple of BLOCK_K, so only
    the tile holding column K - 1 is partial.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    width = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = pid // width * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + pid % width % group_m
    pid_n = pid % width // group_m
    m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_in = m < M
    # Rows past N decode row N - 1 (the decoders' loads are unmasked) and are not stored.
    w_row_ptr = raw_ptr + tl.minimum(n, N - 1) * w_row_stride
    x_row_ptr = x_ptr + m * x_row_stride
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * split_len
    for k0 in range(k_start, tl.minimum(k_start + split_len, K), BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_in = k < K
        x = tl.load(x_row_ptr[:, None] + k[None, :], mask=m_in[:, None] & k_in[None, :], other=0.0)
        kc = tl.minimum(k, K - 1)
        # [BLOCK_N, BLOCK_K], K fastest: neighbouring threads read neighbouring bytes of a row.
        w = decode_block(w_row_ptr[:, None] + (kc // QK * BLOCK_BYTES)[None, :], (kc % QK)[None, :], table_ptr, TYPE)
        w = tl.where(k_in[None, :], w, 0.0)  # a clamped column may decode to inf, and 0 * inf is NaN
        if BLOCK_M == 1:
            acc += tl.sum(w * x.to(tl.float32), axis=1)[None, :]
        else:
            if not F32:
                w = w.to(x_ptr.dtype.element_ty)
            acc += dot(x, tl.trans(w), F32)
    out = out_ptr + split.to(tl.int64) * out_split_stride + m[:, None] * out_row_stride + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_in[:, None] & (n < N)[None, :])


@triton.jit
def _splitk_reduce_kernel(part_ptr, out_ptr, numel, n_splits, BLOCK: tl.constexpr):
    """out = sum over s of part[s] ([n_splits, numel] float32), added in split order: the same bits every run."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(n_splits):
        acc += tl.load(part_ptr + s * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _prune_gemm(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """GEMM configs whose BLOCK_M is not above M's bucket: taller tiles only multiply padding rows."""
    fit = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, named_args["m_bucket"])]
    return fit or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]


@functools.cache
def _tuned(be: str, gemm: bool):
    """The autotuned kernel of backend `be` for the GEMM or the skinny configs."""
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K") if gemm else ("BLOCK_N", "BLOCK_K")
    configs = [triton.Config(dict(zip(names, c[:-2])), num_warps=c[-2], num_stages=c[-1])
               for c in (_GEMM_CONFIGS if gemm else _SKINNY_CONFIGS)[be]]
    prune = {"early_config_prune": _prune_gemm} if gemm else None
    # cache_results: the timings persist in Triton's cache folder (see cache.py): a second start skips tuning.
    return triton.autotune(configs, key=["m_bucket", "N", "K", "TYPE"], prune_configs_by=prune,
                           cache_results=True)(_qmatmul_kernel)


def path_takes(path: str, ggml_type: int, M: int) -> bool:
    """Whether `path` multiplies a weight of this type by M rows of x: "gemv" the types of qgemv.GEMV_TYPES, up to
    MAX_M rows; "skinny" and "splitk" the others (the element decoders'); "gemm" and "dequant" every type."""
    words = ggml_type in GEMV_TYPES
    if path == "gemv":
        return words and M <= MAX_M
    return not words if path in ("skinny", "splitk") else True


def _choose_path(ggml_type: GGMLType, M: int, N: int, K: int, device: torch.device) -> str:
    """The path for an [M, K] x (N, K) product on `device`: the one place that reads the dispatch thresholds."""
    th = _DISPATCH[backend(device)]
    dequant_min_m = th["float_dequant_min_m"] if ggml_type in _FLOAT_TYPES else th["dequant_min_m"]
    if M >= dequant_min_m:
        return "dequant"
    if M > th["skinny_max_m"]:
        return "gemm"
    if ggml_type in GEMV_TYPES:
        return "gemv"
    return "splitk" if N <= th["split_max_n"] and _split_count(N, K, device) > 1 else "skinny"


def _split_align(device: torch.device) -> int:
    """Split ranges are whole multiples of every skinny config's BLOCK_K."""
    return max(c[1] for c in _SKINNY_CONFIGS[backend(device)])


def _split_count(N: int, K: int, device: torch.device) -> int:
    """K ranges for the split-K path: enough programs for two per SM, each range at least one aligned tile."""
    programs = triton.cdiv(N, _SPLIT_ROWS)
    return max(1, min(_MAX_SPLITS, K // _split_align(device), triton.cdiv(2 * sm_count(device), programs)))


def qmatmul(
    x: torch.Tensor | PendingNorm,
    raw: torch.Tensor,
    ggml_type: int,
    shape: Sequence[int],
    *,
    path: str | None = None,
    split_k: int | None = None,
    out_dtype: torch.dtype | None = None,
    planar: bool = False,
) -> torch.Tensor:
    """x [M, K] @ W^T for the weight W of `shape` (N, K) stored as `raw` GGUF blocks of `ggml_type`: [M, N].

    x: float32, float16 or bfloat16, last dim contiguous. raw: contiguous uint8 on x's device (CPU under
    TRITON_INTERPRET=1), 2-byte aligned (4 for F32). path: one of PATHS, default `_choose_path`'s choice.
    split_k: K ranges of the "splitk" and "gemv" paths (default from N, K and the SM count).
    The result is accumulated in float32 and stored in `out_dtype` (default x's dtype).
    planar: raw is in `planar.to_planar`'s layout (only for the types of `planar.RELAID_TYPES`).
    x may be a PendingNorm (its rows y * rstd) where `fusable` holds.
    """
    x, norm_in = _norm_in(x)
    t = _check(x, raw, ggml_type, shape)
    if planar:
        check_relaid(t)
    M, K = x.shape
    N = shape[0]
    if path is None:
        path = _choose_path(t, M, N, K, x.device)
    elif path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if split_k is not None and (path not in ("splitk", "gemv") or split_k < 1):
        raise ValueError(f"split_k must be >= 1 and only goes with path='splitk' or 'gemv', got {split_k} with "
                         f"{path!r}")
    if not path_takes(path, t, M):
        if path == "gemv":
            raise ValueError(f"{t.name}: path 'gemv' takes up to {MAX_M} rows of x and a weight of "
                             f"{', '.join(g.name for g in sorted(GEMV_TYPES))}, got {M} rows of {K}")
        raise ValueError(f"{t.name} is decoded by qgemv's word decoders: paths 'gemv', 'gemm' and 'dequant', not "
                         f"{path!r}")
    out_dtype = out_dtype or x.dtype
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    out = torch.empty((M, N), dtype=out_dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    if _word_path(t, path):
        return _gemv(x, [raw], t, [(N, K)], out, planar, split_k, norm_in=norm_in)
    if norm_in is not None:
        raise ValueError(f"{t.name}: path {path!r} takes no PendingNorm (see `fusable`)")
    if path == "dequant":
        # torch.mm writes its operands' dtype: another output dtype multiplies in that dtype instead.
        return torch.mm(x.to(out_dtype), dequantize(raw, t, (N, K), out_dtype, planar=planar).t(), out=out)

    gemm = path == "gemm"
    split_len = K
    if path == "splitk":
        align = _split_align(x.device)
        split_len = triton.cdiv(triton.cdiv(K, split_k or _split_count(N, K, x.device)), align) * align
    splits = triton.cdiv(K, split_len)  # rounding split_len up can empty trailing ranges
    part = out if splits == 1 else torch.empty((splits, M, N), dtype=torch.float32, device=x.device)
    traits = TYPE_TRAITS[t]
    table = decode_table_tensor(t, x.device)
    _tuned(backend(x.device), gemm)[
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), splits)
    ](
        x, raw, raw if table is None else table, part,
        M, N, K, min(triton.next_power_of_2(M), _M_BUCKET_CAP),
        x.stride(0), K // traits.block_elements * traits.block_bytes, N, M * N, split_len,
        TYPE=t.name, QK=traits.block_elements, BLOCK_BYTES=traits.block_bytes, F32=f32_dot(x),
        GROUP_M=_GROUP_M,
        # tl.dot takes at least 16 rows: 2..16 rows pad to 16; a single row takes the GEMV branch.
        **({} if gemm else {"BLOCK_M": 1 if M == 1 else 16}),
    )
    return _add_splits(part, out) if splits > 1 else out


def qmatmul_many(
    x: torch.Tensor | PendingNorm,
    raws: Sequence[torch.Tensor],
    ggml_type: int,
    shapes: Sequence[Sequence[int]],
    *,
    out_dtype: torch.dtype | None = None,
    planar: bool = False,
) -> list[torch.Tensor]:
    """[x @ W^T for each weight W]: `qmatmul` of one x with one to three weights of one type and K (q, k and v; gate
    and up). Where the dispatch picks qgemv's kernel for them ("gemv", and "gemm" for its types), one launch computes
    all of them over the weights as they are (no concatenated copy), into views of one [M, sum N] tensor; else one
    qmatmul each. x may be a PendingNorm where `fusable` holds for each weight."""
    if not 1 <= len(raws) <= 3 or len(shapes) != len(raws):
        raise ValueError(f"qmatmul_many takes one to three weights with a shape each, got {len(raws)} and "
                         f"{len(shapes)}")
    xt, norm_in = _norm_in(x)
    t = [_check(xt, raw, ggml_type, shape) for raw, shape in zip(raws, shapes)][0]
    M, K = xt.shape
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    ns = [shape[0] for shape in shapes]
    if planar:
        check_relaid(t)
    if M == 0 or K == 0 or not _word_path(t, _choose_path(t, M, sum(ns), K, xt.device)):
        return [qmatmul(x, raw, t, shape, out_dtype=out_dtype, planar=planar) for raw, shape in zip(raws, shapes)]
    out = torch.empty((M, sum(ns)), dtype=out_dtype or xt.dtype, device=xt.device)
    return list(_gemv(xt, raws, t, [(n, K) for n in ns], out, planar, None, norm_in=norm_in).split(ns, dim=1))


def fusable(ggml_type: int, M: int, N: int, K: int, device: torch.device, *, act: bool = False) -> bool:
    """Whether an [M, K] x (N, K) product of this type runs on qgemv's word decoders, which take a PendingNorm as x
    and fuse `qmatmul_add_norm`'s epilogue, and with act, `qmatmul_act`'s (N: gate's and up's columns together)."""
    t = GGMLType(ggml_type)
    if M == 0 or K == 0 or not _word_path(t, _choose_path(t, M, N, K, device)):
        return False
    return not act or act_fits(M, N // 2, device)


def qmatmul_add_norm(x: torch.Tensor | PendingNorm, raw: torch.Tensor, ggml_type: int, shape: Sequence[int],
                     residual: torch.Tensor, norm_weight: torch.Tensor, eps: float, *,
                     planar: bool = False) -> tuple[PendingNorm, torch.Tensor]:
    """h = x @ W^T (rounded to x's dtype) + residual, and rmsnorm(h, norm_weight, eps) left pending for the next
    product (one launch): returns (PendingNorm of h, h). residual: [M, N] in x's dtype, last dim contiguous;
    norm_weight: [N], any float dtype. `fusable` must hold."""
    xt, norm_in = _norm_in(x)
    t = _check(xt, raw, ggml_type, shape)
    if planar:
        check_relaid(t)
    M, K = xt.shape
    N = shape[0]
    check_float(residual=residual, norm_weight=norm_weight)
    if residual.shape != (M, N) or residual.dtype != xt.dtype or not residual.is_contiguous():
        raise ValueError(f"residual must be contiguous {xt.dtype} [{M}, {N}], got {residual.dtype} "
                         f"{tuple(residual.shape)}")
    if norm_weight.shape != (N,) or not norm_weight.is_contiguous():
        raise ValueError(f"norm_weight must be contiguous [{N}], got {tuple(norm_weight.shape)}")
    if not fusable(t, M, N, K, xt.device):
        raise ValueError(f"{t.name}: no fused product for {M} rows of {K} (see `fusable`)")
    y = torch.empty((M, N), dtype=xt.dtype, device=xt.device)
    h = torch.empty_like(y)
    sumsq = torch.empty((M, triton.cdiv(N, RMS_CHUNK)), dtype=torch.float32, device=xt.device)
    _gemv(xt, [raw], t, [(N, K)], y, planar, None, norm_in=norm_in, norm_out=(residual, norm_weight, h, sumsq))
    return PendingNorm(y, sumsq, eps), h


def qmatmul_act(x: torch.Tensor | PendingNorm, raws: Sequence[torch.Tensor], ggml_type: int, shape: Sequence[int],
                activation: str, *, planar: bool = False) -> torch.Tensor:
    """act(x @ gate^T) * (x @ up^T) in one launch, raws = (gate, up), both of `shape` (N, K): [M, N] in x's dtype,
    the two products rounded to it first (as `activations.silu_mul` / `gelu_mul` of them). activation: "silu" or
    "gelu". `fusable` must hold for 2N columns."""
    if activation not in ("silu", "gelu") or len(raws) != 2:
        raise ValueError(f"qmatmul_act takes a gate and an up weight and 'silu' or 'gelu', got {len(raws)} "
                         f"weights and {activation!r}")
    xt, norm_in = _norm_in(x)
    t = [_check(xt, raw, ggml_type, shape) for raw in raws][0]
    if planar:
        check_relaid(t)
    M, K = xt.shape
    N = shape[0]
    if not fusable(t, M, 2 * N, K, xt.device, act=True):
        raise ValueError(f"{t.name}: no fused product for {M} rows of {K} (see `fusable`)")
    out = torch.empty((M, N), dtype=xt.dtype, device=xt.device)
    return _gemv(xt, raws, t, [(N, K)] * 2, out, planar, None, norm_in=norm_in, act=activation)


def _norm_in(x: torch.Tensor | PendingNorm) -> tuple[torch.Tensor, tuple | None]:
    """x's tensor, and qgemv's norm_in for a PendingNorm x (checked against it)."""
    if not isinstance(x, PendingNorm):
        return x, None
    y, sumsq = x.y, x.sumsq
    if sumsq.dtype != torch.float32 or not sumsq.is_contiguous() or y.dim() != 2 or \
            sumsq.shape != (y.shape[0], triton.cdiv(y.shape[1], RMS_CHUNK)) or sumsq.device != y.device:
        raise ValueError(f"a PendingNorm's sumsq must be contiguous float32 [M, cdiv(K, {RMS_CHUNK})] beside y, got "
                         f"{sumsq.dtype} {tuple(sumsq.shape)} for y {tuple(y.shape)}")
    return y, (sumsq, x.eps)


def _word_path(t: GGMLType, path: str) -> bool:
    """Whether `path` runs on qgemv's word decoders: "gemv", and "gemm" for their types."""
    return path == "gemv" or path == "gemm" and t in GEMV_TYPES


def _gemv(x: torch.Tensor, raws: Sequence[torch.Tensor], t: GGMLType, shapes: list[tuple[int, int]],
          out: torch.Tensor, planar: bool, split_k: int | None, **fused) -> torch.Tensor:
    """The "gemv" path (or qgemv's GEMM tiles, for more than MAX_M rows) for one to three weights, into out; fused:
    qgemv's norm_in, norm_out, act."""
    layouts = [word_layout(raw, t, shape, planar) for raw, shape in zip(raws, shapes)]
    M = x.shape[0]
    N, K = sum(s[0] for s in shapes), shapes[0][1]
    return qgemv(x, [raw for raw, _, _ in layouts], t, shapes, out,
                 gemv_splits(t, N, K, sm_count(x.device), 1 if M > MAX_M else split_k), row_bytes=layouts[0][1],
                 **fused)


def _add_splits(part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = the sum of part's [splits, ...] float32 partial sums, in split order."""
    block = 1024
    _splitk_reduce_kernel[(triton.cdiv(out.numel(), block),)](part, out, out.numel(), part.shape[0], BLOCK=block)
    return out


def qmatmul_ref(x: torch.Tensor, raw: torch.Tensor, ggml_type: int, shape: Sequence[int], *,
                planar: bool = False) -> torch.Tensor:
    """Torch reference of `qmatmul`: x @ dequantize(W)^T in float32 (the GGUF reference decoder), cast to x's dtype."""
    t = _check(x, raw, ggml_type, shape)
    if planar:
        raw = from_planar(raw, t, shape)
    return (x.float() @ _gguf_dequantize(raw, ggml_type, shape).t()).to(x.dtype)


def _check(x: torch.Tensor, raw: torch.Tensor, ggml_type: int, shape: Sequence[int]) -> GGMLType:
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8 or not raw.is_contiguous():
        raise ValueError("raw must be a contiguous uint8 torch tensor")
    t = check_size(raw.numel(), ggml_type, shape)
    if len(shape) != 2:
        raise ValueError(f"{t.name}: the weight must be 2-D (N, K), got shape {tuple(shape)}")
    check_float(x=x)
    if x.dim() != 2 or x.shape[1] != shape[1]:
        raise ValueError(f"{t.name}: x must be [M, {shape[1]}] for a weight of shape {tuple(shape)}, "
                         f"got {tuple(x.shape)}")
    check_last_dim_contiguous(x=x)
    if x.device != raw.device:
        raise ValueError(f"x and raw must be on one device, got {x.device} and {raw.device}")
    align = 4 if t == GGMLType.F32 else 2
    if raw.data_ptr() % align:
        raise ValueError(f"{t.name}: raw bytes must be {align}-byte aligned")
    return t
