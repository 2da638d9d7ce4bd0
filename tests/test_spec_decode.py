"""Speculative decoding: greedy output identical to the target alone, sampled output distributed as the
target's, and no page leaked when speculation meets preemption and abort."""

from __future__ import annotations

import itertools
from dataclasses import replace

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
    """Greedy output with a draft is the target's own, token for token (float32), also when pages run out
    (preemption and recomputation) and prompts share cached pages."""
    draft = tmp_path / "draft-q4_0.gguf"
    requantized(smollm2_path, draft)
    words = "the lighthouse keeper wrote about ships and weather every evening by the sea".split()
    shared = "In the spring the engineer began to build a lighthouse on the northern headland, and"
    prompts = [(f"{shared} " if i % 3 == 0 else "") + " ".join(words[i % 7 : i % 7 + 2 + i % 9]).capitalize()
               for i in range(32)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    opts = dict(device=device, dtype=torch.float32, warm_up=False)
    alone = LLM(smollm2_path, **opts, kv_cache_bytes=1 << 30).generate(prompts, params, use_tqdm=False)
    # A cache of 24 pages of 4 tokens cannot hold the sequences a 64-token step admits as they grow by their
    # lookahead: some are preempted.
    page = 4 * 30 * 2 * 3 * 64 * 4  # tokens x layers x (K, V) x KV heads x head size x float32, per model
    spec = LLM(smollm2_path, **opts, draft_model=draft, num_speculative_tokens=4, adaptive_speculation=False,
               block_size=4, kv_cache_bytes=24 * 2 * page, max_num_batched_tokens=64)
    outputs = spec.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in alone]
    sched = spec.engine.scheduler
    assert sched.num_preemptions > 0 and sched.block_manager.num_prefix_hit_tokens > 0
    rates = [o.metrics["acceptance_rate"] for o in outputs]
    assert 0.5 < float(np.mean(rates)) < 1.0, "a close draft: most drafts accepted, some rejected"
    assert all(o.metrics["mean_accepted_length"] > 0 for o in outputs)
    assert all(o.metrics["steps_per_token"] < 1 for o in outputs)


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


def processed(logits: np.ndarray, params: SamplingParams, prompt: list[int], output: list[int]) -> np.ndarray:
    """The sampling distribution after `prompt` and `output`, from its definition, in float64: penalties,
    temperature, top-k, top-p (on the top-k mass), min-p."""
    x = logits.astype(np.float64).copy()
    for t in set(prompt) | set(output):
        r = params.repetition_penalty
        x[t] = x[t] / r if x[t] > 0 else x[t] * r
    for t in set(output):
        x[t] -= params.presence_penalty + params.frequency_penalty * output.count(t)
    x /= params.temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, dtype=bool)
    total = 0.0
    top_k = params.top_k
    for rank, t in enumerate(order):
        if (top_k and rank >= top_k) or total >= params.top_p * p[order[: top_k or len(p)]].sum():
            break
        keep[t] = True
        total += p[t]
    keep &= p >= params.min_p * p.max()
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


SAMPLED = [SamplingParams(temperature=1.0),
           SamplingParams(temperature=0.7, top_k=5, min_p=0.05, repetition_penalty=1.3),
           SamplingParams(temperature=1.3, top_p=0.8, presence_penalty=0.5, frequency_penalty=0.3)]


@pytest.mark.parametrize("params", SAMPLED, ids=["plain", "top_k-min_p-repetition", "top_p-presence-frequency"])
def test_every_position_follows_the_target(tiny_pair, params, device):
    """Four tokens per request: the first sampled after the prompt, the next two drafted and verified, the
    fourth the bonus (or the target's token after a rejection). The exact joint distribution of the four comes
    from the target's logits over every prefix; each position's pair with the token before it is tested
    against it, so drafts, residuals and the bonus are all checked over the whole distribution."""
    target_path, draft_path = tiny_pair
    prompt = [1, 2, 3]
    opts = dict(device=device, dtype=torch.float32, kv_cache_bytes=1 << 30, warm_up=False)
    target = LLM(target_path, **opts)
    prefixes = [list(p) for p in itertools.product(range(VOCAB), repeat=3)]
    last = {}  # the target's next-token logits after prompt + prefix, for every prefix of up to 3 tokens
    for length in range(4):
        seqs = [prompt + list(p) for p in itertools.product(range(VOCAB), repeat=length)]
        rows = {}
        for i, pos, part in target.score(seqs, first=len(prompt) + length - 1):
            rows[i] = part[-1].cpu().numpy()
        for i, seq in enumerate(seqs):
            last[tuple(seq[len(prompt):])] = rows[i]
    joint = np.zeros((VOCAB,) * 4)
    for p in prefixes:
        prob = 1.0
        for j in range(3):
            prob *= processed(last[tuple(p[:j])], params, prompt, p[:j])[p[j]]
        joint[tuple(p)] = prob * processed(last[tuple(p)], params, prompt, p)
    n = 3000
    spec = LLM(target_path, **opts, draft_model=draft_path, num_speculative_tokens=2, adaptive_speculation=False)
    outputs = spec.generate([prompt] * n, [replace(params, max_tokens=4, seed=s, ignore_eos=True) for s in range(n)],
                            use_tqdm=False)
    tokens = np.array([o.token_ids for o in outputs])
    assert all(o.metrics["steps_per_token"] == 0.5 for o in outputs if o.metrics["mean_accepted_length"] == 2)
    for j in range(1, 4):
        expected = joint.sum(axis=tuple(a for a in range(4) if a not in (j - 1, j)))
        observed = np.zeros((VOCAB, VOCAB))
        np.add.at(observed, (tokens[:, j - 1], tokens[:, j]), 1)
        assert observed[expected == 0].sum() == 0, f"position {j + 1}: a token the filters drop was emitted"
        assert chi_square_p_value(observed.reshape(-1), n * expected.reshape(-1)) > 1e-3, f"position {j + 1}"
    rate = np.mean([o.metrics["acceptance_rate"] for o in outputs])
    assert 0 < rate < 1  # both accepted and rejected drafts were exercised


