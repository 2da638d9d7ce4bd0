"""The KV cache layout helper: shapes, sizing and slot arithmetic (the layout the kernels read)."""

from __future__ import annotations

import pytest
import torch

from ggtriton.runtime.engine.kv_cache import KVCacheLayout, slots


def test_layout_allocate_and_size():
    layout = KVCacheLayout(n_layers=3, n_kv_heads=2, head_dim=80, num_blocks=5, block_size=16, dtype=torch.bfloat16)
    caches = layout.allocate("cpu")
    assert len(caches) == 3
    for k, v in caches:
        assert k.shape == v.shape == (5, 16, 2, 80) and k.dtype == torch.bfloat16 and k.is_contiguous()
    assert layout.block_bytes == 2 * 3 * 16 * 2 * 80 * 2
    with pytest.raises(ValueError, match="dtype"):
        KVCacheLayout(1, 1, 64, 4, dtype=torch.int8)
    with pytest.raises(ValueError, match="block_size"):
        KVCacheLayout(1, 1, 64, 4, block_size=0)


def test_slots_follow_the_block_table():
    layout = KVCacheLayout(n_layers=1, n_kv_heads=1, head_dim=64, num_blocks=8, block_size=4)
    table = [6, 1, 3]
    assert slots(table, 0, 12, 4) == [24, 25, 26, 27, 4, 5, 6, 7, 12, 13, 14, 15]
    assert slots(table, 5, 9, 4) == [5, 6, 7, 12]
    assert slots(table, 3, 3, 4) == []
    with pytest.raises(ValueError, match="not covered"):
        slots(table, 10, 13, 4)
    # A slot indexes the cache viewed as [num_blocks * block_size, ...]: page 1 of the table, offset 2.
    k, _ = layout.allocate("cpu")[0]
    k.view(-1, 1, 64)[slots(table, 6, 7, 4)[0]] = 1.0
    assert (k[1, 2] == 1.0).all()
