"""A mixture-of-experts feed-forward block over expert weights kept in their GGUF blocks.

    p = route(logits[t])                              top_k experts e_tj of token t, weights w_tj
    h_tj = act(x[t] . Wg[e_tj]^T, x[t] . Wu[e_tj]^T)  [n_ff]
    out[t] = sum over j = 0..top_k-1 of w_tj * (h_tj . Wd[e_tj]^T)

x: [T, H]; router logits: [T, n_expert]; Wg, Wu: [n_expert, n_ff, H], Wd: [n_expert, H, n_ff], each as the raw
bytes of one GGUF tensor (ffn_gate_exps, ffn_up_exps, ffn_down_exps: the experts one after another, rows of whole
blocks). Five launches, none of which reads a device value back to the host (CUDA-graph safe):

1. Routing (`_route_kernel`, a tile of tokens per program), after llama.cpp's build_moe_ffn:
   "softmax" (qwen2moe, qwen3moe, Mixtral): probabilities p = softmax(logits), the top_k largest chosen, weights
   p_j, or with `normalize` p_j / max(sum of the chosen p, 2^-14) (qwen3moe, Mixtral); "softmax_weight" (gpt-oss):
   the top_k largest logits chosen, weights the softmax over those top_k. Ties go to the lower expert index.
   Weights are then multiplied by `scale`.
2. Sorting (`_align_kernel`, one program, as vLLM's moe_align_block_size): the token-expert pairs (pair
   p = t * top_k + j) grouped by expert in pair order, each expert's list padded to a multiple of BLOCK_M with the
   sentinel T * top_k, and for every tile of BLOCK_M slots its expert (-1 past the last): experts no token chose
   get no tile, so their bytes are never read.
3. Gate and up (`_moe_kernel`, ACT set): program (tile, column block) multiplies the tile's rows of x, gathered
   by token, with BLOCK_N rows of its expert's Wg, then of Wu, and stores act(gate, up) per pair.
4. Down (`_moe_kernel`, ACT "none"): the same over the pairs' activations and Wd, each row times its weight w_tj,
   stored per pair in float32.
5. Combine (`_combine_kernel`): out[t] = the sum over j of the pair rows, in slot order (the same bits every run).

The grouped products decode the weights in the kernel with the one decoder every path uses for their type: for the
types of `qgemv.GEMV_TYPES`, qgemv's word decoders (`qgemv.walk`), in three forms picked by BLOCK_M (`_block_m`): 1
for decode, one pair per program, qgemv's FMA loop; 16 when each expert sees a few tokens, the decoded tile multiplied
on the tensor cores once for 16 rows; 32 and 64 for prefill, the GEMM tiles of qgemv (each weight decoded once per
BLOCK_M rows). Their experts are read in `qgemv.word_layout`'s layout: Q4_0, Q5_0, Q8_0 and Q6_K in the planar layout
of planar.py, MXFP4 in its planes per expert (relaid here unless `planar`: a model relays them once when it loads
them). The other types go through the element decoders of blocks.py, BLOCK_K elements at a time, as qmatmul's generic
kernel does.

Activations: "silu" (SwiGLU), "gelu" (GeGLU, tanh form) and "swiglu_oai" (gpt-oss: g = min(gate, 7),
u = clamp(up, -7, 7), act = g * sigmoid(1.702 g) * (u + 1)). Optional float biases per expert row (gpt-oss) are
added to gate, up and down before the activation and the weighting.
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
from ._common import FLOAT_DTYPES, backend, check_float, check_last_dim_contiguous, dot, f32_dot, tanh
from .blocks import decode_block, decode_table_tensor
from .planar import RELAID_TYPES, from_planar
from .qgemv import _T, GEMV_TYPES, _value_table, _zero_acc, walk, w_left, word_layout

GATINGS = ("softmax", "softmax_weight")
ACTIVATIONS = ("silu", "gelu", "swiglu_oai")
_MIN_WEIGHT_SUM = 6.103515625e-5  # 2^-14, the smallest normal fp16: the normalized weights' divisor floor

# Autotune configs (BLOCK_N, num_warps) per backend, for tiles of 1, 16 and 32..64 rows: qgemv's, unmeasured on a
# GPU; `_prune` keeps out those that spill on sm_90. The interpreter's are small so that tests cross row tiles.
_CONFIGS = {
    1: {"cuda": [(32, 2), (64, 2), (128, 4), (256, 4)], "hip": [(64, 2), (128, 4)], "interpreter": [(32, 1)]},
    16: {"cuda": [(64, 4), (128, 4), (128, 8), (256, 8)], "hip": [(64, 4), (128, 4)], "interpreter": [(32, 1)]},
    32: {"cuda": [(64, 4), (128, 8)], "hip": [(64, 4)], "interpreter": [(32, 1)]},
}
# The most rows of W per program that do not spill on sm_90 (bench/sass.py, Triton 3.9 and 3.6; but Q4_K's 16-row
# down at 64 rows spills 8 bytes under 3.6), per tile form (1, 16, 32..64 rows of x) and type: (gate and up, whose
# sums stay live through up's loop; down). Other types and forms, the element decoders' among them:
# _OTHER_MAX_BLOCK_N (IQ4_XS's and MXFP4's 64-row down spills 16 to 24 bytes there, less than at 128 rows).
_MAX_BLOCK_N = {
    (1, "Q4_K"): (256, 256), (1, "Q5_K"): (256, 256), (1, "Q5_0"): (256, 256), (1, "Q6_K"): (128, 128),
    (1, "Q8_0"): (32, 128), (1, "Q4_0"): (128, 128),
    (16, "Q4_K"): (256, 256), (16, "Q6_K"): (256, 256), (16, "Q4_0"): (256, 256), (16, "Q5_K"): (256, 256),
    (16, "IQ4_XS"): (256, 256), (16, "MXFP4"): (256, 256),
    (32, "Q4_K"): (128, 128), (32, "Q6_K"): (128, 128), (32, "Q4_0"): (128, 128),
    (1, "IQ4_XS"): (256, 256), (1, "MXFP4"): (256, 256),
}
_OTHER_MAX_BLOCK_N = {1: 32, 16: 64, 32: 64}
# Configs (BLOCK_N, num_warps) within those bounds that still spill (Triton 3.9 or 3.6), per (form, type): (gate and
# up; down). IQ4_XS's 16-row float16 loop takes 32 rows of W per warp only for down, at 8 warps.
_SPILLING = {(16, "IQ4_XS"): ({(128, 4), (256, 8)}, {(128, 4)})}
_BLOCK_K = {"cuda": 64, "hip": 64, "interpreter": 32}  # elements per step of the element decoders
_P_BUCKET_CAP = 1 << 16  # autotune key: pairs rounded up to a power of two, at most this
_ROUTE_TOKENS = 16  # tokens per routing program
_ALIGN_CHUNK = 128  # pairs (and slots, tiles) the sorting program takes per step
_COMBINE_BLOCK = 1024


@triton.jit
def _route_kernel(logits_ptr, ids_ptr, weights_ptr, T, E, logits_stride, scale, TOP_K: tl.constexpr,
                  K_POW2: tl.constexpr, GATING: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_E: tl.constexpr):
    """ids, weights [T, TOP_K] of tokens [pid * BLOCK_T, + BLOCK_T): the experts chosen, highest first."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    t_in = t < T
    free = (t[:, None] >= 0) & (e[None, :] < E)  # [BLOCK_T, BLOCK_E]: experts not chosen yet
    # tokens past T read token T - 1 (not stored): a row of -inf would make NaN in the softmax
    v = tl.load(logits_ptr + tl.minimum(t, T - 1)[:, None].to(tl.int64) * logits_stride + e[None, :], mask=free,
                other=-float("inf")).to(tl.float32)
    if GATING == "softmax":
        v = tl.exp(v - tl.max(v, axis=1)[:, None])
        v = v / tl.sum(v, axis=1)[:, None]
    j = tl.arange(0, K_POW2)[None, :]
    ids = tl.zeros([BLOCK_T, K_POW2], tl.int32)
    w = tl.zeros([BLOCK_T, K_POW2], tl.float32)
    for i in tl.static_range(TOP_K):  # TOP_K passes of an arg-max over the experts still free
        best = tl.max(tl.where(free, v, -float("inf")), axis=1)
        pick = tl.min(tl.where(free & (v == best[:, None]), e[None, :], BLOCK_E), axis=1)
        pick = tl.minimum(pick, E - 1)  # a NaN logit matches nothing: still name a real expert
        free = free & (e[None, :] != pick[:, None])
        ids = tl.where(j == i, pick[:, None], ids)
        w = tl.where(j == i, best[:, None], w)
    if GATING == "softmax_weight":
        w = tl.where(j < TOP_K, tl.exp(w - tl.max(w, axis=1)[:, None]), 0.0)  # w[:, 0] is the largest
        w = w / tl.sum(w, axis=1)[:, None]
    elif NORMALIZE:
        w = w / tl.maximum(tl.sum(w, axis=1), _MIN_WEIGHT_SUM)[:, None]
    offs = t[:, None] * TOP_K + j
    mask = t_in[:, None] & (j < TOP_K)
    tl.store(ids_ptr + offs, ids, mask=mask)
    tl.store(weights_ptr + offs, w * scale, mask=mask)


