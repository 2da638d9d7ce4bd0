"""RMSNorm (+ residual), RoPE (both styles, partial rotary, scaled frequencies) and gated activations
against naive float64 references, Triton launchers and torch references alike, on `device` (the GPU, or the
CPU with the kernels in the interpreter)."""

from __future__ import annotations

import math

import pytest
import torch

from ggtriton.kernels.activations import gelu_mul, gelu_mul_ref, silu_mul, silu_mul_ref
from ggtriton.kernels.rmsnorm import rmsnorm, rmsnorm_ref
from ggtriton.kernels.rope import rope, rope_inv_freq, rope_ref
from ggtriton.kernels.rope_kv_store import rope_kv_store, rope_kv_store_ref

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = list(TOL)


# Every float tensor the launchers allocate (outputs, split-K partials) starts as NaN.
pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def randn(*shape, seed, device, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(device, dtype)


# ---------------------------------------------------------------- rmsnorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (7, 80), (3, 5, 96), (2, 1000), (4, 4096)])
@pytest.mark.parametrize("fn", [rmsnorm, rmsnorm_ref])
def test_rmsnorm(fn, shape, with_residual, dtype, device):
    eps = 1e-6
    # x as a strided view: every other row of a larger tensor, scaled away from 1.
    x = randn(shape[0] * 2, *shape[1:], seed=len(shape), device=device, dtype=dtype, scale=3.0)[::2]
    w = randn(shape[-1], seed=1, device=device, scale=0.5) + 1.0
    residual = randn(*shape, seed=2, device=device, dtype=dtype) if with_residual else None
    out, h = fn(x, w, eps, residual)
    h64 = x.double() + (residual.double() if with_residual else 0.0)
    expect = h64 / torch.sqrt(h64.square().mean(-1, keepdim=True) + eps) * w.double()
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, expect) <= TOL[dtype]
    if with_residual:
        assert h.dtype == dtype and rel_err(h, h64) <= TOL[dtype]
    else:
        assert h is x


# ---------------------------------------------------------------- rope

SCALINGS = {
    "none": dict(),
    "linear": dict(scaling="linear", factor=4.0),
    "yarn": dict(scaling="yarn", factor=8.0, original_context=4096),
    "llama3": dict(scaling="llama3", factor=8.0, original_context=8192, low_freq_factor=1.0, high_freq_factor=4.0),
}


