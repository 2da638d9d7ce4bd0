"""The decoder-only transformer every supported architecture is an instance of.

Per layer (names as in the GGUF file):

    x = attn_norm(h)                          RMSNorm (fused with the residual add of the layer before)
    q, k, v = attn_q/k/v(x) (+ bias)          or one fused attn_qkv
    q, k = attn_q_norm(q), attn_k_norm(k)     per head (qwen3, gemma3)
    q, k = rope(q, k); cache k, v             one kernel; the layer's own RoPE (gemma3: local layers differ)
    o = attention over the cache (sliding window, soft-cap)
    a = attn_output(o);  a = post_attention_norm(a)   (gemma)
    h = h + a;  x = ffn_norm(h)
    f = ffn_down(act(ffn_gate(x)) * ffn_up(x));  f = post_ffw_norm(f)   (gemma)
    h = h + f
    logits = output(output_norm(h))  (output = token_embd when absent); final soft-cap (gemma2)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ggtriton.kernels.rope import rope_inv_freq

from ..config import ModelConfig, RopeConfig
from ..engine.batch import ForwardBatch
from .ops import Ops
from .weights import QuantWeight


@dataclass
class _Layer:
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    attn_output: QuantWeight
    ffn_down: QuantWeight
    ffn_up: QuantWeight
    qkv: QuantWeight | None = None
    q: QuantWeight | None = None
    k: QuantWeight | None = None
    v: QuantWeight | None = None
    q_bias: QuantWeight | None = None
    k_bias: QuantWeight | None = None
    v_bias: QuantWeight | None = None
    ffn_gate: QuantWeight | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None
    post_ffn_norm: torch.Tensor | None = None


class DecoderModel:
    def __init__(self, config: ModelConfig, weights: dict[str, QuantWeight], ops: Ops, device: torch.device,
                 max_model_len: int):
        """`max_model_len`: the longest sequence the engine runs, which picks LongRoPE's factors."""
        self.config = config
        self.ops = ops
        arch = config.architecture
        self._weights = weights

        def w(name: str, required: bool = True) -> QuantWeight | None:
            if name in weights:
                return weights[name]
            if required:
                raise ValueError(f"{config.arch} model: tensor {name!r} is missing")
            return None

        def vec(name: str, required: bool = True) -> torch.Tensor | None:
            t = w(name, required)
            return None if t is None else ops.vector(t)

        self.token_embd = w("token_embd.weight")
        self.output = w("output.weight", required=False) or self.token_embd
        self.output_norm = vec("output_norm.weight")
        self.layers = []
        for i in range(config.n_layers):
            p = f"blk.{i}."
            layer = _Layer(
                attn_norm=vec(p + "attn_norm.weight"),
                ffn_norm=vec(p + "ffn_norm.weight"),
                attn_output=w(p + "attn_output.weight"),
                ffn_down=w(p + "ffn_down.weight"),
                ffn_up=w(p + "ffn_up.weight"),
                ffn_gate=None if arch.fused_gate_up else w(p + "ffn_gate.weight"),
            )
            if arch.fused_qkv:
                layer.qkv = w(p + "attn_qkv.weight")
            else:
                layer.q, layer.k, layer.v = (w(p + f"attn_{n}.weight") for n in "qkv")
            if arch.qkv_bias:
                layer.q_bias, layer.k_bias, layer.v_bias = (w(p + f"attn_{n}.bias") for n in "qkv")
            if arch.qk_norm:
                layer.q_norm, layer.k_norm = vec(p + "attn_q_norm.weight"), vec(p + "attn_k_norm.weight")
            if arch.post_norms:
                layer.post_attn_norm = vec(p + "post_attention_norm.weight")
                layer.post_ffn_norm = vec(p + "post_ffw_norm.weight")
            self.layers.append(layer)
        freq_factors = weights.get("rope_freqs.weight")
        if freq_factors is None:
            # LongRoPE (Phi-3 128k): one set of factors for the whole run, chosen as llama.cpp does, by the
            # configured context (not the position): the long ones past the original training context.
            long = max_model_len > (config.rope.original_context or config.context_length)
            freq_factors = weights.get("rope_factors_long.weight" if long else "rope_factors_short.weight")
        factors = ops.vector(freq_factors).cpu() if freq_factors is not None else None
        self._rope = self._rope_table(config.rope, factors, device)
        self._rope_local = self._rope_table(config.rope_local, None, device) if config.rope_local else self._rope

    @staticmethod
    def _rope_table(rope: RopeConfig, freq_factors: torch.Tensor | None,
                    device: torch.device) -> tuple[torch.Tensor, float]:
        inv_freq, attn_factor = rope_inv_freq(
            rope.dim, rope.base, scaling=rope.scaling, factor=rope.factor, original_context=rope.original_context,
            beta_fast=rope.beta_fast, beta_slow=rope.beta_slow, freq_factors=freq_factors,
            attn_factor=rope.attn_factor,
        )
        return inv_freq.to(device), attn_factor

    def forward(self, batch: ForwardBatch, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm, for every token of the batch."""
        cfg, ops = self.config, self.ops
        arch = cfg.architecture
        h = ops.embedding(batch.input_ids, self.token_embd).to(ops.dtype)
        if cfg.embed_scale != 1.0:
            h = h * cfg.embed_scale
        residual = None
        n_q, n_kv, d = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.head_dim
        for i, layer in enumerate(self.layers):
            x, residual = ops.rmsnorm(h, layer.attn_norm, cfg.rms_eps, residual)
            if layer.qkv is not None:
                q, k, v = ops.linear(x, layer.qkv).split([n_q, n_kv, n_kv], dim=-1)
            else:
                q, k, v = ops.linears(x, [layer.q, layer.k, layer.v], [layer.q_bias, layer.k_bias, layer.v_bias])
            q = q.reshape(-1, cfg.n_heads, d)
            k = k.reshape(-1, cfg.n_kv_heads, d)
            v = v.reshape(-1, cfg.n_kv_heads, d)
            if layer.q_norm is not None:
                q = ops.rmsnorm(q, layer.q_norm, cfg.rms_eps)[0]
                k = ops.rmsnorm(k, layer.k_norm, cfg.rms_eps)[0]
            swa = cfg.swa_layers[i]
            inv_freq, attn_factor = self._rope_local if swa else self._rope
            k_cache, v_cache = kv_caches[i]
            # q, k and v stay views into the projection's output: the kernels take strided rows
            ops.rope_kv_store(q, k, v, k_cache, v_cache, batch.slot_mapping, batch.positions, inv_freq,
                              neox=arch.rope_neox, attn_factor=attn_factor)
            o = ops.attention(q, k_cache, v_cache, batch, scale=cfg.attn_scale,
                              sliding_window=cfg.sliding_window if swa else None, soft_cap=cfg.attn_softcap)
            a = ops.linear(o.reshape(-1, n_q), layer.attn_output)
            if layer.post_attn_norm is not None:
                a = ops.rmsnorm(a, layer.post_attn_norm, cfg.rms_eps)[0]
            x, residual = ops.rmsnorm(a, layer.ffn_norm, cfg.rms_eps, residual)
            if layer.ffn_gate is None:
                gate, up = ops.linear(x, layer.ffn_up).chunk(2, dim=-1)
            else:
                gate, up = ops.linears(x, [layer.ffn_gate, layer.ffn_up])
            f = ops.linear(ops.act_mul(arch.activation, gate, up), layer.ffn_down)
            if layer.post_ffn_norm is not None:
                f = ops.rmsnorm(f, layer.post_ffn_norm, cfg.rms_eps)[0]
            h = f
        return ops.rmsnorm(h, self.output_norm, cfg.rms_eps, residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits, float32 [T, vocab], of final hidden states."""
        out = self.ops.linear(hidden, self.output, out_dtype=torch.float32)
        cap = self.config.final_softcap
        if cap is not None:
            out = cap * torch.tanh(out / cap)
        return out
