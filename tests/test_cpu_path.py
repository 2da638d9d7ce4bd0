"""The fast CPU backend ("cpu") against the float32 torch reference ops ("torch"), on random data.

Tolerances: the cpu backend rounds x, the products' sums and the int4 scales and zeros (or the weights of other
quantized types) to bfloat16, 8 significant bits: a relative error of a few 2^-9 per product, checked at <= 1e-2
(DESIGN.md, bf16 operands). Attention, RoPE and the KV store run in float32 as the references do: <= 1e-5.
Float-typed weights stay float32, so a model of F32 weights matches the reference to float32 rounding.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from ggtriton.gguf import TYPE_TRAITS, GGMLType
from ggtriton.gguf.quants import dequantize as dequantize_ref
from ggtriton.kernels.flash_attention import flash_attention_ref
from ggtriton.kernels.paged_decode import paged_decode_ref
from ggtriton.kernels.rope import rope_inv_freq
from ggtriton.kernels.rmsnorm import rmsnorm_ref
from ggtriton.kernels.rope_kv_store import rope_kv_store_ref
from ggtriton.runtime import LLM, SamplingParams
from ggtriton.runtime.engine import batch as batch_module
from ggtriton.runtime.engine.batch import ForwardBatch
from ggtriton.runtime.models import cpu_weights
from ggtriton.runtime.models.cpu_attention import CpuAttention
from ggtriton.runtime.models.cpu_weights import CpuWeight
from ggtriton.runtime.models.ops import Ops
from ggtriton.runtime.models.weights import QuantWeight
from ggtriton.runtime.synthetic import SyntheticModel, write_synthetic_model
from quant_weights import weight

CPU = torch.device("cpu")


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("ggml_type, kind", [
    (GGMLType.Q4_0, "int4"), (GGMLType.Q4_1, "int4"), (GGMLType.Q4_K, "int4"), (GGMLType.Q5_0, "int4x2"),
    (GGMLType.Q5_1, "int4x2"), (GGMLType.Q5_K, "int4x2"), (GGMLType.Q8_0, "int4x2"), (GGMLType.Q6_K, "bf16"),
    (GGMLType.F32, "dense")])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("packed", [False, True, "mixed"])
def test_cpu_weight_matches_dequantized_product(ggml_type, kind, rows, packed):
    """Two weights stacked in one product (q/k/v-like: 64 and 32 rows) against x @ W^T in float64: rows on the
    dense copy, on the packed weight, or some on each."""
    k = 256
    parts = [QuantWeight(f"w{i}", weight(ggml_type, n, k, CPU, seed=i), ggml_type, (n, k))
             for i, n in enumerate((64, 32))]
    w = CpuWeight(parts)
    assert w.kind == kind
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(7))
    ref = x.double() @ torch.cat([dequantize_ref(p.raw, p.ggml_type, p.shape) for p in parts]).double().t()
    if packed == "mixed":
        packed = torch.arange(rows) % 2 == 0
    out = w.matmul(x, packed=packed)
    assert out.dtype == torch.float32 and out.shape == (rows, 96)
    assert rel(out, ref) <= (1e-6 if kind == "dense" else 1e-2)


def test_int4_reads_fewer_bytes_than_float32():
    w = CpuWeight([QuantWeight("w", weight(GGMLType.Q4_K, 64, 512, CPU), GGMLType.Q4_K, (64, 512))])
    assert w.nbytes == 64 * 512 // 2 + 2 * 2 * 64 * 512 // 32  # nibbles + bf16 scale and zero per 32
    w = CpuWeight([QuantWeight("w", weight(GGMLType.Q8_0, 64, 512, CPU), GGMLType.Q8_0, (64, 512))])
    assert w.nbytes == 64 * 512 + 2 * 2 * 2 * 64 * 512 // 32  # two halves of nibbles, scales and zeros


@pytest.mark.parametrize("ggml_type", [GGMLType.Q8_0, GGMLType.Q5_0])
def test_split_product_is_exact_in_the_quants(ggml_type):
    """The two 4-bit halves lose nothing but the bfloat16 rounding of x, of the scales and of the output: with x
    bfloat16 already and every block's d one that bfloat16 holds, the product is the float64 x @ W^T to within the
    output's rounding (half a bfloat16 ulp: <= 2^-8 relative) and float32 sums."""
    n, k = 48, 256
    raw = weight(ggml_type, n, k, CPU, seed=4).reshape(-1, TYPE_TRAITS[ggml_type].block_bytes)
    raw[:, :2] = raw[:, :2].contiguous().view(torch.float16).to(torch.bfloat16).to(torch.float16).view(torch.uint8)
    w = CpuWeight([QuantWeight("w", raw.reshape(-1), ggml_type, (n, k))])
    assert w.kind == "int4x2"
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16).float()
    ref = x.double() @ dequantize_ref(raw.reshape(-1), ggml_type, (n, k)).double().t()
    err = (w.matmul(x, packed=True).double() - ref).abs()
    assert (err <= 2**-8 * ref.abs() + 1e-6 * ref.abs().max()).all()


