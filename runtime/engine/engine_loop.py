"""The engine in a background thread: requests come in from any thread, their progress goes out as deltas.

One thread owns the `Engine` and steps it while any request is unfinished. Other threads (an HTTP server's
event loop) only put commands on a queue: add a request with a sink, abort one, stop. After every step each
request with news gets one `Delta` through its sink, called on the engine thread; a sink must only hand the
delta over (to an asyncio queue with `call_soon_threadsafe`, say), never block. A request that finished,
was aborted or failed gets no more deltas after its last.
"""

from __future__ import annotations

import queue
import sys
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from ..sampling_params import RequestOutput, SamplingParams
from .engine import Engine


@dataclass
class Delta:
    """What a request gained in one step: text (held back while it may begin a stop string), tokens and
    their log-probabilities (if asked). `prompt_logprobs` (if asked) come with the first token, the prompt
    being complete by then. `output` is set on a request's last delta; `error` when a step failed and took
    the request with it."""

    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float] | None] | None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    output: RequestOutput | None = None
    error: str | None = None


Sink = Callable[[Delta], None]


@dataclass
class _Follower:
    """Where a request's deltas go, and what of it has been handed out or counted."""

    sink: Sink
    sent: int = 0  # output tokens
    drafted: int = 0
    accepted: int = 0


@dataclass(frozen=True)
class LoopStats:
    """A snapshot, published after every step: gauges now, counters since start."""

    running: int = 0
    waiting: int = 0
    pages_used: int = 0
    pages_total: int = 0
    steps: int = 0
    preemptions: int = 0
    draft_tokens: int = 0  # speculative decoding: proposed by the draft ...
    accepted_tokens: int = 0  # ... and accepted by the target


class EngineLoop:
    """Steps `engine` on a thread of its own. `add`, `abort`, `stop` and `stats` are safe from any thread."""

    idle_wait = 0.05  # seconds an idle loop waits for a command before looking again

    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._pending = 0  # adds queued but not yet applied (under _lock)
        self._lock = threading.Lock()
        self._followers: dict[str, _Follower] = {}  # engine thread only
        self._drafted = self._accepted = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ggtriton-engine", daemon=True)
        self.stats = self._snapshot()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the step under way; requests still running are aborted and get no further deltas."""
        self._stopping.set()
        self._commands.put(("wake",))
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: queued here, or waiting in the scheduler at the last step."""
        with self._lock:
            return self._pending + self.stats.waiting

    def add(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, sink: Sink) -> Future:
        """Queue a request. The future resolves once the engine took it (None), or with the ValueError
        that says why it cannot run (prompt too long for the context or the cache, bad token ids)."""
        done: Future = Future()
        with self._lock:
            self._pending += 1
        self._commands.put(("add", prompt_token_ids, params, request_id, sink, done))
        return done

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is; its pages go back to the pool at the next step."""
        self._commands.put(("abort", request_id))

    # --- the engine thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping.is_set():
            self._apply_commands(wait=not engine.has_unfinished())
            if not engine.has_unfinished():
                continue
            try:
                finished = engine.step()
            except Exception as e:  # a failed step fails the requests in it, not the server
                traceback.print_exc(file=sys.stderr)
                self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
                continue
            self._publish({out.request_id: out for out in finished})
        self._fail_all("the server is shutting down")

    def _apply_commands(self, wait: bool) -> None:
        try:
            command = self._commands.get(timeout=self.idle_wait) if wait else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, *args = command
            if kind == "add":
                self._add(*args)
            elif kind == "abort":
                self._drop(args[0])
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _add(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, sink: Sink,
             done: Future) -> None:
        try:
            self.engine.add_request(prompt_token_ids, params, request_id)
        except ValueError as e:
            done.set_exception(e)
        else:
            self._followers[request_id] = _Follower(sink)
            done.set_result(None)
        finally:
            with self._lock:
                self._pending -= 1
            self.stats = self._snapshot()

    def _drop(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._followers.pop(request_id, None)
        self.engine.pop_finished()
        self.stats = self._snapshot()

    def _publish(self, finished: dict[str, RequestOutput]) -> None:
        engine = self.engine
        texts = engine.stream_deltas()
        for rid, f in list(self._followers.items()):
            req = engine.requests[rid]
            tokens = req.seq.output_token_ids[f.sent:]
            text = texts.get(rid, "")
            spec = req.seq.spec
            self._drafted += spec.drafted - f.drafted
            self._accepted += spec.accepted - f.accepted
            f.drafted, f.accepted = spec.drafted, spec.accepted
            if not (tokens or text or req.finished):
                continue
            logprobs = req.logprobs[f.sent:] if req.logprobs is not None else None
            prompt_logprobs = req.prompt_logprobs if f.sent == 0 and tokens else None
            f.sent += len(tokens)
            output = finished.get(rid) or (req.output() if req.finished else None)
            self._send(rid, f.sink, Delta(text, tokens, logprobs, prompt_logprobs, output))
            if req.finished:
                self._followers.pop(rid, None)
        engine.pop_finished()
        self.stats = self._snapshot()

    def _send(self, rid: str, sink: Sink, delta: Delta) -> None:
        try:
            sink(delta)
        except Exception:  # the receiver is gone (its event loop closed): nobody wants this request
            self._followers.pop(rid, None)
            self.engine.abort(rid)

    def _fail_all(self, message: str) -> None:
        for rid, f in list(self._followers.items()):
            self.engine.abort(rid)
            self._send(rid, f.sink, Delta("", [], None, error=message))
        self._followers.clear()
        self.engine.pop_finished()
        self.stats = self._snapshot()

    def _snapshot(self) -> LoopStats:
        sched = self.engine.scheduler
        bm = sched.block_manager
        return LoopStats(len(sched.running), len(sched.waiting), bm.num_blocks - bm.num_free_blocks, bm.num_blocks,
                         self.engine.num_steps, sched.num_preemptions, self._drafted, self._accepted)
