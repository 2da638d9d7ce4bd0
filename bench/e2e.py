"""End-to-end engine on a GPU: an 8B-shaped random-weight GGUF, decoding against the bandwidth limit,
throughput under concurrency, and the cost and payoff of speculative decoding.

    python bench/e2e.py [--type Q4_K] [--layers 32] [--out-dir /tmp]

Writes (once, on the machine) Llama-3-8B-shaped models with random weights in GGUF blocks: the target
(32 layers, hidden 4096, 32/8 heads, FFN 14336, vocabulary 128256, untied output) and a draft of about a
tenth of its bytes (same vocabulary, 2 layers). Then, in one run with the copy bandwidth measured beside it:
- batch-1 decode tokens/s against the limit copy bandwidth / model bytes (every weight byte read once
  per token), and the prefill of one 512-token prompt (llama-bench's pp512);
- the kernels one eager decode step launches (Triton's, and all of the GPU's by the torch profiler);
- `ggtriton bench` throughput at 1, 16, 64 and 256 concurrent requests (128-token prompts, 128 tokens out);
- speculative decoding: the time of one target pass over k + 1 tokens against one decode step (batch 1),
  the draft's step time, and from them the batch-1 speed-up at acceptance rates 0.5, 0.7 and 0.9 (with
  acceptance a, a step yields (1 - a^(k+1)) / (1 - a) tokens for k draft steps and one verify pass); the
  mechanism itself is measured end to end with the target drafting for itself (acceptance 1).
Prints a table and appends it to bench/RESULTS.md. `bench/gpu_check.py` runs the same measurements.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ggtriton.gguf import GGMLType
from ggtriton.runtime import LLM, SamplingParams
from ggtriton.runtime.engine.model_runner import Chunk
from ggtriton.runtime.engine.sequence import Sequence
from ggtriton.runtime.entrypoints.bench import random_requests, run_bench
from ggtriton.runtime.synthetic import SyntheticModel, write_synthetic_model
from gpu_timing import append_results, copy_gbps, count_launches, gpu_kernels, heading, median_ms, require_gpu

LLAMA3_8B = dict(n_layers=32, hidden=4096, n_heads=32, n_kv_heads=8, head_dim=128, ffn=14336, vocab=128256,
                 context_length=8192, rope_base=500000.0, tie_embeddings=False)
PROMPT = list(range(1, 33))  # 32 tokens that any vocabulary has


@dataclass
class Plan:
    """What to measure. KV caches are sized explicitly, so the target, the draft and the self-drafting
    engine fit side by side: 256 sequences of 256 tokens at 128 KiB per token (bf16, 32 layers x 8 KV
    heads x 128) need 8 GiB."""

    concurrency: tuple[int, ...] = (1, 16, 64, 256)
    prompt_len: int = 128
    output_len: int = 128
    decode_tokens: int = 128
    prefill_tokens: int = 512
    k: int = 4
    target_kv_bytes: int = 12 << 30
    draft_kv_bytes: int = 1 << 30


def model_file(out_dir: Path, name: str, m: SyntheticModel) -> Path:
    """`out_dir`/`name`.gguf, written unless there; through a temporary name, so that a run killed while
    writing never leaves a truncated file for the next one."""
    path = out_dir / f"{name}.gguf"
    if not path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        write_synthetic_model(tmp, m)
        tmp.rename(path)
    return path


def decode_tokens_per_s(llm: LLM, n: int) -> float:
    out = llm.generate([PROMPT], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    m = out.metrics
    return (n - 1) / (m["last_token"] - m["first_token"])


def pass_ms(llm: LLM, n_tokens: int, context: int, n_logits: int) -> float | None:
    """Median ms of one forward of `n_tokens` new tokens of one sequence after `context` cached ones, with
    logits for the last `n_logits` (None without a GPU)."""
    llm.engine  # noqa: B018 - allocates the KV cache the runner writes into
    seq = Sequence("timing", [1 + i % 32 for i in range(context + n_tokens)], SamplingParams())
    # Pages written outside the engine's books: the engine is idle while this runs.
    seq.block_table = list(range(-(-(context + n_tokens) // llm.block_size)))
    chunk = Chunk(seq, context, seq.token_ids[context:], n_logits)
    llm.runner.run([chunk])  # compile and tune outside the timing
    return median_ms(lambda: llm.runner.run([chunk]))


def row(check: str, figure: str | None, ratio: str = "", why: str = "", value=None) -> dict:
    """A measurement; figure None: not measured, `why` says why."""
    return dict(check=check, figure=figure, ratio=ratio, why=why, value=value)


def measurements(target: Path, draft: Path, copy: float | None, plan: Plan, **llm_kwargs) -> Iterator[dict]:
    """The measurements, most telling first, each as soon as it is made."""
    no_timing = "timing needs CUDA"
    model_bytes = target.stat().st_size
    start = time.perf_counter()
    llm = LLM(target, max_num_seqs=max(plan.concurrency), kv_cache_bytes=plan.target_kv_bytes, **llm_kwargs)
    yield row("start-up (load, compile, tune, capture)", f"{time.perf_counter() - start:.1f} s")

    tps = decode_tokens_per_s(llm, plan.decode_tokens)
    limit = copy and copy * 1e9 / model_bytes
    yield row("batch-1 decode", f"{tps:.1f} tokens/s", limit and f"{tps / limit:.0%} of the limit {limit:.0f} tokens/s "
              f"({model_bytes / 1e9:.2f} GB at {copy:.0f} GB/s)", value=tps)
    prefill = pass_ms(llm, plan.prefill_tokens, 0, 1)
    yield (row(f"prefill {plan.prefill_tokens} tokens", None, why=no_timing) if prefill is None else
           row(f"prefill {plan.prefill_tokens} tokens", f"{plan.prefill_tokens / prefill * 1e3:.0f} tokens/s",
               value=plan.prefill_tokens / prefill * 1e3))

    # One eager decode step (graphs replay the same kernels), into a throwaway cache.
    def step() -> None:
        llm.runner.warm_up([], 1, [1])

    with count_launches() as launches:
        step()
    kernels = gpu_kernels(step)
    yield row("kernels per decode step", f"{sum(launches.values())} Triton launches",
              "" if kernels is None else f"{kernels} GPU kernels in all", value=dict(launches) | {"all": kernels})

    for n in plan.concurrency:
        r = run_bench(llm, random_requests(llm, n, input_len=plan.prompt_len, output_len=plan.output_len, seed=n))
        yield row(f"{n} concurrent", f"{r['output_tokens_per_s']:.0f} output tokens/s",
                  f"{r['total_tokens_per_s']:.0f} total tokens/s; TTFT p50 {r['ttft_ms']['p50']:.0f} ms, "
                  f"ITL p50 {r['itl_ms']['p50']:.1f} ms")

    k = plan.k
    decode, verify = pass_ms(llm, 1, 256, 1), pass_ms(llm, k + 1, 256, k + 1)
    draft_llm = LLM(draft, max_num_seqs=1, kv_cache_bytes=plan.draft_kv_bytes, **llm_kwargs)
    draft_step = pass_ms(draft_llm, 1, 256, 1)
    if None in (decode, verify, draft_step):
        yield row(f"verify {k + 1} tokens", None, why=no_timing)
    else:
        yield row(f"verify {k + 1} tokens", f"{verify:.2f} ms", f"{verify / decode:.2f}x a {decode:.2f} ms decode "
                  f"step; draft step {draft_step:.2f} ms")
        for a in (0.5, 0.7, 0.9):
            tokens_per_step = (1 - a ** (k + 1)) / (1 - a)
            speedup = tokens_per_step * decode / (verify + k * draft_step)
            yield row(f"speculation at acceptance {a}", f"{speedup:.2f}x modelled speed-up",
                      f"{tokens_per_step:.2f} tokens per step, k = {k}, draft "
                      f"{draft.stat().st_size / model_bytes:.0%} of the target's bytes")
    del llm, draft_llm
    gc.collect()  # the engines' reference cycles hold their KV caches and graph pools
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    # A draft as costly as the target never pays: the adaptive rule would not draft, so k is fixed here.
    self_spec = LLM(target, draft_model=target, num_speculative_tokens=k, max_num_seqs=1,
                    adaptive_speculation=False, kv_cache_bytes=plan.target_kv_bytes, **llm_kwargs)
    start = time.perf_counter()
    out = self_spec.generate([PROMPT], SamplingParams(max_tokens=plan.decode_tokens, temperature=0, ignore_eos=True),
                             use_tqdm=False)[0]
    spec_tps = len(out.token_ids) / (time.perf_counter() - start)
    yield row("target drafting for itself", f"{spec_tps:.1f} tokens/s",
              f"acceptance {out.metrics['acceptance_rate']:.0%}; {tps / spec_tps:.2f}x the time of batch-1 decode")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--type", default="Q4_K", help="weight type of the linear layers")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--out-dir", default="/tmp")
    args = parser.parse_args()
    require_gpu("bench/e2e.py")
    wt = GGMLType[args.type]
    out_dir = Path(args.out_dir)
    target = model_file(out_dir, f"llama8b-{args.type}-{args.layers}l",
                        SyntheticModel("llama", weight_type=wt, **(LLAMA3_8B | {"n_layers": args.layers})))
    draft = model_file(out_dir, f"llama8b-{args.type}-draft",
                       SyntheticModel("llama", weight_type=wt, seed=1, **(LLAMA3_8B | {"n_layers": 2})))
    rows = [f"| {r['check']} | {r['figure']} | {r['ratio']} |" for r in measurements(target, draft, copy_gbps(), Plan())]
    lines = ["", heading(f"End to end, Llama-3-8B shapes, random {args.type} weights"), "",
             "| measurement | value | against |", "|---|---|---|", *rows]
    append_results("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
