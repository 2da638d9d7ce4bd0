"""The sampler: next tokens for a whole batch from its logits, each row under its own `SamplingParams`.

Per row, in this order (vLLM's):
0. logit bias: the request's {token: bias} added to the logits;
1. penalties: repetition (tokens in the prompt or the output), then presence and frequency (output only);
2. temperature (0 = greedy: the argmax of the penalized logits, exactly);
3. log-probabilities, if asked: `log_softmax` of the logits after steps 1-2 (temperature 1 for a greedy
   row), before any filtering. This is the distribution the filters start from; vLLM's default
   (raw model log-probs) would hide the penalties and the temperature the request asked for;
4. filters, each on what the previous left: top-k; top-p on the renormalized top-k distribution (the
   smallest set whose probability reaches top_p, at least one token); min-p (p >= min_p * p_max, a
   ratio, so renormalization does not move it);
5. sampling by the exponential race, argmax(p / q) with q ~ Exp(1) drawn per token: a seeded row draws
   its q from its own generator, so its tokens do not depend on what else shares its batch.

Everything runs on the logits' device; the only device-to-host transfer is one `.tolist()` per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ggtriton.runtime.sampling_params import SamplingParams


@dataclass
class SamplerOutput:
    """token_ids: the chosen token of each row. logprobs: per row, None unless its params asked for them;
    else {token_id: logprob} of the chosen token (first) and the top `params.logprobs` tokens."""

    token_ids: list[int]
    logprobs: list[dict[int, float] | None]


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """The random stream of one seeded request, on the device its logits live on."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _counts(token_ids: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[B, V] float32 occurrence counts of each token per row (ids outside [0, V) are ignored)."""
    width = max(map(len, token_ids), default=0)
    counts = torch.zeros(len(token_ids), vocab + 1, device=device)
    if width:
        # Pad with V: its counts land in the extra column, dropped below.
        padded = [[t if 0 <= t < vocab else vocab for t in ids] + [vocab] * (width - len(ids))
                  for ids in token_ids]
        index = torch.tensor(padded, dtype=torch.int64, device=device)
        counts.scatter_add_(1, index, torch.ones(index.shape, device=device))
    return counts[:, :vocab]


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """`logits` [B, V] plus each row's `logit_bias` (a copy; `logits` itself when no row has one)."""
    entries = [(row, token, bias) for row, p in enumerate(params) for token, bias in p.logit_bias.items()]
    if not entries:
        return logits
    rows, tokens, biases = zip(*entries)
    vocab = logits.shape[1]
    if max(tokens) >= vocab:
        raise ValueError(f"sampler: logit_bias token {max(tokens)} is outside the vocabulary of {vocab}")
    index = torch.tensor([rows, tokens], dtype=torch.int64, device=logits.device)
    return logits.index_put(tuple(index), torch.tensor(biases, dtype=logits.dtype, device=logits.device),
                            accumulate=True)


Drafted = tuple[torch.Tensor, torch.Tensor]  # int64 [B, n] token ids on the device, bool [B, n]: which count


def apply_penalties(logits: torch.Tensor, prompt_token_ids: list[list[int]],
                    output_token_ids: list[list[int]], repetition: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor, drafted: Drafted | None = None) -> torch.Tensor:
    """Penalized copy of `logits` [B, V]; the penalties are [B] tensors (1, 0, 0 = off). `drafted`: output
    tokens still on the device (speculative drafts), counted where their mask is set.

    Repetition (HF/vLLM): for a token in the prompt or the output, logit > 0 -> logit / r, else logit * r.
    Presence and frequency (OpenAI/vLLM), output tokens only: logit -= presence * (count > 0) + frequency * count.
    """
    vocab = logits.shape[1]
    out_counts = _counts(output_token_ids, vocab, logits.device)
    if drafted is not None and drafted[0].numel():
        ids, mask = drafted
        out_counts = out_counts.scatter_add(1, ids, mask.to(out_counts.dtype))
    seen = (_counts(prompt_token_ids, vocab, logits.device) > 0) | (out_counts > 0)
    r = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    return logits - presence[:, None] * (out_counts > 0) - frequency[:, None] * out_counts