def test_a_step_reads_the_device_once(tiny_pair, monkeypatch):
    """Outside the forward passes, a step reads results back from the device at one point only, whatever its
    mix: prefill chunks, plain and speculative decodes, log-probabilities, prompt log-probabilities, seeds."""
    target_path, draft_path = tiny_pair
    llm = LLM(target_path, device="cpu", draft_model=draft_path, num_speculative_tokens=3, kv_cache_bytes=1 << 24,
              adaptive_speculation=False, max_num_batched_tokens=16)
    engine = llm.engine
    rng = np.random.default_rng(0)
    mix = [SamplingParams(max_tokens=9, temperature=0), SamplingParams(max_tokens=7, temperature=0.9, seed=3),
           SamplingParams(max_tokens=8, temperature=0.8, top_k=4, min_p=0.1, repetition_penalty=1.2, logprobs=2),
           SamplingParams(max_tokens=6, temperature=1.0, prompt_logprobs=1, presence_penalty=0.4)]
    for i in range(8):
        engine.add_request(rng.integers(0, VOCAB, 3 + 4 * i).tolist(), replace(mix[i % 4], ignore_eos=True))
    reads: list[str] = []
    forward = [0]

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if not forward[0]:
                reads.append(name)
            return original(self, *args, **kwargs)
        return read

    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    for runner in (llm.runner, llm.draft_runner):
        def run(*args, _run=runner.run, **kwargs):
            forward[0] += 1
            try:
                return _run(*args, **kwargs)
            finally:
                forward[0] -= 1
        monkeypatch.setattr(runner, "run", run)
    steps = verifying = 0
    while engine.has_unfinished():
        reads.clear()
        engine.step()
        steps += 1
        verifying += any(r.seq.spec.verify_steps for r in engine.requests.values())
        assert reads in ([], ["tolist"]), f"step {steps}: {reads}"
    assert verifying  # speculative steps were among them


def test_lookahead_follows_acceptance():
    """At batch 1 with weight-bound steps: a good, cheap draft drafts the most; a poor or costly one none,
    except for a one-token probe every `probe_every` steps."""
    from ggtriton.runtime.engine.sequence import SpecState
    from ggtriton.runtime.engine.step_cost import StepCost, choose_lookahead

    good = SpecState()
    for _ in range(20):
        good.verified(4, 4)
    assert good.acceptance > 0.95 and choose_lookahead([good.acceptance], [4], StepCost.weight_bound(0.05)) == [4]
    poor = SpecState()
    for _ in range(20):
        poor.verified(4, 0)
    assert poor.acceptance < 0.25  # the prior fades: a short memory follows the text
    choices = [poor.probe(*choose_lookahead([poor.acceptance], [4], StepCost.weight_bound(0.3)))
               for _ in range(2 * SpecState.probe_every)]
    assert choices.count(1) >= 1 and set(choices) <= {0, 1}
    assert choose_lookahead([SpecState().acceptance], [4], StepCost.weight_bound(1.0)) == [0]  # as costly as the target
    # at batch 1 the rule is the single-sequence one: (1 - a^(k+1)) / (1 - a) tokens per 1 + k * cost
    for a, cost in [(0.5, 0.1), (0.7, 0.39), (0.9, 0.39), (0.3, 0.05)]:
        rates = [(1 - a ** (k + 1)) / (1 - a) / (1 + k * cost) for k in range(5)]
        assert choose_lookahead([a], [4], StepCost.weight_bound(cost)) == [rates.index(max(rates))]


