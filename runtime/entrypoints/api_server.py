"""`ggtriton serve`: an OpenAI-compatible HTTP server over the continuous batch.

Routes: POST /v1/completions and /v1/chat/completions (streamed as server-sent events or not), GET /v1/models,
GET /health (503 while the model loads), GET /metrics (Prometheus), POST /tokenize and /detokenize.

The engine steps on a thread of its own (`EngineLoop`); the asyncio front end parses and checks requests,
tokenizes them off the event loop, hands them over and relays each step's deltas back, so that no request
waits for another's HTTP traffic. A client that disconnects aborts its requests (their pages go back to the
pool at the next step). At most `max_waiting` requests wait for a place in the batch; past that the server
answers 503 rather than queueing without bound. On SIGINT or SIGTERM the server stops accepting, lets the
running requests finish, then stops.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ggtriton.gguf.tokenizer import ChatTemplateError

from ..engine.engine_loop import Delta, EngineLoop
from ..llm import LLM
from ..sampling_params import RequestOutput, SamplingParams
from .protocol import (APIError, ChatCompletionRequest, CompletionLogprobs, CompletionRequest,
                       DetokenizeRequest, TokenizeRequest, chat_logprobs, envelope, finish_reason, new_id, usage)
from .server_metrics import ServerMetrics

@dataclass
class _Choice:
    """One engine request of an HTTP request: the n-th sample of one prompt."""

    index: int
    sample: int  # j of the n samples of its prompt
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str
    echo: str | None = None  # completions with echo: the prompt's text, sent before the output
    score_only: bool = False  # echo with max_tokens 0: the one token generated is not returned
    output: RequestOutput | None = None
    tokens: int = 0
    last_token: float = 0.0
    logprobs: CompletionLogprobs = field(default_factory=CompletionLogprobs)
    queue: asyncio.Queue | None = None  # the deltas of its HTTP request's choices


class Server:
    """The app and what it serves. `load` builds the model; it runs on a thread at start-up while /health
    answers 503. `served_model_name`: the model's name in the API (default: the file's name)."""

    def __init__(self, load: Callable[[], LLM], *, served_model_name: str | None = None,
                 api_key: str | None = None, max_waiting: int = 1024):
        self._load = load
        self._name = served_model_name
        self.api_key = api_key
        self.max_waiting = max_waiting
        self.llm: LLM | None = None
        self.loop: EngineLoop | None = None
        self.load_error: str | None = None
        self.loaded = threading.Event()
        self.on_load_failure: Callable[[], None] | None = None  # the CLI stops the process
        self.metrics = ServerMetrics(lambda: self.loop.stats if self.loop else None)
        self.app = self._build_app()

    @property
    def model_name(self) -> str:
        return self._name or (self.llm.path.name if self.llm else "")

    # --- start-up and shutdown ------------------------------------------------------------------------

    def _start(self) -> None:
        try:
            llm = self._load()
            loop = EngineLoop(llm.engine)
            loop.start()
            self.llm, self.loop = llm, loop
        except Exception as e:  # noqa: BLE001 - reported, and the process stops
            self.load_error = f"{type(e).__name__}: {e}"
            print(f"ggtriton: error: the model did not load: {self.load_error}", file=sys.stderr, flush=True)
            if self.on_load_failure:
                self.on_load_failure()
        finally:
            self.loaded.set()

    @asynccontextmanager
    async def _lifespan(self, app: FastAPI):
        threading.Thread(target=self._start, name="ggtriton-load", daemon=True).start()
        yield
        if self.loop:
            self.loop.stop()

    # --- the app ----------------------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="ggtriton", lifespan=self._lifespan)

        @app.exception_handler(APIError)
        async def api_error(_: Request, e: APIError) -> JSONResponse:
            return JSONResponse(e.body(), status_code=e.status)

        @app.exception_handler(RequestValidationError)
        async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
            return JSONResponse(_validation_error(e).body(), status_code=400)

        @app.middleware("http")
        async def authenticate(request: Request, call_next):
            if self.api_key and request.url.path not in ("/health", "/metrics") and \
                    request.headers.get("authorization") != f"Bearer {self.api_key}":
                e = APIError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY')",
                             code="invalid_api_key")
                return JSONResponse(e.body(), status_code=401)
            return await call_next(request)

        @app.get("/health")
        async def health() -> JSONResponse:
            if self.loop is None:
                state = f"failed to load: {self.load_error}" if self.load_error else "loading"
                return JSONResponse({"status": state}, status_code=503)
            return JSONResponse({"status": "ok"})

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(self.metrics.render(), media_type=self.metrics.content_type)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            llm = self._ready()
            return {"object": "list", "data": [{
                "id": self.model_name, "object": "model", "created": int(time.time()), "owned_by": "ggtriton",
                "max_model_len": llm.scheduler_config.max_model_len}]}

        @app.post("/tokenize")
        async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
            llm = self._ready()
            if body.messages is not None:
                ids = await asyncio.to_thread(self._chat_ids, body.messages, True)
            else:
                text = body.content if body.content is not None else body.prompt
                ids = await asyncio.to_thread(llm.tokenizer.encode, text, body.add_special, body.add_special)
            return {"tokens": ids, "count": len(ids), "max_model_len": llm.scheduler_config.max_model_len}

        @app.post("/detokenize")
        async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
            llm = self._ready()
            self._check_ids(body.tokens, "tokens")
            return {"content": llm.tokenizer.decode(body.tokens)}

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request):
            return await self._completions(body, request)

        @app.post("/v1/chat/completions")
        async def chat_completions(body: ChatCompletionRequest, request: Request):
            return await self._chat(body, request)

        return app

    # --- checks -------------------------------------------------------------------------------------------

    def _ready(self) -> LLM:
        if self.llm is None or self.loop is None:
            raise APIError(503, "the model is loading" if not self.load_error else
                           f"the model failed to load: {self.load_error}", kind="unavailable_error")
        return self.llm

    def _check_model(self, name: str | None) -> None:
        if name not in (None, "", self.model_name):
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                           "model", "model_not_found")

    def _check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.llm.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"{param}: token id {bad} is outside the vocabulary of {vocab}", param)

    def _max_tokens(self, prompt_len: int, asked: int | None, param: str, prompt_param: str) -> int:
        """max_tokens as asked, checked against the context; when not asked (null), the rest of the context."""
        context = self.llm.scheduler_config.max_model_len
        if prompt_len >= context:
            raise APIError(400, f"{prompt_param}: {prompt_len} tokens do not fit the context of {context} tokens "
                                "(at least one must be left to generate)", prompt_param, "context_length_exceeded")
        room = context - prompt_len
        if asked is None:
            return room
        if asked > room:
            raise APIError(400, f"{param}: {asked} tokens after a prompt of {prompt_len} exceed the context of "
                                f"{context} tokens (at most {room})", param, "context_length_exceeded")
        return asked

    def _chat_ids(self, messages, add_generation_prompt: bool) -> list[int]:
        tok = self.llm.tokenizer
        try:
            rendered = tok.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages],
                                               add_generation_prompt=add_generation_prompt)
        except ChatTemplateError as e:
            raise APIError(400, f"messages: the chat template failed: {e}", "messages") from None
        return tok.encode_chat(rendered)

    def _check_waiting(self) -> None:
        if self.loop.num_waiting >= self.max_waiting:
            raise APIError(503, f"the server is busy: {self.max_waiting} requests are already waiting",
                           kind="server_overloaded", code="queue_full")

    # --- the two generation routes ----------------------------------------------------------------------

    async def _completions(self, body: CompletionRequest, request: Request):
        llm = self._ready()
        self._check_model(body.model)
        self._check_waiting()
        choices = []
        for i, prompt in enumerate(body.prompts()):
            if isinstance(prompt, str):
                ids = await asyncio.to_thread(llm.tokenizer.encode, prompt, True, True)
                text = prompt
            else:
                self._check_ids(prompt, "prompt")
                ids, text = list(prompt), None
            score_only = body.max_tokens == 0
            max_tokens = self._max_tokens(len(ids), 1 if score_only else body.max_tokens, "max_tokens", "prompt")
            echo = body.echo and body.logprobs is not None
            params = body.sampling_params(max_tokens, body.logprobs, body.logprobs if echo else None)
            echo_text = None
            if body.echo:
                echo_text = text if text is not None else llm.tokenizer.decode(ids)
            choices += [_Choice(i * body.n + j, j, ids, _seeded(params, j), new_id("cmpl"), echo_text, score_only)
                        for j in range(body.n)]
        rid = new_id("cmpl")
        await self._submit(choices)
        if body.stream:
            return self._sse(self._completion_stream(rid, body, choices))
        await self._collect(choices, request)
        out = []
        for c in choices:
            text = (c.echo or "") + ("" if c.score_only else c.output.text)
            logprobs = None
            if body.logprobs is not None:
                logprobs = self._completion_logprobs(c, body.logprobs).json()
            out.append({"index": c.index, "text": text, "logprobs": logprobs,
                        "finish_reason": "length" if c.score_only else finish_reason(c.output)})
        return envelope("text_completion", rid, self.model_name, choices=out, usage=self._usage(choices))

    def _completion_logprobs(self, c: _Choice, top: int) -> CompletionLogprobs:
        lp = CompletionLogprobs()
        tok = self.llm.tokenizer
        if c.output.prompt_logprobs is not None:
            lp.add(tok, c.prompt_ids, c.output.prompt_logprobs, top)
        if not c.score_only:
            lp.add(tok, c.output.token_ids, c.output.logprobs, top)
        return lp

    async def _chat(self, body: ChatCompletionRequest, request: Request):
        llm = self._ready()
        self._check_model(body.model)
        self._check_waiting()
        ids = await asyncio.to_thread(self._chat_ids, body.messages, body.add_generation_prompt)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = self._max_tokens(len(ids), body.max_new_tokens, param, "messages")
        top = body.top_logprobs or 0
        params = body.sampling_params(max_tokens, top if body.logprobs else None)
        choices = [_Choice(j, j, ids, _seeded(params, j), new_id("chatcmpl")) for j in range(body.n)]
        rid = new_id("chatcmpl")
        await self._submit(choices)
        if body.stream:
            return self._sse(self._chat_stream(rid, body, choices))
        await self._collect(choices, request)
        out = []
        for c in choices:
            logprobs = None
            if body.logprobs:
                logprobs = {"content": chat_logprobs(llm.tokenizer, c.output.token_ids, c.output.logprobs, top)}
            out.append({"index": c.index, "message": {"role": "assistant", "content": c.output.text},
                        "logprobs": logprobs, "finish_reason": finish_reason(c.output)})
        return envelope("chat.completion", rid, self.model_name, choices=out, usage=self._usage(choices))

    # --- talking to the engine ------------------------------------------------------------------------------

    async def _submit(self, choices: list[_Choice]) -> None:
        """Hand the choices to the engine, all or none: a refused one (a ValueError of the engine's checks)
        aborts those already taken and answers 400."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[_Choice, Delta]] = asyncio.Queue()
        for c in choices:
            c.last_token = time.perf_counter()
            c.queue = queue

        def sink_of(c: _Choice):
            return lambda delta: loop.call_soon_threadsafe(queue.put_nowait, (c, delta))

        futures = [self.loop.add(c.prompt_ids, c.params, c.request_id, sink_of(c)) for c in choices]
        try:
            for f in futures:
                await asyncio.wrap_future(f)
        except ValueError as e:
            self._abort(choices)
            raise APIError(400, str(e), code="invalid_request") from None
        except BaseException:
            self._abort(choices)
            raise
        self.metrics.prompt_tokens.inc(sum(len(c.prompt_ids) for c in choices))

    def _abort(self, choices: list[_Choice]) -> None:
        for c in choices:
            if c.output is None:
                self.loop.abort(c.request_id)

    async def _deltas(self, choices: list[_Choice]) -> AsyncIterator[tuple[_Choice, Delta]]:
        """Every delta of the choices until all have finished; aborts the unfinished ones if left early."""
        queue = choices[0].queue
        left = len(choices)
        start = time.perf_counter()
        try:
            while left:
                c, delta = await queue.get()
                if delta.error:
                    raise APIError(500, delta.error, kind="server_error")
                self._observe(c, delta, start)
                if delta.output is not None:
                    c.output = delta.output
                    left -= 1
                yield c, delta
        finally:
            self._abort(choices)

    def _observe(self, c: _Choice, delta: Delta, start: float) -> None:
        now = time.perf_counter()
        n = len(delta.token_ids)
        if n:
            self.metrics.generation_tokens.inc(n)
            if c.tokens == 0:
                self.metrics.ttft.observe(now - start)
            else:
                for _ in range(n):
                    self.metrics.itl.observe((now - c.last_token) / n)
            c.tokens += n
            c.last_token = now
        if delta.output is not None:
            self.metrics.e2e.observe(now - start)
            self.metrics.requests.labels(finish_reason(delta.output)).inc()

    async def _collect(self, choices: list[_Choice], request: Request) -> None:
        """Wait for every choice's output; a client that disconnects meanwhile aborts them."""
        async def consume() -> None:
            async for _ in self._deltas(choices):
                pass

        work = asyncio.ensure_future(consume())
        watch = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                with suppress(asyncio.CancelledError):
                    await work
        if work.cancelled():
            raise APIError(499, "the client disconnected", kind="client_closed")
        work.result()

    @staticmethod
    def _usage(choices: list[_Choice]) -> dict[str, int]:
        """Each prompt counted once, whatever its n."""
        return usage(sum(len(c.prompt_ids) for c in choices if c.sample == 0),
                     sum(0 if c.score_only else len(c.output.token_ids) for c in choices))

    # --- streaming -----------------------------------------------------------------------------------------

    @staticmethod
    def _sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
            except APIError as e:  # the stream has begun: the error goes in it
                yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _completion_stream(self, rid: str, body: CompletionRequest,
                                 choices: list[_Choice]) -> AsyncIterator[dict[str, Any]]:
        created, tok = int(time.time()), self.llm.tokenizer
        extra = {"usage": None} if body.include_usage else {}

        def chunk(index: int, text: str, logprobs, reason: str | None) -> dict[str, Any]:
            return envelope("text_completion", rid, self.model_name, created, **extra, choices=[
                {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}])

        for c in choices:
            if c.echo is not None and body.logprobs is None:
                yield chunk(c.index, c.echo, None, None)
        async for c, delta in self._deltas(choices):
            if delta.prompt_logprobs is not None and c.echo is not None:
                c.logprobs.add(tok, c.prompt_ids, delta.prompt_logprobs, body.logprobs)
                yield chunk(c.index, c.echo, c.logprobs.take(), None)
            text, logprobs = delta.text, None
            if c.score_only:
                text = ""
            elif body.logprobs is not None and delta.token_ids:
                c.logprobs.add(tok, delta.token_ids, delta.logprobs, body.logprobs)
                logprobs = c.logprobs.take()
            if text or logprobs:
                yield chunk(c.index, text, logprobs, None)
            if delta.output is not None:
                yield chunk(c.index, "", None, "length" if c.score_only else finish_reason(delta.output))
        if body.include_usage:
            yield envelope("text_completion", rid, self.model_name, created, choices=[], usage=self._usage(choices))

    async def _chat_stream(self, rid: str, body: ChatCompletionRequest,
                           choices: list[_Choice]) -> AsyncIterator[dict[str, Any]]:
        created, tok = int(time.time()), self.llm.tokenizer
        extra = {"usage": None} if body.include_usage else {}
        top = body.top_logprobs or 0

        def chunk(index: int, delta: dict[str, Any], logprobs, reason: str | None) -> dict[str, Any]:
            return envelope("chat.completion.chunk", rid, self.model_name, created, **extra, choices=[
                {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}])

        for c in choices:
            yield chunk(c.index, {"role": "assistant", "content": ""}, None, None)
        async for c, delta in self._deltas(choices):
            logprobs = None
            if body.logprobs and delta.token_ids:
                logprobs = {"content": chat_logprobs(tok, delta.token_ids, delta.logprobs, top)}
            if delta.text or logprobs:
                yield chunk(c.index, {"content": delta.text}, logprobs, None)
            if delta.output is not None:
                yield chunk(c.index, {}, None, finish_reason(delta.output))
        if body.include_usage:
            yield envelope("chat.completion.chunk", rid, self.model_name, created, choices=[],
                           usage=self._usage(choices))


def _seeded(params: SamplingParams, j: int) -> SamplingParams:
    """The j-th of n samples: its own seed when the request gave one, so that the n differ."""
    return params if params.seed is None or j == 0 else replace(params, seed=params.seed + j)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (its body already read, the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _validation_error(e: RequestValidationError) -> APIError:
    """The first problem of a request body, naming its field."""
    err = e.errors()[0]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
    # A union's members appear in the location as type names ("str", "list[int]"): not fields.
    loc = [str(p) for p in err.get("loc", ()) if p != "body" and not _TYPE_NAME.match(str(p))]
    message = err.get("msg", "invalid request").removeprefix("Value error, ")
    if not loc:  # a check across fields: its message begins with the field it names
        field_name, sep, _ = message.partition(":")
        return APIError(400, message if sep else f"request body: {message}", field_name if sep else None)
    param = ".".join(loc)
    return APIError(400, f"{param}: field required" if kind == "missing" else f"{param}: {message}", loc[0])


_TYPE_NAME = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|function-.*|[A-Z]\w*)$")