@triton.jit
def _align_kernel(ids_ptr, pairs_ptr, tile_expert_ptr, n_pairs, E, n_tiles, BLOCK_M: tl.constexpr,
                  BLOCK_E: tl.constexpr, CHUNK: tl.constexpr):
    """pairs [n_tiles * BLOCK_M]: the pairs p grouped by expert ids[p], in pair order, each expert's run padded to a
    multiple of BLOCK_M with n_pairs; tile_expert [n_tiles]: the expert of each tile of BLOCK_M slots, -1 past the
    last. One program: the experts' counts, their exclusive prefix sums, then each pair's rank in its expert."""
    e = tl.arange(0, BLOCK_E)
    c = tl.arange(0, CHUNK)
    counts = tl.zeros([BLOCK_E], tl.int32)
    for p0 in range(0, n_pairs, CHUNK):
        ids = tl.load(ids_ptr + p0 + c, mask=p0 + c < n_pairs, other=-1)
        counts += tl.sum((ids[:, None] == e[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    for s0 in range(0, n_tiles * BLOCK_M, CHUNK):  # tile experts, and the sentinel in padding slots
        s = s0 + c
        inside = (s[:, None] >= starts[None, :]) & (s[:, None] < ends[None, :])  # [CHUNK, BLOCK_E]
        owner = tl.sum(tl.where(inside, e[None, :], 0), axis=1)
        owned = tl.max(inside.to(tl.int32), axis=1) > 0
        first = s % BLOCK_M == 0
        tl.store(tile_expert_ptr + s // BLOCK_M, tl.where(owned, owner, -1), mask=first & (s < n_tiles * BLOCK_M))
        if BLOCK_M > 1:  # a pair's slot is never a padding slot: no ordering between the two stores is needed
            rank = s - tl.sum(tl.where(inside, starts[None, :], 0), axis=1)
            pad = ~owned | (rank >= tl.sum(tl.where(inside, counts[None, :], 0), axis=1))
            tl.store(pairs_ptr + s, n_pairs + tl.zeros([CHUNK], tl.int32), mask=pad & (s < n_tiles * BLOCK_M))
    taken = tl.zeros([BLOCK_E], tl.int32)
    for p0 in range(0, n_pairs, CHUNK):
        p = p0 + c
        ids = tl.load(ids_ptr + p, mask=p < n_pairs, other=-1)
        hit = (ids[:, None] == e[None, :]).to(tl.int32)
        rank = tl.cumsum(hit, axis=0) - hit + taken[None, :]  # pairs of the same expert before this one
        slot = tl.sum(hit * (starts[None, :] + rank), axis=1)
        tl.store(pairs_ptr + slot, p, mask=p < n_pairs)
        taken += tl.sum(hit, axis=0)


@triton.jit
def _products(w_ptr, row, x_ptr, xm, x_stride, table_ptr, nb, K, N, TYPE: tl.constexpr, WORDS: tl.constexpr,
              QK: tl.constexpr, BLOCK_BYTES: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_K: tl.constexpr, DENORMAL: tl.constexpr, F32: tl.constexpr):
    """x . W[row]^T over all K for the BLOCK_N rows `row` (byte offsets) of the weight at w_ptr: [BLOCK_N] for one
    row of x at x_ptr (BLOCK_M = 1), or [BLOCK_M, BLOCK_N] for the rows xm of the x at x_ptr. WORDS: qgemv's word
    decoders (MXFP4's reading its planes per matrix of N rows); else the element decoders."""
    BN: tl.constexpr = row.shape[0]
    if WORDS:
        # qgemv's accumulator: per-thread lanes, or a tile, [BN, BLOCK_M] where w_left
        acc = walk(_zero_acc(BN, TYPE, BLOCK_M), w_ptr, row, N, 0, nb, nb, x_ptr, table_ptr, xm, x_stride, TYPE,
                   BLOCK_BYTES, DENORMAL, BLOCK_M, F32)
        if BLOCK_M == 1:
            res = tl.sum(acc, axis=1)
        else:
            if DENORMAL:  # the decoded weights were scaled by 2^-T (qgemv)
                acc *= 2.0 ** _T
            if w_left(TYPE, BLOCK_M):
                res = tl.trans(acc)  # once per tile, after the loop
            else:
                res = acc
    else:
        if BLOCK_M == 1:
            # per-element sums, added across K once after the loop: a sum per step costs more shuffles than it saves
            acc = tl.zeros([BN, BLOCK_K], tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BN], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_in = k < K
            kc = tl.minimum(k, K - 1)
            w = decode_block(w_ptr + row[:, None] + (kc // QK * BLOCK_BYTES)[None, :], (kc % QK)[None, :],
                             table_ptr, TYPE)
            w = tl.where(k_in[None, :], w, 0.0)  # a clamped column may decode to inf, and 0 * inf is NaN
            if BLOCK_M == 1:
                acc += w * tl.load(x_ptr + k, mask=k_in, other=0.0).to(tl.float32)[None, :]
            else:
                xt = tl.load(x_ptr + xm[:, None] * x_stride + k[None, :], mask=k_in[None, :], other=0.0)
                if not F32:
                    w = w.to(xt.dtype)
                acc += dot(xt, tl.trans(w), F32)
        if BLOCK_M == 1:
            res = tl.sum(acc, axis=1)
        else:
            res = acc
    return res


@triton.jit(do_not_specialize=["n_pairs", "p_bucket"])
def _moe_kernel(x_ptr, w0_ptr, w1_ptr, bias0_ptr, bias1_ptr, table_ptr, out_ptr, pairs_ptr, tile_expert_ptr,
                route_w_ptr, n_pairs, p_bucket, top_k, N, K, nb, x_stride, row_bytes, expert_bytes,
                TYPE: tl.constexpr, WORDS: tl.constexpr, QK: tl.constexpr,
                BLOCK_BYTES: tl.constexpr, ACT: tl.constexpr, BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DENORMAL: tl.constexpr, F32: tl.constexpr):
    """Columns [c * BLOCK_N, + BLOCK_N) of the pairs in tile s (pid = s * column blocks + c) of the sorted pairs.

    ACT "silu", "gelu", "swiglu_oai": out[p] = act(x[p // top_k] . W0[e]^T (+ bias0[e]), x[p // top_k] . W1[e]^T
    (+ bias1[e])), W0, W1 the gate and up experts. ACT "none": out[p] = (x[p] . W0[e]^T (+ bias0[e])) * route_w[p].
    e = tile_expert[s]; tiles of -1 do nothing. p_bucket is not read: it is the autotune key standing for n_pairs.
    """
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(N, BLOCK_N)
    tile = pid // col_blocks  # neighbouring programs: one expert's tile, its next columns
    expert = tl.load(tile_expert_ptr + tile)
    if expert >= 0:
        n = pid % col_blocks * BLOCK_N + tl.arange(0, BLOCK_N)
        n_in = n < N
        # rows of W past N read row N - 1, and padding slots read pair n_pairs - 1: no masked loads (nor the predicate
        # registers they take) in the loop; neither is stored
        row = tl.minimum(n, N - 1).to(tl.int64) * row_bytes
        w_off = expert.to(tl.int64) * expert_bytes
        if BLOCK_M == 1:  # one pair per tile: no padding
            p = tl.load(pairs_ptr + tile)
            pc = p
        else:
            p = tl.load(pairs_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))
            m_in = p < n_pairs
            pc = tl.minimum(p, n_pairs - 1)
        if ACT == "none":
            xm = pc.to(tl.int64)
        else:
            xm = (pc // top_k).to(tl.int64)  # gate and up read the pair's token
        if BLOCK_M == 1:
            xa = x_ptr + xm * x_stride
        else:
            xa = x_ptr
        a = _products(w0_ptr + w_off, row, xa, xm, x_stride, table_ptr, nb, K, N, TYPE, WORDS, QK, BLOCK_BYTES,
                      BLOCK_M, BLOCK_K, DENORMAL, F32)
        if BIAS:
            a += tl.load(bias0_ptr + expert * N + n, mask=n_in, other=0.0).to(tl.float32)
        if ACT == "none":
            if BLOCK_M == 1:
                h = a * tl.load(route_w_ptr + pc)
            else:
                h = a * tl.load(route_w_ptr + pc)[:, None]
        else:
            u = _products(w1_ptr + w_off, row, xa, xm, x_stride, table_ptr, nb, K, N, TYPE, WORDS, QK,
                          BLOCK_BYTES, BLOCK_M, BLOCK_K, DENORMAL, F32)
            if BIAS:
                u += tl.load(bias1_ptr + expert * N + n, mask=n_in, other=0.0).to(tl.float32)
            if ACT == "silu":
                h = a / (1.0 + tl.exp(-a)) * u
            elif ACT == "gelu":
                h = 0.5 * a * (1.0 + tanh(0.7978845608028654 * (a + 0.044715 * a * a * a))) * u
            else:
                tl.static_assert(ACT == "swiglu_oai", "unknown activation")
                g = tl.minimum(a, 7.0)  # gpt-oss's limit and alpha, fixed in its code
                u = tl.minimum(tl.maximum(u, -7.0), 7.0)
                h = g / (1.0 + tl.exp(-1.702 * g)) * (u + 1.0)
        h = h.to(out_ptr.dtype.element_ty)
        if BLOCK_M == 1:
            tl.store(out_ptr + p.to(tl.int64) * N + n, h, mask=n_in)
        else:
            tl.store(out_ptr + p[:, None].to(tl.int64) * N + n[None, :], h, mask=m_in[:, None] & n_in[None, :])


@triton.jit
def _combine_kernel(y_ptr, out_ptr, H, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[t, cols] = sum over j of y[t * TOP_K + j, cols], j in order: the same bits every run."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (t * TOP_K + j) * H + cols, mask=mask, other=0.0)
    tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _block_m(tokens: int, pairs: int, n_expert: int) -> int:
    """Rows of a tile: 1 (one pair per program, the FMA loop) while pairs are few next to the experts, so that two
    tokens rarely share one (each pair reads its expert); else the smallest of 16 (tensor cores, each weight decoded
    once per 16 rows) and 32 at or above the mean pairs per expert chosen, else 64 (prefill: 128-row tiles would
    hold twice the gate and up sums of 64-row ones, which spill at 128 columns and 4 warps). Unmeasured on a GPU."""
    if tokens == 1 or 4 * pairs <= n_expert:
        return 1
    mean = pairs / min(n_expert, pairs)
    return next((bm for bm in (16, 32) if mean <= bm), 64)


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The configs whose BLOCK_N is at most `_MAX_BLOCK_N`'s for the launch, less those of `_SPILLING`."""
    form, down = min(kwargs["BLOCK_M"], 32), kwargs["ACT"] == "none"
    high = _MAX_BLOCK_N.get((form, kwargs["TYPE"]), (_OTHER_MAX_BLOCK_N[form],) * 2)[down]
    spilling = _SPILLING.get((form, kwargs["TYPE"]), (set(), set()))[down]
    return [c for c in configs if c.kwargs["BLOCK_N"] <= high and (c.kwargs["BLOCK_N"], c.num_warps) not in spilling
            ] or configs[:1]


@functools.cache
def _tuned(be: str, block_m: int):
    """The autotuned `_moe_kernel` for tiles of block_m rows on backend `be`."""
    configs = [triton.Config({"BLOCK_N": n}, num_warps=w) for n, w in _CONFIGS[min(block_m, 32)][be]]
    # cache_results: the timings persist in Triton's cache folder (see cache.py): a second start skips tuning.
    return triton.autotune(configs, key=["p_bucket", "N", "K", "TYPE", "ACT"],
                           prune_configs_by={"early_config_prune": _prune}, cache_results=True)(_moe_kernel)


def moe_route(router_logits: torch.Tensor, top_k: int, *, gating: str = "softmax", normalize: bool = False,
              scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int32 [T, top_k], weights float32 [T, top_k]): each token's experts, highest first, and their weights
    (see the module docstring; `normalize` applies to "softmax" gating)."""
    check_float(router_logits=router_logits)
    if router_logits.dim() != 2 or router_logits.shape[1] < 1:
        raise ValueError(f"router_logits must be [tokens, n_expert], got {tuple(router_logits.shape)}")
    check_last_dim_contiguous(router_logits=router_logits)
    T, E = router_logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in 1..n_expert ({E}), got {top_k}")
    if gating not in GATINGS:
        raise ValueError(f"gating must be one of {GATINGS}, got {gating!r}")
    ids = torch.empty((T, top_k), dtype=torch.int32, device=router_logits.device)
    weights = torch.empty((T, top_k), dtype=torch.float32, device=router_logits.device)
    if T:
        _route_kernel[(triton.cdiv(T, _ROUTE_TOKENS),)](
            router_logits, ids, weights, T, E, router_logits.stride(0), float(scale), TOP_K=top_k,
            K_POW2=triton.next_power_of_2(top_k), GATING=gating, NORMALIZE=normalize, BLOCK_T=_ROUTE_TOKENS,
            BLOCK_E=triton.next_power_of_2(E))
    return ids, weights


def moe_align(ids: torch.Tensor, n_expert: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pairs int32 [tiles * block_m], tile_expert int32 [tiles]) for expert ids [T, top_k] (see `_align_kernel`).
    tiles is the most any routing can need, (T * top_k + min(n_expert, T * top_k) * (block_m - 1)) // block_m, so
    that no count is read back to the host; the tiles past the last expert's are -1."""
    if ids.dtype != torch.int32 or ids.dim() != 2 or not ids.is_contiguous():
        raise ValueError(f"ids must be a contiguous int32 [tokens, top_k] tensor, got {ids.dtype} {tuple(ids.shape)}")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two, got {block_m}")
    P = ids.numel()
    tiles = (P + min(n_expert, P) * (block_m - 1)) // block_m
    pairs = torch.empty(tiles * block_m, dtype=torch.int32, device=ids.device)
    tile_expert = torch.empty(tiles, dtype=torch.int32, device=ids.device)
    if P:
        _align_kernel[(1,)](ids, pairs, tile_expert, P, n_expert, tiles, BLOCK_M=block_m,
                            BLOCK_E=triton.next_power_of_2(n_expert), CHUNK=_ALIGN_CHUNK, num_warps=8)
    return pairs, tile_expert


def _grouped(x: torch.Tensor, raw: torch.Tensor, raw1: torch.Tensor | None, t: GGMLType, shape: tuple[int, int, int],
             planar: bool, biases: tuple[torch.Tensor | None, torch.Tensor | None], out: torch.Tensor,
             pairs: torch.Tensor, tile_expert: torch.Tensor, route_w: torch.Tensor, top_k: int, act: str,
             block_m: int) -> torch.Tensor:
    """One `_moe_kernel` launch: out [pairs, N] for the experts raw (and raw1, gated) of type t and `shape`."""
    E, N, K = shape
    traits = TYPE_TRAITS[t]
    nb = K // traits.block_elements
    words = t in GEMV_TYPES
    raws = [r for r in (raw, raw1) if r is not None]
    row_bytes = nb * traits.block_bytes
    expert_bytes = N * row_bytes
    if words:
        layouts = [word_layout(r, t, shape, planar) for r in raws]
        raws = [r for r, _, _ in layouts]
        _, row_bytes, expert_bytes = layouts[0]
    be = backend(x.device)
    table = _value_table(t, x.device) if words else decode_table_tensor(t, x.device)
    bias0, bias1 = biases
    P = route_w.numel()
    _tuned(be, block_m)[lambda meta: (tile_expert.numel() * triton.cdiv(N, meta["BLOCK_N"]),)](
        x, raws[0], raws[-1], route_w if bias0 is None else bias0, route_w if bias1 is None else bias1,
        raws[0] if table is None else table, out, pairs, tile_expert, route_w, P,
        min(triton.next_power_of_2(P), _P_BUCKET_CAP), top_k, N, K, nb, x.stride(0), row_bytes, expert_bytes,
        TYPE=t.name, WORDS=words, QK=traits.block_elements,
        BLOCK_BYTES=traits.block_bytes, ACT=act, BIAS=bias0 is not None, BLOCK_M=block_m, BLOCK_K=_BLOCK_K[be],
        DENORMAL=be != "hip" and (block_m == 1 or x.dtype != torch.float16), F32=f32_dot(x),
    )
    return out


def fused_moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    top_k: int,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    ggml_types: Sequence[int],
    n_ff: int,
    *,
    gating: str = "softmax",
    normalize: bool = False,
    scale: float = 1.0,
    activation: str = "silu",
    biases: Sequence[torch.Tensor | None] | None = None,
    planar: bool = False,
    block_m: int | None = None,
) -> torch.Tensor:
    """The mixture-of-experts block of the module docstring for x [T, H]: [T, H] in x's dtype.

    router_logits: [T, n_expert] (float, last dim contiguous). gate, up, down: contiguous uint8 bytes of the
    [n_expert, n_ff, H], [n_expert, n_ff, H] and [n_expert, H, n_ff] expert tensors, of `ggml_types` (gate's, up's
    and down's; gate and up share one type), on x's device (CPU under TRITON_INTERPRET=1), 2-byte aligned (4 for
    F32). gating, normalize, scale: the routing (GATINGS). activation: one of ACTIVATIONS. biases: None or
    (gate's, up's, down's) float tensors [n_expert, n_ff], [n_expert, n_ff], [n_expert, H], all or none.
    planar: the experts of the types of `planar.RELAID_TYPES` are in `planar.to_planar`'s layout (MXFP4's: planes
    per expert). block_m: rows per tile (1, 16, 32 or 64; default `_block_m`'s choice).
    """
    types = _check(x, router_logits, top_k, gate, up, down, ggml_types, n_ff, activation, biases, block_m)
    T, H = x.shape
    E = router_logits.shape[1]
    ids, weights = moe_route(router_logits, top_k, gating=gating, normalize=normalize, scale=scale)
    out = torch.empty((T, H), dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    P = T * top_k
    block_m = block_m or _block_m(T, P, E)
    pairs, tile_expert = moe_align(ids, E, block_m)
    b_gate, b_up, b_down = biases if biases is not None else (None, None, None)
    h = torch.empty((P, n_ff), dtype=x.dtype, device=x.device)
    _grouped(x, gate, up, types[0], (E, n_ff, H), planar, (b_gate, b_up), h, pairs, tile_expert, weights, top_k,
             activation, block_m)
    y = torch.empty((P, H), dtype=torch.float32, device=x.device)
    _grouped(h, down, None, types[2], (E, H, n_ff), planar, (b_down, None), y, pairs, tile_expert, weights, top_k,
             "none", block_m)
    _combine_kernel[(T, triton.cdiv(H, _COMBINE_BLOCK))](y, out, H, TOP_K=top_k, BLOCK=_COMBINE_BLOCK)
    return out


def fused_moe_ref(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    top_k: int,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    ggml_types: Sequence[int],
    n_ff: int,
    *,
    gating: str = "softmax",
    normalize: bool = False,
    scale: float = 1.0,
    activation: str = "silu",
    biases: Sequence[torch.Tensor | None] | None = None,
    planar: bool = False,
    block_m: int | None = None,
) -> torch.Tensor:
    """Torch reference of `fused_moe`, in float32, or float64 for float64 x and logits (then also accepted): the
    chosen experts dequantized by the GGUF reference decoder, the slots added in order. block_m is not read."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    _check(x.to(torch.float32) if work == torch.float64 else x,
           router_logits.to(torch.float32) if router_logits.dtype == torch.float64 else router_logits,
           top_k, gate, up, down, ggml_types, n_ff, activation, biases, None)
    T, H = x.shape
    E = router_logits.shape[1]
    logits = router_logits.to(work)
    if gating == "softmax":
        probs = torch.softmax(logits, dim=1)
        weights, ids = torch.topk(probs, top_k, dim=1)
        if normalize:
            weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=_MIN_WEIGHT_SUM)
    elif gating == "softmax_weight":
        weights, ids = torch.topk(logits, top_k, dim=1)
        weights = torch.softmax(weights, dim=1)
    else:
        raise ValueError(f"gating must be one of {GATINGS}, got {gating!r}")
    weights = weights * scale
    b_gate, b_up, b_down = biases if biases is not None else (None, None, None)
    y = torch.zeros((T, top_k, H), dtype=work, device=x.device)
    xw = x.to(work)
    for e in ids.unique().tolist():  # only the chosen experts' bytes are read
        t, j = (ids == e).nonzero(as_tuple=True)
        wg, wu, wd = (_expert(raw, ggml_types[i], shape, e, E, planar).to(work)
                      for i, (raw, shape) in enumerate([(gate, (n_ff, H)), (up, (n_ff, H)), (down, (H, n_ff))]))
        g, u = xw[t] @ wg.t(), xw[t] @ wu.t()
        if b_gate is not None:
            g, u = g + b_gate[e].to(work), u + b_up[e].to(work)
        if activation == "silu":
            a = torch.nn.functional.silu(g) * u
        elif activation == "gelu":
            a = torch.nn.functional.gelu(g, approximate="tanh") * u
        else:
            a = swiglu_oai_ref(g, u)
        d = a @ wd.t()
        if b_down is not None:
            d = d + b_down[e].to(work)
        y[t, j] = d * weights[t, j, None]
    out = y[:, 0]
    for j in range(1, top_k):
        out = out + y[:, j]
    return out.to(x.dtype)


def swiglu_oai_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gpt-oss's gated activation (llama.cpp's ggml_swiglu_oai, alpha 1.702, limit 7): g = min(gate, 7),
    u = clamp(up, -7, 7), g * sigmoid(1.702 g) * (u + 1)."""
    g, u = gate.clamp(max=7.0), up.clamp(-7.0, 7.0)
    return g * torch.sigmoid(1.702 * g) * (u + 1.0)


def _expert(raw: torch.Tensor, ggml_type: int, shape: tuple[int, int], e: int, n_expert: int,
            planar: bool) -> torch.Tensor:
    """Expert e ([N, K] float32) of the raw [n_expert, N, K] tensor (planar: in planar.py's layout, for its types)."""
    t = GGMLType(ggml_type)
    size = raw.numel() // n_expert
    piece = raw[e * size:(e + 1) * size]
    if planar and t in RELAID_TYPES:
        piece = from_planar(piece, t, shape)
    return _gguf_dequantize(piece, t, shape)


def _check(x: torch.Tensor, router_logits: torch.Tensor, top_k: int, gate: torch.Tensor, up: torch.Tensor,
           down: torch.Tensor, ggml_types: Sequence[int], n_ff: int, activation: str,
           biases: Sequence[torch.Tensor | None] | None, block_m: int | None) -> tuple[GGMLType, GGMLType, GGMLType]:
    check_float(x=x, router_logits=router_logits)
    if x.dim() != 2:
        raise ValueError(f"x must be [tokens, hidden], got {tuple(x.shape)}")
    check_last_dim_contiguous(x=x, router_logits=router_logits)
    T, H = x.shape
    if router_logits.dim() != 2 or router_logits.shape[0] != T or router_logits.shape[1] < 1:
        raise ValueError(f"router_logits must be [{T}, n_expert] for x of {T} tokens, got {tuple(router_logits.shape)}")
    E = router_logits.shape[1]
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in 1..n_expert ({E}), got {top_k}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if block_m is not None and block_m not in (1, 16, 32, 64):
        raise ValueError(f"block_m must be 1, 16, 32 or 64, got {block_m}")
    if len(ggml_types) != 3:
        raise ValueError(f"ggml_types must give gate's, up's and down's types, got {len(ggml_types)}")
    if n_ff < 1:
        raise ValueError(f"n_ff must be positive, got {n_ff}")
    types = []
    for name, raw, ggml_type, shape in [("gate", gate, ggml_types[0], (E, n_ff, H)),
                                        ("up", up, ggml_types[1], (E, n_ff, H)),
                                        ("down", down, ggml_types[2], (E, H, n_ff))]:
        if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8 or not raw.is_contiguous():
            raise ValueError(f"{name} must be a contiguous uint8 torch tensor")
        try:
            t = check_size(raw.numel(), ggml_type, shape)
        except ValueError as e:
            raise ValueError(f"{name} experts: {e}") from None
        if raw.device != x.device:
            raise ValueError(f"{name} experts are on {raw.device}, x on {x.device}")
        align = 4 if t == GGMLType.F32 else 2
        if raw.data_ptr() % align:
            raise ValueError(f"{name} experts ({t.name}): raw bytes must be {align}-byte aligned")
        types.append(t)
    if types[0] != types[1]:
        raise ValueError(f"gate and up experts must share one type (one launch reads both), got {types[0].name} and "
                         f"{types[1].name}")
    if biases is not None:
        if len(biases) != 3 or any(b is None for b in biases):
            raise ValueError("biases must be None or gate's, up's and down's bias tensors, all three")
        for name, b, rows in [("gate", biases[0], n_ff), ("up", biases[1], n_ff), ("down", biases[2], H)]:
            if b.shape != (E, rows) or b.dtype not in FLOAT_DTYPES or not b.is_contiguous() or b.device != x.device:
                raise ValueError(f"{name} bias must be a contiguous float [{E}, {rows}] tensor on {x.device}, got "
                                 f"{b.dtype} {tuple(b.shape)} on {b.device}")
    return types[0], types[1], types[2]
