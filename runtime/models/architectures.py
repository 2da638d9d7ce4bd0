"""The decoder-only architectures, each described once: what differs between them is data, not code.

Tensor names are llama.cpp's GGUF names (`blk.{i}.attn_q.weight` ...). Every architecture shares the
block: norm -> attention -> (post-norm) -> residual -> norm -> gated FFN -> (post-norm) -> residual, where
the gated FFN of a mixture-of-experts model is the mixture of runtime/models/moe.py.

gpt-oss (llama.cpp's LLM_ARCH_OPENAI_MOE) is one more instance: biases on q, k, v and the attention output,
a learned sink logit per head in every attention softmax (`attn_sinks.weight`), sliding-window attention on
even layers, `post_attention_norm` as the FFN's norm, and a mixture of experts with a biased router whose
chosen logits are softmaxed ("softmax_weight"), biased experts and the clamped SwiGLU "swiglu_oai".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    rope_neox: bool  # NeoX rotation (halves) instead of llama.cpp's "normal" adjacent pairs
    activation: str = "silu"  # gate activation of the FFN: silu | gelu (tanh approximation) | swiglu_oai (experts)
    fused_qkv: bool = False  # one attn_qkv tensor instead of attn_q / attn_k / attn_v
    fused_gate_up: bool = False  # ffn_up holds [gate; up]
    qkv_bias: bool = False
    attn_output_bias: bool = False  # attn_output.bias
    attn_sinks: bool = False  # attn_sinks.weight: one logit per head in the softmax's denominator
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE
    post_norms: bool = False  # attn_post_norm / ffn_post_norm on the block outputs
    ffn_norm: str = "ffn_norm"  # the FFN's input norm tensor (gpt-oss: post_attention_norm)
    scale_embeddings: bool = False  # token embeddings times sqrt(hidden)
    softcaps: bool = False  # attention and final logit soft-capping from metadata
    swa_pattern: int = 0  # layer i uses the sliding window when i % pattern < pattern - 1 (0: none)
    rope_local_base: float = 0.0  # RoPE base of the sliding-window layers, when they have their own
    # The model of this many layers (Gemma's 27B) scales attention by 1 / sqrt(hidden / n_heads), not by
    # 1 / sqrt(head_dim): its checkpoint was trained so, and llama.cpp knows it only by its depth.
    hidden_scaled_layers: int = 0
    # Mixture-of-experts FFN (ffn_gate_inp, ffn_{gate,up,down}_exps): "" none; "optional": when the file has an
    # expert_count (llama: Mixtral); "always". Routing is llama.cpp's for these architectures: a softmax over the
    # experts, the top expert_used_count taken, their weights normalized when `moe_normalize` (or the file's
    # expert_weights_norm) says so.
    moe: str = ""
    moe_normalize: bool = False  # the chosen experts' weights divided by their sum
    # "softmax": over all experts, then the top-k; "softmax_weight": over the top-k logits (kernels/moe.py)
    moe_gating: str = "softmax"
    moe_biases: bool = False  # ffn_gate_inp.bias and ffn_{gate,up,down}_exps.bias
    shared_expert: bool = False  # ffn_{gate,up,down}_shexp beside the experts, gated by sigmoid(ffn_gate_inp_shexp)


ARCHITECTURES: dict[str, Architecture] = {
    # Llama 2/3, Mistral, SmolLM: the converter permutes Q/K rows for the "normal" rotation.
    "llama": Architecture(rope_neox=False, moe="optional", moe_normalize=True),
    "qwen2": Architecture(rope_neox=True, qkv_bias=True),
    "qwen3": Architecture(rope_neox=True, qk_norm=True),
    "qwen2moe": Architecture(rope_neox=True, qkv_bias=True, moe="always", shared_expert=True),
    "qwen3moe": Architecture(rope_neox=True, qk_norm=True, moe="always", moe_normalize=True),
    "gemma2": Architecture(rope_neox=True, activation="gelu", post_norms=True, scale_embeddings=True, softcaps=True,
                           swa_pattern=2, hidden_scaled_layers=46),
    "gemma3": Architecture(rope_neox=True, activation="gelu", post_norms=True, scale_embeddings=True, qk_norm=True,
                           swa_pattern=6, rope_local_base=10000.0, hidden_scaled_layers=62),
    "phi3": Architecture(rope_neox=True, fused_qkv=True, fused_gate_up=True),
    # llama.cpp's swa pattern 2: layers 0, 2, 4, ... windowed
    "gpt-oss": Architecture(rope_neox=True, activation="swiglu_oai", qkv_bias=True, attn_output_bias=True,
                            attn_sinks=True, ffn_norm="post_attention_norm", swa_pattern=2, moe="always",
                            moe_gating="softmax_weight", moe_biases=True),
}
