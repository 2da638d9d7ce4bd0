"""Speculative decoding: a draft model proposes tokens, the target checks them all in one pass.

Per decoding sequence with lookahead k: the draft first catches up on the tokens its cache lacks (the
whole prompt on the first step) and proposes d_1 from its distribution q_1, then feeds d_i to propose
d_{i+1}, up to k tokens. The target scores the last token and the drafts in one forward, giving
p_1 .. p_{k+1}. Draft d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection
the token is drawn from the residual max(0, p_i - q_i) (renormalized), and if every draft is accepted a
bonus token is drawn from p_{k+1} (Leviathan et al. 2023; Chen et al. 2023): the output follows the
target's distribution exactly. Both p and q are the distributions the sampler would draw from (penalties
over the tokens before each position, drafts included, temperature, top-k, top-p, min-p); for greedy
requests they are one-hot, so acceptance is prefix matching against the target's argmax.

Everything between the step's forward passes stays on the device: drafts are sampled there and fed to the
next draft step and to the target's verify pass as device tensors, and the acceptance, the residual and
the bonus are computed there. The host learns the outcome once, with the rest of the step's results
(`Engine`). Drafts past the first whose draft distribution was less confident than `p_min`, and proposals
shorter than `min_drafts`, are not taken: the target still scores their positions (the shapes are fixed
before anything is read back) but treats them as rejected without a residual, drawing from its own p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model_runner import Chunk, DeviceTokens, ModelRunner
from .sampler import Sampler, token_probs
from .sequence import Sequence


@dataclass
class Proposal:
    """The drafts of a step's speculating sequences, on the device. Sequence b drafted `lookahead[b]`
    tokens, `tokens[b, :lookahead[b]]`, each drawn from `probs[b, i]` (q_{i+1}); the first `valid[b]` count."""

    seqs: list[Sequence]
    lookahead: list[int]
    tokens: torch.Tensor  # int64 [B, k_max]
    probs: torch.Tensor  # float32 [B, k_max, V]
    valid: torch.Tensor  # int64 [B]
    generators: list[torch.Generator | None]

    def device_tokens(self, rows: list[int]) -> DeviceTokens:
        """The drafts as the inputs of a verify pass whose packed rows for them are `rows`, in order."""
        b, i = self._draft_index()
        return DeviceTokens(rows, self.tokens[b, i])

    def _draft_index(self) -> tuple[list[int], list[int]]:
        pairs = [(b, i) for b, k in enumerate(self.lookahead) for i in range(k)]
        return [b for b, _ in pairs], [i for _, i in pairs]


class SpecDecoder:
    """Drafts with `draft` and verifies against the target's logits. A draft forward never takes more than
    `max_batched_tokens` tokens (the step budget the engine's memory was sized for): the catch-up on
    prompts that finished prefilling together is cut into forwards of at most that many."""

    def __init__(self, draft: ModelRunner, sampler: Sampler, *, p_min: float = 0.0, min_drafts: int = 1,
                 max_batched_tokens: int = 2048):
        self.draft = draft
        self.sampler = sampler
        self.p_min = p_min
        self.min_drafts = min_drafts
        self.max_batched_tokens = max_batched_tokens

    def _catch_up(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feed the draft every token its cache lacks up to each sequence's last; logits at that last token
        [len(seqs), V], in forwards of at most `max_batched_tokens` tokens."""
        budget = self.max_batched_tokens
        pieces = []
        for seq in seqs:
            start = seq.spec.draft_computed
            tokens = seq.token_ids[start:]
            for i in range(0, len(tokens), budget):
                pieces.append(Chunk(seq, start + i, tokens[i : i + budget], int(i + budget >= len(tokens))))
        logits, run, size = [], [], 0
        for piece in pieces:  # in order: a sequence's pieces reach the draft's cache before the next needs them
            if run and size + len(piece.tokens) > budget:
                logits.append(self.draft.run(run))
                run, size = [], 0
            run.append(piece)
            size += len(piece.tokens)
        logits.append(self.draft.run(run))
        return torch.cat(logits)

    def propose(self, seqs: list[Sequence], lookahead: list[int],
                generators: list[torch.Generator | None]) -> Proposal:
        """lookahead[b] draft tokens for each sequence (at least one each), sampled on the device."""
        k_max, n = max(lookahead), len(seqs)
        device = self.draft.device
        tokens = torch.zeros(n, k_max, dtype=torch.int64, device=device)
        probs = torch.zeros(n, k_max, self.draft.config.vocab_size, device=device)
        valid = torch.zeros(n, dtype=torch.int64, device=device)
        confident = torch.ones(n, dtype=torch.bool, device=device)  # every draft distribution so far was
        logits = self._catch_up(seqs)
        for j in range(k_max):
            rows = [b for b in range(n) if lookahead[b] > j]
            index = torch.tensor(rows, device=device)
            if j:
                logits = self.draft.run([Chunk(seqs[b], seqs[b].num_tokens + j - 1, [0], 1) for b in rows],
                                        DeviceTokens(list(range(len(rows))), tokens[index, j - 1]))
            else:
                logits = logits[index]
            for b in rows:
                seqs[b].spec.draft_computed = seqs[b].num_tokens + j
            q = token_probs(logits, [seqs[b].params for b in rows], [seqs[b].prompt_token_ids for b in rows],
                            [seqs[b].output_token_ids for b in rows],
                            (tokens[index, :j], torch.ones(len(rows), j, dtype=torch.bool, device=device)))
            tokens[index, j] = self.sampler.race(q, [generators[b] for b in rows])
            probs[index, j] = q
            valid[index] += confident[index].long()
            if self.p_min > 0:  # the draft's own confidence in the distribution it just drew from
                confident[index] &= torch.softmax(logits.float(), dim=1).amax(dim=1) >= self.p_min
        if self.min_drafts > 1:
            valid = torch.where(valid >= self.min_drafts, valid, 0)
        return Proposal(seqs, lookahead, tokens, probs, valid, generators)

    def verify(self, proposal: Proposal, target_logits: torch.Tensor) -> torch.Tensor:
        """The outcome of each sequence's verification, on the device: float64 [B, 2 + k_max + 1] rows of
        (m accepted drafts, drafts taken, then m + 1 tokens: the accepted drafts and one token of the target's).

        target_logits: the target's logits at the last token and at each draft position, sequence after
        sequence ([sum of lookahead + 1, V]).
        """
        seqs, lookahead = proposal.seqs, proposal.lookahead
        n, k_max = len(seqs), max(lookahead)
        device = target_logits.device
        # Row r of the target's logits: sequence rb[r], after ri[r] of its drafts.
        rb = [b for b, k in enumerate(lookahead) for _ in range(k + 1)]
        ri = [i for k in lookahead for i in range(k + 1)]
        rb_t, ri_t = torch.tensor(rb, device=device), torch.tensor(ri, device=device)
        before = torch.arange(k_max, device=device)[None, :] < ri_t[:, None]
        p = token_probs(target_logits, [seqs[b].params for b in rb], [seqs[b].prompt_token_ids for b in rb],
                        [seqs[b].output_token_ids for b in rb], (proposal.tokens[rb_t], before))
        # Draft i + 1 of sequence b is judged at row start[b] + i: accept it with probability min(1, p / q).
        db, di = proposal._draft_index()
        start = [0]
        for k in lookahead[:-1]:
            start.append(start[-1] + k + 1)
        draft_rows = torch.tensor([start[b] + i for b, i in zip(db, di)], device=device)
        db_t, di_t = torch.tensor(db, device=device), torch.tensor(di, device=device)
        d = proposal.tokens[db_t, di_t]
        p_d = p[draft_rows].gather(1, d[:, None])[:, 0]
        q_d = proposal.probs[db_t, di_t].gather(1, d[:, None])[:, 0]
        u = self.sampler.uniform(len(db), device, [proposal.generators[b] for b in db])
        accept = torch.zeros(n, k_max, dtype=torch.bool, device=device)
        accept[db_t, di_t] = (u * q_d < p_d) & (di_t < proposal.valid[db_t])  # u < p / q without dividing by q = 0
        m = accept.long().cumprod(dim=1).sum(dim=1)  # drafts accepted before the first rejection
        # The last token comes from p at row start + m: the residual max(0, p - q) after a real rejection,
        # p itself after all drafts taken were accepted (or when p == q leaves no residual mass).
        final = p[torch.tensor(start, device=device) + m]
        rejected = m < proposal.valid
        q_at = proposal.probs[torch.arange(n, device=device), m.clamp_max(k_max - 1)]
        residual = (final - q_at).clamp_min(0)
        use_residual = rejected & (residual.sum(dim=1) > 0)
        final = torch.where(use_residual[:, None], residual, final)
        last = self.sampler.race(final, proposal.generators)
        gained = torch.cat([proposal.tokens, torch.zeros(n, 1, dtype=torch.int64, device=device)], dim=1)
        gained.scatter_(1, m[:, None], last[:, None])
        return torch.cat([m[:, None], proposal.valid[:, None], gained], dim=1).double()
