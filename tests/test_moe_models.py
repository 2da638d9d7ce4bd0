"""Mixture-of-experts models (qwen3moe, qwen2moe, Mixtral-style llama) on tiny synthetic GGUFs, on `device`.

- Each layer's MoE FFN, on either backend, against a float64 numpy forward of its definition (llama.cpp's
  build_moe_ffn), on weights the PyPI `gguf` package reads and dequantizes: float and quantized experts (Q8_0, Q4_K,
  Q6_K, which the Triton backend relays planar), a shared expert, a weight scale and unnormalized weights.
- The Triton backend against the torch backend on whole models.
- Whole models against llama.cpp: tests/fixtures/moe_logits.npz, made by tests/fixtures/make_arch_fixtures.py from
  the same seeded `SyntheticModel`s (F32, float32 K/V: both sides compute the exact float32 forward).
- Files whose experts disagree with their metadata, or lack a tensor or key, fail with a ValueError naming it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ggtriton.gguf import GGMLType, GGUFFile, GGUFValueType
from ggtriton.gguf.writer import TensorData, Typed, typed_metadata, write_gguf
from ggtriton.runtime.llm import LLM
from ggtriton.runtime.sampling_params import SamplingParams
from ggtriton.runtime.synthetic import SyntheticModel, write_synthetic_model
from test_arch_llamacpp import fixture_script, mean_kl
from test_model_architectures import _read, load

FIXTURES = Path(__file__).with_name("fixtures")
MOE_CASES = fixture_script("make_arch_fixtures").MOE_CASES
Q = GGMLType

LAYER_MODELS = {
    "qwen3moe-top1": SyntheticModel("qwen3moe", n_expert=6, n_expert_used=1, expert_ffn=40),
    "qwen2moe-q8_0": SyntheticModel("qwen2moe", n_expert=6, expert_ffn=64, shared_expert_ffn=96,
                                    weight_type=Q.Q8_0),
    "mixtral-q4_k": SyntheticModel("llama", n_expert=4, hidden=256, ffn=256, n_heads=8, head_dim=32,
                                   weight_type=Q.Q4_K),
    # the file's own routing keys: weights scaled and not normalized, where qwen3moe normalizes them by default
    "qwen3moe-q6_k-scaled": SyntheticModel("qwen3moe", n_expert=5, n_expert_used=2, hidden=256, n_heads=8,
                                           head_dim=32, expert_ffn=256, weight_type=Q.Q6_K,
                                           metadata={"qwen3moe.expert_weights_scale": 2.5,
                                                     "qwen3moe.expert_weights_norm": False}),
}


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for name, m in {**LAYER_MODELS, **{k: m for k, (m, _) in MOE_CASES.items()}}.items():
        out[name] = root / f"{name}.gguf"
        write_synthetic_model(out[name], m)
    return out


# --- the independent reference ---------------------------------------------------------------------------------


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def reference_moe(md: dict, w: dict[str, np.ndarray], p: str, x: np.ndarray) -> np.ndarray:
    """Layer p's MoE FFN of x [T, hidden] in float64, from the definition and the file's metadata."""
    arch = md["general.architecture"]
    top_k = md[f"{arch}.expert_used_count"]
    normalize = md.get(f"{arch}.expert_weights_norm", arch != "qwen2moe")  # llama.cpp's default per architecture
    scale = md.get(f"{arch}.expert_weights_scale", 1.0)
    logits = x @ w[p + "ffn_gate_inp.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for t in range(len(x)):
        chosen = np.argsort(-probs[t])[:top_k]
        weights = probs[t, chosen] / (probs[t, chosen].sum() if normalize else 1.0) * scale
        for e, wt in zip(chosen, weights):
            h = _silu(w[p + "ffn_gate_exps.weight"][e] @ x[t]) * (w[p + "ffn_up_exps.weight"][e] @ x[t])
            out[t] += wt * (w[p + "ffn_down_exps.weight"][e] @ h)
    if p + "ffn_gate_inp_shexp.weight" in w:
        gate = 1 / (1 + np.exp(-(x @ w[p + "ffn_gate_inp_shexp.weight"].reshape(-1))))
        h = _silu(x @ w[p + "ffn_gate_shexp.weight"].T) * (x @ w[p + "ffn_up_shexp.weight"].T)
        out += gate[:, None] * (h @ w[p + "ffn_down_shexp.weight"].T)
    return out


# --- the tests ---------------------------------------------------------------------------------------------------


# The Triton backend on the float experts and on Q8_0's, which it relays planar at load; the fused kernel's own tests
# cover the K-quant decoders, whose layers here would take a minute in the interpreter.
@pytest.mark.parametrize("name,backend", [(name, "torch") for name in LAYER_MODELS] +
                         [("qwen3moe-top1", "triton"), ("qwen2moe-q8_0", "triton")])
def test_moe_layer_matches_float64_reference(paths, name, backend, device):
    llm = load(paths[name], device, backend=backend)
    md, w = _read(paths[name])
    x = torch.randn(13, llm.config.hidden, generator=torch.Generator().manual_seed(3))  # 13 tokens: an odd count
    for i, layer in enumerate(llm.model.layers):
        got = layer.moe(llm.ops, x.to(device)).cpu().double()
        ref = torch.from_numpy(reference_moe(md, w, f"blk.{i}.", x.double().numpy()))
        err = float((got - ref).abs().max())
        print(f"{name} {backend} layer {i}: max abs error {err:.1e} (max |ref| {float(ref.abs().max()):.1f})")
        assert float((got - ref).norm() / ref.norm()) <= 1e-5


@pytest.mark.parametrize("name", list(MOE_CASES))
def test_triton_backend_equals_torch_backend(paths, name, device):
    torch_llm = load(paths[name], device, backend="torch")
    triton_llm = load(paths[name], device, backend="triton")
    assert triton_llm.backend == "triton"
    tokens = np.random.default_rng(5).integers(0, 320, 20).tolist()
    for ids in (tokens, tokens[:1]):  # prefill tiles of many pairs per expert, and one token: a pair per tile
        a, b = torch_llm.logits(ids), triton_llm.logits(ids)
        assert float((a - b).norm() / a.norm()) <= 1e-5


@pytest.fixture(scope="module")
def fixture():
    return np.load(FIXTURES / "moe_logits.npz")


@pytest.mark.parametrize("name", list(MOE_CASES))
def test_logits_agree_with_llamacpp(paths, name, fixture, device):
    _, n_ctx = MOE_CASES[name]
    assert int(fixture[f"{name}.n_ctx"]) == n_ctx, "stale fixture: run tests/fixtures/make_arch_fixtures.py moe"
    llm = LLM(paths[name], device=device, dtype=torch.float32, warm_up=False, max_model_len=n_ctx)
    ref = fixture[f"{name}.logits"]
    got = llm.logits(fixture[f"{name}.tokens"].tolist())
    kl = mean_kl(ref, got)
    top1 = float((got.argmax(-1).numpy() == ref.argmax(-1)).mean())
    print(f"{name}: mean KL {kl:.2e}, top-1 {top1:.3f} (llama-cpp-python {fixture['llama_cpp_python_version']})")
    assert kl <= 1e-5 and top1 >= 0.99


def test_batch_equals_each_prompt_alone(paths, device):
    # Continuous batching with a mixture of experts: chunked prefill (a 16-token step budget), pages of 4 tokens
    # too few for every sequence at once (preemption), a shared beginning (prefix cache); greedy tokens unchanged.
    shared = "the lighthouse keeper wrote every evening about ships, "
    prompts = [shared + "stone" * (i % 3) if i % 2 else "sea light " * (1 + i % 4) for i in range(8)]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    alone = load(paths["qwen2moe"], device, max_num_seqs=1, kv_cache_bytes=1 << 24)
    expected = [alone.generate(p, params, use_tqdm=False)[0].token_ids for p in prompts]
    # 24 pages of 4 tokens, at 2 layers x K and V x 2 KV heads x 16 dims x 4 bytes per token
    batched = load(paths["qwen2moe"], device, max_num_batched_tokens=16, block_size=4,
                   kv_cache_bytes=24 * 4 * 2 * 2 * 2 * 16 * 4)
    outputs = batched.generate(prompts, params, use_tqdm=False)
    sched = batched.engine.scheduler
    assert sched.num_preemptions > 0 and sched.block_manager.num_prefix_hit_tokens > 0
    assert [o.token_ids for o in outputs] == expected


# --- bad input ---------------------------------------------------------------------------------------------------


def _rewrite(src: Path, dst: Path, *, drop: tuple[str, ...] = (), tensors: dict[str, np.ndarray] | None = None,
             metadata: dict | None = None) -> Path:
    """src without the tensors or metadata keys `drop`, with float32 `tensors` and `metadata` set."""
    with GGUFFile(src) as f:
        md = {k: v for k, v in typed_metadata(f.metadata, f.value_types).items() if k not in drop}
        out = [TensorData(n, info.ggml_type, info.shape, f.tensor_bytes(n).copy())
               for n, info in f.tensors.items() if n not in drop and n not in (tensors or {})]
    out += [TensorData(n, GGMLType.F32, v.shape, v.astype(np.float32)) for n, v in (tensors or {}).items()]
    write_gguf(dst, md | (metadata or {}), out)
    return dst


def _random(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape) / math.sqrt(shape[-1])


BAD = {
    "missing expert": (dict(drop=("blk.1.ffn_down_exps.weight",)), r"tensor 'blk.1.ffn_down_exps.weight' is missing"),
    "missing router": (dict(drop=("blk.0.ffn_gate_inp.weight",)), r"tensor 'blk.0.ffn_gate_inp.weight' is missing"),
    "expert count": (dict(metadata={"qwen3moe.expert_count": Typed(GGUFValueType.UINT32, 6)}),
                     r"tensor 'blk.0.ffn_gate_inp.weight' has shape \(8, 64\); the metadata \(qwen3moe.expert_count 6"),
    "one expert tensor": (dict(tensors={"blk.1.ffn_up_exps.weight": _random(7, 24, 64)}),
                          r"tensor 'blk.1.ffn_up_exps.weight' has shape \(7, 24, 64\); the metadata "
                          r"\(qwen3moe.expert_count 8, qwen3moe.expert_feed_forward_length 24"),
    "used count": (dict(metadata={"qwen3moe.expert_used_count": Typed(GGUFValueType.UINT32, 9)}),
                   r"qwen3moe.expert_used_count 9 must be in 1..qwen3moe.expert_count \(8\)"),
    "missing count": (dict(drop=("qwen3moe.expert_count",)), r"metadata key qwen3moe.expert_count is missing"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_expert_input_is_a_clear_error(paths, case, tmp_path, device):
    change, message = BAD[case]
    path = _rewrite(paths["qwen3moe"], tmp_path / "bad.gguf", **change)
    with pytest.raises(ValueError, match=message):
        load(path, device)


def test_missing_shared_expert_gate_is_a_clear_error(paths, tmp_path, device):
    path = _rewrite(paths["qwen2moe"], tmp_path / "bad.gguf", drop=("blk.0.ffn_gate_inp_shexp.weight",))
    with pytest.raises(ValueError, match=r"tensor 'blk.0.ffn_gate_inp_shexp.weight' is missing"):
        load(path, device)