def naive_rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, neox: bool, attn_factor: float):
    """x [T, H, D] float64, one pair at a time."""
    out = x.clone()
    half = len(inv_freq)
    for i in range(half):
        theta = pos.double() * float(inv_freq[i])
        c, s = (torch.cos(theta) * attn_factor)[:, None], (torch.sin(theta) * attn_factor)[:, None]
        i1, i2 = (i, i + half) if neox else (2 * i, 2 * i + 1)
        a, b = x[..., i1], x[..., i2]
        out[..., i1], out[..., i2] = a * c - b * s, b * c + a * s
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("neox", [False, True], ids=["normal", "neox"])
@pytest.mark.parametrize("head_dim,rot_dim,n_heads,n_kv_heads", [(64, 64, 4, 1), (80, 40, 3, 3), (128, 32, 8, 2)])
@pytest.mark.parametrize("scaling", list(SCALINGS))
@pytest.mark.parametrize("fn", [rope, rope_ref])
def test_rope(fn, scaling, head_dim, rot_dim, n_heads, n_kv_heads, neox, dtype, device):
    n = 9
    inv_freq, attn_factor = rope_inv_freq(rot_dim, 10000.0, **SCALINGS[scaling])
    inv_freq = inv_freq.to(device)
    # q and k as views into a fused QKV projection output, positions up to 300 in no order.
    qkv = randn(n, (n_heads + 2 * n_kv_heads) * head_dim, seed=head_dim, device=device, dtype=dtype)
    q = qkv[:, : n_heads * head_dim].view(n, n_heads, head_dim)
    k = qkv[:, n_heads * head_dim : (n_heads + n_kv_heads) * head_dim].view(n, n_kv_heads, head_dim)
    pos = torch.tensor([0, 1, 300, 17, 5, 255, 16, 2, 99], dtype=torch.int32 if neox else torch.int64, device=device)
    q0, k0, v0 = q.clone(), k.clone(), qkv[:, (n_heads + n_kv_heads) * head_dim :].clone()
    fn(q, k, pos, inv_freq, neox=neox, attn_factor=attn_factor)
    for out, x0 in ((q, q0), (k, k0)):
        assert rel_err(out, naive_rope(x0.double(), pos, inv_freq, neox, attn_factor)) <= TOL[dtype]
        assert torch.equal(out[..., rot_dim:], x0[..., rot_dim:])  # past rot_dim: untouched
    assert torch.equal(qkv[:, (n_heads + n_kv_heads) * head_dim :], v0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("neox", [False, True], ids=["normal", "neox"])
@pytest.mark.parametrize("head_dim,rot_dim,n_heads,n_kv_heads", [(64, 64, 4, 1), (80, 40, 3, 3), (128, 32, 8, 2)])
@pytest.mark.parametrize("fn", [rope_kv_store, rope_kv_store_ref])
def test_rope_kv_store(fn, head_dim, rot_dim, n_heads, n_kv_heads, neox, dtype, device):
    n, block_size, num_blocks = 9, 4, 5
    inv_freq, attn_factor = rope_inv_freq(rot_dim, 10000.0, **SCALINGS["yarn"])
    inv_freq = inv_freq.to(device)
    # q, k and v as views into a fused QKV projection output, positions in no order, two tokens not stored.
    qkv = randn(n, (n_heads + 2 * n_kv_heads) * head_dim, seed=head_dim, device=device, dtype=dtype)
    q, k, v = (t.view(n, -1, head_dim) for t in qkv.split([n_heads * head_dim, *[n_kv_heads * head_dim] * 2], 1))
    pos = torch.tensor([0, 1, 300, 17, 5, 255, 16, 2, 99], dtype=torch.int32, device=device)
    slots = torch.tensor([7, 0, -1, 19, 3, 12, -1, 8, 1], device=device)
    caches = [randn(num_blocks, block_size, n_kv_heads, head_dim, seed=s, device=device, dtype=dtype) for s in (5, 6)]
    q0, k0, v0, expect = q.clone(), k.clone(), v.clone(), [c.clone() for c in caches]
    fn(q, k, v, *caches, slots, pos, inv_freq, neox=neox, attn_factor=attn_factor)
    k_rope = naive_rope(k0.double(), pos, inv_freq, neox, attn_factor)
    assert rel_err(q, naive_rope(q0.double(), pos, inv_freq, neox, attn_factor)) <= TOL[dtype]
    assert torch.equal(k, k0) and torch.equal(v, v0)
    stored = slots >= 0
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=device)
    untouched[slots[stored]] = False
    for cache, before, want in zip(caches, expect, (k_rope, v0.double())):
        flat = cache.view(-1, n_kv_heads, head_dim)
        assert rel_err(flat[slots[stored]], want[stored]) <= TOL[dtype]
        assert torch.equal(flat[untouched], before.view(-1, n_kv_heads, head_dim)[untouched])
    assert torch.equal(caches[0].view(-1, n_kv_heads, head_dim)[slots[stored]][..., rot_dim:],
                       k0[stored][..., rot_dim:])  # past rot_dim: copied as it is


