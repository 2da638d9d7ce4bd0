"""`ggtriton serve` on SmolLM2 over loopback, driven by the official `openai` client (and raw HTTP for what
the client will not send): the API's shapes and numbers, every error status, load, disconnects, metrics,
shutdown, and the serving benchmark."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from ggtriton.runtime.entrypoints.api_server import Server
from ggtriton.runtime.entrypoints.cli import main
from ggtriton.runtime.entrypoints.serving_bench import random_text_requests, run_serving_bench
from ggtriton.runtime.llm import LLM

MODEL = "smollm2"
KEY = "test-key"
CONTEXT = 256


class _Running:
    """A server on a free loopback port, in a thread of this process."""

    def __init__(self, server: Server):
        self.server = server
        self.http = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.http.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.http.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.http.servers[0].sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        self.http.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def llm(smollm2_path):
    # On CPU the float32 reference ops: the tests hold the served log-probabilities to the model's own scoring
    # of the same tokens, which the cpu backend runs on other weight formats for generated tokens than for prompts.
    backend = None if torch.cuda.is_available() else "torch"
    return LLM(smollm2_path, backend=backend, max_model_len=CONTEXT, kv_cache_bytes=64 << 20)


@pytest.fixture(scope="module")
def running(llm):
    r = _Running(Server(lambda: llm, served_model_name=MODEL, api_key=KEY))
    assert r.server.loaded.wait(60) and r.server.loop is not None
    yield r
    r.stop()


@pytest.fixture(scope="module")
def client(running):
    return openai.OpenAI(base_url=f"{running.url}/v1", api_key=KEY, max_retries=0)


def _post(running, path: str, body, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(running.url + path, content=body, headers=headers | {"content-type": "application/json"},
                          timeout=60, **kwargs)
    return httpx.post(running.url + path, json=body, headers=headers, timeout=60, **kwargs)


def _wait_idle(running, timeout: float = 30.0) -> None:
    """Until no request runs or waits and every KV page is free."""
    deadline = time.monotonic() + timeout
    while True:
        s = running.server.loop.stats
        if s.running == 0 and s.waiting == 0 and s.pages_used == 0:
            return
        assert time.monotonic() < deadline, f"still busy: {s}"
        time.sleep(0.05)


def _log_softmax_at(llm, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(llm.logits(ids).double(), dim=1)


def _greedy(llm, ids: list[int], n: int) -> list[int]:
    """Greedy tokens by `LLM.logits` over the whole sequence each time: the engine's answer, found without
    the engine (which the server's thread owns)."""
    out = []
    while len(out) < n and (not out or out[-1] not in llm.tokenizer.eos_token_ids):
        out.append(int(llm.logits(ids + out)[-1].argmax()))
    return out


def _generated(registry) -> float:
    return registry.get_sample_value("ggtriton:generation_tokens_total") or 0.0


CHAT = [{"role": "user", "content": "Name three colours."}]


# --- the API ---------------------------------------------------------------------------------------------


def test_chat_and_streamed_chat_agree_with_the_engine(client, llm):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    ids = llm.tokenizer.encode_chat(llm.tokenizer.apply_chat_template(CHAT))
    tokens = _greedy(llm, ids, 16)
    want = llm.tokenizer.decode(tokens, skip_special=True)
    reason = "stop" if tokens[-1] in llm.tokenizer.eos_token_ids else "length"
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(tokens))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model == MODEL and r.object == "chat.completion"

    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_n_and_seed(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=7, n=2)
    r = client.completions.create(**kwargs)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text != r.choices[1].text  # samples 0 and 1 draw with seeds 7 and 8
    again = client.completions.create(**kwargs)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    assert r.usage.completion_tokens == 24 and r.usage.prompt_tokens == 4  # the prompt counted once
    streamed = client.completions.create(**kwargs, stream=True)
    texts = ["", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in r.choices]


def test_stop_strings_end_the_text(client):
    free = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=24, temperature=0)
    text = free.choices[0].text
    stop = text.strip()[2:5] if len(text.strip()) > 5 else text.strip()[:1]
    assert stop and stop in text
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=24, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_chat_logprobs_are_the_models(client, llm):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    ids = llm.tokenizer.encode_chat(llm.tokenizer.apply_chat_template(CHAT))
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    generated = _greedy(llm, ids, 6)
    ref = _log_softmax_at(llm, ids + generated)
    for i, (token, entry) in enumerate(zip(generated, entries)):
        row = ref[len(ids) - 1 + i]
        assert entry.token == llm.tokenizer.token_bytes(token).decode("utf-8", "replace")
        assert entry.bytes == list(llm.tokenizer.token_bytes(token))
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)