def filter_probs(probs: torch.Tensor, params: list[SamplingParams], top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor) -> torch.Tensor:
    """`probs` [B, V] with the tokens that top-k, then top-p, then min-p drop set to 0 (not renormalized).

    top_k [B] (0 = off, larger than V = off), top_p [B] (1 = off), min_p [B] (0 = off): the rows' `params`
    as tensors; the params themselves say, without reading the device, which filters any row uses.
    """
    keep = torch.ones_like(probs, dtype=torch.bool)
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        sorted_p, order = probs.sort(dim=1, descending=True)
        rank = torch.arange(probs.shape[1], device=probs.device)
        k = torch.where(top_k > 0, top_k, probs.shape[1])
        keep_sorted = rank[None, :] < k[:, None]
        sorted_p = sorted_p * keep_sorted
        cum = sorted_p.cumsum(dim=1)
        # A token stays while the mass before it is still short of top_p (of the top-k mass): the
        # smallest set reaching top_p, its first token always kept. top_p = 1 keeps everything, even
        # when float32 rounding makes the cumulative sum reach the total early.
        reached = (cum - sorted_p) >= top_p[:, None] * cum[:, -1:]
        keep_sorted &= ~reached | (top_p[:, None] >= 1)
        keep = keep.scatter(1, order, keep_sorted)
    if any(p.min_p > 0 for p in params):
        keep &= probs >= min_p[:, None] * probs.amax(dim=1, keepdim=True)
    return probs * keep


