"""SentencePiece-style BPE over a scored vocabulary, as llama.cpp's `llm_tokenizer_spm` runs it.

The text's characters start as symbols; the adjacent pair whose concatenation is the best-scoring token
(the leftmost on ties) merges, again and again, until no pair forms a token. Characters outside the
vocabulary end as `<0xNN>` byte tokens.

Building needs only the vocabulary dict, so a 262k-token vocabulary is ready in a fraction of a second;
a ranked-merges BPE model would need every split of every token as a merge (515k for Gemma-3), which
takes seconds to derive and load.

Encoding is fast through words and a cache. llama.cpp merges over the whole text, but a symbol only ever
grows into a token, so two adjacent characters that never stand side by side inside any token are never
joined, and the text on either side tokenizes on its own with the same result. Such a boundary is found
cheaply before the escaped space U+2581: the text splits before every U+2581 whose preceding character
no token puts in front of one, and each distinct word is tokenized once.
"""

from __future__ import annotations

import heapq
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from itertools import pairwise

import numpy as np

SPACE = "\u2581"  # SentencePiece's escaped space
_NO_TOKEN = float("-inf")  # the score of a pair that forms no token; file scores are clamped above it
_MAX_CACHED_WORD = 128  # characters; longer words are rare and would make the cache large
_MAX_SCANNED_WORD = 64  # characters; longer words are cut where no token joins them, or merge in a queue
_PAIR_BITS = 22  # a 4 MB bitmap: a vocabulary's ~100k distinct character pairs set under 3 % of it
_PAIR_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier: the product's top bits mix both characters


def _pair_slots(codes: np.ndarray) -> np.ndarray:
    """A _PAIR_BITS-bit hash of each two adjacent code points."""
    keys = codes[:-1].astype(np.uint64) << np.uint64(21) | codes[1:]
    return (keys * _PAIR_MIX >> np.uint64(64 - _PAIR_BITS)).astype(np.intp)


class SpmEncoder:
    """Token ids of text whose spaces are already escaped as U+2581; `scores[vocab[text]]` is a token's."""

    def __init__(self, vocab: Mapping[str, int], scores: Sequence[float], cache_size: int = 1 << 16):
        self._vocab = vocab
        finite = sys.float_info.max
        self._scores: list[float] = np.nan_to_num(
            np.asarray(scores, dtype=np.float64), nan=-finite, posinf=finite, neginf=-finite).tolist()
        # the vocabulary's code points, tokens apart by a separator: pairs across it only add caution
        codes = np.frombuffer("\0".join(vocab).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        space = ord(SPACE)
        glued = np.unique(codes[:-1][(codes[1:] == space) & (codes[:-1] != space)])  # some token has "x▁"
        self._split = re.compile(f"(?<=[^{SPACE}{re.escape(''.join(map(chr, glued.tolist())))}])(?={SPACE})").split
        # a bitmap over hashed pairs of characters, set for every two that stand side by side inside some
        # token; a hash collision only keeps a word whole
        self._joined = np.zeros(1 << _PAIR_BITS, dtype=bool)
        self._joined[_pair_slots(codes)] = True
        self._cache: dict[str, list[int]] = {}
        self._cache_size = cache_size
        self._bytes: dict[int, int] = {}

    def _words(self, text: str) -> Iterator[str]:
        for word in self._split(text):
            if len(word) <= _MAX_SCANNED_WORD:
                yield word
            else:
                yield from self._split_long(word)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        for word in self._words(text):
            word_ids = cache.get(word)
            if word_ids is None:
                word_ids = self._encode_word(word)
                if len(word) <= _MAX_CACHED_WORD:
                    if len(cache) >= self._cache_size:
                        cache.clear()
                    cache[word] = word_ids
            ids += word_ids
        return ids

    def _score(self, text: str) -> float:
        t = self._vocab.get(text)
        return _NO_TOKEN if t is None else self._scores[t]

    def _split_long(self, word: str) -> list[str]:
        """A long word cut between every two characters no token holds side by side."""
        codes = np.frombuffer(word.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        cuts = [0, *(np.flatnonzero(~self._joined[_pair_slots(codes)]) + 1).tolist(), len(word)]
        return [word[a:b] for a, b in pairwise(cuts)]

    def _encode_word(self, word: str) -> list[int]:
        symbols = self._merge_scan(word) if len(word) <= _MAX_SCANNED_WORD else self._merge_queue(word)
        token_id = self._vocab.get
        out: list[int] = []
        for s in symbols:
            t = token_id(s)
            if t is None:  # a character outside the vocabulary (merged symbols are always tokens)
                out += map(self._byte_token, s.encode("utf-8", "surrogatepass"))
            else:
                out.append(t)
        return out

    def _merge_scan(self, word: str) -> list[str]:
        """The merges of a short word, the best pair found by a scan of all pair scores per merge:
        `max` and `index` run in C, so this beats a queue until words grow long."""
        score = self._score
        symbols = list(word)
        pairs = [score(a + b) for a, b in pairwise(symbols)]  # pairs[i]: symbols i and i+1
        while pairs:
            best = max(pairs)
            if best == _NO_TOKEN:
                break
            i = pairs.index(best)  # the leftmost of equal scores, as llama.cpp's queue orders them
            merged = symbols[i] + symbols.pop(i + 1)
            symbols[i] = merged
            del pairs[i]
            if i < len(pairs):
                pairs[i] = score(merged + symbols[i + 1])
            if i:
                pairs[i - 1] = score(symbols[i - 1] + merged)
        return symbols

    def _merge_queue(self, word: str) -> list[str]:
        """The merges of a long word through a priority queue of pairs, llama.cpp's own algorithm:
        symbols form a linked list over their first characters, and a queued pair is stale once
        either symbol has changed (their lengths no longer add up to the pair's)."""
        token_id, scores = self._vocab.get, self._scores
        n = len(word)
        symbols = list(word)  # by first character; "" once merged into the symbol on its left
        after = list(range(1, n + 1))
        after[-1] = -1
        before = list(range(-1, n - 1))
        queue = [(-scores[t], i, 2) for i, t in enumerate(map(token_id, map(str.__add__, word, word[1:])))
                 if t is not None]  # best score first, then the leftmost
        heapq.heapify(queue)

        def push(left: int) -> None:
            text = symbols[left] + symbols[after[left]]
            t = token_id(text)
            if t is not None:
                heapq.heappush(queue, (-scores[t], left, len(text)))

        while queue:
            _, left, size = heapq.heappop(queue)
            right = after[left]
            if right < 0 or not symbols[left] or len(symbols[left]) + len(symbols[right]) != size:
                continue
            symbols[left] += symbols[right]
            symbols[right] = ""
            after[left] = after[right]
            if after[left] >= 0:
                before[after[left]] = left
                push(left)
            if before[left] >= 0:
                push(before[left])
        return [s for s in symbols if s]

    def _byte_token(self, byte: int) -> int:
        """llama.cpp's byte_to_token: `<0xNN>`, else the byte itself as a one-character token."""
        t = self._bytes.get(byte)
        if t is None:
            t = self._vocab.get(f"<0x{byte:02X}>")
            if t is None and byte < 0x80:
                t = self._vocab.get(chr(byte))
            if t is None:
                raise ValueError(f"byte 0x{byte:02X} is outside the vocabulary, which has no <0x{byte:02X}> token")
            self._bytes[byte] = t
        return t
