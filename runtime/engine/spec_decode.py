"""Speculative decoding: a draft model proposes tokens, the target checks them all in one pass.

Per decoding sequence with lookahead k: the draft first catches up on the tokens its cache lacks (the
whole prompt on the first step) and proposes d_1 from its distribution q_1, then feeds d_i to propose
d_{i+1}, up to k tokens (fewer when its top probability falls below `p_min`). The target scores the
last token and the drafts in one forward, giving p_1 .. p_{k+1}. Draft d_i is accepted with probability
min(1, p_i(d_i) / q_i(d_i)); at the first rejection the token is drawn from the residual
max(0, p_i - q_i) (renormalized), and if every draft is accepted a bonus token is drawn from p_{k+1}
(Leviathan et al. 2023; Chen et al. 2023): the output follows the target's distribution exactly. Both
p and q are the distributions the sampler would draw from (penalties over the tokens before each
position, temperature, top-k, top-p, min-p); for greedy requests they are one-hot, so acceptance is
prefix matching against the target's argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model_runner import Chunk, ModelRunner
from .sampler import Sampler, token_probs
from .sequence import Sequence


@dataclass
class Proposal:
    drafts: list[int]
    probs: torch.Tensor  # [len(drafts), V]: q_i, the draft's distribution each d_i was drawn from


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
            start = seq.num_draft_computed_tokens
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
                generators: list[torch.Generator | None]) -> list[Proposal]:
        """Up to lookahead[i] draft tokens for each sequence, from the draft model."""
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        active = list(range(len(seqs)))
        step = 0
        while active:
            if step == 0:  # everything the draft's cache lacks, up to the last (uncomputed) token
                logits = self._catch_up(seqs)
            else:
                logits = self.draft.run([Chunk(seqs[i], seqs[i].num_tokens + step - 1, drafts[i][-1:], 1)
                                         for i in active])
            for i in active:
                seqs[i].num_draft_computed_tokens = seqs[i].num_tokens + step
            q = token_probs(logits, [seqs[i].params for i in active], [seqs[i].prompt_token_ids for i in active],
                            [seqs[i].output_token_ids + drafts[i] for i in active])
            tokens = self.sampler.race(q, [generators[i] for i in active]).tolist()
            top = torch.softmax(logits, dim=1).amax(dim=1).tolist()  # the draft's own confidence
            still = []
            for row, i in enumerate(active):
                drafts[i].append(tokens[row])
                probs[i].append(q[row])
                if len(drafts[i]) < lookahead[i] and top[row] >= self.p_min:
                    still.append(i)
            active = still
            step += 1
        out = []
        for d, p in zip(drafts, probs):
            if len(d) < self.min_drafts:
                d, p = [], []
            out.append(Proposal(d, torch.stack(p) if p else torch.empty(0)))
        return out

    def verify(self, seqs: list[Sequence], proposals: list[Proposal], target_logits: torch.Tensor,
               generators: list[torch.Generator | None]) -> list[list[int]]:
        """The tokens each sequence gains: its accepted drafts, then one token from the target.

        target_logits: the target's logits at the last token and at each draft, sequence after sequence
        ([sum of len(drafts) + 1, V]).
        """
        params, prompts, histories, gens, draft_rows = [], [], [], [], []
        for seq, prop, g in zip(seqs, proposals, generators):
            draft_rows += range(len(params), len(params) + len(prop.drafts))
            for i in range(len(prop.drafts) + 1):
                params.append(seq.params)
                prompts.append(seq.prompt_token_ids)
                histories.append(seq.output_token_ids + prop.drafts[:i])
                gens.append(g)
        p = token_probs(target_logits, params, prompts, histories)
        device = p.device
        accept = torch.zeros(len(params), dtype=torch.bool, device=device)
        if draft_rows:
            idx = torch.tensor(draft_rows, device=device)
            draft_tokens = torch.tensor([t for prop in proposals for t in prop.drafts], device=device)
            q = torch.cat([prop.probs for prop in proposals if prop.drafts]).to(device)
            p_d = p[idx].gather(1, draft_tokens[:, None])[:, 0]
            q_d = q.gather(1, draft_tokens[:, None])[:, 0]
            u = self.sampler.uniform(len(params), device, gens)[idx]
            accept[idx] = u * q_d < p_d  # u < p / q without dividing by a zero q
        accepted = accept.tolist()
        # Per sequence: the first rejected row, or its last row (the bonus position) when all pass.
        final_rows, counts, row = [], [], 0
        for prop in proposals:
            n = len(prop.drafts)
            a = next((i for i in range(n) if not accepted[row + i]), n)
            final_rows.append(row + a)
            counts.append(a)
            row += n + 1
        last = torch.tensor(final_rows, device=device)
        dist = p[last]
        rejected = [i for i, (a, prop) in enumerate(zip(counts, proposals)) if a < len(prop.drafts)]
        if rejected:
            q_rows = torch.stack([proposals[i].probs[counts[i]] for i in rejected]).to(device)
            residual = (dist[rejected] - q_rows).clamp_min(0)
            # p == q leaves no residual mass: the target's own distribution is then the right one.
            empty = residual.sum(dim=1, keepdim=True) <= 0
            dist[rejected] = torch.where(empty, dist[rejected], residual)
        final = self.sampler.race(dist, [gens[r] for r in final_rows]).tolist()
        return [prop.drafts[:a] + [x] for prop, a, x in zip(proposals, counts, final)]
