"""Offline batch jobs in the OpenAI batch file format: JSONL requests in, JSONL responses out.

Each input line: {"custom_id": str, "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
"body": {"messages": [...] | "prompt": str, "max_tokens", "temperature", "top_p", "top_k", "min_p",
"seed", "stop", "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs", "n", ...}}.
Each output line: {"id", "custom_id", "response": {"status_code": 200, "request_id", "body": <a chat
completion or completion object>}, "error": null}, or with "response": null and "error": {"code",
"message"} for a line that could not be run, the message beginning with its line number. All valid lines
run together in one continuous batch; `n` > 1 runs n requests of the line, the i-th with `seed` + i when
a seed is given, and answers with n choices.

A job can resume: `resume` reads what an interrupted job wrote to its output and says which custom_ids are done,
so that a second run skips them and appends the rest (`ggtriton batch --ray` does so).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..llm import LLM
from ..sampling_params import RequestOutput, SamplingParams

URLS = ("/v1/chat/completions", "/v1/completions")
_INT_FIELDS = ("max_tokens", "max_completion_tokens", "top_k", "seed", "n", "logprobs", "top_logprobs")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


def _number(body: dict[str, Any], key: str) -> int | float | None:
    """body[key] if it is a number of the field's kind (None when absent); else a ValueError naming it."""
    value = body.get(key)
    kind = int if key in _INT_FIELDS else (int, float)
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
        raise ValueError(f"body.{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return value


def _params(body: dict[str, Any]) -> SamplingParams:
    kwargs = {k: v for k in _FLOAT_FIELDS + ("max_tokens", "top_k", "seed") if (v := _number(body, k)) is not None}
    if (max_tokens := _number(body, "max_completion_tokens")) is not None:
        kwargs["max_tokens"] = max_tokens
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ValueError(f"body.stop must be a string or a list of strings, got {body['stop']!r}")
        kwargs["stop"] = stop
    if body.get("logprobs") is True:  # chat: a flag, the count in top_logprobs
        kwargs["logprobs"] = _number(body, "top_logprobs")
    elif body.get("logprobs") is not False:  # completions: the count
        kwargs["logprobs"] = _number(body, "logprobs")
    return SamplingParams(**kwargs)


def _choices(body: dict[str, Any]) -> int:
    n = _number(body, "n")
    if n is not None and n < 1:
        raise ValueError(f"body.n must be at least 1, got {n}")
    return n or 1


def _prompt(llm: LLM, url: str, body: dict[str, Any]) -> str | list[int]:
    if url == "/v1/chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("body.messages must be a non-empty list")
        return llm.tokenizer.encode_chat(llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError("body.prompt must be a string")
    return prompt


@dataclass
class _Job:
    """One request line: where its response goes and the outputs of its `n` choices."""

    index: int
    custom_id: Any
    url: str
    outputs: list[RequestOutput | None] = field(default_factory=list)


def _body(job: _Job, model: str) -> dict[str, Any]:
    outs = job.outputs
    completion = sum(len(o.token_ids) for o in outs)
    usage = {"prompt_tokens": len(outs[0].prompt_token_ids), "completion_tokens": completion,
             "total_tokens": len(outs[0].prompt_token_ids) + completion}
    chat = job.url == "/v1/chat/completions"
    common = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
              "model": model, "usage": usage}
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": o.text}, "finish_reason": o.finish_reason}
                   for i, o in enumerate(outs)]
        return common | {"object": "chat.completion", "choices": choices}
    choices = [{"index": i, "text": o.text, "finish_reason": o.finish_reason} for i, o in enumerate(outs)]
    return common | {"object": "text_completion", "choices": choices}


def run_batch(llm: LLM, lines: Iterable[str], model_name: str,
              line_numbers: Iterable[int] | None = None) -> list[dict[str, Any]]:
    """Responses for the request lines, in input order; an error names its line by its number in `lines`, or by
    `line_numbers` (the lines' numbers in the file, when `lines` is a part of it)."""
    results: list[dict[str, Any] | None] = []
    engine = llm.engine
    running: dict[str, tuple[_Job, int]] = {}  # request id -> (its line's job, choice index)
    for n, line in zip(line_numbers if line_numbers is not None else range(1, 1 << 62), lines):
        if not line.strip():
            continue
        custom_id = None
        try:
            try:
                request = json.loads(line)
            except json.JSONDecodeError as e:  # its message has a line number of its own: keep the column
                raise ValueError(f"invalid JSON: {e.msg} at column {e.colno}") from None
            if not isinstance(request, dict):
                raise ValueError("a request line must be a JSON object")
            custom_id = request.get("custom_id")
            url, body = request.get("url"), request.get("body")
            if url not in URLS:
                raise ValueError(f"url must be one of {', '.join(URLS)}, got {url!r}")
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            prompt, params, choices = _prompt(llm, url, body), _params(body), _choices(body)
            job = _Job(len(results), custom_id, url, [None] * choices)
            added = []
            try:
                for i in range(choices):
                    added.append(engine.add_request(
                        prompt, params if params.seed is None else replace(params, seed=params.seed + i)))
            except ValueError:
                for rid in added:
                    engine.abort(rid)
                raise
            running |= {rid: (job, i) for i, rid in enumerate(added)}
            results.append(None)
        except ValueError as e:
            results.append(_error(custom_id, f"line {n}: {e}"))
    while engine.has_unfinished():
        for out in engine.step():
            job, i = running.pop(out.request_id)
            job.outputs[i] = out
            if all(job.outputs):
                results[job.index] = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": job.custom_id,
                                      "response": {"status_code": 200,
                                                   "request_id": job.outputs[0].request_id,
                                                   "body": _body(job, model_name)},
                                      "error": None}
    engine.pop_finished()
    return results


def _error(custom_id: Any, message: str) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": "invalid_request", "message": message}}


def custom_id_of(line: str) -> Any:
    """The custom_id of a request or response line (None when it has none, or is no JSON object)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    return obj.get("custom_id") if isinstance(obj, dict) else None


def resume(output: str | Path) -> set[str]:
    """The custom_ids an interrupted job already answered in `output` (none when it does not exist). A last line
    cut short by the interruption is removed from the file, so that the next run appends whole lines."""
    path = Path(output)
    if not path.exists():
        return set()
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
        path.write_text("".join(lines), encoding="utf-8")
    return {json.dumps(cid) for line in lines if (cid := custom_id_of(line)) is not None}
