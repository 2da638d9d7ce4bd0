"""The mixture-of-experts FFN of qwen3moe, qwen2moe, Mixtral-style llama and gpt-oss, after llama.cpp's build_moe_ffn.

Per token x (the FFN's normed input; names as in the GGUF file, expert tensors in PyTorch order):

    logits = x @ ffn_gate_inp^T                          [n_expert]
    p = softmax(logits); e_1..e_k the k = expert_used_count largest
    w_j = p_(e_j)  (/ the sum of the chosen p when expert_weights_norm), times expert_weights_scale
    f = sum_j w_j * ffn_down_exps[e_j] @ (silu(ffn_gate_exps[e_j] @ x) * ffn_up_exps[e_j] @ x)
    qwen2moe: f += sigmoid(x . ffn_gate_inp_shexp) * ffn_down_shexp @ (silu(ffn_gate_shexp @ x) * ffn_up_shexp @ x)

gpt-oss: logits += ffn_gate_inp.bias; e_1..e_k the k largest logits, w = softmax(logits_(e_1..e_k)) ("softmax_weight");
each expert product plus its row of ffn_{gate,up,down}_exps.bias, and swiglu_oai for silu (kernels/moe.py).

ffn_gate_exps and ffn_up_exps are [n_expert, n_ff, hidden], ffn_down_exps [n_expert, hidden, n_ff]: one GGUF tensor
each, read as the file stores it. `Ops.moe` runs the routed experts: the fused kernel over the blocks on the Triton
backend (only the chosen experts' bytes are read), `moe_dense` over the experts dequantized at load on the torch
backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .weights import QuantWeight

if TYPE_CHECKING:
    from ..config import ModelConfig
    from .ops import Ops

_MIN_WEIGHT_SUM = 2.0**-14  # llama.cpp's floor of the normalized weights' divisor (the smallest normal fp16)


@dataclass(eq=False)
class SharedExpert:
    """qwen2moe's expert that every token goes through, scaled by its sigmoid gate."""

    gate: QuantWeight  # ffn_gate_shexp [n_ff_shared, hidden]
    up: QuantWeight  # ffn_up_shexp [n_ff_shared, hidden]
    down: QuantWeight  # ffn_down_shexp [hidden, n_ff_shared]
    gate_inp: torch.Tensor  # ffn_gate_inp_shexp, float32 [hidden]


