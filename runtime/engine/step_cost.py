"""How many drafts each sequence verifies: the choice that maximizes the batch's expected tokens per unit of
time, under a model of what a step costs. Plain Python, no torch.

A speculative step of B decoding sequences, sequence b verifying k_b drafts, runs max_j k_j draft steps (draft
step j over the sequences with k_b >= j) and one target pass over B + sum k_b tokens. Sequence b then gains
(1 - a_b^(k_b + 1)) / (1 - a_b) tokens in expectation at acceptance a_b: its j-th draft adds a_b^j. At batch 1
on a GPU the target's pass costs about one decode step whatever its few tokens (reading the weights dominates),
so drafting pays whenever the draft is cheap and often right. At batch 64 the verify pass's extra tokens are no
longer free (the step nears compute-bound), so the same acceptance may call for fewer drafts, or none.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field


def _interpolate(points: Sequence[tuple[int, float]], n: float) -> float:
    """Piecewise-linear through the points (sorted by n), flat below the first, extended along the last two
    beyond the last."""
    if len(points) == 1 or n <= points[0][0]:
        return points[0][1]
    i = min(max(bisect.bisect_left(points, (n, float("-inf"))), 1), len(points) - 1)
    (n0, t0), (n1, t1) = points[i - 1], points[i]
    return t0 + (t1 - t0) * (n - n0) / (n1 - n0)


@dataclass
class StepCost:
    """Step times as (tokens, time) points, in any one unit: `target` for the target's pass over that many
    tokens, `draft` for a draft decode step of that many sequences. The default models a step bound by the
    weights' bandwidth: a target pass costs 1 at any size, a draft step `draft_cost` (its share of the
    target's weight bytes). `LLM` replaces them with times measured at start-up on a GPU."""

    target: list[tuple[int, float]] = field(default_factory=lambda: [(1, 1.0)])
    draft: list[tuple[int, float]] = field(default_factory=lambda: [(1, 0.0)])

    @classmethod
    def weight_bound(cls, draft_cost: float) -> StepCost:
        return cls([(1, 1.0)], [(1, draft_cost)])

    def __post_init__(self) -> None:
        for name in ("target", "draft"):
            points = sorted(getattr(self, name))
            if not points or any(n <= 0 or t < 0 for n, t in points) or len({n for n, _ in points}) < len(points):
                raise ValueError(f"step costs: {name} needs distinct positive token counts and times >= 0, "
                                 f"got {points}")
            setattr(self, name, points)

    def target_time(self, tokens: float) -> float:
        return _interpolate(self.target, tokens)

    def draft_time(self, seqs: float) -> float:
        return _interpolate(self.draft, seqs) if seqs > 0 else 0.0


def choose_lookahead(acceptance: Sequence[float], caps: Sequence[int], cost: StepCost, other_tokens: int = 0
                     ) -> list[int]:
    """Drafts per decoding sequence (k_b <= caps[b]) for a step that also computes `other_tokens` prompt
    tokens: the choice with the most expected tokens per unit of time (prompt tokens count as work done: drafts
    that slow a step also slow the prompts in it), against none at all.

    Two greedy orders of all the drafts the caps allow, each sequence's in order: by expected gain a_b^j (deep
    drafts for the sequences that accept the most), and depth by depth with the likeliest sequences first
    (shallow drafts for many sequences, sharing the draft steps). The best prefix of either is taken, counting
    for each prefix the target's pass over every token and the draft steps over the sequences that reach them.
    """
    drafts = [(a ** j, j, b) for b, a in enumerate(acceptance) for j in range(1, caps[b] + 1)]
    base = len(acceptance) + other_tokens
    # step times by the drafts taken (target) and by the sequences reaching a depth (draft), looked up once
    target = [cost.target_time(base + n) for n in range(len(drafts) + 1)]
    draft = [cost.draft_time(n) for n in range(len(acceptance) + 1)]
    best_rate, best = base / max(target[0], 1e-12), []
    for order in (sorted(drafts, key=lambda d: (-d[0], d[1])), sorted(drafts, key=lambda d: (d[1], -d[0]))):
        rate, taken = _best_prefix(order, base, target, draft)
        if rate > best_rate:
            best_rate, best = rate, taken
    ks = [0] * len(acceptance)
    for _, j, b in best:
        ks[b] = max(ks[b], j)
    return ks


def _best_prefix(order: list[tuple[float, int, int]], base: int, target: list[float], draft: list[float]
                 ) -> tuple[float, list[tuple[float, int, int]]]:
    """The prefix of `order` (drafts (gain, depth, sequence)) with the most tokens per unit of time, and that
    rate: `base` tokens without drafts, target[n] the target's pass with n drafts, draft[n] a draft step of n
    sequences."""
    reach: list[int] = []  # reach[j - 1]: sequences drafting at least j tokens
    tokens = float(base)
    drafting = 0.0  # the draft steps' time
    best_rate, best_n = tokens / max(target[0], 1e-12), 0
    for n, (gain, j, _) in enumerate(order, start=1):
        if j > len(reach):
            reach.append(0)
        drafting += draft[reach[j - 1] + 1] - draft[reach[j - 1]]
        reach[j - 1] += 1
        tokens += gain
        rate = tokens / max(target[n] + drafting, 1e-12)
        if rate > best_rate:
            best_rate, best_n = rate, n
    return best_rate, order[:best_n]
