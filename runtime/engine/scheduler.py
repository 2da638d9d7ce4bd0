"""Continuous batching: which tokens of which sequences the next step computes. Plain Python, no torch.

Each step has a token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`). Running
sequences go first, oldest first: a decode costs one token, a prompt still being prefilled costs the
rest of its prompt or what is left of the budget (chunked prefill), so long prompts share steps with
decodes. Waiting sequences are admitted in arrival order while pages, budget and the cap allow. When a
running sequence needs a page and none is free, the newest running sequence is preempted: its pages
are released and it goes back to the front of the queue, to be recomputed when it is readmitted.
With speculative decoding a decoding sequence also gets room for up to `num_speculative_tokens` draft
tokens (its lookahead): pages for them and a share of the budget, for the target to verify them. The
lookaheads are chosen for the batch as a whole (`step_cost`): what pays at batch 1 may not at batch 64.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus
from .step_cost import StepCost, choose_lookahead


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    num_speculative_tokens: int = 0
    # Speculative decoding: what the target's and the draft's steps cost, and whether each sequence's lookahead
    # adapts to its acceptance and the batch (else it is always num_speculative_tokens).
    step_cost: StepCost = field(default_factory=StepCost)
    adaptive_lookahead: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {self.num_speculative_tokens}")


@dataclass
class ScheduledSeq:
    """`num_new_tokens` tokens of `seq`, from position `start`, are computed this step, and up to
    `num_lookahead` draft tokens after them."""

    seq: Sequence
    start: int
    num_new_tokens: int
    num_lookahead: int = 0

    @property
    def completes(self) -> bool:
        """This chunk reaches the sequence's last token: the step samples its next token."""
        return self.start + self.num_new_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def max_tokens_of(self, seq: Sequence) -> int:
        """The most tokens a sequence can reach: its prompt plus max_tokens, within the model's context."""
        return min(seq.num_prompt_tokens + seq.params.max_tokens, self.config.max_model_len)

    def add(self, seq: Sequence) -> None:
        if seq.num_tokens >= self.config.max_model_len:
            raise ValueError(f"request {seq.request_id}: prompt of {seq.num_tokens} tokens does not fit the model's "
                             f"context of {self.config.max_model_len} (it needs room for at least one new token)")
        bm = self.block_manager
        if bm.blocks_for(self.max_tokens_of(seq)) > bm.num_blocks - bm.watermark_blocks:
            raise ValueError(f"request {seq.request_id}: {self.max_tokens_of(seq)} tokens need more KV cache pages "
                             f"than the {bm.num_blocks} there are")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        out: list[ScheduledSeq] = []
        preempted = False
        i = 0
        lookaheads = self._lookaheads()
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            lookahead = min(lookaheads.get(seq.seq_id, 0), budget - 1)
            while not bm.can_grow(seq, seq.num_tokens + lookahead):
                victim = self.running[-1]
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            bm.grow(seq, seq.num_tokens + lookahead)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            out.append(ScheduledSeq(seq, seq.num_computed_tokens, n, lookahead))
            budget -= n + lookahead
            i += 1
        # Admitting new work right after preempting would only preempt again.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not bm.can_allocate(seq):
                break
            self.waiting.popleft()
            seq.num_computed_tokens = bm.allocate(seq)
            seq.spec.truncate(0)  # shared pages hold the target's K/V, not necessarily the draft's
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            out.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
            budget -= n
        return out

    def _lookaheads(self) -> dict[int, int]:
        """Draft tokens each decoding sequence verifies this step, by seq_id (before the budget): never past its
        max_tokens or the model's context (drafts beyond them would be thrown away), and as many as pay for the
        batch as a whole (`choose_lookahead`) unless the lookahead is fixed."""
        k = self.config.num_speculative_tokens
        if not k:
            return {}
        # only decodes speculate, and not those that report per-token log-probabilities
        decoding = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1 and s.params.logprobs is None]
        caps = [max(0, min(k, s.params.max_tokens - s.num_output_tokens - 1,
                           self.config.max_model_len - s.num_tokens - 1)) for s in decoding]
        if not self.config.adaptive_lookahead:
            return {s.seq_id: cap for s, cap in zip(decoding, caps)}
        prompts = sum(s.num_tokens - s.num_computed_tokens for s in self.running) - len(decoding)
        other = min(prompts, max(0, self.config.max_num_batched_tokens - len(decoding)))
        ks = choose_lookahead([s.spec.acceptance for s in decoding], caps, self.config.step_cost, other)
        return {s.seq_id: s.spec.probe(k) if cap else 0 for s, k, cap in zip(decoding, ks, caps)}

    def preempt(self, seq: Sequence) -> None:
        """Release a running sequence's pages and requeue it first: it is recomputed when readmitted."""
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free_blocks(seq)
        seq.num_computed_tokens = 0
        seq.spec.truncate(0)

    # --- progress: the one place that moves a sequence's computed tokens --------------------------------

    def step_done(self, scheduled: list[ScheduledSeq]) -> None:
        """The step computed its tokens: advance each sequence and register its newly full pages."""
        for s in scheduled:
            s.seq.num_computed_tokens = s.start + s.num_new_tokens
            self.block_manager.register_computed(s.seq)

    def rollback(self, seq: Sequence, computed: int) -> None:
        """After a verification: the sequence's first `computed` tokens have valid K/V (its rejected drafts'
        do not). Pages past its last token go back, and so does its progress, in both models' caches."""
        valid = self.block_manager.truncate(seq, seq.num_tokens, computed)
        seq.num_computed_tokens = valid
        seq.spec.truncate(valid)
        self.block_manager.register_computed(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def abort(self, request_id: str) -> Sequence | None:
        """Drop a request wherever it is; returns its sequence, or None if it is unknown or finished."""
        for seq in self.running:
            if seq.request_id == request_id:
                self.finish(seq, "abort")
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = "abort"
                return seq
        return None
