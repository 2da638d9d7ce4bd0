"""The sampler: seeded reproducibility, sampled distributions against float64 references (chi-square),
greedy, penalties, log-probabilities, mixed batches and edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from ggtriton.runtime.engine.sampler import Sampler, apply_penalties, make_generator
from ggtriton.runtime.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run(logits, params, *, prompts=None, outputs=None, generators=None, sampler=None):
    b = logits.shape[0]
    if isinstance(params, SamplingParams):
        params = [params] * b
    return (sampler or Sampler(seed=0)).sample(
        logits, params, prompts or [[] for _ in range(b)], outputs or [[] for _ in range(b)],
        generators or [None] * b)


# ---------------------------------------------------------------- float64 references, written independently

def ref_distribution(logits: list[float], temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> list[float]:
    """The filtered, renormalized distribution, one token at a time in Python floats."""
    m = max(logits)
    w = [math.exp((x - m) / temperature) for x in logits]
    probs = [x / sum(w) for x in w]
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    if top_k:
        order = order[:top_k]
    mass = sum(probs[i] for i in order)
    kept, acc = [], 0.0
    for i in order:
        kept.append(i)
        acc += probs[i] / mass
        if acc >= top_p:
            break
    kept = [i for i in kept if probs[i] >= min_p * max(probs)]
    total = sum(probs[i] for i in kept)
    return [probs[i] / total if i in kept else 0.0 for i in range(len(probs))]


def ref_penalties(logits: list[float], prompt: list[int], output: list[int], rep, pres, freq) -> list[float]:
    out = []
    for t, x in enumerate(logits):
        if t in prompt or t in output:
            x = x / rep if x > 0 else x * rep
        n = output.count(t)
        out.append(x - pres * (n > 0) - freq * n)
    return out


def chi2_sf(stat: float, df: int) -> float:
    """Chi-square survival function: the regularized upper incomplete gamma Q(df / 2, stat / 2)."""
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                   torch.tensor(stat / 2, dtype=torch.float64)).item()


def assert_matches(counts: list[int], expected: list[float]):
    """Chi-square goodness of fit over the tokens with probability > 0; the others must never appear."""
    n = sum(counts)
    assert all(c == 0 for c, p in zip(counts, expected) if p == 0), (counts, expected)
    support = [(c, p) for c, p in zip(counts, expected) if p > 0]
    assert all(n * p >= 5 for _, p in support), "test setup: expected counts too small for chi-square"
    if len(support) == 1:
        assert support[0][0] == n
        return
    stat = sum((c - n * p) ** 2 / (n * p) for c, p in support)
    # Fixed seeds make this deterministic; 1e-4 leaves room to change them without a false alarm.
    assert chi2_sf(stat, len(support) - 1) > 1e-4, (stat, counts, [round(n * p) for p in expected])


def test_chi2_sf_against_table():
    # Tabulated chi-square upper 1e-4 quantiles.
    for df, quantile in [(1, 15.137), (2, 18.421), (3, 21.108), (5, 25.745), (11, 37.367)]:
        assert chi2_sf(quantile, df) == pytest.approx(1e-4, rel=1e-3)


# ---------------------------------------------------------------- distributions

V12 = [1.3, -0.4, 2.1, 0.2, 0.9, -1.7, 1.7, 0.05, -0.9, 1.1, -0.2, 0.6]

CASES = {
    "plain": dict(),
    "temperature": dict(temperature=0.6),
    "hot": dict(temperature=1.8),
    "top_k": dict(top_k=4),
    "top_k_hot": dict(top_k=5, temperature=1.4),
    "top_p": dict(top_p=0.7),
    "min_p": dict(min_p=0.2),
    "all_filters": dict(temperature=1.2, top_k=8, top_p=0.85, min_p=0.12),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_sampled_distribution_matches_reference(case, device):
    kwargs = CASES[case]
    n = 40_000
    logits = torch.tensor(V12, device=device).expand(n, -1).contiguous()
    tokens = run(logits, SamplingParams(**kwargs), sampler=Sampler(seed=1234)).token_ids
    counts = torch.bincount(torch.tensor(tokens), minlength=len(V12)).tolist()
    assert_matches(counts, ref_distribution(V12, **kwargs))


def test_seeded_rows_follow_the_distribution():
    # Seeded rows draw from their own generators: 3000 requests, one token each, still the right law.
    n, kwargs = 3000, dict(top_k=6, temperature=0.9)
    logits = torch.tensor(V12).expand(n, -1).contiguous()
    gens = [make_generator(s, "cpu") for s in range(n)]
    tokens = run(logits, SamplingParams(seed=0, **kwargs), generators=gens).token_ids
    assert_matches(torch.bincount(torch.tensor(tokens), minlength=12).tolist(), ref_distribution(V12, **kwargs))


# ---------------------------------------------------------------- seeds

def test_seeded_request_reproduces_whatever_its_batch():
    torch.manual_seed(0)
    vocab, steps = 500, 6
    step_logits = [torch.randn(vocab) * 0.5 for _ in range(steps)]
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=42)

    def tokens_of_seed_request(batch: int, row: int, neighbour_seed: int, sampler_seed: int) -> list[int]:
        sampler = Sampler(seed=sampler_seed)
        gens = [make_generator(neighbour_seed + i, "cpu") if i % 2 else None for i in range(batch)]
        gens[row] = make_generator(params.seed, "cpu")
        out = []
        for s in range(steps):
            logits = torch.randn(batch, vocab)
            logits[row] = step_logits[s]
            p = [SamplingParams(temperature=1.0 + 0.1 * i, top_k=i) for i in range(batch)]
            p[row] = params
            out.append(run(logits, p, generators=gens, sampler=sampler).token_ids[row])
        return out

    alone = tokens_of_seed_request(1, 0, 0, 0)
    assert tokens_of_seed_request(3, 0, 7, 1) == alone
    assert tokens_of_seed_request(8, 5, 100, 2) == alone
    assert tokens_of_seed_request(8, 2, 9, 3) == alone


def test_different_seeds_differ():
    logits = torch.zeros(1, 1000)
    draws = {tuple(run(logits, SamplingParams(seed=s), generators=[make_generator(s, "cpu")]).token_ids)
             for s in range(20)}
    assert len(draws) > 15
    same = [run(logits, SamplingParams(seed=3), generators=[make_generator(3, "cpu")]).token_ids for _ in range(3)]
    assert same[0] == same[1] == same[2]


def test_unseeded_sampler_seed_reproduces():
    logits = torch.zeros(64, 1000)
    assert run(logits, SamplingParams(), sampler=Sampler(5)).token_ids == \
        run(logits, SamplingParams(), sampler=Sampler(5)).token_ids
    assert run(logits, SamplingParams(), sampler=Sampler(5)).token_ids != \
        run(logits, SamplingParams(), sampler=Sampler(6)).token_ids


# ---------------------------------------------------------------- greedy and penalties

@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax(device):
    logits = torch.randn(33, 257, generator=torch.Generator().manual_seed(1)).to(device)
    # Greedy ignores the filters.
    out = run(logits, SamplingParams(temperature=0, top_k=3, top_p=0.1, min_p=0.5))
    assert out.token_ids == logits.argmax(1).tolist()


def penalty_case():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 40, generator=g) * 2
    prompts = [[1, 2, 3, 3], [], [5, 39], [0, 7, 7, 7]]
    outputs = [[3, 4, 4, 9], [1, 1, 1, 2], [], [7, 8, 8, 0]]
    pen = [(1.3, 0.5, 0.2), (0.8, -0.4, 0.7), (2.0, 1.0, 1.0), (1.0, 0.0, 1.5)]
    return logits, prompts, outputs, pen


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_match_reference(device):
    logits, prompts, outputs, pen = penalty_case()
    rep, pres, freq = (torch.tensor(c, device=device) for c in zip(*pen))
    got = apply_penalties(logits.to(device), prompts, outputs, rep, pres, freq).cpu().double()
    ref = torch.tensor([ref_penalties(row.double().tolist(), p, o, *k)
                        for row, p, o, k in zip(logits, prompts, outputs, pen)], dtype=torch.float64)
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_greedy_after_penalties():
    logits = torch.tensor([[5.0, 4.0, 3.0, -1.0], [5.0, 4.9, 3.0, -1.0], [-0.5, -3.0, -0.6, -4.0]])
    params = [SamplingParams(temperature=0, repetition_penalty=2.0),       # 5 -> 2.5: token 1 wins
              SamplingParams(temperature=0, frequency_penalty=0.2),        # 5 - 0.4 = 4.6 < 4.9
              SamplingParams(temperature=0, repetition_penalty=1.5)]       # -0.5 -> -0.75 < -0.6
    out = run(logits, params, prompts=[[0], [], [0]], outputs=[[], [0, 0], []])
    assert out.token_ids == [1, 1, 2]


# ---------------------------------------------------------------- log-probabilities

@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_log_softmax_after_penalties_and_temperature(device):
    logits, prompts, outputs, pen = penalty_case()
    params = [SamplingParams(temperature=0, repetition_penalty=pen[0][0], presence_penalty=pen[0][1],
                             frequency_penalty=pen[0][2], logprobs=5),
              SamplingParams(temperature=0.7, top_k=3, repetition_penalty=pen[1][0], presence_penalty=pen[1][1],
                             frequency_penalty=pen[1][2], logprobs=0),
              SamplingParams(temperature=1.3, top_p=0.5, seed=1, repetition_penalty=pen[2][0],
                             presence_penalty=pen[2][1], frequency_penalty=pen[2][2], logprobs=40),
              SamplingParams(temperature=1.0)]
    gens = [None, None, make_generator(1, device), None]
    out = run(logits.to(device), params, prompts=prompts, outputs=outputs, generators=gens)
    assert out.logprobs[3] is None
    for i, p in enumerate(params[:3]):
        pen_row = ref_penalties(logits[i].double().tolist(), prompts[i], outputs[i], *pen[i])
        ref = torch.log_softmax(torch.tensor(pen_row, dtype=torch.float64) / (p.temperature or 1.0), 0)
        got = out.logprobs[i]
        token = out.token_ids[i]
        top = ref.topk(p.logprobs).indices.tolist()
        assert next(iter(got)) == token                     # the chosen token comes first
        assert set(got) == {token, *top}
        for t, lp in got.items():
            assert lp == pytest.approx(ref[t].item(), abs=1e-5)


# ---------------------------------------------------------------- logit bias

@pytest.mark.parametrize("device", DEVICES)
def test_logit_bias_is_added_before_everything(device):
    """Bias then penalties then temperature: the log-probs are those of the biased, penalized logits, a +100
    bias makes its token the greedy choice, and -100 keeps a token from ever being sampled."""
    logits, prompts, outputs, pen = penalty_case()
    vocab = logits.shape[1]
    bias = {3: 100.0, 7: -2.5, 3 + vocab // 2: 0.75}
    params = [SamplingParams(temperature=0, logit_bias=bias, logprobs=4, repetition_penalty=pen[0][0],
                             presence_penalty=pen[0][1], frequency_penalty=pen[0][2]),
              SamplingParams(temperature=0.9, logit_bias={int(logits[1].argmax()): -100.0}, logprobs=2),
              SamplingParams(temperature=0, logprobs=1)]
    out = run(logits[:3].to(device), params, prompts=prompts[:3], outputs=outputs[:3])
    assert out.token_ids[0] == 3
    row = logits[0].double().tolist()
    for t, b in bias.items():
        row[t] += b
    ref = torch.log_softmax(torch.tensor(ref_penalties(row, prompts[0], outputs[0], *pen[0]), dtype=torch.float64), 0)
    for t, lp in out.logprobs[0].items():
        assert lp == pytest.approx(ref[t].item(), abs=1e-4)
    assert out.logprobs[2] == pytest.approx(run(logits[2:3].to(device), params[2]).logprobs[0])  # unbiased row
    banned = int(logits[1].argmax())
    for seed in range(20):
        assert run(logits[1:2].to(device), params[1], sampler=Sampler(seed)).token_ids[0] != banned


def test_logit_bias_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        run(torch.randn(1, 10), SamplingParams(logit_bias={10: 1.0}))
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 101.0})


# ---------------------------------------------------------------- mixed batches and edge cases

def test_mixed_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 300)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_k=5),
              SamplingParams(temperature=1.1, seed=9, top_p=0.9), SamplingParams(temperature=0),
              SamplingParams(min_p=0.3), SamplingParams(temperature=0.5, seed=10, top_k=2)]
    gens = [make_generator(p.seed, "cpu") if p.seed is not None else None for p in params]
    out = run(logits, params, generators=gens).token_ids
    assert out[0] == logits[0].argmax() and out[3] == logits[3].argmax()
    assert out[1] in logits[1].topk(5).indices.tolist()
    assert out[5] in logits[5].topk(2).indices.tolist()
    p4 = torch.softmax(logits[4], 0)
    assert p4[out[4]] >= 0.3 * p4.max()
    for i in (2, 5):  # seeded rows: the same token as alone in a batch of one
        alone = run(logits[i:i + 1], [params[i]], generators=[make_generator(params[i].seed, "cpu")],
                    sampler=Sampler(seed=77))
        assert alone.token_ids[0] == out[i]


def test_top_k_larger_than_vocab_is_no_filter():
    n = 40_000
    logits = torch.tensor(V12).expand(n, -1).contiguous()
    counts = torch.bincount(torch.tensor(run(logits, SamplingParams(top_k=1000)).token_ids), minlength=12)
    assert_matches(counts.tolist(), ref_distribution(V12))


def test_tiny_top_p_and_min_p_one_keep_only_the_top():
    logits = torch.tensor(V12).expand(2000, -1).contiguous()
    assert set(run(logits, SamplingParams(top_p=1e-6, temperature=3.0)).token_ids) == {2}
    assert set(run(logits, SamplingParams(min_p=1.0, temperature=3.0)).token_ids) == {2}
    # min_p = 1 keeps every token tied for the maximum.
    tied = torch.tensor([0.0, 3.0, 1.0, 3.0]).expand(2000, -1).contiguous()
    assert set(run(tied, SamplingParams(min_p=1.0)).token_ids) == {1, 3}


@pytest.mark.parametrize("device", DEVICES)
def test_minus_inf_logits(device):
    logits = torch.tensor([[-math.inf, 1.0, -math.inf, 0.5, 0.0, -math.inf]], device=device).expand(5000, -1)
    for params in [SamplingParams(), SamplingParams(temperature=0.3, top_k=5), SamplingParams(top_p=0.99),
                   SamplingParams(min_p=0.01), SamplingParams(temperature=0),
                   SamplingParams(repetition_penalty=1.4, presence_penalty=0.5, frequency_penalty=0.5)]:
        params.logprobs = 2
        out = run(logits.contiguous(), params, prompts=[[0, 1]] * 5000, outputs=[[2, 3, 3]] * 5000)
        assert set(out.token_ids) <= {1, 3, 4}
        assert all(not math.isnan(lp) and lp > -math.inf for row in out.logprobs for lp in row.values())


def test_empty_batch():
    out = Sampler().sample(torch.empty(0, 50), [], [], [], [])
    assert out.token_ids == [] and out.logprobs == []


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="logit rows"):
        Sampler().sample(torch.zeros(2, 5), [SamplingParams()], [[]], [[]], [None])
