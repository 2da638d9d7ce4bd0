"""Speculative decoding: greedy output identical to the target alone, sampled output distributed as the
target's, and no page leaked when speculation meets preemption and abort."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ggtriton.gguf import GGMLType, GGUFFile, dequantize
from ggtriton.gguf.quantize import quantize
from ggtriton.gguf.writer import TensorData, typed_metadata, write_gguf
from ggtriton.runtime.llm import LLM
from ggtriton.runtime.sampling_params import SamplingParams
from ggtriton.runtime.synthetic import SyntheticModel, write_synthetic_model


def requantized(src, dst) -> None:
    """A draft made from the target itself: its Q4_1 weights requantized to Q4_0."""
    f = GGUFFile(src)
    tensors = []
    for t in f.tensors.values():
        raw = f.tensor_bytes(t.name)
        if t.ggml_type == GGMLType.Q4_1:
            values = dequantize(raw, t.ggml_type, t.shape)
            tensors.append(TensorData(t.name, GGMLType.Q4_0, t.shape, quantize(values, GGMLType.Q4_0).numpy()))
        else:
            tensors.append(TensorData(t.name, t.ggml_type, t.shape, raw))
    write_gguf(dst, typed_metadata(f.metadata, f.value_types), tensors)


def test_greedy_output_is_the_targets(smollm2_path, tmp_path, device):
    draft = tmp_path / "draft-q4_0.gguf"
    requantized(smollm2_path, draft)
    words = "the lighthouse keeper wrote about ships and weather every evening by the sea".split()
    prompts = [" ".join(words[i % 7 : i % 7 + 2 + i % 9]).capitalize() for i in range(32)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    opts = dict(device=device, dtype=torch.float32, kv_cache_bytes=1 << 30, warm_up=False)
    alone = LLM(smollm2_path, **opts).generate(prompts, params, use_tqdm=False)
    spec = LLM(smollm2_path, **opts, draft_model=draft, num_speculative_tokens=4)
    outputs = spec.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in alone]
    rates = [o.metrics["acceptance_rate"] for o in outputs]
    assert 0.5 < float(np.mean(rates)) < 1.0, "a close draft: most drafts accepted, some rejected"
    assert all(o.metrics["mean_accepted_length"] > 0 for o in outputs)


def test_draft_with_another_vocabulary_is_refused(smollm2_path, tmp_path):
    other = tmp_path / "other.gguf"
    write_synthetic_model(other, SyntheticModel("llama", vocab=300))
    with pytest.raises(ValueError, match="does not share the vocabulary"):
        LLM(smollm2_path, device="cpu", draft_model=other)


# --- the distribution, on tiny models with a 12-token vocabulary -------------------------------------

VOCAB = 12


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    target, draft = root / "target.gguf", root / "draft.gguf"
    write_synthetic_model(target, SyntheticModel("llama", vocab=VOCAB, hidden=32, n_layers=2, seed=1))
    write_synthetic_model(draft, SyntheticModel("llama", vocab=VOCAB, hidden=32, n_layers=1, seed=2))
    return target, draft


def processed(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The sampling distribution, from its definition, in float64."""
    x = logits.astype(np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, dtype=bool)
    total = 0.0
    for rank, t in enumerate(order):
        if (top_k and rank >= top_k) or total >= top_p * p[order[: top_k or len(p)]].sum():
            break
        keep[t] = True
        total += p[t]
    p = np.where(keep, p, 0.0)
    return p / p.sum()


def chi_square_p_value(observed: np.ndarray, expected: np.ndarray) -> float:
    """P-value of Pearson's test; cells expecting fewer than 5 are pooled into one."""
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8)])
def test_sampled_tokens_follow_the_target(tiny_pair, temperature, top_k, top_p, device):
    target_path, draft_path = tiny_pair
    prompt = [1, 2, 3]
    opts = dict(device=device, dtype=torch.float32, kv_cache_bytes=1 << 30, warm_up=False)
    target = LLM(target_path, **opts)
    first = processed(target.logits(prompt)[-1].numpy(), temperature, top_k, top_p)
    joint = np.stack([first[a] * processed(target.logits(prompt + [a])[-1].numpy(), temperature, top_k, top_p)
                      for a in range(VOCAB)])
    n = 3000
    spec = LLM(target_path, **opts, draft_model=draft_path, num_speculative_tokens=3)
    params = [SamplingParams(max_tokens=3, temperature=temperature, top_k=top_k, top_p=top_p, seed=s,
                             ignore_eos=True) for s in range(n)]
    outputs = spec.generate([prompt] * n, params, use_tqdm=False)
    pairs = np.zeros((VOCAB, VOCAB))
    for o in outputs:
        pairs[o.token_ids[0], o.token_ids[1]] += 1
    assert pairs[joint == 0].sum() == 0, "a token the filters drop was emitted"
    assert chi_square_p_value(pairs.reshape(-1), n * joint.reshape(-1)) > 1e-3
    rate = np.mean([o.metrics["acceptance_rate"] for o in outputs])
    assert 0 < rate < 1  # both accepted and rejected drafts were exercised


# --- bookkeeping under speculation, preemption and abort ----------------------------------------------

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "step", "step", "abort", "preempt"]),
                              st.integers(1, 30), st.integers(1, 12)), max_size=30),
       k=st.integers(1, 4), seed=st.integers(0, 1000))
def test_speculation_with_preemption_and_abort_leaks_nothing(tiny_pair, check_books, ops, k, seed):
    target_path, draft_path = tiny_pair
    llm = LLM(target_path, device="cpu", draft_model=draft_path, num_speculative_tokens=k, block_size=4,
              kv_cache_bytes=24 * 4 * 2 * 2 * 2 * 16 * 4 + 24 * 4 * 2 * 1 * 2 * 16 * 4, max_num_batched_tokens=16)
    engine = llm.engine
    rng = np.random.default_rng(seed)
    ids = []
    for op, length, max_tokens in ops:
        if op == "add":
            prompt = rng.integers(0, VOCAB, length).tolist()
            try:
                ids.append(engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=1.0,
                                                                     ignore_eos=True)))
            except ValueError as e:
                assert "KV cache pages" in str(e)
        elif op == "step" and engine.has_unfinished():
            engine.step()
        elif op == "abort" and ids:
            engine.abort(ids[length % len(ids)])
        elif op == "preempt" and engine.scheduler.running:
            engine.scheduler.preempt(engine.scheduler.running[length % len(engine.scheduler.running)])
        check_books(engine.scheduler)
    for _ in range(500):
        if not engine.has_unfinished():
            break
        engine.step()
        check_books(engine.scheduler)
    assert not engine.has_unfinished()
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    for rid in ids:
        req = engine.requests[rid]
        assert req.finished
        if req.seq.finish_reason == "length":
            assert req.seq.num_output_tokens == req.seq.params.max_tokens