def test_echo_scores_the_prompt_as_the_model_does(client, llm):
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = llm.tokenizer.encode(prompt, add_special=True, parse_special=True)
    ref = _log_softmax_at(llm, ids)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt and r.usage.completion_tokens == 0
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [float(ref[p - 1, ids[p]]) for p in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert all(len(top) >= 2 for top in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)
    # Token ids as the prompt, one generated token after it, and the same request again: the prompt is
    # recomputed (no prefix-cache hits skip its positions), so it scores the same.
    for _ in range(2):
        r = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
        lp = r.choices[0].logprobs
        assert len(lp.tokens) == len(ids) + 1
        assert lp.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, echo=True, logprobs=1,
                                              temperature=0, stream=True))
    assert streamed[0].choices[0].text == prompt
    assert streamed[0].choices[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)


def test_logit_bias_forces_a_token(client, llm):
    token = llm.tokenizer.encode(" banana", add_special=False)[0]
    r = client.completions.create(model=MODEL, prompt="I like", max_tokens=3, temperature=0,
                                  logit_bias={str(token): 100})
    assert r.choices[0].text == llm.tokenizer.decode([token] * 3)


def test_models_tokenize_detokenize_health(running, llm):
    models = httpx.get(running.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [m["id"] for m in models["data"]] == [MODEL] and models["data"][0]["max_model_len"] == CONTEXT
    r = _post(running, "/tokenize", {"content": "Hello world"}).json()
    assert r["tokens"] == llm.tokenizer.encode("Hello world", add_special=True, parse_special=True)
    assert r["count"] == len(r["tokens"])
    assert _post(running, "/detokenize", {"tokens": r["tokens"]}).json()["content"] == \
        llm.tokenizer.decode(r["tokens"])
    chat = _post(running, "/tokenize", {"messages": CHAT}).json()["tokens"]
    assert chat == llm.tokenizer.encode_chat(llm.tokenizer.apply_chat_template(CHAT))
    assert httpx.get(running.url + "/health").status_code == 200  # needs no key


# --- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", b"[1, 2]", None),
    ("/v1/completions", {"max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": [1, 10**9]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2.5}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": CONTEXT}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi " * CONTEXT}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 500}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {str(10**9): 1}}, None),
    ("/v1/completions", {"prompt": "hi", "suffix": "end"}, "suffix"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": CONTEXT}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * CONTEXT}]}, "messages"),
    ("/tokenize", {"content": "a", "prompt": "b"}, None),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
])
def test_bad_requests_get_400_naming_the_field(running, path, body, param):
    r = _post(running, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"]
    if param is not None:
        assert error["param"] == param and param in error["message"]
    _wait_idle(running)  # nothing was left running or holding pages


def test_api_key_and_model_name(running, client):
    for key in (None, "wrong"):
        r = _post(running, "/v1/completions", {"prompt": "hi"}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{running.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-5", prompt="hi", max_tokens=2)
    assert e.value.body["param"] == "model" and "gpt-5" in e.value.body["message"]


def test_a_full_queue_answers_503(running, client):
    running.server.max_waiting = 0
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"
    finally:
        running.server.max_waiting = 1024


def test_health_is_503_while_loading(llm):
    release = threading.Event()

    def load():
        release.wait(30)
        return llm

    r = _Running(Server(load))
    try:
        assert httpx.get(r.url + "/health").status_code == 503
        bad = httpx.post(r.url + "/v1/completions", json={"prompt": "hi"})
        assert bad.status_code == 503 and "loading" in bad.json()["error"]["message"]
    finally:
        release.set()
        r.server.loaded.wait(30)
        assert httpx.get(r.url + "/health").status_code == 200
        r.stop()
        r.server.loop.stop()


# --- load, disconnects, metrics --------------------------------------------------------------------------


def test_64_concurrent_streams_over_rounds_then_every_page_is_free(running, llm):
    aclient = openai.AsyncOpenAI(base_url=f"{running.url}/v1", api_key=KEY, max_retries=0)

    async def one(i: int) -> tuple[int, int, str]:
        n = 3 + i % 6
        stream = await aclient.completions.create(model=MODEL, prompt=f"Request {i}: the number", max_tokens=n,
                                                  temperature=0.7, seed=i, stream=True, extra_body={"ignore_eos": True},
                                                  stream_options={"include_usage": True})
        text, usage, reasons = "", None, []
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                reasons += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
            usage = chunk.usage or usage
        assert reasons == ["length"]
        return n, usage.completion_tokens, text

    async def rounds() -> None:
        for _ in range(3):
            results = await asyncio.gather(*(one(i) for i in range(64)))
            assert all(want == got for want, got, _ in results)
            assert all(text for _, _, text in results)
        await aclient.close()

    asyncio.run(rounds())
    _wait_idle(running)


def test_a_disconnected_client_frees_its_pages(running):
    """Clients that leave (a dropped stream, a non-streamed request timing out) abort their requests: the
    engine goes idle with every page free long before the CONTEXT - 16 tokens asked for are generated."""
    registry = running.server.metrics.registry
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": CONTEXT - 16, "ignore_eos": True,
            "stream": True}
    before = _generated(registry)
    with httpx.stream("POST", running.url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ") and bool(json.loads(line[6:])["choices"][0]["text"])
            if seen == 3:
                break
        assert running.server.loop.stats.running == 1
    _wait_idle(running)
    assert _generated(registry) - before < CONTEXT // 2

    before = _generated(registry)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(running.url + "/v1/completions", json=body | {"stream": False}, headers=headers, timeout=1.0)
    _wait_idle(running)
    assert _generated(registry) - before < CONTEXT // 2


def test_metrics_parse_and_count(running, client):
    client.completions.create(model=MODEL, prompt="Count me", max_tokens=4, temperature=0,
                              extra_body={"ignore_eos": True})
    text = httpx.get(running.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    value = {s.name: s.value for f in families.values() for s in f.samples}
    assert value["ggtriton:kv_cache_pages_total"] > 0 and value["ggtriton:kv_cache_pages_used"] == 0
    assert value["ggtriton:num_requests_running"] == 0 and value["ggtriton:num_requests_waiting"] == 0
    assert value["ggtriton:generation_tokens_total"] >= 4 and value["ggtriton:prompt_tokens_total"] >= 3
    assert value["ggtriton:time_to_first_token_seconds_count"] >= 1
    assert value["ggtriton:inter_token_latency_seconds_count"] >= 3
    assert families["ggtriton:time_to_first_token_seconds"].type == "histogram"
    assert "ggtriton:spec_decode_acceptance_ratio" in families


# --- the serving benchmark and the command ----------------------------------------------------------------


def test_serving_bench_measures_the_server(running):
    requests = random_text_requests(6, 12, 5, seed=1)
    report = asyncio.run(run_serving_bench(running.url, requests, request_rate=50.0, max_concurrency=4,
                                           api_key=KEY, seed=3))
    assert report["completed"] == 6 and report["failed"] == 0 and report["model"] == MODEL
    assert report["output_tokens"] == 30 and report["prompt_tokens"] >= 6 * 6
    assert 0 < report["ttft_ms"]["p50"] <= report["e2e_ms"]["p50"] and report["itl_ms"]["p50"] > 0
    bad = asyncio.run(run_serving_bench(running.url, requests[:2], api_key="wrong", model=MODEL))
    assert bad["completed"] == 0 and bad["failed"] == 2 and "401" in bad["errors"][0]


def test_bench_command_with_url(running, capsys):
    code = main(["bench", "--url", running.url, "--api-key", KEY, "--num-prompts", "3", "--input-len", "8",
                 "--output-len", "3", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["completed"] == 3 and report["output_tokens"] == 9


def test_serve_command_drains_on_sigterm(smollm2_path):
    """The command end to end: it loads, serves, and on SIGTERM finishes the running stream, then exits 0."""
    proc = subprocess.Popen([sys.executable, "-m", "ggtriton.runtime", "serve", "-m", str(smollm2_path), "--port",
                             "0", "-c", str(CONTEXT)], stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        url = None
        for line in proc.stderr:
            if m := re.search(r"running on (http://\S+)", line, re.IGNORECASE):
                url = m.group(1)
                break
        assert url, "the server did not say where it listens"
        deadline = time.monotonic() + 120
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        body = {"prompt": "Hello", "max_tokens": 24, "ignore_eos": True, "stream": True, "temperature": 0}
        texts, reasons = [], []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                texts.append(choice["text"])
                reasons += [choice["finish_reason"]] if choice["finish_reason"] else []
                if len(texts) == 2:
                    proc.send_signal(signal.SIGTERM)
        assert reasons == ["length"] and len([t for t in texts if t]) > 2
        # uvicorn raises the signal again once drained, so that the exit status says how the server ended
        assert proc.wait(60) in (0, -signal.SIGTERM)
        assert "Finished server process" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_serve_command_stops_when_the_model_does_not_load(tmp_path, capsys):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(20))
    assert main(["serve", "-m", str(bad), "--port", "0"]) == 1
    assert "the model did not load" in capsys.readouterr().err
