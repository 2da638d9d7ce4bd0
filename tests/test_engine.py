"""The engine end to end on SmolLM2 (on `device`, float32): continuous batching changes nothing in the output."""

from __future__ import annotations

import pytest
import torch

from ggtriton.runtime.llm import LLM
from ggtriton.runtime.sampling_params import SamplingParams

WORDS = "the a lighthouse keeper wrote every evening about ships weather stone sea light tower".split()


def mixed_prompts(n: int) -> list[str]:
    """Prompts of 1 to ~60 words; many share a long common beginning (prefix caching)."""
    shared = "In the spring of 1871 the engineer Tobias Wren began to build a lighthouse on the northern headland, and"
    out = []
    for i in range(n):
        words = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + (i * 13) % 40))
        out.append(f"{shared} {words}" if i % 3 == 0 else words.capitalize())
    return out


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return smollm2_path


def test_batch_equals_each_prompt_alone(smollm2, device):
    prompts = mixed_prompts(32)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    opts = dict(device=device, dtype=torch.float32, warm_up=False)
    alone = LLM(smollm2, **opts, max_num_seqs=1, kv_cache_bytes=1 << 30)
    expected = [alone.generate(p, params, use_tqdm=False)[0].token_ids for p in prompts]
    # A 24-token step budget splits prompts into chunks; a cache of 40 pages of 4 tokens cannot hold
    # every sequence at once, so some are preempted and recomputed; the shared beginning is cached.
    batched = LLM(smollm2, **opts, max_num_batched_tokens=24, block_size=4,
                  kv_cache_bytes=40 * 4 * 30 * 2 * 3 * 64 * 4)
    outputs = batched.generate(prompts, params, use_tqdm=False)
    engine = batched.engine
    assert engine.scheduler.num_preemptions > 0
    assert engine.scheduler.block_manager.num_prefix_hit_tokens > 0
    assert [o.token_ids for o in outputs] == expected
    assert [o.prompt for o in outputs] == prompts
    assert all(o.finish_reason == "length" and len(o.token_ids) == 6 for o in outputs)


def test_prompt_logprobs_cover_every_prompt_token(smollm2, device):
    """Every prompt token after the first gets the model's log-probability and its top ones, through chunked
    prefill (a 24-token step budget), and again for a prompt whose pages sit in the prefix cache: such a
    prompt is computed whole, while the same prompt without prompt_logprobs hits the cache."""
    # float32 reference ops on CPU: the cpu backend's bfloat16 activations let chunking move a log-probability by
    # about 1e-3, more than the 1e-4 held here
    llm = LLM(smollm2, device=device, dtype=torch.float32, warm_up=False, max_num_batched_tokens=24, block_size=4,
              kv_cache_bytes=1 << 26, backend="torch" if device.type == "cpu" else None)
    prompts = mixed_prompts(9)[::3]  # the ones that begin with the shared sentence: longer than a step
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2)
    bm = llm.engine.scheduler.block_manager
    first = llm.generate(prompts, params, use_tqdm=False)
    hits = bm.num_prefix_hit_tokens
    again = llm.generate(prompts[:1], params, use_tqdm=False)
    assert bm.num_prefix_hit_tokens == hits
    llm.generate(prompts[:1], SamplingParams(max_tokens=1), use_tqdm=False)
    assert bm.num_prefix_hit_tokens > hits
    for a, b in zip(again[0].prompt_logprobs[1:], first[0].prompt_logprobs[1:], strict=True):
        assert a == pytest.approx(b, abs=1e-4)  # chunked differently: float32 sums in another order
    for out in first:
        ids = out.prompt_token_ids
        ref = torch.log_softmax(llm.logits(ids).double(), dim=1)
        assert len(out.prompt_logprobs) == len(ids) > 24 and out.prompt_logprobs[0] is None
        for p in range(1, len(ids)):
            entry = out.prompt_logprobs[p]
            assert next(iter(entry)) == ids[p]
            assert set(entry) == {ids[p], *ref[p - 1].topk(2).indices.tolist()}
            for t, lp in entry.items():
                assert lp == pytest.approx(float(ref[p - 1, t]), abs=1e-4)
