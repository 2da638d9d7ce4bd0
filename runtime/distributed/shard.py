"""Which part of every weight a tensor-parallel rank holds, still in its GGUF blocks.

With N ranks, rank r holds (names as in the GGUF file; q heads and KV heads in their file order):

    attn_q (+ bias)             rows of q heads [r * H/N, (r + 1) * H/N)             column-parallel
    attn_k, attn_v (+ bias)     rows of its KV heads: KV/N of them, or, when KV < N, the one its q heads read
    attn_qkv (phi3)             the q, k and v rows above, in that order
    attn_output                 the columns (K) of its q heads, whole blocks per row  row-parallel + all-reduce
    ffn_gate, ffn_up            rows [r * F/N, (r + 1) * F/N) (phi3's fused ffn_up: the same rows of each half)
    ffn_down                    the columns (K) of those rows, whole blocks per row   row-parallel + all-reduce
    token_embd, output          rows (vocabulary entries) [r * V', (r + 1) * V'), V' = ceil(V / N): the embedding
                                a masked lookup + all-reduce, the lm_head an all-gather of the logits
    everything else             replicated: norms, RoPE factors, and the mixture-of-experts FFN (router, experts,
                                shared expert): every rank computes the whole FFN of its tokens, so an expert layer
                                needs no communication, at the cost of every rank holding every expert

A row split takes whole rows of blocks, so it fits any type; a K split cuts each row on a block boundary, so the
columns a rank takes (the head columns of attn_output, F/N for ffn_down) must be a multiple of the type's block
(32 elements for Q4_0/Q8_0, 256 for the K-quants). Head counts must divide: H % N == 0, and KV % N == 0 or
N % KV == 0 (KV heads then replicated N / KV times, each rank's q heads reading the one it holds).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from ggtriton.gguf import GGUFFile

from ..config import ModelConfig
from ..models.weights import QuantWeight, load_weights

_LAYER = re.compile(r"blk\.\d+\.(.+)$")
_ROW_PARALLEL = ("attn_output.weight", "ffn_down.weight")
_VOCAB = ("token_embd.weight", "output.weight")


@dataclass(frozen=True)
class ShardPlan:
    """Rank `rank` of `size`: the q heads, KV heads, FFN rows and vocabulary rows it holds."""

    config: ModelConfig  # the whole model's
    size: int
    rank: int

    def __post_init__(self) -> None:
        check_tensor_parallel(self.config, self.size)

    def _share(self, total: int) -> range:
        """This rank's equal share of `total` items (heads, rows), in rank order."""
        n = total // self.size
        return range(self.rank * n, (self.rank + 1) * n)

    @property
    def q_heads(self) -> range:
        return self._share(self.config.n_heads)

    @property
    def kv_heads(self) -> range:
        kv = self.config.n_kv_heads
        if kv >= self.size:
            return self._share(kv)
        head = self.rank * kv // self.size  # replicated: the KV head this rank's q heads are grouped on
        return range(head, head + 1)

    @property
    def ffn_rows(self) -> range:
        return self._share(self.config.ffn)

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.config.vocab_size // self.size)

    @property
    def vocab_rows(self) -> range:
        n, v = self.vocab_per_rank, self.config.vocab_size
        return range(min(self.rank * n, v), min((self.rank + 1) * n, v))

    def shard_config(self) -> ModelConfig:
        """The model as this rank runs it: its heads and, for a dense FFN, its FFN rows."""
        cfg = self.config
        ffn = cfg.ffn if cfg.n_expert else len(self.ffn_rows)
        return dataclasses.replace(cfg, n_heads=len(self.q_heads), n_kv_heads=len(self.kv_heads), ffn=ffn)


def is_row_parallel(name: str) -> bool:
    m = _LAYER.match(name)
    return m is not None and m.group(1) in _ROW_PARALLEL


def is_vocab_parallel(name: str) -> bool:
    return name in _VOCAB


