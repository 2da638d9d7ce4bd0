"""Every architecture on tiny synthetic GGUFs against an independent float64 forward, on `device` (the GPU, or
the CPU: there the torch path, and the Triton kernels in the interpreter where a test asks for them).

The reference reads the file with the PyPI `gguf` package (GGUFReader, `gguf.quants.dequantize`) and
computes each architecture from its definition in float64 numpy, sharing no code with the engine.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ggtriton.gguf import GGMLType
from ggtriton.runtime import llm as llm_module
from ggtriton.runtime.engine.batch import ForwardBatch
from ggtriton.runtime.llm import LLM
from ggtriton.runtime.synthetic import SyntheticModel, write_synthetic_model

# --- the independent reference -----------------------------------------------------------------------


def _read(path):
    import gguf as gguf_pypi

    r = gguf_pypi.GGUFReader(path)
    md = {k: f.contents() for k, f in r.fields.items()}
    w = {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        w[t.name] = gguf_pypi.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(shape)
    return md, w


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, pos, base, dim, neox, freq_factors=None, linear_factor=1.0):
    inv = base ** (-np.arange(0, dim, 2) / dim) / linear_factor
    if freq_factors is not None:
        inv = inv / freq_factors
    ang = pos[:, None] * inv[None, :]  # [T, dim/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x = x.copy()
    if neox:
        a, b = x[..., : dim // 2].copy(), x[..., dim // 2 : dim].copy()
        x[..., : dim // 2], x[..., dim // 2 : dim] = a * cos - b * sin, b * cos + a * sin
    else:
        a, b = x[..., 0:dim:2].copy(), x[..., 1:dim:2].copy()
        x[..., 0:dim:2], x[..., 1:dim:2] = a * cos - b * sin, b * cos + a * sin
    return x


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def reference_logits(path, tokens):
    md, w = _read(path)
    arch = md["general.architecture"]
    g = lambda k, d=None: md.get(f"{arch}.{k}", d)  # noqa: E731
    n_layers, hidden = g("block_count"), g("embedding_length")
    n_heads, n_kv, d = g("attention.head_count"), g("attention.head_count_kv"), g("attention.key_length")
    eps, base, rope_dim = g("attention.layer_norm_rms_epsilon"), g("rope.freq_base"), g("rope.dimension_count")
    window, cap_attn, cap_final = g("attention.sliding_window"), g("attn_logit_softcapping"), g("final_logit_softcapping")
    linear = g("rope.scaling.factor", 1.0) if g("rope.scaling.type") == "linear" else 1.0
    gemma = arch in ("gemma2", "gemma3")
    neox = arch != "llama"
    T = len(tokens)
    pos = np.arange(T, dtype=np.float64)
    x = w["token_embd.weight"][tokens]
    if gemma:
        x = x * math.sqrt(hidden)
    for i in range(n_layers):
        p = f"blk.{i}."
        if arch == "gemma2":
            local = i % 2 == 0
        elif arch == "gemma3":
            local = i % 6 < 5
        else:
            local = False
        h = _rms(x, w[p + "attn_norm.weight"], eps)
        if arch == "phi3":
            q, k, v = np.split(h @ w[p + "attn_qkv.weight"].T, [n_heads * d, (n_heads + n_kv) * d], axis=-1)
        else:
            q, k, v = (h @ w[p + f"attn_{n}.weight"].T for n in "qkv")
        if arch == "qwen2":
            q, k, v = q + w[p + "attn_q.bias"], k + w[p + "attn_k.bias"], v + w[p + "attn_v.bias"]
        q, k, v = q.reshape(T, n_heads, d), k.reshape(T, n_kv, d), v.reshape(T, n_kv, d)
        if arch in ("qwen3", "gemma3"):
            q, k = _rms(q, w[p + "attn_q_norm.weight"], eps), _rms(k, w[p + "attn_k_norm.weight"], eps)
        layer_base = 10000.0 if arch == "gemma3" and local else base
        factors = w.get("rope_freqs.weight")
        q = _rope(q, pos, layer_base, rope_dim, neox, factors, linear)
        k = _rope(k, pos, layer_base, rope_dim, neox, factors, linear)
        out = np.zeros((T, n_heads, d))
        for hd in range(n_heads):
            kh = hd // (n_heads // n_kv)
            s = q[:, hd] @ k[:, kh].T / math.sqrt(d)
            if cap_attn:
                s = cap_attn * np.tanh(s / cap_attn)
            i_q, i_k = np.arange(T)[:, None], np.arange(T)[None, :]
            visible = i_k <= i_q
            if window and local:
                visible &= i_k > i_q - window
            s = np.where(visible, s, -np.inf)
            pr = np.exp(s - s.max(-1, keepdims=True))
            out[:, hd] = (pr / pr.sum(-1, keepdims=True)) @ v[:, kh]
        a = out.reshape(T, -1) @ w[p + "attn_output.weight"].T
        if gemma:
            a = _rms(a, w[p + "post_attention_norm.weight"], eps)
        x = x + a
        h = _rms(x, w[p + "ffn_norm.weight"], eps)
        if arch == "phi3":
            gate, up = np.split(h @ w[p + "ffn_up.weight"].T, 2, axis=-1)
        else:
            gate, up = h @ w[p + "ffn_gate.weight"].T, h @ w[p + "ffn_up.weight"].T
        act = _gelu_tanh(gate) if gemma else gate / (1 + np.exp(-gate))
        f = (act * up) @ w[p + "ffn_down.weight"].T
        if gemma:
            f = _rms(f, w[p + "post_ffw_norm.weight"], eps)
        x = x + f
    x = _rms(x, w["output_norm.weight"], eps)
    logits = x @ w.get("output.weight", w["token_embd.weight"]).T
    if cap_final:
        logits = cap_final * np.tanh(logits / cap_final)
    return logits


# --- the models ---------------------------------------------------------------------------------------

MODELS = {
    "llama": SyntheticModel("llama"),
    "llama-untied-q8_0": SyntheticModel("llama", hidden=64, weight_type=GGMLType.Q8_0, tie_embeddings=False),
    "llama-q4_k-gqa4": SyntheticModel("llama", hidden=256, n_heads=8, n_kv_heads=2, head_dim=32, ffn=256,
                                      weight_type=GGMLType.Q4_K),
    "llama-rope_freqs": SyntheticModel("llama", rope_dim=12, tensors={"rope_freqs.weight": np.linspace(1, 8, 6)}),
    "qwen2": SyntheticModel("qwen2", rope_base=1e6),
    "qwen2-linear-rope": SyntheticModel("qwen2", metadata={"qwen2.rope.scaling.type": "linear",
                                                           "qwen2.rope.scaling.factor": 4.0}),
    "qwen3": SyntheticModel("qwen3", n_heads=4, n_kv_heads=1),
    "gemma2": SyntheticModel("gemma2", n_layers=3, sliding_window=8, attn_softcap=5.0, final_softcap=3.0,
                             weight_type=GGMLType.Q5_0),
    "gemma3": SyntheticModel("gemma3", n_layers=7, sliding_window=6, n_heads=2, n_kv_heads=1, head_dim=32,
                             rope_base=1e6),
    "phi3": SyntheticModel("phi3", n_kv_heads=4),
}


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    paths = {}
    for name, m in MODELS.items():
        paths[name] = root / f"{name}.gguf"
        write_synthetic_model(paths[name], m)
    return paths


def load(path, device: torch.device, **kwargs) -> LLM:
    """The model on `device` in float32 (a GPU's default is bfloat16): the tolerances are float32's. No
    start-up warm-up: these tests score tokens, they build no engine."""
    return LLM(path, device=device, dtype=torch.float32, warm_up=False, **kwargs)


def rel_err(a: torch.Tensor, b: np.ndarray) -> float:
    b = torch.from_numpy(b)
    return float((a.double() - b).norm() / b.norm())


TOKENS = np.random.default_rng(7).integers(0, 320, 29).tolist()


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_path_matches_float64_reference(model_paths, name, device):
    llm = load(model_paths[name], device, backend="torch")
    got = llm.logits(TOKENS)
    ref = reference_logits(model_paths[name], TOKENS)
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= 1e-5


def test_chunked_prefill_equals_one_pass(model_paths, monkeypatch, device):
    llm = load(model_paths["gemma2"], device)
    whole = llm.logits(TOKENS)
    monkeypatch.setattr(llm_module, "_LOGITS_CHUNK", 5)
    chunked = llm.logits(TOKENS)
    assert float((chunked - whole).norm() / whole.norm()) <= 1e-6


def _decode_logits(llm: LLM, tokens: list[int]) -> torch.Tensor:
    """Prefill all but the last token, then one decode step: the last row of `logits`, via paged decode."""
    bs = llm.block_size
    n_blocks = -(-len(tokens) // bs) + 1
    kv = llm.runner.kv_layout(n_blocks).allocate(llm.device)
    table = list(range(n_blocks))[::-1]  # pages in reverse: nothing may assume contiguous blocks
    prefill = ForwardBatch.build([tokens[:-1]], [0], [table], bs, llm.device)
    llm.model.forward(prefill, kv)
    step = ForwardBatch.build([tokens[-1:]], [len(tokens) - 1], [table], bs, llm.device)
    assert step.is_decode
    return llm.model.logits(llm.model.forward(step, kv))[0].cpu()


@pytest.mark.parametrize("name", ["llama-q4_k-gqa4", "gemma2", "gemma3"])
def test_decode_step_matches_reference(model_paths, name, device):
    llm = load(model_paths[name], device, backend="torch" if device.type == "cpu" else None)
    ref = reference_logits(model_paths[name], TOKENS)
    assert rel_err(_decode_logits(llm, TOKENS)[None], ref[-1:]) <= 1e-5


@pytest.mark.parametrize("name", ["gemma2", "llama-q4_k-gqa4"])
def test_triton_backend_equals_torch_backend(model_paths, name, device):
    tokens = TOKENS[:20]
    torch_llm = load(model_paths[name], device, backend="torch")
    triton_llm = load(model_paths[name], device, backend="triton")
    assert triton_llm.backend == "triton"
    a, b = torch_llm.logits(tokens), triton_llm.logits(tokens)
    assert float((a - b).norm() / a.norm()) <= 1e-4
    da, db = _decode_logits(torch_llm, tokens), _decode_logits(triton_llm, tokens)
    assert float((da - db).norm() / da.norm()) <= 1e-4


def test_unknown_architecture_is_a_clear_error(tmp_path, device):
    from ggtriton.gguf.writer import write_gguf

    path = tmp_path / "mamba.gguf"
    write_gguf(path, {"general.architecture": "mamba"})
    with pytest.raises(ValueError,
                       match=r"architecture 'mamba' is not supported; supported: gemma2, gemma3, gpt-oss, llama"):
        LLM(path, device=device)


def test_bad_token_ids_and_lengths(model_paths, device):
    llm = load(model_paths["llama"], device)
    with pytest.raises(ValueError, match="token id 320 is outside the vocabulary of 320"):
        llm.logits([1, 320])
    assert llm.logits([]).shape == (0, 320)
