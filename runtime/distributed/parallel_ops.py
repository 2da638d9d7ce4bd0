"""The op layer of a tensor-parallel rank: `Ops` plus the collectives its sharded weights need.

The model code is the same at any tensor_parallel_size; what differs is in the weights it is given (see
shard.py) and in these ops, which recognize a sharded weight by its GGUF name:
- a row-parallel product (attn_output, ffn_down) sums its ranks' partial products (all-reduce, in float32),
  then adds its bias; the RMSNorm after it is never fused into its epilogue (the norm needs the full sum);
- the vocabulary-parallel embedding looks up the ids in this rank's rows, zero elsewhere, and sums;
- the vocabulary-parallel lm_head gathers every rank's logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ggtriton.kernels.rmsnorm import PendingNorm

from ..models.ops import Ops
from ..models.weights import QuantWeight
from .parallel_state import ParallelGroup
from .shard import ShardPlan, is_row_parallel, is_vocab_parallel


class ParallelOps(Ops):
    def __init__(self, backend: str, dtype: torch.dtype, group: ParallelGroup, plan: ShardPlan):
        super().__init__(backend, dtype)
        self.group = group
        self.plan = plan

    def linear(self, x: torch.Tensor | PendingNorm, w: QuantWeight, bias: QuantWeight | None = None, *,
               out_dtype: torch.dtype | None = None, generated: bool | torch.Tensor = False) -> torch.Tensor:
        if is_row_parallel(w.name):
            dtype = out_dtype or (x.y if isinstance(x, PendingNorm) else x).dtype
            out = self.group.all_reduce(super().linear(x, w, out_dtype=torch.float32, generated=generated))
            return self._biased(out.to(dtype), bias)
        out = super().linear(x, w, bias, out_dtype=out_dtype, generated=generated)
        if is_vocab_parallel(w.name):
            return self.group.gather_columns(out, self.plan.config.vocab_size)
        return out

    def fuses_norm(self, rows: int, producer: QuantWeight, consumers: Sequence[QuantWeight] | None) -> bool:
        return not is_row_parallel(producer.name) and super().fuses_norm(rows, producer, consumers)

    def embedding(self, ids: torch.Tensor, w: QuantWeight) -> torch.Tensor:
        if not is_vocab_parallel(w.name):
            return super().embedding(ids, w)
        rows = self.plan.vocab_rows
        mine = (ids >= rows.start) & (ids < rows.stop)
        h = super().embedding(torch.where(mine, ids - rows.start, 0), w)
        return self.group.all_reduce(h * mine[:, None].to(h.dtype))
