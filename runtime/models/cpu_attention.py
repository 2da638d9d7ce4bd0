"""The CPU backend's RoPE, KV store and paged attention: the torch references' formulas in a few large torch calls.

What does not change within a step is computed once per step, not once per layer: the rotation's complex factors
(per inv_freq table), the slots written, and per sequence the cache rows it attends to and its mask. The caches
key on the identity of the step's tensors (`positions`, `slot_mapping`, the batch), which every layer shares.

- RoPE: llama.cpp's "normal" rotation (adjacent pairs) is a complex multiply by e^(i theta) * attn_factor in place
  (view_as_complex); NeoX (halves) is x * cos + rotate_half(x) * sin. Same float32 angles as `rope_ref`.
- Attention: `F.scaled_dot_product_attention` (float32) over each sequence's context gathered from its pages,
  batched (padded, masked) for decode, one call per sequence for prefill; attention soft-capping and sinks, and
  sequences with nothing to attend to, take the torch references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ggtriton.kernels.flash_attention import flash_attention_ref
from ggtriton.kernels.paged_decode import paged_decode_ref
from ggtriton.kernels.rope_kv_store import rope_kv_store_ref


class CpuAttention:
    """The step caches of the module docstring and the ops that read them."""

    def __init__(self) -> None:
        self._rope_key: torch.Tensor | None = None  # the positions the factors were made for
        self._factors: dict[tuple[int, bool, float], tuple[torch.Tensor, ...]] = {}
        self._slots_key: torch.Tensor | None = None
        self._slots: torch.Tensor | None = None  # the written rows (slot >= 0), None: all
        self._batch = None
        self._plans: dict[int | None, list[tuple[slice, torch.Tensor | int, int, torch.Tensor | None]]] = {}
        self._all_attend = False  # every sequence of the batch has keys to attend to

    # --- RoPE and KV store ------------------------------------------------------------------------

    def _rope_factors(self, positions: torch.Tensor, inv_freq: torch.Tensor, neox: bool,
                      attn_factor: float) -> tuple[torch.Tensor, ...]:
        if positions is not self._rope_key:
            self._rope_key, self._factors = positions, {}
        key = (id(inv_freq), neox, attn_factor)
        if key not in self._factors:
            theta = positions.to(torch.float32)[:, None, None] * inv_freq  # [T, 1, half]
            if neox:
                cos, sin = torch.cos(theta) * attn_factor, torch.sin(theta) * attn_factor
                self._factors[key] = (torch.cat([cos, cos], -1), torch.cat([sin, sin], -1))
            else:
                self._factors[key] = (torch.polar(torch.full_like(theta, attn_factor), theta),)
        return self._factors[key]

    def _rotate(self, x: torch.Tensor, factors: tuple[torch.Tensor, ...], neox: bool) -> torch.Tensor:
        """x [T, H, D] with its first 2 * half dims rotated (x itself, rotated in place)."""
        rot = x[..., : factors[0].shape[-1] * (1 if neox else 2)]
        if neox:
            cos, sin = factors
            a, b = rot.chunk(2, -1)
            rot.copy_(torch.addcmul(rot * cos, torch.cat([-b, a], -1), sin))
        else:
            c = torch.view_as_complex(rot.unflatten(-1, (-1, 2)))
            c.mul_(factors[0])
        return x

    def rope_kv_store(self, q, k, v, k_cache, v_cache, slot_mapping, positions, inv_freq, *, neox: bool,
                      attn_factor: float) -> None:
        """`rope_kv_store_ref`'s result: q rotated in place; rotated k and v stored at their slots (k rotated in place
        too where it follows q in memory)."""
        if q.dtype != torch.float32 or k_cache.dtype != torch.float32:
            return rope_kv_store_ref(q, k, v, k_cache, v_cache, slot_mapping, positions, inv_freq, neox=neox,
                                     attn_factor=attn_factor)
        factors = self._rope_factors(positions, inv_freq, neox, attn_factor)
        qk = joined_heads(q, k)
        if qk is not None:  # k right after q in each row (one projection's output): one rotation for both
            self._rotate(qk, factors, neox)
        else:
            self._rotate(q, factors, neox)
            k = self._rotate(k.clone(), factors, neox)
        if slot_mapping is not self._slots_key:
            keep = slot_mapping >= 0
            self._slots_key, self._slots = slot_mapping, None if bool(keep.all()) else keep
        slots = slot_mapping
        if self._slots is not None:
            slots, k, v = slot_mapping[self._slots], k[self._slots], v[self._slots]
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))

    # --- attention --------------------------------------------------------------------------------

    def _new_step(self, batch) -> bool:
        """Whether every sequence of the batch has keys to attend to; a new batch drops the last one's plans."""
        if batch is not self._batch:
            self._batch, self._plans = batch, {}
            self._all_attend = bool((batch.context_lens > 0).all())
        return self._all_attend

    def _plan(self, batch, page: int, window: int | None) -> list[tuple[slice, torch.Tensor | int, int,
                                                                         torch.Tensor | None]]:
        """Per call group (decode: the whole batch; prefill: each sequence): (query rows, the cache rows it reads
        [B * L], or the first of them where they are consecutive (one sequence on consecutive pages: a view, no
        gather), context length L, boolean mask [B, 1, T, L] or None: every row sees every key), after
        `_new_step`."""
        if window in self._plans:
            return self._plans[window]
        ctx = batch.context_lens.tolist()
        cu = batch.cu_seqlens_q.tolist()
        tables = batch.block_tables.long()
        offsets = torch.arange(page)
        plan = []
        groups = [range(len(ctx))] if batch.is_decode else [range(b, b + 1) for b in range(len(ctx))]
        for seqs in groups:
            length = max(ctx[b] for b in seqs)
            pages = -(-length // page)
            rows = (tables[seqs.start: seqs.stop, :pages, None] * page + offsets).flatten(1)[:, :length]
            n_q = cu[seqs.stop] - cu[seqs.start] if not batch.is_decode else 1
            j = torch.arange(length)
            lens = torch.tensor([ctx[b] for b in seqs])[:, None, None]
            # a shorter sequence's padding reads its own first row, not unwritten cache (NaN there would survive
            # the mask: 0 * NaN)
            rows = torch.where(j < lens[:, 0], rows, rows[:, :1]).flatten()
            if len(seqs) == 1 and int(rows[-1] - rows[0]) == length - 1 and bool((rows.diff() == 1).all()):
                rows = int(rows[0])
            pos = lens - n_q + torch.arange(n_q)[:, None]  # [B, T, 1]: each query's position
            seen = (j <= pos) & (j < lens)
            if window is not None:
                seen &= j > pos - window
            plan.append((slice(cu[seqs.start], cu[seqs.stop]), rows, length,
                         None if bool(seen.all()) else seen[:, None]))
        self._plans[window] = plan
        return plan

    def attention(self, q, k_cache, v_cache, batch, *, scale: float, sliding_window: int | None,
                  soft_cap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
        """The torch references' attention of the batch's queries q [T, H, D] over the paged cache."""
        if soft_cap is not None or sinks is not None or q.dtype != torch.float32 or not self._new_step(batch):
            if batch.is_decode:
                return paged_decode_ref(q, k_cache, v_cache, batch.block_tables, batch.context_lens, scale=scale,
                                        sliding_window=sliding_window, soft_cap=soft_cap, sinks=sinks)
            return flash_attention_ref(q, k_cache, v_cache, batch.block_tables, batch.cu_seqlens_q,
                                       batch.context_lens, scale=scale, sliding_window=sliding_window,
                                       soft_cap=soft_cap, sinks=sinks)
        outs = []
        for rows_q, rows, length, mask in self._plan(batch, k_cache.shape[1], sliding_window):
            # [B, H, T, D] queries: decode's B sequences of one token each, or one prefill sequence's T tokens;
            # keys and values [B, L, H_kv, D] by index_select (several times faster than indexing by a 2-D index)
            k, v = ((c.view(-1, *c.shape[2:]).narrow(0, rows, length) if isinstance(rows, int) else
                     c.view(-1, *c.shape[2:]).index_select(0, rows)).view(-1, length, *c.shape[2:])
                    for c in (k_cache, v_cache))
            qs = q[rows_q].unsqueeze(1) if batch.is_decode else q[rows_q].unsqueeze(0)
            o = F.scaled_dot_product_attention(qs.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask, scale=scale, enable_gqa=True)
            outs.append(o.transpose(1, 2).flatten(0, 1))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def joined_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """q and k [T, H, D] as one view [T, H_q + H_k, D] where k's heads follow q's in memory with the same strides
    (the q/k/v product's output, or the q/k norm's), else None. Rotating it rotates k in place too: the caller's
    k is a temporary."""
    if q.shape[2] != k.shape[2] or q.stride()[1:] != (q.shape[2], 1) or k.stride()[1:] != (k.shape[2], 1):
        return None
    if q.shape[0] > 1 and q.stride(0) != k.stride(0):  # one row: its stride is whatever the view made it
        return None
    if k.data_ptr() != q.data_ptr() + q.shape[1] * q.shape[2] * q.element_size():
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1], q.shape[2]), q.stride())
