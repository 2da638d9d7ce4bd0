"""Tokenizer and chat template built from a GGUF file's `tokenizer.*` metadata, token for token as llama.cpp.

A byte-level BPE vocabulary becomes a `tokenizers` (Rust) BPE model in memory; nothing is downloaded or
written.
What llama.cpp does around the model is done here the same way:

- Special tokens are split out of the text first, longest token text first (llama.cpp's
  `tokenizer_st_partition`). User-defined tokens always are; control and unknown tokens only with
  `parse_special=True`.
- `tokenizer.ggml.model == "gpt2"`: byte-level BPE over ranked merges, the text pre-split by the
  regexes llama.cpp picks for `tokenizer.ggml.pre` (each regex splits the pieces of the one before,
  matches and the text between them kept).
- `tokenizer.ggml.model == "llama"`: SentencePiece-style BPE that merges the adjacent pair whose
  concatenation is the highest-scoring token (spm.py), spaces escaped as U+2581, an optional space
  prefix, and `<0xNN>` byte tokens for characters outside the vocabulary.
- Decoding follows llama.cpp's `llama_detokenize` (piece per token, first-token space strip, and the
  `clean_spaces` rules of BPE vocabularies).

Chat templates are untrusted code from the file: they render in jinja2's `ImmutableSandboxedEnvironment`.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property, lru_cache
from itertools import repeat
from typing import Any

import numpy as np
from tokenizers import Regex, Tokenizer as _HFTokenizer, pre_tokenizers
from tokenizers.models import BPE

from .reader import GGUFFile
from .spm import SPACE, SpmEncoder

# token_type values in `tokenizer.ggml.token_type`
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp's token attribute bits (llama_token_attr)
_ATTR_UNKNOWN, _ATTR_UNUSED, _ATTR_NORMAL, _ATTR_CONTROL, _ATTR_USER_DEFINED, _ATTR_BYTE = 2, 4, 8, 16, 32, 64
_ATTR_OF_TYPE = {NORMAL: _ATTR_NORMAL, UNKNOWN: _ATTR_UNKNOWN, CONTROL: _ATTR_CONTROL,
                 USER_DEFINED: _ATTR_USER_DEFINED, UNUSED: _ATTR_UNUSED, BYTE: _ATTR_BYTE}
_ATTR_SPECIAL = _ATTR_CONTROL | _ATTR_UNKNOWN

# Token texts llama.cpp ends generation on (llama-vocab.cpp, "special_eog_ids").
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
})
# Fill-in-the-middle token texts llama.cpp recognises when the metadata names none; the pad, repo and
# file-separator ones also end generation.
_FIM_TEXTS = {
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>", "<|code_middle|>", "<|middle|>"),
    "pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "sep": ("<|file_sep|>",),
}
_FIM_EOG = ("pad", "rep", "sep")

# --- pre-tokenizers: regexes from llama.cpp's llama-vocab.cpp, in Oniguruma syntax -------------------
# Where llama.cpp runs a hand-written splitter (gpt2, llama3, qwen2) the regex is the one that splitter
# implements; elsewhere it is llama.cpp's own regex (`$` written `\z`: end of the piece, not of a line).
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_CASED = r"((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
_CASED2 = r"((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_CASED}|[^\r\n\p{{L}}\p{{N}}]?{_CASED2}|\p{{N}}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_CASED}{_CONTRACTIONS}?|[^\r\n\p{{L}}\p{{N}}]?{_CASED2}{_CONTRACTIONS}?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK3_MAIN = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                   r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CJK_DEEPSEEK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_BLOOM = r" ?[^(\s|.,!?…。，、।۔،)]+"
_DEEPSEEK_LLM_LETTERS = (  # escaped: several of these characters change under Unicode normalisation
    "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377"
    "\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556"
    "\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a"
    "\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4"
    "\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b"
    "\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a"
    "\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    "\U000118a0-\U000118df\U0001e900-\U0001e943]+"
)


@dataclass(frozen=True, slots=True)
class PreTokenizer:
    """How llama.cpp prepares text for one `tokenizer.ggml.pre` family of byte-level BPE vocabularies."""

    regexes: tuple[str, ...]
    clean_spaces: bool = True  # llama.cpp's decode-time removal of spaces before punctuation
    ignore_merges: bool = False  # a pre-token that is itself a token is taken whole
    add_bos: bool = False  # default when `tokenizer.ggml.add_bos_token` is absent


_DEFAULT = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"))
_GPT2_PRE = PreTokenizer((_GPT2,))
_STARCODER = PreTokenizer((r"\p{N}", _GPT2))
_LLAMA3_PRE = PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)

# `tokenizer.ggml.pre` name -> pre-tokenizer, as llama.cpp's llama_vocab::impl::load maps them.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _DEFAULT,
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"), _LLAMA3_PRE),
    "dbrx": PreTokenizer((_LLAMA3,)),
    "smaug-bpe": PreTokenizer((_LLAMA3,)),
    "chatglm-bpe": PreTokenizer((_LLAMA3,)),
    "glm4": PreTokenizer((_LLAMA3,), ignore_merges=True),
    "deepseek-llm": PreTokenizer(
        ("[\r\n]", _DEEPSEEK_LLM_LETTERS, "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+", r"\s+\z", _CJK_DEEPSEEK, r"\p{N}+"),
        clean_spaces=False),
    "deepseek-coder": PreTokenizer(("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_DEEPSEEK, r"\p{N}"), clean_spaces=False),
    "deepseek-v3": PreTokenizer((r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+", _DEEPSEEK3_MAIN), clean_spaces=False),
    "falcon": PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]")),
    **dict.fromkeys(("starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"), _STARCODER),
    "command-r": PreTokenizer(_STARCODER.regexes, clean_spaces=False),
    "smollm": PreTokenizer(_STARCODER.regexes, clean_spaces=False),
    **dict.fromkeys(("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
                     "mellum", "modern-bert", "mpt", "olmo", "jais", "exaone4", "jina-v1-en", "jina-v2-code",
                     "roberta-bpe"), _GPT2_PRE),
    "trillion": PreTokenizer((_GPT2,), clean_spaces=False),
    "qwen2": PreTokenizer((_QWEN2,), clean_spaces=False),
    "deepseek-r1-qwen": PreTokenizer((_QWEN2,), clean_spaces=False),
    "megrez": PreTokenizer((_QWEN2,)),
    "stablelm2": PreTokenizer((_QWEN2,)),
    "poro-chat": PreTokenizer((_BLOOM,), clean_spaces=False),
    "bloom": PreTokenizer((_BLOOM,)),
    "gpt3-finnish": PreTokenizer((_BLOOM,)),
    "viking": PreTokenizer((_BLOOM, r"\p{N}"), clean_spaces=False),
    "tekken": PreTokenizer((_TEKKEN,), clean_spaces=False, ignore_merges=True, add_bos=True),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), PreTokenizer((_GPT4O,), clean_spaces=False)),
}
FALLBACK_PRE = "gpt-2"


class ChatTemplateError(ValueError):
    """A chat template that is missing, broken, or tried to leave the sandbox."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map of byte-level BPE vocabularies."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def _clean_spaces(text: bytes) -> bytes:
    """llama.cpp's three `clean_spaces` passes of llama_detokenize, in order."""
    text = re.sub(rb" (?=[?!.,])", b"", text)  # " ?", " !", " .", " ,"
    text = re.sub(rb" ' ", b"'", text)  # a lone apostrophe between spaces
    return re.sub(rb" '(?=[sm]|re|ve)", b"'", text)  # " 's", " 'm", " 're", " 've"


