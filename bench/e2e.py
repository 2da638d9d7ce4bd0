"""End-to-end engine on a GPU: an 8B-shaped random-weight GGUF, decoding against the bandwidth limit,
throughput under concurrency, and the cost and payoff of speculative decoding.

    python bench/e2e.py [--type Q4_K] [--layers 32] [--out-dir /tmp]

Writes (once, on the machine) Llama-3-8B-shaped models with random weights in GGUF blocks: the target
(32 layers, hidden 4096, 32/8 heads, FFN 14336, vocabulary 128256) and a draft of about a tenth of its
bytes (same vocabulary, 2 layers). Then, in one run with the copy bandwidth measured beside it:
- batch-1 decode tokens/s against the limit copy bandwidth / model bytes (every weight byte read once
  per token);
- `ggtriton bench` throughput at 1, 16, 64 and 256 concurrent requests (128-token prompts, 128 tokens out);
- speculative decoding: the time of one target pass over k + 1 tokens against one decode step (batch 1),
  the draft's step time, and from them the batch-1 speed-up at acceptance rates 0.5, 0.7 and 0.9 (with
  acceptance a, a step yields (1 - a^(k+1)) / (1 - a) tokens for k draft steps and one verify pass); the
  mechanism itself is measured end to end with the target drafting for itself (acceptance 1).
Prints a table and appends it to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ggtriton.gguf import GGMLType
from ggtriton.runtime import LLM, SamplingParams
from ggtriton.runtime.engine.model_runner import Chunk
from ggtriton.runtime.engine.sequence import Sequence
from ggtriton.runtime.entrypoints.bench import random_requests, run_bench
from ggtriton.runtime.synthetic import SyntheticModel, write_synthetic_model
from gpu_timing import append_results, copy_gbps, heading, median_ms, require_gpu

LLAMA3_8B = dict(n_layers=32, hidden=4096, n_heads=32, n_kv_heads=8, head_dim=128, ffn=14336, vocab=128256,
                 context_length=8192, rope_base=500000.0)
CONCURRENCY = (1, 16, 64, 256)
K = 4
# KV caches sized explicitly, so the target, the draft and the self-drafting engine fit side by side:
# 256 sequences of 256 tokens at 128 KiB per token (bf16, 32 layers x 8 KV heads x 128) need 8 GiB.
TARGET_KV_BYTES, DRAFT_KV_BYTES = 12 << 30, 1 << 30


def model_file(out_dir: Path, name: str, m: SyntheticModel) -> Path:
    path = out_dir / f"{name}.gguf"
    if not path.exists():
        write_synthetic_model(path, m)
    return path


def decode_tokens_per_s(llm: LLM, n: int = 128) -> float:
    out = llm.generate([list(range(100, 132))], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                       use_tqdm=False)[0]
    m = out.metrics
    return (n - 1) / (m["last_token"] - m["first_token"])


def pass_ms(llm: LLM, runner, n_tokens: int, context: int = 256) -> float:
    """Median ms of one forward of `n_tokens` new tokens of one sequence after `context` cached ones."""
    seq = Sequence("timing", list(range(context + n_tokens)), SamplingParams())
    pages = -(-(context + n_tokens) // llm.block_size)
    # Pages written outside the engine's books: the engine is idle and not used for generation after this.
    seq.block_table = list(range(pages))
    chunk = Chunk(seq, context, seq.token_ids[context:], n_tokens)
    runner.run([chunk])  # compile and autotune outside the timing
    return median_ms(lambda: runner.run([chunk]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--type", default="Q4_K", help="weight type of the linear layers")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--out-dir", default="/tmp")
    args = parser.parse_args()
    require_gpu("bench/e2e.py")
    wt = GGMLType[args.type]
    out_dir = Path(args.out_dir)
    target_path = model_file(out_dir, f"llama8b-{args.type}-{args.layers}l",
                             SyntheticModel("llama", weight_type=wt, **(LLAMA3_8B | {"n_layers": args.layers})))
    draft_path = model_file(out_dir, f"llama8b-{args.type}-draft",
                            SyntheticModel("llama", weight_type=wt, seed=1, **(LLAMA3_8B | {"n_layers": 2})))
    copy = copy_gbps()
    model_bytes = target_path.stat().st_size
    rows = []

    llm = LLM(target_path, max_num_seqs=max(CONCURRENCY), kv_cache_bytes=TARGET_KV_BYTES)
    limit = copy * 1e9 / model_bytes
    tps = decode_tokens_per_s(llm)
    rows.append(f"| batch-1 decode | {tps:.1f} tokens/s | limit {limit:.1f} tokens/s ({model_bytes / 1e9:.2f} GB "
                f"at {copy:.0f} GB/s) | {tps / limit:.0%} of the limit |")
    for n in CONCURRENCY:
        r = run_bench(llm, random_requests(llm, n, input_len=128, output_len=128, seed=n))
        rows.append(f"| {n} concurrent | {r['output_tokens_per_s']:.0f} output tokens/s | "
                    f"{r['total_tokens_per_s']:.0f} total tokens/s | TTFT p50 {r['ttft_ms']['p50']:.0f} ms, "
                    f"ITL p50 {r['itl_ms']['p50']:.1f} ms |")

    runner = llm.engine.runner
    decode, verify = pass_ms(llm, runner, 1), pass_ms(llm, runner, K + 1)
    draft_llm = LLM(draft_path, max_num_seqs=1, kv_cache_bytes=DRAFT_KV_BYTES)
    draft_step = pass_ms(draft_llm, draft_llm.engine.runner, 1)
    rows.append(f"| verify {K + 1} tokens | {verify:.2f} ms | one decode step {decode:.2f} ms | "
                f"{verify / decode:.2f}x a step; draft step {draft_step:.2f} ms |")
    for a in (0.5, 0.7, 0.9):
        tokens_per_step = (1 - a ** (K + 1)) / (1 - a)
        speedup = tokens_per_step * decode / (verify + K * draft_step)
        rows.append(f"| acceptance {a} | {tokens_per_step:.2f} tokens per step | modelled speed-up {speedup:.2f}x | "
                    f"k = {K}, draft {draft_path.stat().st_size / model_bytes:.0%} of the target's bytes |")
    del llm, draft_llm
    torch.cuda.empty_cache()
    self_spec = LLM(target_path, draft_model=target_path, num_speculative_tokens=K, max_num_seqs=1,
                    kv_cache_bytes=TARGET_KV_BYTES)
    start = time.perf_counter()
    out = self_spec.generate([list(range(100, 132))], SamplingParams(max_tokens=128, temperature=0, ignore_eos=True),
                             use_tqdm=False)[0]
    spec_tps = len(out.token_ids) / (time.perf_counter() - start)
    rows.append(f"| target drafting for itself | {spec_tps:.1f} tokens/s | acceptance "
                f"{out.metrics['acceptance_rate']:.0%} | mechanism overhead vs batch-1 decode: {tps / spec_tps:.2f}x |")

    lines = ["", heading(f"End to end, Llama-3-8B shapes, random {args.type} weights"), "",
             "| measurement | value | reference | ratio |", "|---|---|---|---|", *rows]
    append_results("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