def check_tensor_parallel(config: ModelConfig, size: int) -> None:
    """A ValueError saying why `config` cannot be split `size` ways by heads (the shape checks of the blocks
    come with the weights, `check_weights`)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {size!r}")
    if size == 1:
        return
    heads, kv = config.n_heads, config.n_kv_heads
    if heads % size:
        raise ValueError(f"{config.arch}: {heads} query heads ({kv} KV heads) do not split across "
                         f"tensor_parallel_size {size}: the query heads must be a multiple of it")
    if kv % size and size % kv:
        raise ValueError(f"{config.arch}: {kv} KV heads ({heads} query heads) do not split across "
                         f"tensor_parallel_size {size}: the KV heads must be a multiple or a divisor of it")
    if not config.n_expert and config.ffn % size:
        raise ValueError(f"{config.arch}: feed_forward_length {config.ffn} is not a multiple of "
                         f"tensor_parallel_size {size}")
    if (size - 1) * -(-config.vocab_size // size) >= config.vocab_size:
        raise ValueError(f"{config.arch}: a vocabulary of {config.vocab_size} leaves a rank of "
                         f"tensor_parallel_size {size} no rows")


def check_weights(f: GGUFFile, config: ModelConfig, size: int) -> None:
    """A ValueError naming the first tensor whose K split would cut a block (before any process starts)."""
    if size == 1:
        return
    plan = ShardPlan(config, size, 0)
    for name, info in f.tensors.items():
        cols = _k_split(plan, name)
        if cols is not None:
            _check_blocks(name, info.ggml_type, info.shape, cols)


def _k_split(plan: ShardPlan, name: str) -> range | None:
    """The columns rank `plan.rank` takes of a row-parallel tensor (None for any other)."""
    if not is_row_parallel(name):
        return None
    d = plan.config.head_dim
    if name.endswith("attn_output.weight"):
        return range(plan.q_heads.start * d, plan.q_heads.stop * d)
    return plan.ffn_rows


def _check_blocks(name: str, ggml_type, shape: tuple[int, ...], cols: range) -> None:
    block = ggml_type.block_elements
    if len(cols) % block:
        raise ValueError(f"tensor {name!r} ({ggml_type.name}, shape {tuple(shape)}): its K of {shape[-1]} split "
                         f"into {len(cols)} columns per rank cuts its blocks of {block} elements; "
                         f"tensor parallelism needs whole blocks per rank (try a smaller tensor_parallel_size)")


def _rows(w: QuantWeight, *spans: range) -> QuantWeight:
    """Rows `spans` of a weight (whole rows of blocks), concatenated, as a new tensor."""
    raw = w.raw.view(w.shape[0], -1)
    part = torch.cat([raw[s.start : s.stop] for s in spans]) if len(spans) > 1 else raw[spans[0].start : spans[0].stop]
    return QuantWeight(w.name, part.reshape(-1).clone(), w.ggml_type, (sum(map(len, spans)), *w.shape[1:]))


def _cols(w: QuantWeight, cols: range) -> QuantWeight:
    """Columns `cols` of every row (a whole number of blocks from a block boundary), as a new tensor."""
    _check_blocks(w.name, w.ggml_type, w.shape, cols)
    block, nbytes = w.ggml_type.block_elements, w.ggml_type.block_bytes
    raw = w.raw.view(w.shape[0], -1, nbytes)[:, cols.start // block : cols.stop // block]
    return QuantWeight(w.name, raw.reshape(-1).clone(), w.ggml_type, (w.shape[0], len(cols)))


def _shard(plan: ShardPlan, w: QuantWeight) -> QuantWeight:
    cfg, d = plan.config, plan.config.head_dim
    m = _LAYER.match(w.name)
    part = m.group(1).rsplit(".", 1)[0] if m else w.name
    q = range(plan.q_heads.start * d, plan.q_heads.stop * d)
    kv = range(plan.kv_heads.start * d, plan.kv_heads.stop * d)
    n_q, n_kv = cfg.n_heads * d, cfg.n_kv_heads * d
    if is_vocab_parallel(w.name):
        return _rows(w, plan.vocab_rows)
    if m is None:
        return w
    if part == "attn_q":
        return _rows(w, q)
    if part in ("attn_k", "attn_v"):
        return _rows(w, kv)
    if part == "attn_qkv":
        return _rows(w, q, _shift(kv, n_q), _shift(kv, n_q + n_kv))
    if part in ("ffn_gate", "ffn_up") and not cfg.n_expert:
        f = plan.ffn_rows
        fused = cfg.architecture.fused_gate_up and part == "ffn_up"
        return _rows(w, f, _shift(f, cfg.ffn)) if fused else _rows(w, f)
    cols = _k_split(plan, w.name)
    return _cols(w, cols) if cols is not None else w


def _shift(r: range, by: int) -> range:
    return range(r.start + by, r.stop + by)


def load_shard(f: GGUFFile, plan: ShardPlan, device: torch.device) -> dict[str, QuantWeight]:
    """Rank `plan.rank`'s part of every tensor of `f` (see the module docstring), its blocks copied onto
    `device`: only the shard is ever copied off the file's mapping."""
    out = {}
    for name, w in load_weights(f, torch.device("cpu")).items():
        s = _shard(plan, w)
        if s is w and device.type != "cpu":
            s = dataclasses.replace(w, raw=w.raw.to(device, copy=True))
        elif s is not w:
            s.raw = s.raw.to(device)
        out[name] = s
    return out
