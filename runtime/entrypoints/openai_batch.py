"""Offline batch jobs in the OpenAI batch file format: JSONL requests in, JSONL responses out.

Each input line: {"custom_id": str, "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
"body": {"messages": [...] | "prompt": str, "max_tokens", "temperature", "top_p", "top_k", "min_p",
"seed", "stop", "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs", ...}}.
Each output line: {"id", "custom_id", "response": {"status_code": 200, "request_id", "body": <a chat
completion or completion object>}, "error": null}, or with "response": null and "error": {"code",
"message"} for a line that could not be run. All valid lines run together in one continuous batch.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from typing import Any

from ..llm import LLM
from ..sampling_params import RequestOutput, SamplingParams

URLS = ("/v1/chat/completions", "/v1/completions")
_PARAM_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                 "frequency_penalty", "repetition_penalty")


def _params(body: dict[str, Any]) -> SamplingParams:
    kwargs = {k: body[k] for k in _PARAM_FIELDS if body.get(k) is not None}
    if "max_completion_tokens" in body:
        kwargs["max_tokens"] = body["max_completion_tokens"]
    stop = body.get("stop")
    if stop is not None:
        kwargs["stop"] = [stop] if isinstance(stop, str) else list(stop)
    logprobs = body.get("top_logprobs") if body.get("logprobs") is True else body.get("logprobs")
    if logprobs not in (None, False):
        kwargs["logprobs"] = int(logprobs)
    return SamplingParams(**kwargs)


def _prompt(llm: LLM, url: str, body: dict[str, Any]) -> str:
    if url == "/v1/chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("body.messages must be a non-empty list")
        return llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError("body.prompt must be a string")
    return prompt


def _body(url: str, model: str, out: RequestOutput) -> dict[str, Any]:
    usage = {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": len(out.token_ids),
             "total_tokens": len(out.prompt_token_ids) + len(out.token_ids)}
    common = {"id": f"cmpl-{out.request_id}", "created": int(time.time()), "model": model, "usage": usage}
    if url == "/v1/chat/completions":
        choice = {"index": 0, "message": {"role": "assistant", "content": out.text},
                  "finish_reason": out.finish_reason}
        return common | {"object": "chat.completion", "choices": [choice]}
    return common | {"object": "text_completion",
                     "choices": [{"index": 0, "text": out.text, "finish_reason": out.finish_reason}]}


def run_batch(llm: LLM, lines: Iterable[str], model_name: str) -> list[dict[str, Any]]:
    """Responses for the request lines, in input order."""
    results: list[dict[str, Any] | None] = []
    jobs = []  # (result index, custom_id, url, prompt, params)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        custom_id = None
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request line must be a JSON object")
            custom_id = request.get("custom_id")
            url, body = request.get("url"), request.get("body")
            if url not in URLS:
                raise ValueError(f"url must be one of {', '.join(URLS)}, got {url!r}")
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            jobs.append((len(results), custom_id, url, _prompt(llm, url, body), _params(body)))
            results.append(None)
        except (ValueError, TypeError) as e:
            results.append(_error(custom_id, f"line {n}: {e}"))
    engine = llm.engine
    ids = {}
    for index, custom_id, url, prompt, params in jobs:
        try:
            ids[engine.add_request(prompt, params)] = (index, custom_id, url)
        except ValueError as e:
            results[index] = _error(custom_id, str(e))
    while engine.has_unfinished():
        for out in engine.step():
            index, custom_id, url = ids[out.request_id]
            results[index] = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
                              "response": {"status_code": 200, "request_id": out.request_id,
                                           "body": _body(url, model_name, out)},
                              "error": None}
    engine.pop_finished()
    return results


def _error(custom_id: Any, message: str) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": "invalid_request", "message": message}}