@pytest.mark.parametrize("ggml_type, n, rows, packed", [
    (GGMLType.Q8_0, 17000, 1, True), (GGMLType.Q8_0, 17000, 20, False), (GGMLType.Q4_K, 20480, 3, True),
    (GGMLType.Q4_K, 20480, 3, False), (GGMLType.Q6_K, 48, 2, True)])
def test_top_sums_are_exact(ggml_type, n, rows, packed):
    """`matmul_top_exact`: TOP_EXACT sums of each row, the largest among them, are the float64 x @ W^T to float32
    rounding, the rest within the product's bfloat16 tolerance. More blocks than TOP_EXACT, N a whole number of
    them (20480) or not (17000), and fewer columns than TOP_EXACT (48); the packed and dense paths."""
    k = 256
    w = QuantWeight("w", weight(ggml_type, n, k, CPU, seed=3), ggml_type, (n, k))
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(9))
    ref = x.double() @ dequantize_ref(w.raw, ggml_type, w.shape).double().t()
    out = CpuWeight([w]).matmul_top_exact(x, packed=packed)
    assert out.dtype == torch.float32 and out.shape == (rows, n)
    exact = (out.double() - ref).abs() <= 1e-5 * ref.abs() + 1e-7 * ref.abs().max(-1, keepdim=True).values
    assert (exact.sum(-1) >= min(cpu_weights.TOP_EXACT, n)).all()
    assert exact.gather(1, ref.argmax(-1, keepdim=True)).all() and torch.equal(out.argmax(-1), ref.argmax(-1))
    assert rel(out, ref) <= 1e-2


@pytest.mark.parametrize("ggml_type", [GGMLType.Q4_K, GGMLType.Q5_0, GGMLType.Q6_K])
@pytest.mark.parametrize("n, k", [(96, 256), (640, 2048)])
def test_a_rows_sums_do_not_depend_on_the_rows_beside_it(ggml_type, n, k):
    """Each row of a product, alone and among 2, 3, 16, 17 and 40 rows with the packed and dense rows mixed, gets
    the same sums (`matmul`: bit for bit; the exact top sums of `matmul_top_exact`: to one float32 rounding step):
    what keeps a sequence's tokens independent of the batch it runs in."""
    w = CpuWeight([QuantWeight("w", weight(ggml_type, n, k, CPU, seed=6), ggml_type, (n, k))])
    g = torch.Generator().manual_seed(11)
    x = torch.randn(40, k, generator=g)
    packed = torch.rand(40, generator=g) < 0.5
    whole, whole_top = w.matmul(x, packed=packed), w.matmul_top_exact(x, packed=packed)
    for size in (1, 2, 3, 16, 17):
        for start in range(0, 40 - size + 1, size):
            rows = slice(start, start + size)
            assert torch.equal(w.matmul(x[rows], packed=packed[rows]), whole[rows]), (size, start)
            top = w.matmul_top_exact(x[rows], packed=packed[rows])
            assert torch.allclose(top, whole_top[rows], rtol=2**-23, atol=0), (size, start)


def test_top_sums_of_no_rows():
    w = QuantWeight("w", weight(GGMLType.Q4_K, 64, 256, CPU), GGMLType.Q4_K, (64, 256))
    for packed in (False, True):
        assert CpuWeight([w]).matmul_top_exact(torch.randn(0, 256), packed=packed).shape == (0, 64)