def _rate(ks, acceptance, cost, other=0):
    tokens = other + sum((1 - a ** (k + 1)) / (1 - a) for a, k in zip(acceptance, ks))
    drafting = sum(cost.draft_time(sum(k >= j for k in ks)) for j in range(1, max(ks, default=0) + 1))
    return tokens / (cost.target_time(len(ks) + other + sum(ks)) + drafting)


def test_lookahead_is_chosen_for_the_batch():
    """Where a verify pass's extra tokens cost time (a step past the weight-bound knee), a large batch drafts
    less than one sequence at the same acceptance, down to none; the choice is never worse than not drafting
    and within 10 % of the best choice found by trying all (random batches, caps and costs)."""
    from ggtriton.runtime.engine.step_cost import StepCost, choose_lookahead

    knee = StepCost([(1, 1.0), (32, 1.0), (1024, 32.0)], [(1, 0.1), (64, 0.2), (256, 0.8)])
    assert choose_lookahead([0.7], [4], knee) == [4]
    batch = choose_lookahead([0.7] * 64, [4] * 64, knee)
    assert max(batch) < 4 and _rate(batch, [0.7] * 64, knee) >= _rate([0] * 64, [0.7] * 64, knee)
    assert choose_lookahead([0.5] * 128, [4] * 128, knee) == [0] * 128
    # prompt tokens sharing the step leave less room under the knee
    assert sum(choose_lookahead([0.8] * 8, [4] * 8, knee)) == 24
    assert sum(choose_lookahead([0.8] * 8, [4] * 8, knee, other_tokens=16)) == 8
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 4))
        acceptance = rng.uniform(0, 0.95, n).tolist()
        caps = rng.integers(0, 5, n).tolist()
        bend = int(rng.choice([2, 4, 8, 100]))
        cost = StepCost([(1, 1.0), (bend, 1.0 + 0.5 * (bend == 2)), (200, 200 / bend + 0.5)],
                        [(1, float(rng.uniform(0, 0.6))), (200, 2.0)])
        ks = choose_lookahead(acceptance, caps, cost)
        assert all(0 <= k <= c for k, c in zip(ks, caps))
        best = max(_rate(list(c), acceptance, cost) for c in itertools.product(*[range(c + 1) for c in caps]))
        assert best * 0.9 <= _rate(ks, acceptance, cost) and _rate([0] * n, acceptance, cost) <= _rate(ks, acceptance,
                                                                                                         cost)


def test_step_costs_are_checked():
    from ggtriton.runtime.engine.step_cost import StepCost

    with pytest.raises(ValueError, match="target needs distinct positive token counts"):
        StepCost([(0, 1.0)])
    with pytest.raises(ValueError, match="draft needs"):
        StepCost([(1, 1.0)], [(2, 0.1), (2, 0.2)])
    cost = StepCost([(4, 2.0), (1, 1.0)], [(1, 0.5)])
    assert cost.target_time(0.5) == 1.0 and cost.target_time(2.5) == 1.5 and cost.target_time(7) == 3.0
    assert cost.draft_time(0) == 0.0 and cost.draft_time(9) == 0.5


def test_measured_step_costs_steer_the_engine(tiny_pair):
    """With warm-up, the step costs come from timed steps of both models (here on CPU), and the engine
    generates the same greedy text as with a fixed lookahead."""
    target_path, draft_path = tiny_pair
    opts = dict(device="cpu", draft_model=draft_path, num_speculative_tokens=3, kv_cache_bytes=1 << 22, max_num_seqs=4)
    llm = LLM(target_path, warm_up=True, **opts)
    cost = llm.scheduler_config.step_cost
    assert [n for n, _ in cost.target] == [1, 2, 4, 8, 16] and [n for n, _ in cost.draft] == [1, 2, 4]
    assert cost.target_time(1) == 1.0 and all(t > 0 for _, t in cost.target + cost.draft)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    fixed = LLM(target_path, adaptive_speculation=False, **opts)
    assert ([o.token_ids for o in llm.generate(["a b", "c"], params, use_tqdm=False)]
            == [o.token_ids for o in fixed.generate(["a b", "c"], params, use_tqdm=False)])


def test_adaptive_speculation_drafts_less_with_a_costly_draft(tiny_pair):
    """Drafting with the target itself (cost 1) does not pay: adaptive speculation leaves it to probes, while
    a fixed lookahead drafts every step; both give the same greedy text."""
    target_path, _ = tiny_pair
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    opts = dict(device="cpu", draft_model=target_path, num_speculative_tokens=3, kv_cache_bytes=1 << 24)
    adaptive = LLM(target_path, **opts).generate([[1, 2, 3]], params, use_tqdm=False)[0]
    fixed = LLM(target_path, **opts, adaptive_speculation=False).generate([[1, 2, 3]], params, use_tqdm=False)[0]
    assert adaptive.token_ids == fixed.token_ids
    assert fixed.metrics["steps_per_token"] < 0.5  # self-drafting: every draft is accepted
    assert adaptive.metrics["steps_per_token"] > 0.8


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
