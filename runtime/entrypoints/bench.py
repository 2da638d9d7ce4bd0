"""`ggtriton bench`: offline throughput and latency of the engine on a set of requests.

All requests arrive at once (an offline batch); the report gives requests/s, output and total
tokens/s, time to first token (TTFT) and inter-token latency (ITL) percentiles.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..llm import LLM, Progress
from ..sampling_params import SamplingParams


@dataclass
class BenchRequest:
    prompt: str | list[int]
    output_len: int


def random_requests(llm: LLM, n: int, input_len: int, output_len: int, seed: int) -> list[BenchRequest]:
    """`n` prompts of random tokens (no special ones), lengths uniform in [input_len / 2, 3 input_len / 2]."""
    rng = random.Random(seed)
    special = set(llm.tokenizer.eos_token_ids) | {llm.tokenizer.bos_token_id}
    vocab = [t for t in range(llm.config.vocab_size) if t not in special]
    out = []
    for _ in range(n):
        length = rng.randint(max(1, input_len // 2), max(1, input_len * 3 // 2))
        out.append(BenchRequest([rng.choice(vocab) for _ in range(length)], output_len))
    return out


def jsonl_requests(path: str | Path, output_len: int) -> list[BenchRequest]:
    """Requests from a JSONL file of {"prompt": str, "max_tokens"?: int} lines."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{n}: each line must be an object with a string 'prompt'")
            out.append(BenchRequest(row["prompt"], int(row.get("max_tokens", output_len))))
    return out


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    p50, p90, p99 = np.percentile(np.asarray(values) * 1e3, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99)}


def run_bench(llm: LLM, requests: list[BenchRequest], seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Run every request at once and measure; `progress`: report output tokens on stderr as they come."""
    engine = llm.engine
    start = time.perf_counter()
    ids = [engine.add_request(r.prompt, SamplingParams(max_tokens=r.output_len, temperature=0.8, seed=seed + i,
                                                       ignore_eos=True))
           for i, r in enumerate(requests)]
    # Requests of one length finish together, at the end: progress counts output tokens.
    bar = Progress("bench", sum(r.output_len for r in requests), "output tokens") if progress else None
    done = {}
    while engine.has_unfinished():
        engine.step()
        for rid in ids:
            req = engine.requests[rid]
            if req.finished and rid not in done:
                done[rid] = req
        if bar:
            tokens = sum(engine.requests[rid].seq.num_output_tokens for rid in ids)
            bar.update(tokens, tokens)
    elapsed = time.perf_counter() - start
    if bar:
        bar.close()
    engine.pop_finished()
    reqs = [done[rid] for rid in ids]
    prompt_tokens = sum(r.seq.num_prompt_tokens for r in reqs)
    output_tokens = sum(r.seq.num_output_tokens for r in reqs)
    ttft = [r.token_times[0] - start for r in reqs if r.token_times]
    itl = [b - a for r in reqs for a, b in zip(r.token_times, r.token_times[1:])]
    return {
        "model": str(llm.path.name),
        "device": str(llm.device),
        "backend": llm.backend,
        "requests": len(reqs),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "elapsed_s": elapsed,
        "requests_per_s": len(reqs) / elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed,
        "ttft_ms": percentiles(ttft),
        "itl_ms": percentiles(itl),
        "steps": engine.num_steps,
        "preemptions": engine.scheduler.num_preemptions,
    } | _spec_metrics(reqs)


def _spec_metrics(reqs) -> dict[str, float]:
    """Decode steps per generated token (below 1 when speculation pays); with speculative decoding, the share
    of draft tokens accepted and tokens accepted per verify step."""
    tokens = sum(r.seq.num_output_tokens for r in reqs)
    out = {"steps_per_token": sum(r.decode_steps for r in reqs) / max(tokens, 1)}
    specs = [r.seq.spec for r in reqs]
    steps = sum(s.verify_steps for s in specs)
    if steps:
        out |= {"acceptance_rate": sum(s.accepted for s in specs) / max(sum(s.drafted for s in specs), 1),
                "mean_accepted_length": sum(s.accepted for s in specs) / steps}
    return out


def format_report(r: dict[str, Any]) -> str:
    return "\n".join([
        f"{r['model']} on {r['device']} ({r['backend']}): {r['requests']} requests, {r['prompt_tokens']} prompt + "
        f"{r['output_tokens']} output tokens in {r['elapsed_s']:.2f} s",
        f"  requests/s          {r['requests_per_s']:.2f}",
        f"  output tokens/s     {r['output_tokens_per_s']:.1f}",
        f"  total tokens/s      {r['total_tokens_per_s']:.1f}",
        "  TTFT ms             p50 {p50:.1f}  p90 {p90:.1f}  p99 {p99:.1f}".format(**r["ttft_ms"]),
        "  ITL ms              p50 {p50:.1f}  p90 {p90:.1f}  p99 {p99:.1f}".format(**r["itl_ms"]),
        f"  steps per token     {r['steps_per_token']:.3f}",
        *([f"  draft acceptance    {r['acceptance_rate']:.1%}, {r['mean_accepted_length']:.2f} tokens per step"]
          if "acceptance_rate" in r else []),
    ])