class Sampler:
    """Samples the next token of every row of a batch; holds the stream that unseeded rows share.

    seed: the shared stream's seed (None: a fresh nondeterministic one).
    """

    def __init__(self, seed: int | None = None):
        self._seed = seed
        self._shared: dict[torch.device, torch.Generator] = {}

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._shared:
            g = torch.Generator(device=device)
            if self._seed is None:
                g.seed()
            else:
                g.manual_seed(self._seed)
            self._shared[device] = g
        return self._shared[device]

    def _random(self, shape: tuple[int, int], device: torch.device, generators: list[torch.Generator | None],
                draw) -> torch.Tensor:
        """Random numbers [rows, n] by `draw(tensor, generator)`; a row with a generator of its own draws
        from it (a seeded request is reproducible whatever shares its batch), the rest from the shared one."""
        out = draw(torch.empty(shape, device=device), self._shared_generator(device))
        for i, g in enumerate(generators):
            if g is not None:
                if g.device != device:
                    raise ValueError(f"sampler: row {i}'s generator is on {g.device}, its logits on {device}")
                draw(out[i], g)
        return out

    def race(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """One token per row of `probs` [B, V] (any non-negative weights) by the exponential race."""
        q = self._random(probs.shape, probs.device, generators, lambda t, g: t.exponential_(generator=g))
        # q can be exactly 0; clamping keeps p / q finite and a dropped token (p = 0) at score 0.
        return (probs / q.clamp_min(torch.finfo(q.dtype).tiny)).argmax(dim=1)

    def uniform(self, rows: int, device: torch.device, generators: list[torch.Generator | None]) -> torch.Tensor:
        """One U(0, 1) number per row."""
        return self._random((rows, 1), device, generators, lambda t, g: t.uniform_(generator=g))[:, 0]

    def sample(self, logits: torch.Tensor, params: list[SamplingParams], prompt_token_ids: list[list[int]],
               output_token_ids: list[list[int]], generators: list[torch.Generator | None]) -> SamplerOutput:
        """Next token of each row of `logits` [B, V] (see `sample_on_device`), read back to the host."""
        return read_samples(self.sample_on_device(logits, params, prompt_token_ids, output_token_ids, generators)
                            .tolist(), params)

    def sample_on_device(self, logits: torch.Tensor, params: list[SamplingParams], prompt_token_ids: list[list[int]],
                         output_token_ids: list[list[int]], generators: list[torch.Generator | None]) -> torch.Tensor:
        """Next token of each row of `logits` [B, V], and its log-probabilities if any row asks: float64 rows
        (see `logprob_table`; `read_samples` makes them `SamplerOutput`), left on the device so that a step
        reads everything back at once.

        Per row: its params, its prompt ids and its output ids so far (for the penalties), and its
        generator (`make_generator(params.seed, logits.device)` for a seeded request, else None).
        """
        batch, vocab = logits.shape
        if not len(params) == len(prompt_token_ids) == len(output_token_ids) == len(generators) == batch:
            raise ValueError(f"sampler: {batch} logit rows but {len(params)} params, {len(prompt_token_ids)} "
                             f"prompts, {len(output_token_ids)} outputs, {len(generators)} generators")
        device = logits.device
        if batch == 0:
            return torch.empty(0, 1, dtype=torch.float64, device=device)
        logits = apply_logit_bias(logits.float(), params)

        # One host-to-device copy for all per-row parameters.
        table = torch.tensor([[p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty,
                               p.presence_penalty, p.frequency_penalty] for p in params],
                             dtype=torch.float32, device=device)
        temperature, top_k, top_p, min_p, repetition, presence, frequency = table.unbind(1)

        penalized = [p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0
                     for p in params]
        if any(penalized):
            # Rows without penalties pass no ids: they would cost a padded copy for nothing.
            logits = apply_penalties(
                logits, [ids if on else [] for ids, on in zip(prompt_token_ids, penalized)],
                [ids if on else [] for ids, on in zip(output_token_ids, penalized)],
                repetition, presence, frequency)

        greedy = temperature == 0
        tokens = logits.argmax(dim=1)
        n_top = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        if n_top is None and all(p.greedy for p in params):
            return tokens[:, None].double()  # no scaled copy of the logits: a vocabulary's worth per row
        scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
        if not all(p.greedy for p in params):
            probs = filter_probs(torch.softmax(scaled, dim=1), params, top_k.long(), top_p, min_p)
            race = self.race(probs, generators)
            tokens = torch.where(greedy, tokens, race)
        if n_top is None:
            return tokens[:, None].double()
        return logprob_table(torch.log_softmax(scaled, dim=1), tokens, n_top)


def logprob_table(logprobs: torch.Tensor, chosen: torch.Tensor, n_top: int) -> torch.Tensor:
    """float64 [R, 2 + 2n] on the device: per row of `logprobs` [R, V], the `chosen` token and its log-prob,
    then the ids and log-probs of its n = min(n_top, V) most likely tokens. float64 holds token ids and
    float32 log-probs exactly, so one transfer carries both."""
    top_lp, top_ids = logprobs.topk(min(n_top, logprobs.shape[1]), dim=1)
    chosen_lp = logprobs.gather(1, chosen[:, None])
    return torch.cat([chosen[:, None].double(), chosen_lp.double(), top_ids.double(), top_lp.double()], dim=1)


def logprob_dict(row: list[float], count: int) -> dict[int, float]:
    """{token: logprob} of a `logprob_table` row: the chosen token first, then its top `count` tokens."""
    n = (len(row) - 2) // 2
    entry = {int(row[0]): row[1]}
    for t, lp in zip(row[2:2 + min(count, n)], row[2 + n:2 + n + min(count, n)]):
        entry.setdefault(int(t), lp)
    return entry


def read_samples(rows: list[list[float]], params: list[SamplingParams]) -> SamplerOutput:
    """`SamplerOutput` of `Sampler.sample_on_device`'s rows, read back."""
    return SamplerOutput([int(r[0]) for r in rows],
                         [None if p.logprobs is None else logprob_dict(r, p.logprobs) for r, p in zip(rows, params)])


def token_probs(logits: torch.Tensor, params: list[SamplingParams], prompt_token_ids: list[list[int]],
                output_token_ids: list[list[int]], drafted: Drafted | None = None) -> torch.Tensor:
    """The distribution each row of `logits` [B, V] is sampled from, as probabilities [B, V]: penalties
    (over the output ids and the `drafted` tokens still on the device), temperature, then top-k, top-p and
    min-p, renormalized; a greedy row is one-hot on its argmax. Speculative decoding compares the draft's and
    the target's distributions in this form."""
    device = logits.device
    table = torch.tensor([[p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
                           p.frequency_penalty] for p in params], dtype=torch.float32, device=device)
    temperature, top_k, top_p, min_p, repetition, presence, frequency = table.unbind(1)
    logits = apply_logit_bias(logits.float(), params)
    if any(p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params):
        logits = apply_penalties(logits, prompt_token_ids, output_token_ids, repetition, presence, frequency,
                                 drafted)
    greedy = temperature == 0
    probs = filter_probs(torch.softmax(logits / torch.where(greedy, 1.0, temperature)[:, None], dim=1), params,
                         top_k.long(), top_p, min_p)
    probs = probs / probs.sum(dim=1, keepdim=True)
    one_hot = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=1, keepdim=True), 1.0)
    return torch.where(greedy[:, None], one_hot, probs)
