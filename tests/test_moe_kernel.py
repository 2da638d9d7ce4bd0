"""The fused MoE op (kernels/moe.py): routing, sorting by expert and the grouped products over GGUF expert blocks,
against float64 torch references, on `device`. Shapes are kept small for the interpreter: the K-quant experts sit
beside float or 32-element experts, so that a hidden size or n_ff of one block is not a multiple of the row tile."""

from __future__ import annotations

import pytest
import torch

from ggtriton.gguf import GGMLType
from ggtriton.kernels import fused_moe
from ggtriton.kernels.moe import fused_moe_ref, moe_align, moe_route
from ggtriton.kernels.planar import to_planar
from quant_weights import weight

pytestmark = pytest.mark.usefixtures("poisoned_outputs")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
Q = GGMLType


def experts(ggml_types: tuple[GGMLType, GGMLType], n_expert: int, hidden: int, n_ff: int, device: torch.device,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw gate, up ([n_expert, n_ff, hidden]) and down ([n_expert, hidden, n_ff]) experts of random valid blocks."""
    gate_up, down = ggml_types
    gate = weight(gate_up, n_expert * n_ff, hidden, device, seed)
    up = weight(gate_up, n_expert * n_ff, hidden, device, seed + 1)
    return gate, up, weight(down, n_expert * hidden, n_ff, device, seed + 2)


def moe_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double().cpu() - ref.cpu()).norm() / ref.norm()).item()


def run(ggml_types: tuple[GGMLType, GGMLType], hidden: int, n_ff: int, n_expert: int, top_k: int, tokens: int,
        dtype: torch.dtype, block_m: int | None, device: torch.device, logits: torch.Tensor | None = None,
        **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(fused_moe's output, the float64 reference) on random x, logits and experts."""
    gen = torch.Generator().manual_seed(tokens + n_expert)
    gate, up, down = experts(ggml_types, n_expert, hidden, n_ff, device, seed=hidden + n_ff)
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    if logits is None:
        logits = torch.randn(tokens, n_expert, generator=gen)
    logits = logits.to(device)
    types = (ggml_types[0], ggml_types[0], ggml_types[1])
    args = (top_k, gate, up, down, types, n_ff)
    out = fused_moe(x, logits, *args, block_m=block_m, **options)
    ref = fused_moe_ref(x.double(), logits.double(), *args, **options)
    assert out.shape == x.shape and out.dtype == dtype
    return out, ref


# (gate/up type, down type), hidden, n_ff, n_expert, top_k, tokens, x dtype, rows per tile, options. Every type the
# real models use (Q4_K, Q5_K, Q6_K, Q8_0, MXFP4) and Q4_0, IQ4_XS, Q2_K and IQ4_NL (element decoders); each form
# (1: one pair per program; 16; 32: GEMM tiles); hidden and n_ff of one block, and of 40 (a partial row tile).
CASES = [
    ((Q.Q4_K, Q.F32), 256, 40, 4, 2, 3, torch.float32, 1, {"normalize": True}),
    ((Q.Q4_K, Q.F16), 256, 40, 6, 3, 17, torch.bfloat16, 32, {"normalize": True}),
    ((Q.Q5_K, Q.Q8_0), 256, 64, 6, 2, 3, torch.bfloat16, 16, {"normalize": True}),
    ((Q.F16, Q.Q6_K), 40, 256, 4, 2, 3, torch.float32, 1, {}),
    ((Q.F32, Q.Q6_K), 40, 256, 5, 2, 3, torch.bfloat16, 16, {}),
    ((Q.F16, Q.Q4_K), 40, 256, 4, 1, 3, torch.float32, 16, {"activation": "gelu"}),
    ((Q.Q8_0, Q.Q8_0), 64, 64, 16, 4, 17, torch.bfloat16, 16, {"normalize": True}),
    ((Q.Q4_0, Q.Q4_0), 64, 64, 8, 2, 70, torch.float32, 32, {}),
    ((Q.IQ4_XS, Q.F16), 256, 40, 4, 2, 1, torch.float32, None, {"normalize": True}),
    ((Q.Q2_K, Q.F16), 256, 40, 4, 2, 3, torch.float32, 1, {"activation": "gelu"}),
    ((Q.IQ4_NL, Q.IQ4_NL), 64, 64, 8, 3, 17, torch.bfloat16, 16, {}),
]


@pytest.mark.parametrize(("types", "hidden", "n_ff", "n_expert", "top_k", "tokens", "dtype", "block_m", "options"),
                         CASES, ids=[f"{c[0][0].name}-{c[0][1].name}-T{c[5]}-{str(c[6])[6:]}-M{c[7]}" for c in CASES])
def test_fused_moe_matches_reference(types, hidden, n_ff, n_expert, top_k, tokens, dtype, block_m, options,
                                     device) -> None:
    out, ref = run(types, hidden, n_ff, n_expert, top_k, tokens, dtype, block_m, device, **options)
    assert moe_error(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpt_oss_experts(dtype: torch.dtype, device) -> None:
    # MXFP4 experts with biases, top-k on the logits then a softmax over the chosen, the clamped SwiGLU
    n_expert, hidden, n_ff = 8, 64, 64
    gen = torch.Generator().manual_seed(7)
    biases = [torch.randn(n_expert, n, generator=gen).to(device) for n in (n_ff, n_ff, hidden)]
    out, ref = run((Q.MXFP4, Q.MXFP4), hidden, n_ff, n_expert, 4, 3, dtype, 1 if dtype == torch.float32 else 16,
                   device, gating="softmax_weight", activation="swiglu_oai", biases=biases, scale=0.5)
    assert moe_error(out, ref) <= TOL[dtype]


@pytest.mark.parametrize(("tokens", "top_k"), [(1, 8), (2, 1)], ids=str)
def test_decode_top_k(tokens: int, top_k: int, device) -> None:
    out, ref = run((Q.Q8_0, Q.Q8_0), 64, 64, 16, top_k, tokens, torch.float32, None, device, normalize=True)
    assert moe_error(out, ref) <= TOL[torch.float32]


def test_all_tokens_on_one_expert_and_idle_experts(device) -> None:
    # 17 tokens all choose expert 2 first: two tiles of 16 for it, experts 0 and 4..7 get nothing
    logits = torch.randn(17, 8, generator=torch.Generator().manual_seed(1))
    logits[:, 2] += 100.0
    logits[:, 4:] -= 100.0
    out, ref = run((Q.Q8_0, Q.Q4_0), 64, 64, 8, 2, 17, torch.float32, 16, device, logits=logits)
    assert moe_error(out, ref) <= TOL[torch.float32]


def test_only_chosen_experts_are_read(device) -> None:
    # the experts no token chooses filled with 0xFF bytes (NaN scales of the Q4_K gate and up, NaN floats of the F32
    # down): the output is unchanged, the same bits
    n_expert, hidden, n_ff, tokens = 6, 256, 40, 3
    gate, up, down = experts((Q.Q4_K, Q.F32), n_expert, hidden, n_ff, device, seed=3)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(4)).to(device)
    logits = torch.randn(tokens, n_expert, generator=torch.Generator().manual_seed(5))
    logits[:, [1, 4]] -= 100.0
    args = (logits.to(device), 2, gate, up, down, (Q.Q4_K, Q.Q4_K, Q.F32), n_ff)
    clean = fused_moe(x, *args, block_m=1)
    for raw in (gate, up, down):
        per_expert = raw.numel() // n_expert
        for e in (1, 4):
            raw[e * per_expert:(e + 1) * per_expert] = 0xFF
    poisoned = fused_moe(x, *args, block_m=1)
    assert torch.isfinite(poisoned).all() and torch.equal(poisoned, clean)


def test_planar_experts(device) -> None:
    # Q6_K and Q8_0 experts given in the planar layout (relaid once, as a model loads them) or as the file has them;
    # Q6_K's rows of one block (210 bytes) relaid per call with rows padded to whole words
    n_expert, hidden, n_ff = 4, 64, 256
    gate, up, down = experts((Q.Q8_0, Q.Q6_K), n_expert, hidden, n_ff, device, seed=9)
    x = torch.randn(2, hidden, generator=torch.Generator().manual_seed(9)).to(device)
    logits = torch.randn(2, n_expert, generator=torch.Generator().manual_seed(10)).to(device)
    types = (Q.Q8_0, Q.Q8_0, Q.Q6_K)
    file_layout = fused_moe(x, logits, 2, gate, up, down, types, n_ff, block_m=16)
    planar = [to_planar(r, t, s) for r, t, s in [(gate, Q.Q8_0, (n_expert, n_ff, hidden)),
                                                 (up, Q.Q8_0, (n_expert, n_ff, hidden)),
                                                 (down, Q.Q6_K, (n_expert, hidden, n_ff))]]
    assert torch.equal(fused_moe(x, logits, 2, *planar, types, n_ff, planar=True, block_m=16), file_layout)


@pytest.mark.parametrize(("block_m", "dtype"), [(1, torch.float32), (16, torch.bfloat16), (32, torch.float32)],
                         ids=str)
def test_mxfp4_experts_in_planes_per_expert(block_m: int, dtype: torch.dtype, device) -> None:
    # gpt-oss's experts on qgemv's word decoders: in MXFP4's planes per expert (relaid once, as a model loads them)
    # or as the file has them (relaid per call), the same bits; 9 blocks per gate/up row (a step of 8 and one more);
    # one row of x per program: 2 tokens (4 token-expert pairs) cover it, tiles: an odd 5
    n_expert, hidden, n_ff, tokens = 4, 288, 64, 2 if block_m == 1 else 5
    gate, up, down = experts((Q.MXFP4, Q.MXFP4), n_expert, hidden, n_ff, device, seed=11)
    gen = torch.Generator().manual_seed(block_m)
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    logits = torch.randn(tokens, n_expert, generator=gen).to(device)
    types = (Q.MXFP4, Q.MXFP4, Q.MXFP4)
    options = {"gating": "softmax_weight", "activation": "swiglu_oai", "block_m": block_m}
    file_layout = fused_moe(x, logits, 2, gate, up, down, types, n_ff, **options)
    planar = [to_planar(r, Q.MXFP4, s) for r, s in [(gate, (n_expert, n_ff, hidden)), (up, (n_expert, n_ff, hidden)),
                                                    (down, (n_expert, hidden, n_ff))]]
    assert torch.equal(fused_moe(x, logits, 2, *planar, types, n_ff, planar=True, **options), file_layout)
    ref = fused_moe_ref(x.double(), logits.double(), 2, *planar, types, n_ff, planar=True, **options)
    assert moe_error(file_layout, ref) <= TOL[dtype]


def test_mxfp4_experts_off_word_boundaries(device) -> None:
    # 37 rows of 2 blocks: an expert's 1258 bytes would leave the next one's planes 2-byte aligned, which the word
    # loads cannot take: each call relays them at a stride of whole 16 bytes per expert (from the file's layout, or
    # the planes per expert put back first)
    n_expert, hidden, n_ff, tokens = 3, 64, 37, 4
    gate, up, down = experts((Q.MXFP4, Q.F16), n_expert, hidden, n_ff, device, seed=12)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(3)).to(device)
    logits = torch.randn(tokens, n_expert, generator=torch.Generator().manual_seed(4)).to(device)
    types = (Q.MXFP4, Q.MXFP4, Q.F16)
    file_layout = fused_moe(x, logits, 2, gate, up, down, types, n_ff, block_m=1)
    planar = [to_planar(r, Q.MXFP4, (n_expert, n_ff, hidden)) for r in (gate, up)]
    assert torch.equal(fused_moe(x, logits, 2, *planar, down, types, n_ff, planar=True, block_m=1), file_layout)
    ref = fused_moe_ref(x.double(), logits.double(), 2, gate, up, down, types, n_ff)
    assert moe_error(file_layout, ref) <= TOL[torch.float32]


