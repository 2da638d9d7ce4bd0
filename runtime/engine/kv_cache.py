"""The paged KV cache: its memory layout (the one place it is documented) and its allocation.

Layout
------
The cache is cut into pages ("blocks") of `block_size` tokens (default 16). Per layer, K and V are each
one tensor

    k_cache, v_cache: [num_blocks, block_size, n_kv_heads, head_dim]    float16 / bfloat16 (float32 on CPU)

so the vectors of one token are contiguous (n_kv_heads * head_dim elements) and a page is one contiguous
run of block_size tokens. A sequence owns a list of physical block ids, its *block table*: logical page
i (its tokens at positions [i * block_size, (i + 1) * block_size)) lives in physical block
`block_table[i]`. A token at position `pos` therefore lives in the *slot*

    slot = block_table[pos // block_size] * block_size + pos % block_size

(index into the cache viewed as [num_blocks * block_size, n_kv_heads, head_dim]).

The kernels take a batch's block tables as one int32 tensor [batch, max_pages] (row b: sequence b's
table, padded past its last page with any value: entries past a sequence's length are never read by the
Triton kernels and are masked out by the torch references), each sequence's total length
`context_lens[b]` (cached tokens plus the new ones), and for writes a `slot_mapping` int64 [n_tokens]
(-1: do not write this token).

Physical blocks are interchangeable and need not be contiguous or ordered: pages are shared by prefix
caching and re-used after a sequence finishes, so any block can back any page.

No fp8 cache: an e4m3 cache needs per-head scales that GGUF files do not carry (they would come from
calibration or a running amax at write time) and a dequantize step in both attention kernels; numpy,
which the Triton interpreter runs on, has no fp8 type either. 16-bit pages it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class KVCacheLayout:
    """Shape of the whole cache: `n_layers` layers of K and V pages of the layout above."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int = 16
    dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        for field in ("n_layers", "n_kv_heads", "head_dim", "num_blocks", "block_size"):
            if getattr(self, field) <= 0:
                raise ValueError(f"KVCacheLayout.{field} must be positive, got {getattr(self, field)}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"KVCacheLayout.dtype must be float16, bfloat16 or float32, got {self.dtype}")

    @property
    def page_shape(self) -> tuple[int, int, int, int]:
        """Shape of one layer's K (or V) tensor."""
        return (self.num_blocks, self.block_size, self.n_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        """Bytes one physical block takes over all layers, K and V."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.n_layers * self.block_size * self.n_kv_heads * self.head_dim * elem

    def allocate(self, device: torch.device | str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the (k_cache, v_cache) pair; uninitialised: a slot is read only after it is written."""
        return [(torch.empty(self.page_shape, dtype=self.dtype, device=device),
                 torch.empty(self.page_shape, dtype=self.dtype, device=device)) for _ in range(self.n_layers)]


def slots(block_table: Sequence[int], start: int, end: int, block_size: int) -> list[int]:
    """Slots of positions [start, end) of a sequence with this block table (its slot_mapping entries)."""
    if end > len(block_table) * block_size or not 0 <= start <= end:
        raise ValueError(f"positions [{start}, {end}) are not covered by {len(block_table)} pages")
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]
