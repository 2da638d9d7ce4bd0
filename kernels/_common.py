"""Pieces shared by the kernels of this folder: argument checks and small device functions."""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256  # the attention kernels' K/V tiles must fit in shared memory
LOG2E: tl.constexpr = tl.constexpr(math.log2(math.e))  # the attention kernels' logits are base 2


@triton.jit
def tanh(x):
    """tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|) in (0, 1]: never overflows; Triton has no portable tanh."""
    e = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -y, y)


@triton.jit
def to_bf16(v):
    """float32 -> bfloat16, round to nearest even (NaN stays NaN), spelled out: the interpreter's cast truncates."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits >> 16) | 0x40
    return tl.where(v != v, quiet_nan, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def dot(a, b, F32: tl.constexpr):
    """a @ b with float32 accumulation; F32: as exact float32 products (see `f32_dot`)."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


def f32_dot(t: torch.Tensor) -> bool:
    """Whether `dot` should multiply t's dtype as float32: float32 itself (else TF32 would round it), and
    bfloat16 in the interpreter, whose bfloat16 tl.dot returns garbage (Triton 3.9); a bfloat16 tensor core
    also forms exact products summed in float32, so the results agree."""
    return t.dtype == torch.float32 or (t.dtype == torch.bfloat16 and t.device.type == "cpu")


ARRIVAL_COUNTERS = 1 << 14


@functools.cache
def arrival_counters(device: torch.device) -> torch.Tensor:
    """ARRIVAL_COUNTERS int32 zeros on `device`, made once, before any CUDA graph capture: the counters with which
    the programs of a K-split launch find the last of them to finish, who combines their partial results and
    sets its counter back to 0. The kernels that use them run on one stream, one launch at a time."""
    return torch.zeros(ARRIVAL_COUNTERS, dtype=torch.int32, device=device)


def backend(device: torch.device) -> str:
    """Which config list a launch on `device` uses: "cuda", "hip" or "interpreter" (CPU tensors)."""
    if device.type == "cpu":
        return "interpreter"
    return "hip" if torch.version.hip else "cuda"


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors (compute units) of a GPU; 1 for CPU tensors (the interpreter)."""
    if device.type == "cpu":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def logit_scales(scale: float, soft_cap: float | None) -> tuple[float, float]:
    """(qk_scale, cap) for the attention kernels, which compute base-2 logits: capped,
    s = tanh(q.k * qk_scale) * cap = soft_cap * tanh(scale * q.k / soft_cap) * log2(e); else s = q.k * qk_scale."""
    if soft_cap is None:
        return scale * math.log2(math.e), 1.0
    return scale / soft_cap, soft_cap * math.log2(math.e)


def check_float(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_last_dim_contiguous(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim, got strides {t.stride()}")


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """K and V pages: [num_blocks, block_size, n_kv_heads, head_dim], one dtype (ggtriton.runtime.engine.kv_cache)."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache, v_cache must be [num_blocks, block_size, n_kv_heads, head_dim] alike, "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache and v_cache dtypes differ: {k_cache.dtype}, {v_cache.dtype}")
    check_float(k_cache=k_cache)
    check_last_dim_contiguous(k_cache=k_cache, v_cache=v_cache)


def check_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                context_lens: torch.Tensor, batch: int) -> None:
    """Checks the attention kernels share: q [tokens, n_heads, head_dim] against the cache and block tables."""
    check_cache(k_cache, v_cache)
    if q.dim() != 3 or q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"q must be [tokens, n_heads, {k_cache.shape[3]}], got {tuple(q.shape)}")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q dtype {q.dtype} differs from the cache dtype {k_cache.dtype}")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"n_heads {q.shape[1]} is not a multiple of n_kv_heads {k_cache.shape[2]}")
    check_last_dim_contiguous(q=q)
    if q.shape[2] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {q.shape[2]} is above {MAX_HEAD_DIM}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32 [{batch}, max_pages], got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    if context_lens.shape != (batch,) or context_lens.dtype != torch.int32:
        raise ValueError(f"context_lens must be int32 [{batch}], got {context_lens.dtype} "
                         f"{tuple(context_lens.shape)}")
    if not block_tables.is_contiguous() or not context_lens.is_contiguous():
        raise ValueError("block_tables and context_lens must be contiguous")
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, context_lens)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def gather_pages(cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """Keys (or values) of each sequence, [batch, max_len, n_kv_heads, head_dim]; rows past a length are junk."""
    bs = cache.shape[1]
    n_pages = -(-int(context_lens.max()) // bs) if len(context_lens) else 0
    pages = block_tables[:, :n_pages].long()
    # Table entries past a sequence's last page may be anything: point them at block 0, masked later.
    in_use = torch.arange(n_pages, device=pages.device) < (context_lens[:, None] + bs - 1) // bs
    pages = torch.where(in_use, pages, 0)
    return cache[pages].flatten(1, 2)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, kv_len: torch.Tensor,
                  *, scale: float, sliding_window: int | None, soft_cap: float | None,
                  sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Dense masked attention, the torch references' core, in float32 (float64 stays float64).

    q [B, T, H, D], k, v [B, L, KVH, D], q_pos [B, T], kv_len [B]. Query (b, t) sees the keys j with
    j <= q_pos[b, t], j < kv_len[b] and j > q_pos[b, t] - sliding_window; logits s = scale * q.k, then
    s = soft_cap * tanh(s / soft_cap) when capped. sinks [H] (gpt-oss): one more logit per head in the softmax's
    denominator, with no value. A query that sees no key gets 0.
    """
    b, t, h, d = q.shape
    kvh = k.shape[2]
    dt = torch.promote_types(q.dtype, torch.float32)
    s = torch.einsum("btkgd,blkd->bkgtl", q.to(dt).reshape(b, t, kvh, h // kvh, d), k.to(dt)) * scale
    if soft_cap is not None:
        s = soft_cap * torch.tanh(s / soft_cap)
    j = torch.arange(k.shape[1], device=q.device)
    written = j < kv_len[:, None]
    seen = (j <= q_pos[..., None]) & written[:, None]
    if sliding_window is not None:
        seen &= j > q_pos[..., None] - sliding_window
    s = s.masked_fill(~seen[:, None, None], float("-inf"))
    if sinks is not None:
        sink = sinks.to(dt).reshape(1, kvh, h // kvh, 1, 1).expand(*s.shape[:-1], 1)
        s = torch.cat([s, sink], dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num_(0.0)[..., : k.shape[1]]
    # Slots past a sequence's length were never written (may hold NaN): 0 * NaN would leak into the sum.
    v = v.to(dt).masked_fill(~written[:, :, None, None], 0.0)
    return torch.einsum("bkgtl,blkd->btkgd", p, v).reshape(b, t, h, d)


def check_sinks(sinks: torch.Tensor | None, n_heads: int, device: torch.device) -> None:
    """Attention sinks: None, or one float32 logit per query head."""
    if sinks is not None and (sinks.shape != (n_heads,) or sinks.dtype != torch.float32 or sinks.device != device
                              or not sinks.is_contiguous()):
        raise ValueError(f"sinks must be a contiguous float32 [{n_heads}] tensor on {device}, got {sinks.dtype} "
                         f"{tuple(sinks.shape)} on {sinks.device}")


def check_attention_options(scale: float, sliding_window: int | None, soft_cap: float | None) -> None:
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap must be positive or None, got {soft_cap}")
