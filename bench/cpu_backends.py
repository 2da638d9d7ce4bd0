"""Single-stream CPU speed of ggtriton's CPU backends beside llama-bench, back to back, on one GGUF.

    python bench/cpu_backends.py MODEL [--llama-bench PATH] [-t 2] [--reps 3]

Per round: llama-bench pp512 / tg128 (when its binary is given), then for each backend ("torch": float32 reference
ops; "cpu": packed int4 / bfloat16 weights) the prompt rate of one 512-token prompt (one prefill step and the
first token: the last row's logits only, as llama-bench's pp512) and the decode rate of 64 greedy tokens after an
8-token prompt. Prefix caching is off, so every round computes its prompt. Prints the median of the rounds: the
machine may be shared, so each engine is timed right beside the others.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import torch

from ggtriton.runtime import LLM, SamplingParams


def ggtriton_rates(llm: LLM, prompt: list[int], n: int) -> tuple[float, float]:
    """(prompt tokens/s, decode tokens/s) of one request."""
    start = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    pp = len(prompt) / (time.perf_counter() - start)
    out = llm.generate([prompt[:8]], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    m = out.metrics
    return pp, (n - 1) / (m["last_token"] - m["first_token"])


def llama_bench(binary: str, model: str, threads: int) -> tuple[float, float]:
    out = subprocess.run([binary, "-m", model, "-t", str(threads), "-p", "512", "-n", "128", "-r", "1", "-o", "json"],
                         check=True, capture_output=True, text=True).stdout
    rates = {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in json.loads(out)}
    return rates["pp"], rates["tg"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--llama-bench", default=None)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--backends", default="torch,cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    backends = args.backends.split(",")
    llms = {b: LLM(args.model, device="cpu", backend=b, max_num_seqs=1, kv_cache_bytes=1 << 28,
                   enable_prefix_caching=False) for b in backends}
    prompt = list(range(100, 612))
    for llm in llms.values():  # packs and warms every path once
        ggtriton_rates(llm, prompt, 4)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in [*backends, "llama.cpp"]}
    for _ in range(args.reps):
        if args.llama_bench:
            results["llama.cpp"].append(llama_bench(args.llama_bench, args.model, args.threads))
        for b, llm in llms.items():
            results[b].append(ggtriton_rates(llm, prompt, 64))
    print(f"{args.model}, {args.threads} threads, median of {args.reps} rounds, torch {torch.__version__}")
    print("| engine | pp512 tokens/s | decode tokens/s |\n|---|---:|---:|")
    for name, rs in results.items():
        if rs:
            print(f"| {name} | {statistics.median(r[0] for r in rs):.1f} | {statistics.median(r[1] for r in rs):.1f} |")


if __name__ == "__main__":
    main()