def _bpe_merges(merges: Iterable[str], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """`tokenizer.ggml.merges` ("a b", split at the first space after the first character) as pairs.

    A merge whose result is not a token is dropped: llama.cpp would split that symbol back into byte
    tokens, which only happens with inconsistent vocabularies.
    """
    out = []
    for m in merges:
        p = m.find(" ", 1)
        if p < 0:
            continue
        a, b = m[:p], m[p + 1 :]
        if a + b in vocab and a in vocab and b in vocab:
            out.append((a, b))
    return out


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class Tokenizer:
    """A GGUF vocabulary: encode, decode, stream-decode, chat template. Build with `from_gguf`."""

    def __init__(self, metadata: Mapping[str, Any], source: str = "<metadata>"):
        self.source = source
        model = metadata.get("tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise ValueError(f"{source}: tokenizer.ggml.model {model!r} is not supported (gpt2, llama)")
        self.model = model
        tokens = list(metadata["tokenizer.ggml.tokens"])
        # llama.cpp renames empty tokens so every text is unique and non-empty
        if "" in tokens:
            tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self.tokens = tokens
        n = len(tokens)
        types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * n
        if len(types) < n:
            raise ValueError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
        self._attrs = list(map(_ATTR_OF_TYPE.get, types[:n], repeat(0, n)))
        vocab = {t: i for i, t in enumerate(tokens)}  # last id wins, as in llama.cpp
        self._vocab = vocab

        if model == "gpt2":
            self.pre = metadata.get("tokenizer.ggml.pre") or "default"
            if self.pre not in PRE_TOKENIZERS:
                warnings.warn(f"{source}: unknown pre-tokenizer {self.pre!r}, using {FALLBACK_PRE!r}", stacklevel=3)
            pre = PRE_TOKENIZERS.get(self.pre, PRE_TOKENIZERS[FALLBACK_PRE])
            self.add_space_prefix, self.clean_spaces = False, pre.clean_spaces
            add_bos, bos, eos, unk = pre.add_bos, 11, 11, None
        else:
            self.pre, pre = "default", None
            self.add_space_prefix, self.clean_spaces = True, False
            add_bos, bos, eos, unk = True, 1, 2, 0
        self.add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", self.add_space_prefix))
        self.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos))
        self.add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))

        def special(key: str, default: int | None) -> int | None:
            # an id outside the vocabulary is ignored, as llama.cpp does (a default one too)
            default = default if default is not None and default < n else None
            v = metadata.get(f"tokenizer.ggml.{key}_token_id")
            return v if v is not None and 0 <= v < n else default

        self.bos_token_id = special("bos", bos)
        self.eos_token_id = special("eos", eos)
        self.unk_token_id = special("unknown", unk)
        self.eos_token_ids = self._end_of_generation(metadata, special)
        if self.add_bos and self.bos_token_id is None:
            raise ValueError(f"{source}: add_bos_token is set but there is no BOS token")

        # special tokens, longest text first, matched before the model sees the text
        is_special = np.array(self._attrs) & (_ATTR_CONTROL | _ATTR_USER_DEFINED | _ATTR_UNKNOWN)
        self._specials = sorted(np.flatnonzero(is_special).tolist(), key=lambda i: -len(tokens[i]))

        if model == "gpt2":
            merges = _bpe_merges(metadata.get("tokenizer.ggml.merges", ()), vocab)
            hf = _HFTokenizer(BPE(vocab, merges, ignore_merges=pre.ignore_merges))
            hf.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(r), "isolated") for r in pre.regexes]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
            )
            self._hf = hf
        else:
            scores = metadata.get("tokenizer.ggml.scores") or [0.0] * n
            if len(scores) < n:
                raise ValueError(f"{source}: tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
            self._spm = SpmEncoder(vocab, scores)
        self.chat_template: str | None = metadata.get("tokenizer.chat_template")

    @classmethod
    def from_gguf(cls, source: str | os.PathLike | GGUFFile) -> Tokenizer:
        """Build the tokenizer of a GGUF file (a path or an open `GGUFFile`)."""
        f = source if isinstance(source, GGUFFile) else GGUFFile(source)
        return cls(f.metadata, str(getattr(f, "path", source)))

    def _end_of_generation(self, metadata: Mapping[str, Any], special) -> frozenset[int]:
        """llama.cpp's EOG set: EOS, EOT, EOM, FIM pad/repo/sep, and tokens with end-of-turn texts.

        Tokens found by text become control tokens, as llama.cpp overrides their type.
        """
        vocab, attrs = self._vocab, self._attrs
        eog = set()
        for kind, texts in _FIM_TEXTS.items():
            tid = special(f"fim_{kind}", None)
            if tid is None:
                tid = next((vocab[t] for t in texts if t in vocab), None)
                if tid is not None:
                    attrs[tid] |= _ATTR_CONTROL
            if tid is not None and kind in _FIM_EOG:
                eog.add(tid)
        for text in _EOG_TEXTS:
            if text in vocab:
                eog.add(vocab[text])
                attrs[vocab[text]] |= _ATTR_CONTROL
        # gpt-oss/harmony: these render as plain text
        for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
            if text in vocab:
                attrs[vocab[text]] = _ATTR_USER_DEFINED
        for key in ("eos", "eot", "eom"):
            tid = self.eos_token_id if key == "eos" else special(key, None)
            if tid is not None:
                eog.add(tid)
        texts = {self.tokens[i] for i in eog}
        if {"<|return|>", "<|call|>", "<|end|>"} <= texts or {"<|calls|>", "<|flush|>", "<|end|>"} <= texts:
            eog.discard(vocab["<|end|>"])
            attrs[vocab["<|end|>"]] = _ATTR_USER_DEFINED
        if "</s>" in texts and texts & {"<|tool_response>", "<|plamo:eos|>"}:
            eog.discard(vocab["</s>"])
            attrs[vocab["</s>"]] = _ATTR_NORMAL
        return frozenset(eog)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    # --- encoding ------------------------------------------------------------------------------------

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split special tokens out of the text the way llama.cpp does: longest token text first."""
        frags: list[str | int] = [text]
        tokens, attrs = self.tokens, self._attrs
        for tid in self._specials:
            tok = tokens[tid]
            if (not parse_special and attrs[tid] & _ATTR_SPECIAL) or tok not in text:
                continue
            out: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or tok not in f:
                    out.append(f)
                    continue
                for j, part in enumerate(f.split(tok)):
                    if j:
                        out.append(tid)
                    if part:
                        out.append(part)
            frags = out
        return frags

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`; `add_special` adds BOS/EOS as the model asks, `parse_special` lets
        control-token texts in `text` become those tokens."""
        ids: list[int] = []
        if add_special and self.add_bos:
            ids.append(self.bos_token_id)
        prev_special = True  # SPM: a space prefix goes before text that starts or follows a special token
        for frag in self._partition(text, parse_special) if text else ():
            if isinstance(frag, int):
                ids.append(frag)
                prev_special = True
                continue
            if self.model == "llama":
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                ids += self._spm.encode(frag.replace(" ", SPACE))
            else:
                ids += self._hf.encode(frag, add_special_tokens=False).ids
            prev_special = False
        if add_special and self.add_eos:
            ids.append(self.eos_token_id)
        return ids

    # --- decoding ------------------------------------------------------------------------------------

    @cached_property
    def _pieces(self) -> list[bytes]:
        """Each token's bytes as llama.cpp's token_to_piece(special=True) renders them."""
        out = []
        for text, attr in zip(self.tokens, self._attrs):
            if attr & (_ATTR_SPECIAL | _ATTR_USER_DEFINED):
                out.append(text.encode())
            elif attr & _ATTR_NORMAL:
                if self.model == "llama":
                    out.append(text.replace(SPACE, " ").encode())
                else:
                    out.append(bytes(_BYTE_DECODER[c] for c in text) if all(c in _BYTE_DECODER for c in text)
                               else text.encode())
            elif attr & _ATTR_BYTE:
                out.append(bytes([int(text[3:5], 16)]))
            else:
                out.append(b"")
        return out

    def token_bytes(self, token_id: int, skip_special: bool = False) -> bytes:
        """The bytes one token decodes to (control and unknown tokens to nothing with `skip_special`)."""
        if skip_special and self._attrs[token_id] & _ATTR_SPECIAL:
            return b""
        return self._pieces[token_id]

    def _raw_bytes(self, ids: Iterable[int], skip_special: bool) -> bytes:
        parts = [self.token_bytes(i, skip_special) for i in ids]
        if parts and self.add_space_prefix and parts[0][:1] == b" ":
            parts[0] = parts[0][1:]
        return b"".join(parts)

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        raw = self._raw_bytes(ids, skip_special)
        return _clean_spaces(raw) if self.clean_spaces else raw

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids` as llama.cpp's llama_detokenize (remove_special=False, unparse_special=not
        skip_special); invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def incremental_detokenizer(self, skip_special: bool = False) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special)

    # --- chat template -------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render `tokenizer.chat_template` in a jinja2 sandbox with the variables HF templates use."""
        if not self.chat_template:
            raise ChatTemplateError(f"{self.source}: the GGUF file has no tokenizer.chat_template")
        bos = self.tokens[self.bos_token_id] if self.bos_token_id is not None else ""
        eos = self.tokens[self.eos_token_id] if self.eos_token_id is not None else ""
        variables = {"bos_token": bos, "eos_token": eos, "tools": None} | kwargs
        return render_chat_template(self.chat_template, messages, add_generation_prompt, **variables)

    def encode_chat(self, rendered: str) -> list[int]:
        """Token ids of a rendered chat template: its special-token texts parsed, no BOS/EOS added. The
        template writes its own BOS (`{{ bos_token }}`), as llama.cpp and vLLM read it: adding one would
        double it."""
        return self.encode(rendered, add_special=False, parse_special=True)


class IncrementalDetokenizer:
    """Streaming decode: `add(token_id)` returns the new text, never a broken UTF-8 sequence (incomplete
    bytes wait for the next token), and `flush()` the rest; together they equal `Tokenizer.decode`."""

    # llama.cpp's clean_spaces looks at most this many bytes ahead of a space it may remove
    _HOLD = 8

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._skip = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._raw = bytearray()
        self._sent = 0  # bytes of the cleaned text already passed to the UTF-8 decoder
        self.token_ids: list[int] = []

    def add(self, token_id: int) -> str:
        piece = self._tok.token_bytes(token_id, self._skip)
        if not self.token_ids and self._tok.add_space_prefix and piece[:1] == b" ":
            piece = piece[1:]
        self.token_ids.append(token_id)
        if not self._tok.clean_spaces:
            return self._utf8.decode(piece)
        self._raw += piece
        cleaned = _clean_spaces(bytes(self._raw))
        stable = max(self._sent, len(cleaned) - self._HOLD)
        out = self._utf8.decode(cleaned[self._sent : stable])
        self._sent = stable
        return out

    def flush(self) -> str:
        """The text still held back; call once the sequence is complete."""
        rest = _clean_spaces(bytes(self._raw))[self._sent :] if self._tok.clean_spaces else b""
        self._sent += len(rest)
        return self._utf8.decode(rest, final=True)


# --- chat templates ------------------------------------------------------------------------------------

# Built-in templates for files that carry none, each in its family's published format.
CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Gemma has no system turn: the system message opens the first user turn.
    "gemma": (
        "{{ bos_token }}"
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] + '\\n\\n' %}{% set messages = messages[1:] %}"
        "{% else %}{% set system = '' %}{% endif %}"
        "{% for message in messages %}"
        "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n'"
        " + (system if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    "llama2": (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
        "{% set messages = messages[1:] %}"
        "{% else %}{% set system = '' %}{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + ((system if loop.first else '') + message['content']) | trim + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}"
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] + '\\n\\n' %}{% set messages = messages[1:] %}"
        "{% else %}{% set system = '' %}{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "phi3": (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
}
# A vocabulary's turn tokens tell its template family, whatever the architecture.
_TURN_TOKENS = (("<start_of_turn>", "gemma"), ("<|start_header_id|>", "llama3"), ("<|assistant|>", "phi3"),
                ("[INST]", "mistral"), ("<|im_start|>", "chatml"))


def builtin_chat_template(metadata: Mapping[str, Any]) -> str:
    """The name of the built-in template (`CHAT_TEMPLATES`) for a model whose file has none: by the turn
    tokens of its vocabulary, else by its architecture; ChatML when neither tells."""
    tokens = set(metadata.get("tokenizer.ggml.tokens") or ())
    for token, name in _TURN_TOKENS:
        if token in tokens:
            return name
    arch = metadata.get("general.architecture", "")
    if arch.startswith("gemma"):
        return "gemma"
    if arch == "phi3":
        return "phi3"
    if arch == "llama" and metadata.get("tokenizer.ggml.model") == "llama":  # a SentencePiece vocabulary
        return "mistral" if "mistral" in str(metadata.get("general.name", "")).lower() else "llama2"
    return "chatml"


@lru_cache(maxsize=1)
def _sandbox():
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            # jinja2 would render a refused attribute as an empty string; refuse loudly instead
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    # the settings transformers renders chat templates with
    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda v, indent=None, ensure_ascii=False, separators=None, sort_keys=False: json.dumps(
        v, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env, SecurityError, TemplateError


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                         **variables: Any) -> str:
    """Render an HF-style chat template in jinja2's immutable sandbox.

    Raises `ChatTemplateError` for a template that does not parse, calls `raise_exception`, or reaches for
    attributes the sandbox refuses (Python internals such as `__class__` or `__globals__`).
    """
    env, security_error, template_error = _sandbox()
    try:
        compiled = env.from_string(template)
        return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)
    except security_error as e:
        raise ChatTemplateError(f"chat template refused by the sandbox: {e}") from None
    except template_error as e:
        raise ChatTemplateError(f"chat template error: {e}") from None
