"""Bookkeeping of the block manager and scheduler under random request streams (no model needed).

A fake step stands in for the model: it takes the scheduled chunks, marks them computed and appends a
random token to every sequence whose chunk completed. After every operation the invariants are
checked: no page leaked or freed twice, reference counts equal the block tables that hold each page,
the prefix-cache index points at pages that carry that hash, and every request finishes.
"""

from __future__ import annotations

import random
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ggtriton.runtime.engine.block_manager import BlockManager, chain_hash
from ggtriton.runtime.engine.scheduler import Scheduler, SchedulerConfig
from ggtriton.runtime.engine.sequence import Sequence, SequenceStatus
from ggtriton.runtime.sampling_params import SamplingParams


def fake_step(sched: Scheduler, rng: random.Random, vocab: int = 7) -> list[Sequence]:
    """One step with random sampled tokens; returns the sequences that finished."""
    scheduled = sched.schedule()
    assert sum(s.num_new_tokens for s in scheduled) <= sched.config.max_num_batched_tokens
    assert len({id(s.seq) for s in scheduled}) == len(scheduled)
    for s in scheduled:
        assert s.start == s.seq.num_computed_tokens and s.num_new_tokens > 0
        assert len(s.seq.block_table) * sched.block_manager.block_size >= s.seq.num_tokens
    sched.step_done(scheduled)
    finished = []
    for s in scheduled:
        if s.completes:
            seq = s.seq
            seq.append(rng.randrange(vocab))
            if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= sched.config.max_model_len:
                sched.finish(seq, "length")
                finished.append(seq)
    return finished


prompts = st.lists(st.integers(0, 3), min_size=1, max_size=40)  # a small alphabet: shared prefixes are common
operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), prompts, st.integers(1, 12)),
        st.tuples(st.just("step"), st.just(None), st.just(0)),
        st.tuples(st.just("abort"), st.just(None), st.integers(0, 50)),
        st.tuples(st.just("preempt"), st.just(None), st.integers(0, 50)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=operations, num_blocks=st.integers(4, 40), block_size=st.sampled_from([1, 2, 4, 16]),
       max_seqs=st.integers(1, 8), budget=st.integers(1, 64), seed=st.integers(0, 2**16),
       prefix_caching=st.booleans())
def test_random_request_streams_keep_the_books(check_books, ops, num_blocks, block_size, max_seqs, budget, seed,
                                               prefix_caching):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, block_size, watermark=0.0, prefix_caching=prefix_caching)
    sched = Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=64), bm)
    seqs: list[Sequence] = []
    for op, prompt, arg in ops:
        if op == "add":
            seq = Sequence(str(len(seqs)), prompt, SamplingParams(max_tokens=arg))
            try:
                sched.add(seq)
            except ValueError as e:
                assert "KV cache pages" in str(e) or "context" in str(e)
                continue
            seqs.append(seq)
        elif op == "step":
            fake_step(sched, rng)
        elif op == "preempt":
            if sched.running:
                sched.preempt(sched.running[arg % len(sched.running)])
        elif seqs:
            aborted = sched.abort(seqs[arg % len(seqs)].request_id)
            assert aborted is None or aborted.is_finished
        check_books(sched)
    # Every request finishes: each step makes progress, so a bounded number of steps drains the queue.
    for _ in range(10_000):
        if not sched.has_unfinished():
            break
        fake_step(sched, rng)
        check_books(sched)
    assert not sched.has_unfinished()
    assert all(s.is_finished for s in seqs)
    assert bm.num_free_blocks == num_blocks
    for seq in seqs:
        if seq.finish_reason == "length":
            assert seq.num_output_tokens == min(seq.params.max_tokens, 64 - seq.num_prompt_tokens)