@pytest.mark.parametrize(("gating", "normalize"), [("softmax", True), ("softmax", False), ("softmax_weight", False)])
@pytest.mark.parametrize(("tokens", "n_expert", "top_k"), [(1, 4, 4), (17, 7, 2), (70, 16, 8)], ids=str)
def test_routing(gating: str, normalize: bool, tokens: int, n_expert: int, top_k: int, device) -> None:
    logits = torch.randn(tokens, n_expert, generator=torch.Generator().manual_seed(tokens)).to(device)
    ids, weights = moe_route(logits, top_k, gating=gating, normalize=normalize, scale=2.0)
    l64 = logits.double().cpu()
    if gating == "softmax":
        ref_w, ref_ids = torch.topk(torch.softmax(l64, dim=1), top_k, dim=1)
        if normalize:
            ref_w = ref_w / ref_w.sum(dim=1, keepdim=True)
    else:
        ref_w, ref_ids = torch.topk(l64, top_k, dim=1)
        ref_w = torch.softmax(ref_w, dim=1)
    assert ids.dtype == torch.int32 and torch.equal(ids.long().cpu(), ref_ids)
    assert torch.allclose(weights.double().cpu(), 2.0 * ref_w, rtol=1e-6, atol=0)


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_align(block_m: int, device) -> None:
    # 23 tokens x 3 slots over 9 experts: expert 0 takes 10 pairs, expert 5 none, expert 8 every token's last slot
    gen = torch.Generator().manual_seed(block_m)
    ids = torch.randint(1, 5, (23, 3), generator=gen, dtype=torch.int32)
    ids[:10, 0] = 0
    ids[:, 2] = 8
    pairs, tile_expert = moe_align(ids.to(device), 9, block_m)
    pairs, tile_expert = pairs.cpu().long(), tile_expert.cpu().long()
    n_pairs = ids.numel()
    flat = ids.reshape(-1).long()
    used = tile_expert >= 0
    assert not used[used.sum():].any()  # the tiles in use come first
    expected = []
    for e in range(9):
        mine = (flat == e).nonzero().flatten()  # in pair order
        padded = -(-len(mine) // block_m) * block_m
        expected += [mine, torch.full((padded - len(mine),), n_pairs)]
        assert (tile_expert == e).sum() * block_m == padded
    expected = torch.cat(expected)
    assert torch.equal(pairs[:len(expected)], expected)
    assert torch.equal(tile_expert[used].repeat_interleave(block_m), torch.cat(
        [torch.full((-(-int((flat == e).sum()) // block_m) * block_m,), e) for e in range(9)]))


def test_bad_input(device) -> None:
    gate, up, down = experts((Q.Q8_0, Q.Q8_0), 4, 64, 64, device)
    x = torch.randn(2, 64, device=device)
    logits = torch.randn(2, 4, device=device)
    types = (Q.Q8_0, Q.Q8_0, Q.Q8_0)
    with pytest.raises(ValueError, match=r"top_k must be in 1..n_expert \(4\), got 5"):
        fused_moe(x, logits, 5, gate, up, down, types, 64)
    with pytest.raises(ValueError, match=r"router_logits must be \[2, n_expert\]"):
        fused_moe(x, logits[:1], 2, gate, up, down, types, 64)
    with pytest.raises(ValueError, match=r"gate experts: Q8_0: a tensor of shape \(4, 32, 64\) takes"):
        fused_moe(x, logits, 2, gate, up, down, types, 32)
    with pytest.raises(ValueError, match="gate and up experts must share one type"):
        fused_moe(x, logits, 2, gate, weight(Q.Q4_0, 4 * 64, 64, device), down, (Q.Q8_0, Q.Q4_0, Q.Q8_0), 64)
    with pytest.raises(ValueError, match="activation must be one of"):
        fused_moe(x, logits, 2, gate, up, down, types, 64, activation="relu")
    with pytest.raises(ValueError, match="gating must be one of"):
        fused_moe(x, logits, 2, gate, up, down, types, 64, gating="sigmoid")
    with pytest.raises(ValueError, match="x must be float32, float16 or bfloat16"):
        fused_moe(x.double(), logits, 2, gate, up, down, types, 64)
    with pytest.raises(ValueError, match=r"up bias must be a contiguous float \[4, 64\]"):
        fused_moe(x, logits, 2, gate, up, down, types, 64, biases=[torch.zeros(4, 64, device=device),
                                                                     torch.zeros(4, 63, device=device),
                                                                     torch.zeros(4, 64, device=device)])
    with pytest.raises(ValueError, match="block_m must be 1, 16, 32 or 64"):
        fused_moe(x, logits, 2, gate, up, down, types, 64, block_m=8)
