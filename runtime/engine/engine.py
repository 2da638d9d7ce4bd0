"""The engine loop: requests in, one scheduled step at a time, finished outputs out."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from ggtriton.gguf import Tokenizer
from ggtriton.gguf.tokenizer import IncrementalDetokenizer

from ..sampling_params import RequestOutput, SamplingParams
from .model_runner import Chunk, ModelRunner
from .sampler import Sampler, logprob_dict, logprob_table, make_generator, read_samples
from .scheduler import ScheduledSeq, Scheduler
from .sequence import Sequence
from .spec_decode import Proposal, SpecDecoder


@dataclass(eq=False)
class Request:
    """A sequence and what is built from it as it grows: text, stop-string state, logprobs, timing."""

    seq: Sequence
    prompt: str | None
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    arrival: float
    text: str = ""
    streamed: int = 0  # characters of `text` already handed out by `Engine.stream_deltas`
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None  # index p: of prompt token p (None at 0)
    token_times: list[float] = field(default_factory=list)
    decode_steps: int = 0  # steps that gave it tokens: one per token, fewer when drafts are accepted

    @property
    def finished(self) -> bool:
        return self.seq.is_finished

    def output(self) -> RequestOutput:
        m = {"arrival": self.arrival}
        if self.token_times:
            m["first_token"] = self.token_times[0]
            m["last_token"] = self.token_times[-1]
        if self.decode_steps:
            m["steps_per_token"] = self.decode_steps / max(self.seq.num_output_tokens, 1)
        spec = self.seq.spec
        if spec.verify_steps:
            m["acceptance_rate"] = spec.accepted / max(spec.drafted, 1)
            m["mean_accepted_length"] = spec.accepted / spec.verify_steps
        return RequestOutput(self.seq.request_id, self.prompt, self.seq.prompt_token_ids, self.text,
                             self.seq.output_token_ids, self.seq.finish_reason or "", self.logprobs,
                             self.prompt_logprobs, m)


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, scheduler: Scheduler, sampler: Sampler,
                 spec: SpecDecoder | None = None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.sampler = sampler
        self.spec = spec
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.num_steps = 0

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a prompt (text, tokenized with the model's special tokens, or token ids)."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt, add_special=True, parse_special=True)
        else:
            text, ids = None, [int(t) for t in prompt]
        vocab = self.runner.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"request {request_id}: token ids must be in [0, {vocab})")
        if any(t >= vocab for t in params.logit_bias):
            raise ValueError(f"request {request_id}: logit_bias token ids must be in [0, {vocab})")
        seq = Sequence(request_id, ids, params, arrival=len(self.requests))
        self.scheduler.add(seq)
        generator = make_generator(params.seed, self.runner.device) if params.seed is not None else None
        self.requests[request_id] = Request(seq, text, self.tokenizer.incremental_detokenizer(skip_special=True),
                                            generator, time.perf_counter(),
                                            logprobs=[] if params.logprobs is not None else None,
                                            prompt_logprobs=[None] * len(ids)
                                            if params.prompt_logprobs is not None else None)
        return request_id

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def step(self) -> list[RequestOutput]:
        """Run one step; returns the requests that finished in it.

        Whatever the step computes on the device (sampled tokens, log-probabilities, drafts and their
        verification) is read back once, at its end (`to_host`): the device runs the step's passes back to
        back without waiting for the host.
        """
        scheduled = self.scheduler.schedule()
        if not scheduled:
            if self.scheduler.has_unfinished():
                raise RuntimeError("no request can be scheduled: the KV cache is too small for the waiting ones")
            return []
        speculative = [s for s in scheduled if s.num_lookahead] if self.spec else []
        proposal = None
        if speculative:
            proposal = self.spec.propose([s.seq for s in speculative], [s.num_lookahead for s in speculative],
                                         [self.requests[s.seq.request_id].generator for s in speculative])
        verifying = {id(s) for s in speculative}
        chunks, draft_rows, packed = [], [], 0
        for s in scheduled:
            tokens = s.seq.token_ids[s.start : s.start + s.num_new_tokens]
            if id(s) in verifying:  # the drafts' places, filled on the device
                draft_rows += range(packed + len(tokens), packed + len(tokens) + s.num_lookahead)
                chunks.append(Chunk(s.seq, s.start, tokens + [0] * s.num_lookahead, 1 + s.num_lookahead))
            elif self._scores_prompt(s):
                chunks.append(Chunk(s.seq, s.start, tokens, len(tokens)))
            else:
                chunks.append(Chunk(s.seq, s.start, tokens, int(s.completes)))
            packed += len(chunks[-1].tokens)
        logits = self.runner.run(chunks, proposal.device_tokens(draft_rows) if proposal else None)
        self.scheduler.step_done(scheduled)
        self.num_steps += 1
        sample_rows, verify_rows, prompt_rows, row = [], [], [], 0
        for s, c in zip(scheduled, chunks):
            if id(s) in verifying:
                verify_rows.extend(range(row, row + c.n_logits))
            elif s.completes:
                sample_rows.append(row + c.n_logits - 1)
            if self._scores_prompt(s) and id(s) not in verifying:
                prompt_rows.append((s, row))
            row += c.n_logits
        plain = [s.seq for s in scheduled if s.completes and id(s) not in verifying]
        plain_reqs = [self.requests[seq.request_id] for seq in plain]
        parts = {}  # what the step reads back, computed on the device
        if plain:
            parts["sampled"] = self.sampler.sample_on_device(
                logits[sample_rows], [seq.params for seq in plain], [seq.prompt_token_ids for seq in plain],
                [seq.output_token_ids for seq in plain], [r.generator for r in plain_reqs])
        if prompt_rows:
            parts["prompt"], prompt_slots = self._prompt_logprobs(prompt_rows, logits)
        if proposal:
            parts["verified"] = self.spec.verify(proposal, logits[verify_rows])
        host = to_host(parts)
        now = time.perf_counter()
        if prompt_rows:
            for (req, position, count), row_values in zip(prompt_slots, host["prompt"]):
                req.prompt_logprobs[position] = logprob_dict(row_values, count)
        finished = []
        if plain:
            sampled = read_samples(host["sampled"], [seq.params for seq in plain])
            for req, token, logprobs in zip(plain_reqs, sampled.token_ids, sampled.logprobs):
                req.token_times.append(now)
                req.decode_steps += 1
                if self._append(req, token, logprobs):
                    finished.append(req.output())
        if proposal:
            finished += self._verified(proposal, host["verified"], now)
        return finished

    @staticmethod
    def _scores_prompt(s: ScheduledSeq) -> bool:
        """The chunk holds prompt tokens whose successor is a prompt token, and the request wants their
        log-probabilities: every row of the chunk gets logits."""
        return s.seq.params.prompt_logprobs is not None and s.start < s.seq.num_prompt_tokens - 1

    def _prompt_logprobs(self, chunks: list[tuple[ScheduledSeq, int]],
                         logits: torch.Tensor) -> tuple[torch.Tensor, list[tuple[Request, int, int]]]:
        """Log-probabilities of the prompt tokens that the chunks' rows (from their first row on) predict, as
        `logprob_table` rows on the device, and where each row goes: (request, prompt position, top count)."""
        rows, targets, slots = [], [], []
        for s, first in chunks:
            seq = s.seq
            req = self.requests[seq.request_id]
            for j in range(min(s.num_new_tokens, seq.num_prompt_tokens - 1 - s.start)):
                rows.append(first + j)
                targets.append(seq.token_ids[s.start + j + 1])
                slots.append((req, s.start + j + 1, seq.params.prompt_logprobs))
        table = logprob_table(torch.log_softmax(logits[rows].float(), dim=1),
                              torch.tensor(targets, device=logits.device), max(c for _, _, c in slots))
        return table, slots

    def _verified(self, proposal: Proposal, outcome: list[list[float]], now: float) -> list[RequestOutput]:
        """Append what each verified sequence gains (its accepted drafts, then the target's token); roll the
        rest back: the caches hold valid K/V up to its last accepted draft."""
        finished = []
        for seq, row in zip(proposal.seqs, outcome):
            accepted, taken = int(row[0]), int(row[1])
            req = self.requests[seq.request_id]
            seq.spec.verified(taken, accepted)
            req.decode_steps += 1
            done = False
            for token in row[2 : 3 + accepted]:
                req.token_times.append(now)
                if self._append(req, int(token), None):
                    finished.append(req.output())
                    done = True
                    break
            if not done:
                self.scheduler.rollback(seq, seq.num_tokens - 1)
        return finished

    def _append(self, req: Request, token: int, logprobs: dict[int, float] | None) -> bool:
        """Add a sampled token to its request; True if that finished the request."""
        seq, params = req.seq, req.seq.params
        seq.append(token)
        if req.logprobs is not None:
            req.logprobs.append(logprobs)
        if token in self.tokenizer.eos_token_ids and not params.ignore_eos:
            return self._finish(req, "stop")
        piece = req.detokenizer.add(token)
        req.text += piece
        if params.stop and self._cut_at_stop(req, len(piece)):
            self.scheduler.finish(seq, "stop")
            return True
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.scheduler.config.max_model_len:
            return self._finish(req, "length")
        return False

    def _finish(self, req: Request, reason: str) -> bool:
        tail = req.detokenizer.flush()  # bytes the detokenizer held back
        req.text += tail
        if req.seq.params.stop and tail and self._cut_at_stop(req, len(tail)):
            reason = "stop"
        self.scheduler.finish(req.seq, reason)
        return True

    @staticmethod
    def _cut_at_stop(req: Request, new_chars: int) -> bool:
        """End the text before the first stop string that the last `new_chars` characters completed."""
        stops = req.seq.params.stop
        start = max(0, len(req.text) - new_chars - max(map(len, stops)) + 1)
        hits = [i for i in (req.text.find(s, start) for s in stops) if i >= 0]
        if hits:
            req.text = req.text[: min(hits)]
        return bool(hits)

    def stream_deltas(self) -> dict[str, str]:
        """New text of each request since the last call, holding back what may begin a stop string."""
        out = {}
        for rid, req in self.requests.items():
            stops = req.seq.params.stop
            hold = 0 if req.finished or not stops else max(map(len, stops)) - 1
            end = max(req.streamed, len(req.text) - hold)
            if end > req.streamed:
                out[rid] = req.text[req.streamed : end]
                req.streamed = end
        return out

    def pop_finished(self) -> None:
        """Forget finished requests (their outputs have been handed out)."""
        self.requests = {rid: r for rid, r in self.requests.items() if not r.finished}


def to_host(parts: dict[str, torch.Tensor]) -> dict[str, list[list[float]]]:
    """The one point where a step waits for the device: its 2-D results read back in a single transfer."""
    if not parts:
        return {}
    flat = torch.cat([t.reshape(-1).double() for t in parts.values()]).tolist()
    out, at = {}, 0
    for name, t in parts.items():
        rows, width = t.shape
        out[name] = [flat[at + r * width : at + (r + 1) * width] for r in range(rows)]
        at += rows * width
    return out
