"""gpt-oss (llama.cpp's LLM_ARCH_OPENAI_MOE) on tiny synthetic GGUFs, on `device`.

- Each layer's mixture of experts, on either backend, against a float64 numpy forward of llama.cpp's build_moe_ffn
  for gpt-oss (biased router, softmax over the chosen logits, biased experts, swiglu_oai with its clamps, which the
  inputs here reach), on weights the PyPI `gguf` package reads: F32 and MXFP4 experts.
- The Triton backend against the torch backend on whole models: prefill (flash attention with sinks) and greedy
  decoding past the sliding window (paged decode with sinks, split-K).
- Whole models against llama.cpp: tests/fixtures/gpt_oss_logits.npz, made by tests/fixtures/make_gpt_oss_fixtures.py
  from the same seeded `SyntheticModel`s.
- The harmony vocabulary: end-of-generation tokens and the tokens that render as text, as llama.cpp sets them.
- Files that lack a gpt-oss tensor or disagree with their metadata fail with a ValueError naming it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ggtriton.gguf import GGUFFile, GGUFValueType
from ggtriton.gguf.tokenizer import Tokenizer
from ggtriton.gguf.writer import Typed
from ggtriton.runtime.config import ModelConfig
from ggtriton.runtime.sampling_params import SamplingParams
from ggtriton.runtime.synthetic import write_synthetic_model
from test_arch_llamacpp import mean_kl
from test_model_architectures import _read, load
from test_arch_llamacpp import fixture_script
from test_moe_models import _random, _rewrite

FIXTURES = Path(__file__).with_name("fixtures")


CASES = fixture_script("make_gpt_oss_fixtures").CASES
F32, MXFP4 = "gpt-oss-f32", "gpt-oss-mxfp4"


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpt_oss")
    out = {}
    for name, (m, _) in CASES.items():
        out[name] = root / f"{name}.gguf"
        write_synthetic_model(out[name], m)
    return out


def reference_moe(md: dict, w: dict[str, np.ndarray], p: str, x: np.ndarray) -> tuple[np.ndarray, int]:
    """Layer p's MoE FFN of x [T, hidden] in float64, and how many gate/up values the clamps changed."""
    top_k = md["gpt-oss.expert_used_count"]
    logits = x @ w[p + "ffn_gate_inp.weight"].T + w[p + "ffn_gate_inp.bias"]
    out, clamped = np.zeros_like(x), 0
    for t in range(len(x)):
        chosen = np.argsort(-logits[t], kind="stable")[:top_k]
        weights = np.exp(logits[t, chosen] - logits[t, chosen].max())
        for e, wt in zip(chosen, weights / weights.sum()):
            g = w[p + "ffn_gate_exps.weight"][e] @ x[t] + w[p + "ffn_gate_exps.bias"][e]
            u = w[p + "ffn_up_exps.weight"][e] @ x[t] + w[p + "ffn_up_exps.bias"][e]
            clamped += int((g > 7).sum() + (np.abs(u) > 7).sum())
            g, u = np.minimum(g, 7.0), np.clip(u, -7.0, 7.0)
            h = g / (1 + np.exp(-1.702 * g)) * (u + 1)
            out[t] += wt * (w[p + "ffn_down_exps.weight"][e] @ h + w[p + "ffn_down_exps.bias"][e])
    return out, clamped


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", [F32, MXFP4])
def test_moe_layer_matches_float64_reference(paths, name, backend, device):
    llm = load(paths[name], device, backend=backend)
    md, w = _read(paths[name])
    # inputs of std 5: gate and up values past the clamps at +-7
    x = 5 * torch.randn(11, llm.config.hidden, generator=torch.Generator().manual_seed(3))
    for i, layer in enumerate(llm.model.layers):
        got = layer.moe(llm.ops, x.to(device)).cpu().double()
        ref, clamped = reference_moe(md, w, f"blk.{i}.", x.double().numpy())
        assert clamped > 0
        assert float((got - torch.from_numpy(ref)).norm() / np.linalg.norm(ref)) <= 1e-5


@pytest.mark.parametrize("name", [F32, MXFP4])
def test_triton_backend_equals_torch_backend(paths, name, device):
    torch_llm = load(paths[name], device, backend="torch")
    triton_llm = load(paths[name], device, backend="triton")
    tokens = np.random.default_rng(5).integers(0, 320, 13).tolist()
    a, b = torch_llm.logits(tokens), triton_llm.logits(tokens)
    assert float((a - b).norm() / a.norm()) <= 1e-5
    # 13 + 6 tokens: decode steps past the window of 8 on the even layers
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=1)
    want, got = (llm.generate(tokens, params, use_tqdm=False)[0] for llm in (torch_llm, triton_llm))
    assert got.token_ids == want.token_ids
    chosen = [[d[t] for d, t in zip(out.logprobs, out.token_ids)] for out in (got, want)]
    assert np.allclose(*chosen, atol=1e-4)


@pytest.fixture(scope="module")
def fixture():
    return np.load(FIXTURES / "gpt_oss_logits.npz")


# F32: both sides compute the exact float32 forward. MXFP4: llama.cpp rounds the activations of its MXFP4 products
# to 8 bits (Q8_0), so the bound is the one for quantized products (tests/fixtures/make_gpt_oss_fixtures.py).
BOUNDS = {F32: (1e-5, 0.99), MXFP4: (5e-3, 0.9)}