@dataclass(eq=False)
class MoE:
    """One layer's mixture of experts (see the module docstring)."""

    router: QuantWeight  # ffn_gate_inp [n_expert, hidden]
    gate: QuantWeight
    up: QuantWeight
    down: QuantWeight
    top_k: int
    normalize: bool
    scale: float
    activation: str
    gating: str = "softmax"
    router_bias: QuantWeight | None = None  # ffn_gate_inp.bias [n_expert]
    biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # gate's, up's, down's: float32
    shared: SharedExpert | None = None

    @classmethod
    def load(cls, config: ModelConfig, prefix: str, w: Callable[[str], QuantWeight], ops: Ops) -> MoE:
        """Layer `prefix`'s experts from `w` (name -> weight, raising a ValueError naming a missing tensor), their
        shapes checked against the metadata so that a file whose tensors disagree with it fails here, by name."""
        arch, hidden, n_expert, n_ff = config.arch, config.hidden, config.n_expert, config.expert_ffn
        keys = f"{arch}.expert_count {n_expert}, {arch}.expert_feed_forward_length {n_ff}, " \
               f"{arch}.embedding_length {hidden}"

        def shaped(name: str, shape: tuple[int, ...], source: str) -> QuantWeight:
            t = w(prefix + name)
            if tuple(t.shape) != shape:
                raise ValueError(f"{arch} model: tensor {prefix + name!r} has shape {tuple(t.shape)}; the metadata "
                                 f"({source}) gives {shape}")
            return t

        moe = cls(
            router=shaped("ffn_gate_inp.weight", (n_expert, hidden), keys),
            gate=shaped("ffn_gate_exps.weight", (n_expert, n_ff, hidden), keys),
            up=shaped("ffn_up_exps.weight", (n_expert, n_ff, hidden), keys),
            down=shaped("ffn_down_exps.weight", (n_expert, hidden, n_ff), keys),
            top_k=config.n_expert_used,
            normalize=config.expert_weights_norm,
            scale=config.expert_weights_scale,
            activation=config.architecture.activation,
            gating=config.architecture.moe_gating,
        )
        if config.architecture.moe_biases:
            moe.router_bias = shaped("ffn_gate_inp.bias", (n_expert,), keys)
            moe.biases = tuple(ops.vector(shaped(f"ffn_{n}_exps.bias", (n_expert, rows), keys))
                               for n, rows in (("gate", n_ff), ("up", n_ff), ("down", hidden)))
        if config.architecture.shared_expert:
            n_sh = config.shared_expert_ffn
            sh_keys = f"{arch}.expert_shared_feed_forward_length {n_sh}, {arch}.embedding_length {hidden}"
            gate_inp = w(prefix + "ffn_gate_inp_shexp.weight")
            if gate_inp.shape not in ((hidden,), (1, hidden)):  # llama.cpp reads [hidden] or [1, hidden]
                raise ValueError(f"{arch} model: tensor {prefix + 'ffn_gate_inp_shexp.weight'!r} has shape "
                                 f"{tuple(gate_inp.shape)}; the metadata ({arch}.embedding_length) gives ({hidden},)")
            moe.shared = SharedExpert(
                gate=shaped("ffn_gate_shexp.weight", (n_sh, hidden), sh_keys),
                up=shaped("ffn_up_shexp.weight", (n_sh, hidden), sh_keys),
                down=shaped("ffn_down_shexp.weight", (hidden, n_sh), sh_keys),
                gate_inp=ops.vector(gate_inp).reshape(hidden),
            )
        return moe

    def __call__(self, ops: Ops, x: torch.Tensor, generated: bool | torch.Tensor = False) -> torch.Tensor:
        """The FFN's output [T, hidden] for its normed input x [T, hidden] (`generated`: `Ops.linear`'s)."""
        logits = ops.linear(x, self.router, self.router_bias, out_dtype=torch.float32, generated=generated)
        out = ops.moe(x, logits, self.top_k, self.gate, self.up, self.down, normalize=self.normalize,
                      scale=self.scale, activation=self.activation, gating=self.gating, biases=self.biases)
        s = self.shared
        if s is not None:
            y = ops.linear(ops.gated(self.activation, x, s.gate, s.up, generated=generated), s.down,
                           generated=generated)
            out = out + torch.sigmoid(x.float() @ s.gate_inp).to(y.dtype)[:, None] * y
        return out


def moe_dense(x: torch.Tensor, router_logits: torch.Tensor, top_k: int, gate: torch.Tensor, up: torch.Tensor,
              down: torch.Tensor, *, normalize: bool, scale: float,
              act_mul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], gating: str = "softmax",
              biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The routed experts of the module docstring over dense experts (the torch backend's copies): gate, up
    [n_expert, n_ff, hidden], down [n_expert, hidden, n_ff] in x's dtype; act_mul(gate, up) the activation;
    biases: gate's, up's [n_expert, n_ff] and down's [n_expert, hidden], or None. Each expert's tokens are
    multiplied together; routing in float32."""
    if gating == "softmax_weight":
        weights, ids = router_logits.float().topk(top_k, dim=-1)
        weights = torch.softmax(weights, dim=-1)
    else:
        weights, ids = torch.softmax(router_logits.float(), dim=-1).topk(top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=_MIN_WEIGHT_SUM)
    weights = (weights * scale).to(x.dtype)
    y = x.new_empty((*ids.shape, x.shape[1]))  # per token and choice: every slot is written once
    for e in ids.unique().tolist():
        t, j = (ids == e).nonzero(as_tuple=True)
        xe = x[t]
        g, u = xe @ gate[e].t(), xe @ up[e].t()
        if biases is not None:
            g, u = g + biases[0][e].to(g.dtype), u + biases[1][e].to(u.dtype)
        d = act_mul(g, u) @ down[e].t()
        if biases is not None:
            d = d + biases[2][e].to(d.dtype)
        y[t, j] = d * weights[t, j, None]
    return y.sum(dim=1)
