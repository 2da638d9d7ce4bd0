"""The flat batch of one forward step: every scheduled token of every sequence, packed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .kv_cache import slots


@dataclass
class ForwardBatch:
    """Tokens of B sequences packed into one [T] axis, with what attention needs to find their pages.

    Sequence b contributes tokens cu_seqlens_q[b]:cu_seqlens_q[b + 1] at the last positions of its
    context of context_lens[b] tokens (cached prefix plus these); `slot_mapping` says where each token's
    K/V goes; `block_tables` [B, max_pages] holds each sequence's pages. `is_decode`: one token each.
    `generated`: which tokens are past their sequence's prompt (decoded or drafted): host bool [T], or True or
    False where all rows agree. The cpu backend multiplies those rows and the prompt's with different weight
    formats (`Ops.linear`).
    """

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    slot_mapping: torch.Tensor  # int64 [T]
    block_tables: torch.Tensor  # int32 [B, max_pages]
    context_lens: torch.Tensor  # int32 [B]
    cu_seqlens_q: torch.Tensor  # int32 [B + 1]
    max_seqlen_q: int
    is_decode: bool
    generated: bool | torch.Tensor = False

    @classmethod
    def build(cls, tokens: Sequence[Sequence[int]], starts: Sequence[int], block_tables: Sequence[Sequence[int]],
              block_size: int, device: torch.device, prompt_lens: Sequence[int] | None = None) -> ForwardBatch:
        """Sequence b feeds `tokens[b]` at positions starts[b] ..., its pages listed in block_tables[b]; its prompt
        is its first prompt_lens[b] tokens (None: every token fed is a prompt's)."""
        ids, positions, slot_ids, cu, ctx = [], [], [], [0], []
        for toks, start, table in zip(tokens, starts, block_tables):
            end = start + len(toks)
            ids += toks
            positions += range(start, end)
            slot_ids += slots(table, start, end, block_size)
            cu.append(cu[-1] + len(toks))
            ctx.append(end)
        width = max((len(t) for t in block_tables), default=0)
        tables = [list(t) + [0] * (width - len(t)) for t in block_tables]

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        q_lens = [len(t) for t in tokens]
        return cls(
            input_ids=tensor(ids, torch.int64),
            positions=tensor(positions, torch.int64),
            slot_mapping=tensor(slot_ids, torch.int64),
            block_tables=tensor(tables, torch.int32).reshape(len(tables), width),
            context_lens=tensor(ctx, torch.int32),
            cu_seqlens_q=tensor(cu, torch.int32),
            max_seqlen_q=max(q_lens, default=0),
            is_decode=bool(q_lens) and all(n == 1 for n in q_lens),
            generated=_generated(starts, q_lens, prompt_lens),
        )


def _generated(starts: Sequence[int], q_lens: list[int], prompt_lens: Sequence[int] | None) -> bool | torch.Tensor:
    """Whether each row's position is past its sequence's prompt: True or False where all rows agree (decided per
    sequence: a flag per row only for a step that mixes them)."""
    if prompt_lens is None or all(s + q <= n for s, q, n in zip(starts, q_lens, prompt_lens)):
        return False
    if all(s >= n for s, n in zip(starts, prompt_lens)):
        return True
    return torch.cat([torch.arange(s, s + q) >= n for s, q, n in zip(starts, q_lens, prompt_lens)])


def row_flags(flags: list[bool]) -> bool | torch.Tensor:
    """One flag per row, as one bool where all rows agree, else a host bool tensor."""
    return all(flags) if all(flags) or not any(flags) else torch.tensor(flags)