def test_rope_inv_freq_formulas():
    d, base = 128, 500000.0
    plain = [base ** (-2 * i / d) for i in range(d // 2)]
    f, a = rope_inv_freq(d, base)
    assert torch.allclose(f.double(), torch.tensor(plain, dtype=torch.float64), rtol=1e-7) and a == 1.0
    f, _ = rope_inv_freq(d, base, scaling="linear", factor=4.0)
    assert torch.allclose(f.double(), torch.tensor(plain, dtype=torch.float64) / 4, rtol=1e-7)

    # YaRN, one dim at a time as llama.cpp's ggml_rope_yarn_corr_dims / rope_yarn_ramp / rope_yarn write it.
    factor, n_ctx_orig, beta_fast, beta_slow = 16.0, 4096, 32.0, 1.0

    def corr_dim(n_rot):
        return d * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(0, math.floor(corr_dim(beta_fast))), min(d - 1, math.ceil(corr_dim(beta_slow)))
    yarn = []
    for i0 in range(0, d, 2):
        ramp = 1 - min(1, max(0, (i0 // 2 - low) / max(0.001, high - low)))
        theta_extrap = plain[i0 // 2]
        yarn.append(theta_extrap / factor * (1 - ramp) + theta_extrap * ramp)
    f, a = rope_inv_freq(d, base, scaling="yarn", factor=factor, original_context=n_ctx_orig, attn_factor=0.5)
    assert torch.allclose(f.double(), torch.tensor(yarn, dtype=torch.float64), rtol=1e-7)
    assert a == pytest.approx(0.5 * (1 + 0.1 * math.log(factor)))

    # Llama 3, as the model's reference code writes it.
    factor, low_ff, high_ff, old_ctx = 8.0, 1.0, 4.0, 8192
    llama3 = []
    for freq in plain:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high_ff:
            llama3.append(freq)
        elif wavelen > old_ctx / low_ff:
            llama3.append(freq / factor)
        else:
            smooth = (old_ctx / wavelen - low_ff) / (high_ff - low_ff)
            llama3.append((1 - smooth) * freq / factor + smooth * freq)
    f, _ = rope_inv_freq(d, base, scaling="llama3", factor=factor, original_context=old_ctx,
                         low_freq_factor=low_ff, high_freq_factor=high_ff)
    assert torch.allclose(f.double(), torch.tensor(llama3, dtype=torch.float64), rtol=1e-7)

    # GGUF rope_freqs divides the frequencies.
    ff = torch.linspace(1, 8, d // 2)
    f, _ = rope_inv_freq(d, base, freq_factors=ff)
    assert torch.allclose(f.double(), torch.tensor(plain, dtype=torch.float64) / ff.double(), rtol=1e-7)
    with pytest.raises(ValueError, match="scaling"):
        rope_inv_freq(d, base, scaling="ntk")


# ---------------------------------------------------------------- activations


def naive_act(act: str, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    if act == "silu":
        return g / (1 + torch.exp(-g)) * u
    return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3))) * u


ACTS = {"silu": (silu_mul, silu_mul_ref), "gelu": (gelu_mul, gelu_mul_ref)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (5, 80), (3, 1500), (2, 3, 17)])
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("act,which", [(a, w) for a in ACTS for w in (0, 1)],
                         ids=["silu", "silu_ref", "gelu", "gelu_ref"])
def test_act_mul(act, which, fused, shape, dtype, device):
    d = shape[-1]
    # Gates up to +-30: exp over/underflows in float32 there, which the formulas must absorb.
    gate_up = randn(*shape[:-1], 2 * d, seed=d, device=device, dtype=dtype, scale=8.0)
    gate_up[..., :3] = torch.tensor([30.0, -30.0, 0.0], dtype=dtype, device=device)
    if fused:
        gate, up = gate_up[..., :d], gate_up[..., d:]
    else:
        gate, up = gate_up[..., :d].contiguous(), randn(*shape, seed=5, device=device, dtype=dtype)
    out = ACTS[act][which](gate, up)
    assert out.dtype == dtype and out.shape == gate.shape and out.is_contiguous()
    assert rel_err(out, naive_act(act, gate.double(), up.double())) <= TOL[dtype]


def test_bad_arguments(device):
    x = torch.randn(4, 64, device=device)
    with pytest.raises(ValueError, match="weight"):
        rmsnorm(x, torch.ones(32, device=device), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rmsnorm(x, torch.ones(64, device=device), 1e-6, x.half())
    with pytest.raises(ValueError, match="gate and up"):
        silu_mul(x, x[:, :32])
    with pytest.raises(ValueError, match="contiguous last dim"):
        gelu_mul(x.T, x.T)
    q = torch.randn(3, 2, 64, device=device)
    with pytest.raises(ValueError, match="inv_freq"):
        rope(q, q, torch.arange(3, device=device), torch.ones(40, device=device), neox=True)
    with pytest.raises(ValueError, match="positions"):
        rope(q, q, torch.arange(3.0, device=device), torch.ones(32, device=device), neox=True)
