"""The OpenAI API's request bodies (pydantic models, checked before anything runs) and response objects.

Request fields follow OpenAI's names and ranges; sampling fields it lacks (top_k, min_p,
repetition_penalty, ignore_eos) are taken as vLLM and llama-server take them. Fields this server ignores
(user, service_tier, ...) are accepted and ignored; fields it cannot honour are refused with a 400 that
names them, never dropped silently.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ggtriton.gguf import Tokenizer

from ..sampling_params import RequestOutput, SamplingParams

MAX_LOGPROBS = 20  # top log-probabilities per token, at most (OpenAI's limit for chat)


class APIError(Exception):
    """An error answered with OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    # strict: "2" is not 2 and 1.5 is not an integer; extra: unknown fields are ignored, as OpenAI's own
    # clients send fields a server may not know.
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _supported(self):
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format: structured output is not supported (only {'type': 'text'})")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if any(not s for s in stops):
            raise ValueError("stop: stop strings must not be empty")
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias: keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias: values must be in [-100, 100], got {bias} for token {key}")
        return self

    def sampling_params(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None,
                        ) -> SamplingParams:
        try:
            return self._sampling_params(max_tokens, logprobs, prompt_logprobs)
        except ValueError as e:  # SamplingParams' own checks; its messages begin with the field's name
            raise APIError(400, str(e), str(e).split()[0]) from None

    def _sampling_params(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_k=max(self.top_k, 0), top_p=self.top_p,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []), ignore_eos=self.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()})

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _completion_supported(self):
        if self.suffix:
            raise ValueError("suffix: insertion is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of equal to n is supported")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: must be at least 1 (0 only with echo, to score the prompt)")
        if any(len(p) == 0 for p in self.prompts()):
            raise ValueError("prompt: must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(t, int) for t in p):
            return [p]
        return list(p)


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The content as one string; only text parts are understood."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages: content parts of type {part.get('type')!r} are not supported "
                                    "(text only)", "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _chat_supported(self):
        if self.tools:
            raise ValueError("tools: tool calling is not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs set to true")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Body):
    content: str | None = None
    prompt: str | None = None  # vLLM's name for content
    messages: list[ChatMessage] | None = None
    add_special: bool = True

    @model_validator(mode="after")
    def _one_source(self):
        if sum(x is not None for x in (self.content, self.prompt, self.messages)) != 1:
            raise ValueError("give exactly one of content, prompt or messages")
        return self


class DetokenizeRequest(_Body):
    tokens: list[int]


# --- responses ------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def token_text(tokenizer: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token as text (invalid UTF-8 of a partial character replaced) and as its bytes."""
    raw = tokenizer.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tokenizer: Tokenizer, token_ids: list[int], logprobs: list[dict[int, float] | None],
                  top: int) -> list[dict[str, Any]]:
    """Chat's `logprobs.content` entries: per token, its log-prob and the `top` most likely tokens."""
    out = []
    for token, entry in zip(token_ids, logprobs):
        text, raw = token_text(tokenizer, token)
        alternatives = sorted(entry.items(), key=lambda kv: -kv[1])[:top]
        out.append({"token": text, "logprob": entry[token], "bytes": raw,
                    "top_logprobs": [{"token": t, "logprob": lp, "bytes": b}
                                     for (t, b), lp in ((token_text(tokenizer, i), lp) for i, lp in alternatives)]})
    return out


@dataclass
class CompletionLogprobs:
    """The completions API's logprobs object, built up token by token."""

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    offset: int = 0  # characters of text before the next token

    def add(self, tokenizer: Tokenizer, token_ids: list[int], logprobs: list[dict[int, float] | None],
            top: int) -> None:
        for token, entry in zip(token_ids, logprobs):
            text, _ = token_text(tokenizer, token)
            self.tokens.append(text)
            self.text_offset.append(self.offset)
            self.offset += len(text)
            if entry is None:  # a prompt's first token: nothing predicts it
                self.token_logprobs.append(None)
                self.top_logprobs.append(None)
                continue
            self.token_logprobs.append(entry[token])
            best = sorted(entry.items(), key=lambda kv: -kv[1])[:top]
            self.top_logprobs.append({token_text(tokenizer, t)[0]: lp for t, lp in best})

    def json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}

    def take(self) -> dict[str, Any]:
        """The entries added since the last take (a streamed chunk's share)."""
        out = self.json()
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(output: RequestOutput) -> str:
    return output.finish_reason if output.finish_reason in ("stop", "length") else "stop"


def envelope(kind: str, request_id: str, model: str, created: int | None = None, **rest: Any) -> dict[str, Any]:
    return {"id": request_id, "object": kind, "created": created or int(time.time()), "model": model} | rest