def test_prefix_pages_are_shared_and_survive_their_first_owner():
    bm = BlockManager(16, 4, watermark=0.0)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_model_len=64), bm)
    rng = random.Random(0)
    prompt = list(range(10))  # two full pages and a partial one
    a = Sequence("a", prompt, SamplingParams(max_tokens=1))
    sched.add(a)
    fake_step(sched, rng)  # a computes its prompt, samples, finishes: its full pages stay cached
    assert a.is_finished and bm.num_free_blocks == 16
    b = Sequence("b", prompt + [99], SamplingParams(max_tokens=1))
    sched.add(b)
    scheduled = sched.schedule()
    assert b.num_computed_tokens == 8, "the two full prompt pages are reused"
    assert scheduled[0].start == 8 and scheduled[0].num_new_tokens == 3
    c = Sequence("c", prompt[:8], SamplingParams(max_tokens=1))
    sched.add(c)
    sched.schedule()
    # all of c's tokens are cached, but its last token is recomputed to produce logits
    assert c.num_computed_tokens == 4
    assert bm.blocks[c.block_table[0]].ref_count == 2


def test_preemption_frees_the_newest_and_recomputes_it(check_books):
    bm = BlockManager(5, 2, watermark=0.0)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_model_len=64), bm)
    rng = random.Random(1)
    old, new = (Sequence(n, [1, 2, 3], SamplingParams(max_tokens=5)) for n in ("old", "new"))
    sched.add(old)
    sched.add(new)
    fake_step(sched, rng)  # both prefilled: 2 pages each, one page left
    assert bm.num_free_blocks == 1
    while sched.num_preemptions == 0:  # both grow: the second to need a third page has none
        fake_step(sched, rng)
        check_books(sched)
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0 and new.block_table == []
    assert old.status is SequenceStatus.RUNNING
    for _ in range(100):
        if not sched.has_unfinished():
            break
        fake_step(sched, rng)
        check_books(sched)
    assert old.is_finished and new.is_finished and new.num_output_tokens == 5


def test_truncate_rolls_back_and_keeps_hashes_valid():
    bm = BlockManager(8, 4, watermark=0.0)
    seq = Sequence("s", list(range(10)), SamplingParams())
    assert bm.allocate(seq) == 0
    seq.num_computed_tokens = 10
    bm.register_computed(seq)
    assert seq.num_hashed_blocks == 2
    assert bm.truncate(seq, 6, 10) == 6  # back into the second page: it will be overwritten, so it loses its hash
    del seq.token_ids[6:]
    assert len(seq.block_table) == 2 and seq.num_hashed_blocks == 1
    second = bm.blocks[seq.block_table[1]]
    assert second.hash is None and all(bm.blocks[b].hash == h for h, b in bm.cached.items())
    first_hash = chain_hash(None, (0, 1, 2, 3))
    assert bm.cached[first_hash] == seq.block_table[0]


def test_truncate_into_a_shared_page_takes_a_private_copy():
    bm = BlockManager(8, 4, watermark=0.0)
    a = Sequence("a", list(range(9)), SamplingParams())
    bm.allocate(a)
    a.num_computed_tokens = 9
    bm.register_computed(a)
    b = Sequence("b", list(range(9)), SamplingParams())
    assert bm.allocate(b) == 8
    shared = b.block_table[1]
    assert bm.blocks[shared].ref_count == 2
    assert bm.truncate(b, 6, 8) == 4
    assert b.block_table[1] != shared
    assert bm.blocks[shared].ref_count == 1 and bm.blocks[shared].hash is not None


@pytest.mark.parametrize(("prompt_len", "max_tokens", "match"), [(64, 1, "does not fit the model's context"),
                                                                   (30, 200, "need more KV cache pages")])
def test_requests_that_can_never_run_are_rejected(prompt_len, max_tokens, match):
    sched = Scheduler(SchedulerConfig(max_model_len=64), BlockManager(4, 4, watermark=0.0))
    with pytest.raises(ValueError, match=match):
        sched.add(Sequence("x", [1] * prompt_len, SamplingParams(max_tokens=max_tokens)))
