"""The SentencePiece-style encoder against a line-by-line transcription of llama.cpp's
`llm_tokenizer_spm_session::tokenize`: one priority queue over the whole text's UTF-8 bytes, no words,
no cache. Random vocabularies put U+2581 inside tokens, leave characters out of the vocabulary that
still merge into tokens, and tie scores; random texts run long enough to take every path."""

from __future__ import annotations

import heapq

import numpy as np
import pytest

from ggtriton.gguf.bundled import gemma3_path
from ggtriton.gguf.reader import GGUFFile
from ggtriton.gguf.spm import SPACE, SpmEncoder


def llamacpp_spm(vocab: dict[str, int], scores: list[float], text: str) -> list[int]:
    """llama.cpp's SPM tokenize over bytes: merge the best (score, then leftmost) adjacent pair whose
    bytes are a token while any is left, then resegment (unknown symbols become <0xNN> tokens)."""
    by_bytes = {t.encode(): i for t, i in vocab.items()}
    data = text.encode()
    symbols = []  # [offset, length, prev, next]
    offset = 0
    while offset < len(data):
        lead = data[offset]
        n = 1 if lead < 0x80 else 2 if lead >> 5 == 6 else 3 if lead >> 4 == 14 else 4
        n = min(n, len(data) - offset)
        symbols.append([offset, n, len(symbols) - 1, len(symbols) + 1])
        offset += n
    if symbols:
        symbols[-1][3] = -1
    queue: list[tuple[float, int, int, int]] = []
    rev_merge: dict[bytes, tuple[int, int]] = {}

    def try_add_bigram(left: int, right: int) -> None:
        if left == -1 or right == -1:
            return
        start = symbols[left][0]
        piece = data[start : start + symbols[left][1] + symbols[right][1]]
        token = by_bytes.get(piece)
        if token is None:
            return
        heapq.heappush(queue, (-scores[token], left, right, len(piece)))
        rev_merge[piece] = (left, right)

    for i in range(1, len(symbols)):
        try_add_bigram(i - 1, i)
    while queue:
        _, left, right, size = heapq.heappop(queue)
        lsym, rsym = symbols[left], symbols[right]
        if lsym[1] == 0 or rsym[1] == 0 or lsym[1] + rsym[1] != size:
            continue
        lsym[1] += rsym[1]
        rsym[1] = 0
        lsym[3] = rsym[3]
        if rsym[3] >= 0:
            symbols[rsym[3]][2] = left
        try_add_bigram(lsym[2], left)
        try_add_bigram(left, lsym[3])

    out: list[int] = []

    def resegment(i: int) -> None:
        piece = data[symbols[i][0] : symbols[i][0] + symbols[i][1]]
        if piece in by_bytes:
            out.append(by_bytes[piece])
        elif piece in rev_merge:
            resegment(rev_merge[piece][0])
            resegment(rev_merge[piece][1])
        else:
            out.extend(by_bytes[f"<0x{b:02X}>".encode()] for b in piece)

    i = 0 if symbols else -1
    while i != -1:
        resegment(i)
        i = symbols[i][3]
    return out


ALPHABET = ["a", "b", "c", "d", SPACE, ">", "é", "語"]


def random_vocab(rng: np.random.Generator, size: int) -> tuple[dict[str, int], list[float]]:
    """Byte tokens, most single characters ("é" left out: it falls back to bytes, or merges into a
    token), and random strings over ALPHABET, U+2581 anywhere in them; scores with ties."""
    tokens = [f"<0x{b:02X}>" for b in range(256)] + [c for c in ALPHABET if c != "é"]
    while len(tokens) < size:
        piece = "".join(rng.choice(ALPHABET, size=int(rng.integers(2, 7)), p=[.2, .15, .15, .1, .15, .05, .1, .1]))
        if piece not in tokens:
            tokens.append(piece)
    scores = np.round(rng.normal(size=len(tokens)), 1).tolist()  # one decimal: many equal scores
    return {t: i for i, t in enumerate(tokens)}, scores


def random_text(rng: np.random.Generator, length: int, space: float) -> str:
    weights = np.array([.2, .15, .15, .1, space, .05, .05, .1])
    return "".join(rng.choice(ALPHABET, size=length, p=weights / weights.sum()))


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("space", [0.3, 0.01])  # words of a few characters, and words past 64
def test_matches_llamacpp_on_random_vocabularies(seed, space):
    rng = np.random.default_rng(seed)
    vocab, scores = random_vocab(rng, 300 + 40 * seed)
    encoder = SpmEncoder(vocab, scores)
    for length in [0, 1, 2, 5, 17, 70, 150, 400]:
        for _ in range(6):
            text = random_text(rng, length, space)
            assert encoder.encode(text) == llamacpp_spm(vocab, scores, text), (seed, text)
    # the cache gives back what it was given, and a second encoder agrees with the first
    text = random_text(rng, 300, space)
    assert encoder.encode(text) == SpmEncoder(vocab, scores).encode(text) == llamacpp_spm(vocab, scores, text)


def test_tokens_that_span_a_space_still_form():
    # "x▁" and "x▁y" are tokens, so the text may not be cut before a U+2581 that follows an "x"
    pieces = ["x", "y", "z", SPACE, f"x{SPACE}", f"x{SPACE}y", f"{SPACE}z"]
    vocab = {t: i for i, t in enumerate(pieces)}
    scores = [0.0, 0.0, 0.0, 0.0, -1.0, -0.5, -2.0]
    text = f"x{SPACE}y{SPACE}z"
    expected = [vocab[f"x{SPACE}y"], vocab[f"{SPACE}z"]]
    assert SpmEncoder(vocab, scores).encode(text) == llamacpp_spm(vocab, scores, text) == expected


def test_characters_outside_the_vocabulary():
    vocab = {t: i for i, t in enumerate([f"<0x{b:02X}>" for b in range(256)] + ["a", "éa"])}
    scores = [0.0] * len(vocab)
    encoder = SpmEncoder(vocab, scores)
    # "é" alone is no token and becomes its two bytes; beside an "a" it merges into "éa", as in llama.cpp
    assert encoder.encode("éé") == [0xC3, 0xA9, 0xC3, 0xA9]
    assert encoder.encode("éa") == [vocab["éa"]] == llamacpp_spm(vocab, scores, "éa")
    without_bytes = SpmEncoder({"a": 0}, [0.0])
    with pytest.raises(ValueError, match="byte 0xC3 is outside the vocabulary"):
        without_bytes.encode("é")


def test_matches_llamacpp_on_gemma3_long_words():
    # Gemma-3's own vocabulary on texts with long unspaced runs (CJK, digits, symbols) and odd spacing
    metadata = GGUFFile(gemma3_path()).metadata
    tokens = metadata["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    scores = metadata["tokenizer.ggml.scores"]
    encoder = SpmEncoder(vocab, scores)
    rng = np.random.default_rng(0)
    pool = list("東京は日本の首都です。我们今天去公园散步，天气很好0123456789=-_>▁▁abcxyzé") + ["\n", "\t"]
    for _ in range(40):
        text = "".join(rng.choice(pool, size=int(rng.integers(60, 300))))
        assert encoder.encode(text) == llamacpp_spm(vocab, scores, text), text
