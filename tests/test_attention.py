"""Prefill (flash) and decode (paged, split-K) attention and kv_store against naive float64 attention.

The tests run on `device`: the GPU, or the CPU with the kernels in the interpreter. Each case packs
sequences of 1, 15, 16, 17 and 100 new tokens behind cached prefixes that end on and off page boundaries,
with pages scattered over a shuffled cache whose unused slots hold NaN (a read outside a sequence's
context shows up as NaN).
"""

from __future__ import annotations

import math

import pytest
import torch

from ggtriton.kernels.flash_attention import flash_attention, flash_attention_ref
from ggtriton.kernels.kv_store import kv_store, kv_store_ref
from ggtriton.kernels.paged_decode import paged_decode, paged_decode_ref

Q_LENS = (1, 15, 16, 17, 100)
PREFIXES = (0, 5, 16, 3, 37)  # cached tokens before the new ones: none, mid-page, on a page edge
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


# Every float tensor the launchers allocate (outputs, split-K partials) starts as NaN.
pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, on the CPU (the naive references are CPU float64)."""
    out, ref = out.cpu().double(), ref.cpu().double()
    return ((out - ref).norm() / ref.norm()).item()


class Paged:
    """Dense per-sequence K/V (CPU float64 copies of the cache dtype's values) and the same in shuffled pages
    on `device`."""

    def __init__(self, ctx_lens, n_kv_heads, head_dim, dtype, block_size, seed, device):
        g = torch.Generator().manual_seed(seed)
        n_pages = [-(-c // block_size) for c in ctx_lens]
        num_blocks = sum(n_pages) + 3  # spare blocks stay NaN
        perm = torch.randperm(num_blocks, generator=g)
        shape = (num_blocks, block_size, n_kv_heads, head_dim)
        self.k_cache = torch.full(shape, math.nan, dtype=dtype)
        self.v_cache = torch.full(shape, math.nan, dtype=dtype)
        # Table padding points past the cache: the kernels must never read it.
        self.block_tables = torch.full((len(ctx_lens), max(n_pages) + 2), 10**6, dtype=torch.int32)
        self.k, self.v = [], []
        used = 0
        for b, (ctx, n) in enumerate(zip(ctx_lens, n_pages)):
            pages = perm[used : used + n]
            used += n
            self.block_tables[b, :n] = pages.int()
            k = torch.randn(ctx, n_kv_heads, head_dim, generator=g).to(dtype)
            v = torch.randn(ctx, n_kv_heads, head_dim, generator=g).to(dtype)
            pos = torch.arange(ctx)
            self.k_cache[pages[pos // block_size], pos % block_size] = k
            self.v_cache[pages[pos // block_size], pos % block_size] = v
            self.k.append(k.double())
            self.v.append(v.double())
        self.k_cache, self.v_cache = self.k_cache.to(device), self.v_cache.to(device)
        self.block_tables = self.block_tables.to(device)
        self.context_lens = torch.tensor(ctx_lens, dtype=torch.int32, device=device)


def naive_attention(q, k, v, ctx, scale, window, cap, sinks=None):
    """q [T, H, D] at positions ctx - T .. ctx - 1, k, v [ctx, KVH, D] CPU float64: dense softmax per head,
    in float64 on the CPU; sinks [H]: e^sink[h] added to head h's softmax denominator."""
    q = q.cpu().double()
    t, h, _ = q.shape
    group = h // k.shape[1]
    pos = torch.arange(ctx - t, ctx)[:, None]
    j = torch.arange(ctx)[None, :]
    allowed = (j <= pos) & ((j > pos - window) if window else True)
    out = torch.empty_like(q)
    for head in range(h):
        s = q[:, head] @ k[:, head // group].T * scale
        if cap:
            s = cap * torch.tanh(s / cap)
        s = s.masked_fill(~allowed, -math.inf)
        sink = -math.inf if sinks is None else float(sinks[head])
        m = s.max(-1, keepdim=True).values.clamp(min=sink)
        p = torch.exp(s - m)
        out[:, head] = (p / (p.sum(-1, keepdim=True) + torch.exp(sink - m))) @ v[:, head // group]
    return out


# (head_dim, GQA ratio, n_kv_heads, dtype, sliding window, soft cap, block size): every head dim, every
# ratio and dtype, windows of 1 (only itself), 8, one page, 20, 24 and longer than any context, caps,
# pages of 8 and 16 (a key tile straddles pages) and 32 (a window starts key tiles mid-page).
CASES = [
    (64, 1, 2, torch.float32, None, None, 16),
    (80, 4, 1, torch.float16, None, None, 16),
    (96, 8, 1, torch.bfloat16, None, None, 8),
    (128, 4, 1, torch.float32, 8, None, 16),
    (256, 1, 1, torch.float16, None, 30.0, 32),
    (128, 1, 2, torch.bfloat16, 20, 5.0, 16),
    (64, 8, 1, torch.float32, 1, 2.0, 8),
    (80, 1, 1, torch.float32, 16, None, 16),
    (96, 4, 1, torch.float32, 24, 10.0, 32),
    (256, 8, 1, torch.float32, 1000, None, 16),
]


def _ids(case):
    d, ratio, kvh, dtype, window, cap, bs = case
    return f"d{d}-gqa{ratio}-{str(dtype)[6:]}-win{window}-cap{cap}-bs{bs}"


@pytest.mark.parametrize("case", CASES, ids=map(_ids, CASES))
def test_flash_attention(case, device):
    head_dim, ratio, n_kv_heads, dtype, window, cap, block_size = case
    ctx_lens = [p + q for p, q in zip(PREFIXES, Q_LENS)]
    paged = Paged(ctx_lens, n_kv_heads, head_dim, dtype, block_size, seed=head_dim + ratio, device=device)
    n_heads = ratio * n_kv_heads
    q = torch.randn(sum(Q_LENS), n_heads, head_dim, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    cu = torch.tensor([0, *torch.tensor(Q_LENS).cumsum(0).tolist()], dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    args = (q, paged.k_cache, paged.v_cache, paged.block_tables, cu, paged.context_lens)
    opts = dict(scale=scale, sliding_window=window, soft_cap=cap)
    out = flash_attention(*args, **opts, max_seqlen_q=max(Q_LENS))
    ref = flash_attention_ref(*args, **opts)
    expect = torch.cat([
        naive_attention(q[cu[b] : cu[b + 1]].double(), paged.k[b], paged.v[b], ctx_lens[b], scale, window, cap)
        for b in range(len(Q_LENS))
    ])
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, expect) <= TOL[dtype]
    assert rel_err(ref, expect) <= TOL[dtype]
    # The launcher reads max_seqlen_q itself when not given.
    assert torch.equal(flash_attention(*args, **opts), out)


@pytest.mark.parametrize("dtype", list(TOL), ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_flash_attention_sweep(head_dim, dtype, device):
    """Every head dim in every dtype, on a smaller batch: 1 and 17 new tokens behind mid-page prefixes."""
    q_lens, ctx_lens = [1, 17], [4, 40]
    paged = Paged(ctx_lens, 1, head_dim, dtype, 16, seed=head_dim, device=device)
    q = torch.randn(sum(q_lens), 2, head_dim, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    cu = torch.tensor([0, 1, 18], dtype=torch.int32, device=device)
    out = flash_attention(q, paged.k_cache, paged.v_cache, paged.block_tables, cu, paged.context_lens, scale=0.2)
    expect = torch.cat([naive_attention(q[:1].double(), paged.k[0], paged.v[0], 4, 0.2, None, None),
                        naive_attention(q[1:].double(), paged.k[1], paged.v[1], 40, 0.2, None, None)])
    assert rel_err(out, expect) <= TOL[dtype]


# (head_dim, GQA ratio, n_kv_heads, dtype, window, cap, block size, splits): one split (no reduce),
# several (some empty past a short context), and the default choice.
DECODE_CASES = [
    (64, 1, 2, torch.float32, None, None, 16, 1),
    (80, 4, 2, torch.float16, None, None, 16, 3),
    (96, 8, 1, torch.bfloat16, None, 20.0, 8, 4),
    (128, 4, 1, torch.float32, 7, None, 16, 2),
    (256, 8, 1, torch.float32, None, 2.0, 32, None),
    (128, 1, 1, torch.float16, 16, 5.0, 8, 5),
    (64, 8, 1, torch.float32, 1, None, 16, 3),
    (80, 1, 1, torch.bfloat16, 33, None, 16, None),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: _ids(c[:7]) + f"-split{c[7]}")
def test_paged_decode(case, device):
    head_dim, ratio, n_kv_heads, dtype, window, cap, block_size, splits = case
    ctx_lens = [p + q for p, q in zip(PREFIXES, Q_LENS)] + [1, 0]  # a fresh sequence, a padding row
    paged = Paged(ctx_lens, n_kv_heads, head_dim, dtype, block_size, seed=head_dim * ratio, device=device)
    n_heads = ratio * n_kv_heads
    q = torch.randn(len(ctx_lens), n_heads, head_dim, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    scale = head_dim**-0.5
    args = (q, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens)
    opts = dict(scale=scale, sliding_window=window, soft_cap=cap)
    out = paged_decode(*args, **opts, num_splits=splits)
    ref = paged_decode_ref(*args, **opts)
    expect = torch.stack([
        naive_attention(q[b : b + 1].double(), paged.k[b], paged.v[b], c, scale, window, cap)[0]
        if c else torch.zeros(n_heads, head_dim, dtype=torch.float64)
        for b, c in enumerate(ctx_lens)
    ])
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, expect) <= TOL[dtype]
    assert rel_err(ref, expect) <= TOL[dtype]
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))


@pytest.mark.parametrize("dtype", list(TOL), ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_paged_decode_sweep(head_dim, dtype, device):
    """Every head dim in every dtype, two splits, GQA 4."""
    ctx_lens = [3, 16, 45]
    paged = Paged(ctx_lens, 1, head_dim, dtype, 16, seed=head_dim, device=device)
    q = torch.randn(3, 4, head_dim, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    out = paged_decode(q, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens, scale=0.2,
                       num_splits=2)
    expect = torch.stack([naive_attention(q[b : b + 1].double(), paged.k[b], paged.v[b], c, 0.2, None, None)[0]
                          for b, c in enumerate(ctx_lens)])
    assert rel_err(out, expect) <= TOL[dtype]


def test_decode_matches_last_prefill_row(device):
    """The two kernels agree on a sequence's last token (split-K against one pass, float32)."""
    paged = Paged([300], 2, 64, torch.float32, 16, seed=3, device=device)
    q = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(4)).to(device)
    cu = torch.tensor([0, 1], dtype=torch.int32, device=device)
    common = (paged.k_cache, paged.v_cache, paged.block_tables)
    prefill = flash_attention(q, *common, cu, paged.context_lens, scale=0.125, sliding_window=100)
    decode = paged_decode(q, *common, paged.context_lens, scale=0.125, sliding_window=100, num_splits=4)
    assert rel_err(decode, prefill.double()) <= 1e-6


def _sinks(n_heads: int, seed: int) -> torch.Tensor:
    """Sink logits around the attention logits' range, one far above it (the sink takes nearly all the weight) and
    one far below (none)."""
    sinks = 2 * torch.randn(n_heads, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    sinks[0] = 9.0
    sinks[-1] = -30.0
    return sinks


# (head_dim, GQA ratio, n_kv_heads, dtype, window, cap, block size): attention sinks with and without windows
# (a window of 1 sees only its own key), GQA, soft caps, pages a key tile straddles.
SINK_CASES = [
    (64, 4, 2, torch.float32, None, None, 16),
    (80, 2, 2, torch.float32, 8, None, 8),
    (96, 8, 1, torch.bfloat16, 20, None, 16),
    (64, 1, 3, torch.float16, 1, 5.0, 32),
]


@pytest.mark.parametrize("case", SINK_CASES, ids=map(_ids, SINK_CASES))
def test_flash_attention_sinks(case, device):
    head_dim, ratio, n_kv_heads, dtype, window, cap, block_size = case
    q_lens, prefixes = (1, 17, 40), (0, 5, 16)
    ctx_lens = [p + q for p, q in zip(prefixes, q_lens)]
    paged = Paged(ctx_lens, n_kv_heads, head_dim, dtype, block_size, seed=head_dim + 11, device=device)
    n_heads = ratio * n_kv_heads
    q = torch.randn(sum(q_lens), n_heads, head_dim, generator=torch.Generator().manual_seed(8)).to(device, dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    sinks = _sinks(n_heads, head_dim)
    args = (q, paged.k_cache, paged.v_cache, paged.block_tables, cu, paged.context_lens)
    opts = dict(scale=head_dim**-0.5, sliding_window=window, soft_cap=cap, sinks=sinks.float().to(device))
    out = flash_attention(*args, **opts)
    ref = flash_attention_ref(*args, **opts)
    expect = torch.cat([naive_attention(q[cu[b] : cu[b + 1]].double(), paged.k[b], paged.v[b], ctx_lens[b],
                                        head_dim**-0.5, window, cap, sinks) for b in range(len(q_lens))])
    assert rel_err(out, expect) <= TOL[dtype]
    assert rel_err(ref, expect) <= TOL[dtype]
    # the sinks change the answer: a kernel that ignored them would not pass
    plain = naive_attention(q[:1].double(), paged.k[0], paged.v[0], 1, head_dim**-0.5, window, cap)
    assert rel_err(plain, expect[:1]) > 0.5


# (..., splits): one split (the sink as the first key), several with empty ones past a short context (the sink
# counted once, in the combine), and the default choice.
SINK_DECODE_CASES = [
    (64, 4, 2, torch.float32, None, None, 16, 1),
    (64, 4, 2, torch.float32, None, None, 16, 5),
    (80, 8, 1, torch.bfloat16, 24, None, 8, 3),
    (96, 2, 2, torch.float16, 7, 10.0, 16, None),
]


@pytest.mark.parametrize("case", SINK_DECODE_CASES, ids=lambda c: _ids(c[:7]) + f"-split{c[7]}")
def test_paged_decode_sinks(case, device):
    head_dim, ratio, n_kv_heads, dtype, window, cap, block_size, splits = case
    ctx_lens = [1, 17, 45, 100, 0]  # a fresh sequence, ..., a padding row
    paged = Paged(ctx_lens, n_kv_heads, head_dim, dtype, block_size, seed=head_dim + 12, device=device)
    n_heads = ratio * n_kv_heads
    q = torch.randn(len(ctx_lens), n_heads, head_dim, generator=torch.Generator().manual_seed(9)).to(device, dtype)
    sinks = _sinks(n_heads, head_dim + 1)
    args = (q, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens)
    opts = dict(scale=head_dim**-0.5, sliding_window=window, soft_cap=cap, sinks=sinks.float().to(device))
    out = paged_decode(*args, **opts, num_splits=splits)
    ref = paged_decode_ref(*args, **opts)
    expect = torch.stack([
        naive_attention(q[b : b + 1].double(), paged.k[b], paged.v[b], c, head_dim**-0.5, window, cap, sinks)[0]
        if c else torch.zeros(n_heads, head_dim, dtype=torch.float64)
        for b, c in enumerate(ctx_lens)
    ])
    assert rel_err(out, expect) <= TOL[dtype]
    assert rel_err(ref, expect) <= TOL[dtype]
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_kv_heads,head_dim,block_size", [(1, 64, 16), (3, 80, 8), (2, 256, 32)])
def test_kv_store(n_kv_heads, head_dim, block_size, dtype, device):
    g = torch.Generator().manual_seed(head_dim)
    num_blocks, n = 6, 23
    cache = [torch.randn(num_blocks, block_size, n_kv_heads, head_dim, generator=g).to(device, dtype)
             for _ in range(2)]
    slots = torch.randperm(num_blocks * block_size, generator=g)[:n]
    slots[::5] = -1
    slots = slots.to(device)
    # k and v as views into a fused [n, 3 * heads * head_dim] projection output, as a model passes them.
    qkv = torch.randn(n, 3 * n_kv_heads * head_dim, generator=g).to(device, dtype)
    k, v = (qkv[:, i * n_kv_heads * head_dim : (i + 1) * n_kv_heads * head_dim].view(n, n_kv_heads, head_dim)
            for i in (1, 2))
    expect = [c.clone() for c in cache]
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            expect[0][s // block_size, s % block_size] = k[t]
            expect[1][s // block_size, s % block_size] = v[t]
    out = [c.clone() for c in cache]
    kv_store(k, v, *out, slots)
    assert all(torch.equal(a, b) for a, b in zip(out, expect))
    out = [c.clone() for c in cache]
    kv_store_ref(k, v, *out, slots)
    assert all(torch.equal(a, b) for a, b in zip(out, expect))


def test_store_then_attend(device):
    """The runtime's order: kv_store the new tokens behind a cached prefix, then flash_attention."""
    head_dim, block_size, prefix, new = 64, 16, 21, 12
    paged = Paged([prefix + new], 1, head_dim, torch.float32, block_size, seed=5, device=device)
    k_new, v_new = paged.k[0][prefix:].float().to(device), paged.v[0][prefix:].float().to(device)
    pos = torch.arange(prefix, prefix + new, device=device)
    table = paged.block_tables[0].long()
    slots = table[pos // block_size] * block_size + pos % block_size
    paged.k_cache.view(-1, 1, head_dim)[slots] = math.nan  # the new tokens are not in the cache yet
    paged.v_cache.view(-1, 1, head_dim)[slots] = math.nan
    kv_store(k_new, v_new, paged.k_cache, paged.v_cache, slots)
    q = torch.randn(new, 2, head_dim, generator=torch.Generator().manual_seed(6)).to(device)
    cu = torch.tensor([0, new], dtype=torch.int32, device=device)
    out = flash_attention(q, paged.k_cache, paged.v_cache, paged.block_tables, cu, paged.context_lens, scale=0.1)
    expect = naive_attention(q.double(), paged.k[0], paged.v[0], prefix + new, 0.1, None, None)
    assert rel_err(out, expect) <= 1e-5


def test_bad_arguments(device):
    paged = Paged([5], 2, 64, torch.float16, 16, seed=7, device=device)
    cache = (paged.k_cache, paged.v_cache, paged.block_tables)
    cu = torch.tensor([0, 5], dtype=torch.int32, device=device)
    q = torch.randn(5, 4, 64, device=device).half()
    with pytest.raises(ValueError, match="dtype"):
        flash_attention(q.float(), *cache, cu, paged.context_lens, scale=0.1)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        flash_attention(q[:, :3], *cache, cu, paged.context_lens, scale=0.1)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        flash_attention(q, *cache, cu.long(), paged.context_lens, scale=0.1)
    with pytest.raises(ValueError, match="sliding_window"):
        paged_decode(q[:1], *cache, paged.context_lens, scale=0.1, sliding_window=0)
    with pytest.raises(ValueError, match="context_lens"):
        paged_decode(q[:1], *cache, paged.context_lens.long(), scale=0.1)
    with pytest.raises(ValueError, match=r"sinks must be a contiguous float32 \[4\]"):
        paged_decode(q[:1], *cache, paged.context_lens, scale=0.1, sinks=torch.zeros(2, device=device))
    with pytest.raises(ValueError, match="sinks"):
        flash_attention(q, *cache, cu, paged.context_lens, scale=0.1, sinks=torch.zeros(4, device=device).half())
    with pytest.raises(ValueError, match="slot_mapping"):
        kv_store(q[:, :2], q[:, :2], paged.k_cache, paged.v_cache, torch.zeros(5, dtype=torch.int32, device=device))