def test_cpu_weight_rejects_parts_of_different_k():
    parts = [QuantWeight(f"w{k}", weight(GGMLType.Q8_0, 32, k, CPU), GGMLType.Q8_0, (32, k)) for k in (64, 96)]
    with pytest.raises(ValueError, match="one K.*w64.*w96"):
        CpuWeight(parts)


def _batch(ctx: list[int], n_new: list[int], page: int, pages: int, shuffled: bool = True) -> ForwardBatch:
    """Sequences with ctx[b] tokens in all, the last n_new[b] of them new, on shuffled pages (or consecutive ones,
    which a lone sequence reads as a view of the cache)."""
    order = torch.randperm(pages, generator=torch.Generator().manual_seed(1)).tolist() if shuffled else list(
        range(pages))
    tables, used = [], 0
    for c in ctx:
        n = -(-c // page)
        tables.append(order[used: used + n])
        used += n
    return ForwardBatch.build([[1] * n for n in n_new], [c - n for c, n in zip(ctx, n_new)], tables, page, CPU)


def test_batch_marks_the_rows_past_each_prompt():
    """`ForwardBatch.generated`: a decode token, a prefill chunk, and a recomputed sequence whose chunk spans its
    prompt's end, in one step; steps of one kind are one bool."""
    build = partial(ForwardBatch.build, block_tables=[[0, 1], [2, 3], [4, 5]], block_size=8, device=CPU)
    mixed = build([[1], [1, 2, 3], [1, 2, 3, 4]], [9, 2, 3], prompt_lens=[9, 7, 5])
    assert mixed.generated.tolist() == [True, False, False, False, False, False, True, True]
    assert build([[1], [1, 2]], [9, 7], prompt_lens=[9, 7]).generated is True
    assert build([[1], [1, 2]], [3, 0], prompt_lens=[9, 7]).generated is False
    assert build([[1], [1, 2]], [9, 7]).generated is False  # no prompt lengths: prompt rows


@pytest.mark.parametrize("neox, rope_dim", [(False, 16), (True, 16), (True, 8)])
@pytest.mark.parametrize("ctx, n_new", [([5, 19, 33], [1, 1, 1]), ([21, 9], [21, 4]), ([19], [1])])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("shuffled", [True, False])
@pytest.mark.parametrize("one_projection", [False, True])
def test_cpu_attention_matches_references(neox, rope_dim, ctx, n_new, window, shuffled, one_projection):
    """RoPE + KV store, then attention (decode: three sequences, or one; prefill: one with a cached prefix), against
    the references on random queries and a random cache, NaN where no sequence has written (a shorter sequence's
    padding must not read it); pages shuffled or consecutive; q, k and v separate tensors or views into one
    projection's output rows (q and k then rotate as one)."""
    page, heads, kv_heads, d = 4, 4, 2, 16
    g = torch.Generator().manual_seed(sum(ctx) + rope_dim)
    batch = _batch(ctx, n_new, page, 24, shuffled)
    t = sum(n_new)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=g)

    def projections() -> list[torch.Tensor]:
        """q, k, v [t, H, d]: views into a copy of qkv, or separate copies."""
        parts = qkv.clone().split([heads * d, kv_heads * d, kv_heads * d], -1)
        return [p.reshape(t, -1, d) if one_projection else p.reshape(t, -1, d).clone() for p in parts]

    q, k, v = projections()
    caches = [torch.randn(24, page, kv_heads, d, generator=g) for _ in range(2)]
    written = torch.zeros(24 * page, dtype=torch.bool)  # rows no sequence has reached hold NaN (unwritten memory)
    for b, c in enumerate(ctx):
        written[(batch.block_tables[b, :, None] * page + torch.arange(page)).flatten()[:c]] = True
    for c in caches:
        c.view(-1, kv_heads, d)[~written] = float("nan")
    inv_freq, attn_factor = rope_inv_freq(rope_dim, 10000.0)
    attn_factor = 0.9  # a non-trivial magnitude factor (YaRN's)
    ref_q, ref_caches = q.clone(), [c.clone() for c in caches]
    rope_kv_store_ref(ref_q, k, v, *ref_caches, batch.slot_mapping, batch.positions, inv_freq, neox=neox,
                      attn_factor=attn_factor)
    ops = CpuAttention()
    for _ in range(2):  # the second call reads what the first made for the step
        out_q, out_k, out_v = projections()  # k may rotate in place (one projection's views)
        ops.rope_kv_store(out_q, out_k, out_v, *caches, batch.slot_mapping, batch.positions, inv_freq, neox=neox,
                          attn_factor=attn_factor)
    assert rel(out_q, ref_q) <= 1e-5 and rel(caches[0].nan_to_num(), ref_caches[0].nan_to_num()) <= 1e-5
    assert torch.equal(caches[1].nan_to_num(), ref_caches[1].nan_to_num())
    opts = {"scale": d**-0.5, "sliding_window": window, "soft_cap": None, "sinks": None}
    if batch.is_decode:
        ref = paged_decode_ref(ref_q, *ref_caches, batch.block_tables, batch.context_lens, **opts)
    else:
        ref = flash_attention_ref(ref_q, *ref_caches, batch.block_tables, batch.cu_seqlens_q, batch.context_lens,
                                  **opts)
    out = ops.attention(out_q, *caches, batch, **opts)
    assert out.shape == ref.shape and rel(out, ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
def test_qk_norm_matches_separate_norms(dtype, rows):
    """The cpu backend's q/k norm over one projection's views (one norm, weights stacked per head) against the
    reference norm of q and of k."""
    heads, kv_heads, d = 4, 2, 32
    g = torch.Generator().manual_seed(rows)
    qkv = (torch.randn(rows, (heads + 2 * kv_heads) * d, generator=g) * 3).to(dtype)
    q, k, _ = (p.reshape(rows, -1, d) for p in qkv.split([heads * d, kv_heads * d, kv_heads * d], -1))
    q_norm, k_norm = (torch.rand(d, generator=g) + 0.5 for _ in range(2))
    out_q, out_k = Ops("cpu", dtype).qk_norm(q, k, q_norm, k_norm, 1e-6)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel(out_q, rmsnorm_ref(q, q_norm, 1e-6)[0]) <= tol and rel(out_k, rmsnorm_ref(k, k_norm, 1e-6)[0]) <= tol


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """(F32 model, Q4_K model with a Q6_K output: int4 and bf16 products) of the gemma3 architecture: NeoX RoPE,
    q/k norms, post-norms, a sliding window."""
    out = []
    for name, wtype in (("f32", GGMLType.F32), ("q4k", GGMLType.Q4_K)):
        path = tmp_path_factory.mktemp("cpu") / f"{name}.gguf"
        write_synthetic_model(path, SyntheticModel("gemma3", n_layers=2, hidden=256, n_heads=4, n_kv_heads=2,
                                                   head_dim=64, ffn=512, vocab=320, weight_type=wtype,
                                                   sliding_window=8, seed=5))
        out.append(path)
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_cpu_backend_logits_match_float32_reference(tiny_models, monkeypatch, packed):
    """Next-token logits at every position (one prefill step; `packed`: every row taken for a generated token's,
    so every product on the packed weights, as decode runs them) of the cpu backend against the torch backend."""
    if packed:
        monkeypatch.setattr(batch_module, "_generated", lambda *args: True)
    tokens = torch.randint(3, 320, (24,), generator=torch.Generator().manual_seed(2)).tolist()
    for path, tol in zip(tiny_models, (1e-5, 2e-2)):
        ref, out = (LLM(path, device="cpu", backend=b, dtype=torch.float32, kv_cache_bytes=1 << 22).logits(tokens)
                    for b in ("torch", "cpu"))
        assert rel(out, ref) <= tol, path.name


def test_cpu_backend_decode_matches_float32_reference(tiny_models):
    """Greedy decode of two sequences at once (decode steps of one token per sequence, on the packed weights): each
    token it picks is, by the reference's logits of the same context, the top one or within bf16 rounding of it
    (a near tie may go either way)."""
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = [[5, 9, 11, 40, 7], [3, 4]]
    ref, fast = (LLM(tiny_models[1], device="cpu", backend=b, dtype=torch.float32, kv_cache_bytes=1 << 22)
                 for b in ("torch", "cpu"))
    for prompt, out in zip(prompts, fast.generate(prompts, params, use_tqdm=False)):
        assert len(out.token_ids) == 6
        logits = ref.logits(prompt + out.token_ids)[len(prompt) - 1: -1]
        picked = logits.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
        assert (logits.max(-1).values - picked <= 2e-2 * logits.abs().max(-1).values).all()
