"""A request's sequence: its tokens, its pages and how far its KV cache is computed."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass

from ..sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass
class SpecState:
    """Everything speculative decoding keeps about a sequence, in one place.

    `draft_computed`: tokens whose K/V are in the draft model's cache. `acceptance`: the running estimate of
    the chance that a draft token is accepted, a decayed count of accepted over verified draft tokens with a
    prior, from which the scheduler picks the sequence's lookahead (`step_cost.choose_lookahead`). The totals
    feed `RequestOutput.metrics`.
    """

    prior = 0.7  # acceptance assumed before any verification, worth `prior_weight` verified drafts
    prior_weight = 2.0
    decay = 0.8  # weight of the past per verification: the estimate follows a changing text
    probe_every = 16

    draft_computed: int = 0
    accepted_recent: float = 0.0
    verified_recent: float = 0.0
    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0
    idle_steps: int = 0  # decode steps in a row without drafting (the estimate said it would not pay)

    @property
    def acceptance(self) -> float:
        return (self.accepted_recent + self.prior * self.prior_weight) / (self.verified_recent + self.prior_weight)

    def verified(self, drafted: int, accepted: int) -> None:
        """A verification of `drafted` draft tokens accepted the first `accepted` of them."""
        trials = accepted + (accepted < drafted)  # drafts after the first rejection were never judged
        self.accepted_recent = self.decay * self.accepted_recent + accepted
        self.verified_recent = self.decay * self.verified_recent + trials
        self.drafted += drafted
        self.accepted += accepted
        self.verify_steps += 1
        self.idle_steps = 0

    def probe(self, k: int) -> int:
        """The lookahead to use when the cost model chose k (`step_cost.choose_lookahead`): when drafting has
        not paid for `probe_every` steps in a row, one draft, to find out whether it pays again."""
        if k:
            return k
        self.idle_steps += 1
        return int(self.idle_steps >= self.probe_every)

    def truncate(self, num_tokens: int) -> None:
        """The draft's cache holds at most the first `num_tokens` tokens now (pages freed or rewritten)."""
        self.draft_computed = min(self.draft_computed, num_tokens)


class Sequence:
    """Prompt plus generated tokens. `num_computed_tokens` of them have their K/V in the cache (pages
    `block_table`); the rest are computed by the next steps, a chunk at a time."""

    _ids = itertools.count()

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival: int = 0):
        if not prompt_token_ids:
            raise ValueError(f"request {request_id}: the prompt is empty")
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.arrival = arrival
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.spec = SpecState()
        self.num_hashed_blocks = 0  # leading full pages registered in the prefix cache
        self.finish_reason: str | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")
