"""Tokenizer built from GGUF metadata against llama.cpp (fixtures made by
tests/fixtures/make_tokenizer_fixtures.py) and on tiny synthetic vocabularies."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from ggtriton.gguf import GGUFFile
from ggtriton.gguf.bundled import gemma3_path, smollm2_path
from ggtriton.gguf.tokenizer import CHAT_TEMPLATES, FALLBACK_PRE, PRE_TOKENIZERS, IncrementalDetokenizer, Tokenizer
from ggtriton.gguf.writer import write_gguf

FIXTURE = Path(__file__).parent / "fixtures" / "tokenizer_llamacpp.json"
MODES = [f"add_special={a},parse_special={p}" for a in (0, 1) for p in (0, 1)]


@pytest.fixture(scope="module")
def llamacpp() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def model(request) -> tuple[str, Tokenizer]:
    path = smollm2_path() if request.param == "smollm2" else gemma3_path()
    return request.param, Tokenizer.from_gguf(path)


def _diff_report(texts: list[str], ours: list[list[int]], theirs: list[list[int]]) -> str:
    bad = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    lines = [f"{len(bad)}/{len(texts)} texts differ from llama.cpp"]
    lines += [f"  #{i} {texts[i]!r}\n    ours:     {ours[i]}\n    llama.cpp: {theirs[i]}" for i in bad[:10]]
    return "\n".join(lines)


def test_chat_prompt_has_one_bos_like_llamacpp(llamacpp):
    """A template that writes its own BOS (Gemma's): the rendering is llama-cpp-python's, and the ids are
    llama.cpp's for that text without add_special. With add_special llama.cpp prepends a second BOS (and warns),
    which the chat paths here never do."""
    ref = llamacpp["chat_bos"]
    tok = Tokenizer.from_gguf(gemma3_path())
    tok.chat_template = CHAT_TEMPLATES[ref["template"]]
    rendered = tok.apply_chat_template(ref["messages"])
    assert rendered == ref["rendered"]
    ids = tok.encode_chat(rendered)
    assert ids == ref["add_special=0"] and ids.count(tok.bos_token_id) == 1
    assert ref["add_special=1"] == [tok.bos_token_id] + ids  # what encoding with add_special would have given


@pytest.mark.parametrize("mode", MODES)
def test_encode_matches_llamacpp(model, llamacpp, mode):
    name, tok = model
    texts = llamacpp["corpus"]
    add_special, parse_special = (bool(int(part[-1])) for part in mode.split(","))
    ours = [tok.encode(t, add_special=add_special, parse_special=parse_special) for t in texts]
    theirs = llamacpp["models"][name]["encode"][mode]
    assert ours == theirs, _diff_report(texts, ours, theirs)


def test_special_ids_match_llamacpp(model, llamacpp):
    name, tok = model
    ref = llamacpp["models"][name]
    assert tok.vocab_size == ref["n_vocab"]
    assert (tok.bos_token_id, tok.eos_token_id) == (ref["bos"], ref["eos"])
    assert (tok.add_bos, tok.add_eos) == (ref["add_bos"], ref["add_eos"])
    assert sorted(tok.eos_token_ids) == ref["eog"]


@pytest.mark.parametrize("skip_special", [False, True])
def test_decode_matches_llamacpp(model, llamacpp, skip_special):
    name, tok = model
    ref = llamacpp["models"][name]
    key = "decode_skip_special_hex" if skip_special else "decode_hex"
    ids = ref["encode"]["add_special=0,parse_special=1"]
    ours = [tok.decode_bytes(i, skip_special=skip_special).hex() for i in ids]
    bad = [k for k, (a, b) in enumerate(zip(ours, ref[key])) if a != b]
    assert not bad, [(llamacpp["corpus"][k], ours[k], ref[key][k]) for k in bad[:5]]


def test_round_trip_where_llamacpp_round_trips(model, llamacpp):
    name, tok = model
    ref = llamacpp["models"][name]
    for text, hexed in zip(llamacpp["corpus"], ref["decode_hex"]):
        if bytes.fromhex(hexed) == text.encode():
            assert tok.decode(tok.encode(text, add_special=False, parse_special=True)) == text


def test_incremental_detokenizer_equals_decode(model, llamacpp):
    _, tok = model
    for text in llamacpp["corpus"]:
        ids = tok.encode(text, add_special=True, parse_special=True)
        for skip_special in (False, True):
            stream = tok.incremental_detokenizer(skip_special)
            pieces = [stream.add(i) for i in ids] + [stream.flush()]
            whole = tok.decode(ids, skip_special=skip_special)
            assert "".join(pieces) == whole
            if "\ufffd" not in whole:
                assert not any("\ufffd" in p for p in pieces), text


def test_incremental_detokenizer_holds_back_split_characters(tmp_path):
    # one byte token per UTF-8 byte: every multi-byte character arrives split at every byte
    tok = Tokenizer.from_gguf(_spm_file(tmp_path, ["a"], extra={"tokenizer.ggml.add_space_prefix": False}))
    text = "é世🙂👨‍👩‍👧z"
    ids = tok.encode(text, add_special=False)
    assert len(ids) == len(text.encode())
    stream = IncrementalDetokenizer(tok)
    pieces = [stream.add(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.flush() == tok.decode(ids) == text
    # a sequence that ends mid-character is replaced only when it is complete
    stream = IncrementalDetokenizer(tok)
    first = [stream.add(i) for i in tok.encode("🙂", add_special=False)[:2]]
    assert first == ["", ""] and stream.flush() == "\ufffd"


# --- synthetic vocabularies ---------------------------------------------------------------------------


def _byte_chars() -> list[str]:
    from ggtriton.gguf.tokenizer import _bytes_to_unicode

    return list(_bytes_to_unicode().values())


def _gpt2_file(tmp_path: Path, pre: str | None, extra: dict | None = None) -> Path:
    merges = ["h e", "l l", "ll o", "he llo", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2", "12 3"]
    tokens = ["<|endoftext|>", "<|im_end|>", *_byte_chars(), "he", "ll", "llo", "hello", "Ġw", "or", "Ġwor", "ld",
              "Ġworld", "12", "123"]
    meta = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3] + [1] * (len(tokens) - 2),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": 0,
    }
    if pre is not None:
        meta["tokenizer.ggml.pre"] = pre
    meta |= extra or {}
    path = tmp_path / f"gpt2-{pre}.gguf"
    write_gguf(path, meta)
    return path


def _spm_file(tmp_path: Path, pieces: list[str], scores: list[float] | None = None, extra: dict | None = None) -> Path:
    specials = ["<unk>", "<s>", "</s>", "<start_of_turn>", "<end_of_turn>", "<tab>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = specials + byte_tokens + pieces
    types = [2, 3, 3, 3, 3, 4] + [6] * 256 + [1] * len(pieces)
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": [0.0] * (len(specials) + 256) + (scores or [-float(i) for i in range(len(pieces))]),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    } | (extra or {})
    path = tmp_path / "spm.gguf"
    write_gguf(path, meta)
    return path


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_every_pre_tokenizer_builds(tmp_path, pre):
    tok = Tokenizer.from_gguf(_gpt2_file(tmp_path, pre))
    text = "hello world 123<|im_end|>"
    ids = tok.encode(text, add_special=False, parse_special=True)
    assert ids[-1] == 1 and tok.decode(ids) == text


def test_gpt2_merges_and_pre_tokenizer(tmp_path):
    tok = Tokenizer.from_gguf(_gpt2_file(tmp_path, "gpt-2"))
    t = tok.tokens
    assert [t[i] for i in tok.encode("hello world")] == ["hello", "Ġworld"]
    # smollm splits digits one by one before BPE; gpt-2 keeps the run
    assert [t[i] for i in tok.encode("123")] == ["123"]
    smol = Tokenizer.from_gguf(_gpt2_file(tmp_path, "smollm"))
    assert [t[i] for i in smol.encode("123")] == ["1", "2", "3"]


def test_unknown_pre_tokenizer_warns_and_falls_back(tmp_path):
    with pytest.warns(UserWarning, match="unknown pre-tokenizer 'no-such-pre'"):
        tok = Tokenizer.from_gguf(_gpt2_file(tmp_path, "no-such-pre"))
    reference = Tokenizer.from_gguf(_gpt2_file(tmp_path, FALLBACK_PRE))
    text = "hello world 123 it's"
    assert tok.encode(text) == reference.encode(text)


def test_missing_pre_means_default(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok = Tokenizer.from_gguf(_gpt2_file(tmp_path, None))
    assert tok.pre == "default"


def test_control_tokens_only_with_parse_special(tmp_path):
    tok = Tokenizer.from_gguf(_gpt2_file(tmp_path, "gpt-2"))
    assert tok.encode("<|im_end|>", parse_special=True) == [1]
    plain = tok.encode("<|im_end|>")
    assert 1 not in plain and tok.decode(plain) == "<|im_end|>"
    assert 1 in tok.eos_token_ids and 0 in tok.eos_token_ids


def test_add_bos_add_eos_from_metadata(tmp_path):
    tok = Tokenizer.from_gguf(_gpt2_file(tmp_path, "gpt-2", {
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True}))
    ids = tok.encode("hello")
    assert ids[0] == 0 and ids[-1] == 0 and tok.encode("hello", add_special=False) == ids[1:-1]
    # llama-bpe adds BOS by default, gpt-2 does not
    assert Tokenizer.from_gguf(_gpt2_file(tmp_path, "llama-bpe", {"tokenizer.ggml.bos_token_id": 0})).add_bos
    assert not Tokenizer.from_gguf(_gpt2_file(tmp_path, "gpt-2")).add_bos


def test_spm_highest_score_merges_first(tmp_path):
    # the best-scoring pair merges first, whatever its position or length
    pieces = ["\u2581", "a", "b", "c", "\u2581a", "ab", "bc", "\u2581ab", "abc"]
    scores = [-1.0, -1.0, -1.0, -1.0, -5.0, -9.0, -2.0, -3.0, -4.0]
    tok = Tokenizer.from_gguf(_spm_file(tmp_path, pieces, scores))
    t = tok.tokens
    # ▁ a b c: "bc" (-2) beats "▁a" (-5) and "ab" (-9); then "abc" (-4) beats "▁a"; "▁abc" is no token
    assert [t[i] for i in tok.encode("abc", add_special=False)] == ["\u2581", "abc"]
    assert tok.encode("abc")[0] == 1  # llama vocabularies add BOS by default
    assert tok.decode(tok.encode("abc", add_special=False)) == "abc"  # leading space stripped


def test_spm_byte_fallback_user_defined_and_space_prefix(tmp_path):
    pieces = ["\u2581", "a", "b"]
    tok = Tokenizer.from_gguf(_spm_file(tmp_path, pieces, extra={"tokenizer.ggml.add_space_prefix": False}))
    t = tok.tokens
    assert [t[i] for i in tok.encode("aé", add_special=False)] == ["a", "<0xC3>", "<0xA9>"]
    # user-defined tokens are split out even without parse_special; control tokens are not
    assert [t[i] for i in tok.encode("a<tab>b", add_special=False)] == ["a", "<tab>", "b"]
    assert "<start_of_turn>" not in [t[i] for i in tok.encode("<start_of_turn>", add_special=False)]
    assert [t[i] for i in tok.encode("<start_of_turn>a", add_special=False, parse_special=True)] == ["<start_of_turn>", "a"]
    assert tok.decode(tok.encode("<start_of_turn>a", parse_special=True), skip_special=True) == "a"
    prefixed = Tokenizer.from_gguf(_spm_file(tmp_path, pieces))
    assert [t[i] for i in prefixed.encode("a", add_special=False)] == ["\u2581", "a"]
    assert {prefixed.eos_token_id, t.index("<end_of_turn>")} <= prefixed.eos_token_ids


def test_from_open_file_and_path_agree(tmp_path):
    path = _gpt2_file(tmp_path, "gpt-2")
    assert Tokenizer.from_gguf(GGUFFile(path)).encode("hello world") == Tokenizer.from_gguf(path).encode("hello world")


def test_unsupported_model_is_a_clear_error(tmp_path):
    path = tmp_path / "bert.gguf"
    write_gguf(path, {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ValueError, match="bert.gguf.*'bert' is not supported"):
        Tokenizer.from_gguf(path)


def test_spm_scores_shorter_than_the_vocabulary_is_a_clear_error(tmp_path):
    path = _spm_file(tmp_path, ["a", "b", "ab"], scores=[-1.0, -2.0])
    with pytest.raises(ValueError, match=r"spm.gguf: tokenizer.ggml.scores has 264 entries for 265 tokens"):
        Tokenizer.from_gguf(path)