@pytest.mark.parametrize("name", list(CASES))
def test_logits_agree_with_llamacpp(paths, name, fixture, device):
    _, n_ctx = CASES[name]
    assert int(fixture[f"{name}.n_ctx"]) == n_ctx, "stale fixture: run tests/fixtures/make_gpt_oss_fixtures.py"
    llm = load(paths[name], device, max_model_len=n_ctx)
    ref = fixture[f"{name}.logits"]
    got = llm.logits(fixture[f"{name}.tokens"].tolist())
    kl = mean_kl(ref, got)
    top1 = float((got.argmax(-1).numpy() == ref.argmax(-1)).mean())
    print(f"{name}: mean KL {kl:.2e}, top-1 {top1:.3f} (llama-cpp-python {fixture['llama_cpp_python_version']})")
    max_kl, min_top1 = BOUNDS[name]
    assert kl <= max_kl and top1 >= min_top1


def test_layer_pattern_and_rope(paths):
    with GGUFFile(paths[F32]) as f:
        cfg = ModelConfig.from_gguf(f)
    # llama.cpp's swa pattern 2 for gpt-oss: even layers windowed
    assert cfg.swa_layers == (True, False, True) and cfg.sliding_window == 8
    assert (cfg.rope.scaling, cfg.rope.factor, cfg.rope.original_context) == ("yarn", 32.0, 4096)


# --- the harmony vocabulary ----------------------------------------------------------------------------------------

HARMONY = ["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>", "<|end|>",
           "<|message|>", "<|call|>"]


def _harmony_tokenizer() -> Tokenizer:
    tokens = [*(chr(c) for c in range(ord("a"), ord("z") + 1)), "Ġ", *HARMONY]
    return Tokenizer({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-4o", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 27 + [3] * len(HARMONY), "tokenizer.ggml.merges": [],
        "tokenizer.ggml.bos_token_id": tokens.index("<|startoftext|>"),
        "tokenizer.ggml.eos_token_id": tokens.index("<|return|>"),
        "tokenizer.chat_template": "{% for m in messages %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>"
                                   "{% endfor %}{% if add_generation_prompt %}<|start|>assistant{% endif %}",
    })


def test_harmony_special_tokens():
    tok = _harmony_tokenizer()
    ids = {t: tok.tokens.index(t) for t in HARMONY}
    assert tok.pre == "gpt-4o"
    # llama-vocab.cpp: <|return|> and <|call|> end generation; with both present, <|end|> (which ends every turn of
    # the harmony format) does not, and it renders as text, as <|channel|>, <|message|>, <|start|> and
    # <|constrain|> do
    assert tok.eos_token_ids == {ids["<|return|>"], ids["<|call|>"], ids["<|endoftext|>"]}
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|start|>user<|message|>hi<|end|><|start|>assistant"
    chat = tok.encode_chat(text)
    assert [i for i in chat if i in ids.values()] == [ids[t] for t in ("<|start|>", "<|message|>", "<|end|>",
                                                                       "<|start|>")]
    rendered = [ids[t] for t in ("<|start|>", "<|channel|>", "<|message|>", "<|constrain|>", "<|end|>")]
    assert tok.decode(rendered + [ids["<|return|>"]], skip_special=True) == "<|start|><|channel|><|message|>" \
                                                                             "<|constrain|><|end|>"


# --- bad input -----------------------------------------------------------------------------------------------------

BAD = {
    "missing sinks": ({"drop": ("blk.1.attn_sinks.weight",)}, r"tensor 'blk.1.attn_sinks.weight' is missing"),
    "sinks shape": ({"tensors": {"blk.0.attn_sinks.weight": _random(3)}},
                    (r"tensor 'blk.0.attn_sinks.weight' has shape \(3,\); the metadata "
                     r"\(gpt-oss.attention.head_count\) gives \(4,\)")),
    "missing output bias": ({"drop": ("blk.2.attn_output.bias",)}, r"tensor 'blk.2.attn_output.bias' is missing"),
    "missing router bias": ({"drop": ("blk.0.ffn_gate_inp.bias",)}, r"tensor 'blk.0.ffn_gate_inp.bias' is missing"),
    "missing window": ({"drop": ("gpt-oss.attention.sliding_window",)},
                       r"metadata key gpt-oss.attention.sliding_window is missing"),
    "expert count": ({"metadata": {"gpt-oss.expert_count": Typed(GGUFValueType.UINT32, 6)}},
                     r"tensor 'blk.0.ffn_gate_inp.weight' has shape \(4, 64\); the metadata \(gpt-oss.expert_count 6"),
    "expert bias": ({"tensors": {"blk.1.ffn_up_exps.bias": _random(4, 24)}},
                    (r"tensor 'blk.1.ffn_up_exps.bias' has shape \(4, 24\); the metadata \(gpt-oss.expert_count 4, "
                     r"gpt-oss.expert_feed_forward_length 32")),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_clear_error(paths, case, tmp_path, device):
    change, message = BAD[case]
    path = _rewrite(paths[F32], tmp_path / "bad.gguf", **change)
    with pytest.raises(ValueError, match=message):
        load(path, device)
