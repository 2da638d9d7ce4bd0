"""Pages of the KV cache: allocation, reference counts and prefix caching. Plain Python, no torch.

Every full page whose K/V have been computed gets a chained hash, hash(previous page's hash, its
tokens), and is registered under it. A new sequence whose prompt starts with the same pages shares
them (reference counts) instead of computing them again. Freed pages keep their hash and stay findable
until they are handed out again, least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()  # a hashed page's tokens: a hash match must also match these


def chain_hash(prev: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((prev, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, watermark: float = 0.01, prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # chained hash -> block id
        self.watermark_blocks = int(watermark * num_blocks)
        self.prefix_caching = prefix_caching
        self.num_prefix_hit_tokens = 0  # tokens whose pages came from the prefix cache

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- prefix cache ---------------------------------------------------------------------------------

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Cached pages equal to the sequence's leading full pages. The last token is never a hit: it
        must be computed to produce the logits of the next one. A prompt whose log-probabilities are asked
        for has no hits: its every position must be computed."""
        if not self.prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        hits, prev, bs = [], None, self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            prev = chain_hash(prev, tokens)
            block_id = self.cached.get(prev)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def register_computed(self, seq: Sequence) -> None:
        """Hash and register the sequence's full pages whose K/V are now all computed."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        for i in range(seq.num_hashed_blocks, seq.num_computed_tokens // bs):
            block = self.blocks[seq.block_table[i]]
            prev = self.blocks[seq.block_table[i - 1]].hash if i else None
            block.token_ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            block.hash = chain_hash(prev, block.token_ids)
            self.cached.setdefault(block.hash, block.block_id)
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, seq.num_computed_tokens // bs)

    def _unhash(self, block: Block) -> None:
        if block.hash is not None and self.cached.get(block.hash) == block.block_id:
            del self.cached[block.hash]
        block.hash, block.token_ids = None, ()

    # --- allocation -----------------------------------------------------------------------------------

    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        self._unhash(block)  # its contents are about to be overwritten
        block.ref_count = 1
        return block_id

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether a waiting sequence's pages fit, keeping the watermark free for running sequences."""
        hits = self._prefix_hits(seq)
        reused_free = sum(self.blocks[b].ref_count == 0 for b in hits)
        needed = self.blocks_for(seq.num_tokens) - len(hits) + reused_free
        return self.num_free_blocks - needed >= self.watermark_blocks

    def allocate(self, seq: Sequence) -> int:
        """Pages for all of a waiting sequence's tokens, sharing cached prefix pages. Returns how many leading
        tokens the shared pages already hold (the sequence's progress is the scheduler's to set)."""
        if seq.block_table:
            raise ValueError(f"{seq!r} already holds pages")
        hits = self._prefix_hits(seq)
        for block_id in hits:
            self._ref(block_id)
        seq.block_table = hits + [self._take_free() for _ in range(self.blocks_for(seq.num_tokens) - len(hits))]
        seq.num_hashed_blocks = len(hits)
        cached = len(hits) * self.block_size
        self.num_prefix_hit_tokens += cached
        return cached

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether the sequence's pages can be extended to hold `num_tokens` tokens."""
        return self.blocks_for(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.blocks_for(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._take_free())

    def free_blocks(self, seq: Sequence) -> None:
        """Release a sequence's pages (finished, aborted or preempted); it keeps its tokens."""
        # Its last pages are the least likely to be shared again: free them first, reused first.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_hashed_blocks = 0

    def truncate(self, seq: Sequence, num_tokens: int, computed: int) -> int:
        """Shrink a sequence's pages to those of its first `num_tokens` tokens (rejected draft tokens roll back);
        returns how many of its first `computed` tokens still have their K/V in its pages.

        Pages past the end are released. The page the new end falls in will be overwritten: it loses its
        hash, and if other sequences share it, this sequence gets a fresh page and must recompute the page's
        kept tokens.
        """
        bs = self.block_size
        keep = self.blocks_for(num_tokens)
        for block_id in reversed(seq.block_table[keep:]):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        del seq.block_table[keep:]
        valid = min(computed, num_tokens)
        if num_tokens % bs and keep:
            last = self.blocks[seq.block_table[-1]]
            if last.ref_count > 1:
                if not self.free:
                    raise RuntimeError(f"no free page to take a private copy of a shared page of {seq!r}")
                last.ref_count -= 1
                seq.block_table[-1] = self._take_free()
                valid = min(valid, (keep - 1) * bs)
            else:
                self._unhash(last)
        seq.num_hashed_blocks = min(seq.num_hashed_blocks, valid // bs)
        return valid
