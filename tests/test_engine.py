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
