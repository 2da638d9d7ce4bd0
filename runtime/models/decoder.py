"""The decoder-only transformer every supported architecture is an instance of.

Per layer (names as in the GGUF file):

    x = attn_norm(h)                          RMSNorm (fused with the residual add of the layer before)
    q, k, v = attn_q/k/v(x) (+ bias)          or one fused attn_qkv
    q, k = attn_q_norm(q), attn_k_norm(k)     per head (qwen3, gemma3)
    q, k = rope(q, k); cache k, v             one kernel; the layer's own RoPE (gemma3: local layers differ)
    o = attention over the cache (sliding window, soft-cap, sinks: gpt-oss)
    a = attn_output(o) (+ bias: gpt-oss);  a = post_attention_norm(a)   (gemma)
    h = h + a;  x = ffn_norm(h)               (gpt-oss names it post_attention_norm)
    f = ffn_down(act(ffn_gate(x)) * ffn_up(x));  f = post_ffw_norm(f)   (gemma)
        or the mixture of experts of moe.py (qwen2moe, qwen3moe, llama with experts, gpt-oss)
    h = h + f
    logits = output(output_norm(h))  (output = token_embd when absent); final soft-cap (gemma2)

Where the ops fuse them (`Ops.fuses_norm`, `Ops.gated`: the Triton backend's word-decoder products), a norm
after a residual add runs in the epilogue of the product before it and the prologue-free scaling of the one
after (attn_output + ffn_norm -> gate/up; ffn_down + the next layer's attn_norm -> q/k/v), and act(gate) * up in
the gate/up product: 6 launches per llama layer instead of 9. Gemma's post-norms keep the separate ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ggtriton.kernels.rmsnorm import PendingNorm
from ggtriton.kernels.rope import rope_inv_freq

from ..config import ModelConfig, RopeConfig
from ..engine.batch import ForwardBatch
from .moe import MoE
from .ops import Ops
from .weights import QuantWeight


@dataclass
class _Layer:
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    attn_output: QuantWeight
    attn_output_bias: QuantWeight | None
    ffn_down: QuantWeight | None  # None (and ffn_up, ffn_gate): a mixture of experts
    ffn_up: QuantWeight | None
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
    sinks: torch.Tensor | None = None  # float32 [n_heads]
    moe: MoE | None = None

    @property
    def qkv_weights(self) -> list[QuantWeight]:
        """The weights of the q/k/v product: one fused, or q, k and v."""
        return [self.qkv] if self.qkv is not None else [self.q, self.k, self.v]


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
                ffn_norm=vec(p + arch.ffn_norm + ".weight"),
                attn_output=w(p + "attn_output.weight"),
                attn_output_bias=w(p + "attn_output.bias") if arch.attn_output_bias else None,
                ffn_down=None if config.n_expert else w(p + "ffn_down.weight"),
                ffn_up=None if config.n_expert else w(p + "ffn_up.weight"),
                ffn_gate=None if arch.fused_gate_up or config.n_expert else w(p + "ffn_gate.weight"),
                moe=MoE.load(config, p, w, ops) if config.n_expert else None,
            )
            if arch.fused_qkv:
                layer.qkv = w(p + "attn_qkv.weight")
            else:
                layer.q, layer.k, layer.v = (w(p + f"attn_{n}.weight") for n in "qkv")
            if arch.qkv_bias:
                layer.q_bias, layer.k_bias, layer.v_bias = (w(p + f"attn_{n}.bias") for n in "qkv")
            if arch.qk_norm:
                layer.q_norm, layer.k_norm = vec(p + "attn_q_norm.weight"), vec(p + "attn_k_norm.weight")
            if arch.attn_sinks:
                layer.sinks = vec(p + "attn_sinks.weight")
                if layer.sinks.shape != (config.n_heads,):
                    raise ValueError(f"{config.arch} model: tensor {p + 'attn_sinks.weight'!r} has shape "
                                     f"{tuple(layer.sinks.shape)}; the metadata ({config.arch}.attention.head_count) "
                                     f"gives ({config.n_heads},)")
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
        n_q, n_kv, d = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.head_dim
        x, residual = ops.rmsnorm(h, self.layers[0].attn_norm, cfg.rms_eps)
        gen = batch.generated
        for i, layer in enumerate(self.layers):
            if layer.qkv is not None:
                q, k, v = ops.linear(x, layer.qkv, generated=gen).split([n_q, n_kv, n_kv], dim=-1)
            else:
                q, k, v = ops.linears(x, layer.qkv_weights, [layer.q_bias, layer.k_bias, layer.v_bias], generated=gen)
            q = q.reshape(-1, cfg.n_heads, d)
            k = k.reshape(-1, cfg.n_kv_heads, d)
            v = v.reshape(-1, cfg.n_kv_heads, d)
            if layer.q_norm is not None:
                q, k = ops.qk_norm(q, k, layer.q_norm, layer.k_norm, cfg.rms_eps)
            swa = cfg.swa_layers[i]
            inv_freq, attn_factor = self._rope_local if swa else self._rope
            k_cache, v_cache = kv_caches[i]
            # q, k and v stay views into the projection's output: the kernels take strided rows
            ops.rope_kv_store(q, k, v, k_cache, v_cache, batch.slot_mapping, batch.positions, inv_freq,
                              neox=arch.rope_neox, attn_factor=attn_factor)
            o = ops.attention(q, k_cache, v_cache, batch, scale=cfg.attn_scale,
                              sliding_window=cfg.sliding_window if swa else None, soft_cap=cfg.attn_softcap,
                              sinks=layer.sinks)
            # the router and the experts take x as a tensor: no norm left pending for them
            ffn_in = None if layer.moe else [layer.ffn_up] if layer.ffn_gate is None else [layer.ffn_gate, layer.ffn_up]
            x, residual = self._add_norm(o.reshape(-1, n_q), layer.attn_output, layer.post_attn_norm, residual,
                                         layer.ffn_norm, ffn_in, gen, layer.attn_output_bias)
            if layer.moe is not None:
                g = layer.moe(ops, x, gen)  # the FFN's output: no ffn_down follows
            elif layer.ffn_gate is None:
                g = ops.act_mul(arch.activation, *ops.linear(x, layer.ffn_up, generated=gen).chunk(2, dim=-1))
            else:
                g = ops.gated(arch.activation, x, layer.ffn_gate, layer.ffn_up, generated=gen)
            nxt = self.layers[i + 1] if i + 1 < len(self.layers) else None
            # after the last layer, the final norm, whose rows go to the caller
            x, residual = self._add_norm(g, layer.ffn_down, layer.post_ffn_norm, residual,
                                         self.output_norm if nxt is None else nxt.attn_norm,
                                         None if nxt is None else nxt.qkv_weights, gen)
        return x

    def _add_norm(self, x: torch.Tensor, w: QuantWeight | None, post_norm: torch.Tensor | None, residual: torch.Tensor,
                  norm: torch.Tensor, consumers: list[QuantWeight] | None, generated: bool | torch.Tensor,
                  bias: QuantWeight | None = None) -> tuple[torch.Tensor | PendingNorm, torch.Tensor]:
        """(rmsnorm(h, norm), h) for h = residual + post_norm(x @ W^T + bias) (x itself where W is None: a mixture
        of experts' output): pending for the products `consumers` where the ops fuse it, else computed."""
        ops, eps = self.ops, self.config.rms_eps
        if w is not None and post_norm is None and bias is None and ops.fuses_norm(len(x), w, consumers):
            return ops.linear_add_norm(x, w, residual, norm, eps)
        a = x if w is None else ops.linear(x, w, bias, generated=generated)
        if post_norm is not None:
            a = ops.rmsnorm(a, post_norm, eps)[0]
        return ops.rmsnorm(a, norm, eps, residual)

    def logits(self, hidden: torch.Tensor, generated: bool | torch.Tensor = False) -> torch.Tensor:
        """Next-token logits, float32 [T, vocab], of final hidden states. generated: the rows whose next token is a
        generated one (as `ForwardBatch.generated`, per row or one bool), not a prompt's being scored."""
        out = self.ops.linear(hidden, self.output, out_dtype=torch.float32, generated=generated)
        cap = self.config.final_softcap
        if cap is not None:
            out = cap * torch.tanh(out / cap)
        return out
