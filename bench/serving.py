"""The serving overhead: one workload through `LLM` directly and through `ggtriton serve` over loopback HTTP.

Both runs send every request at once, with the same token-id prompts, sampling settings and seeds, and
ignore end-of-sequence, so that both generate the same number of tokens; the engine is the same object, with
the prefix cache off so that no run finds another's pages. The two alternate `--repeats` times and the best
run of each counts. The difference in requests/s, TTFT and ITL is what the HTTP server (parsing, the engine
thread hand-off, streaming) costs.

    python bench/serving.py [-m model.gguf] [--device cuda] [--num-prompts 64] [--input-len 64] [--output-len 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import threading
import time

import torch
import uvicorn

from ggtriton.runtime.entrypoints.api_server import Server
from ggtriton.runtime.entrypoints.bench import random_requests, run_bench
from ggtriton.runtime.entrypoints.serving_bench import run_serving_bench
from ggtriton.runtime.llm import LLM


def serve_in_thread(server: Server) -> tuple[uvicorn.Server, threading.Thread, str]:
    http = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    while not http.started:
        time.sleep(0.02)
    server.loaded.wait()
    return http, thread, f"http://127.0.0.1:{http.servers[0].sockets[0].getsockname()[1]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None, help="GGUF file (default: the bundled SmolLM2)")
    p.add_argument("--device", default=None)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    llm = LLM(args.model, device=args.device, max_num_seqs=max(args.num_prompts, 1), enable_prefix_caching=False)
    requests = random_requests(llm, args.num_prompts, args.input_len, args.output_len, args.seed)
    run_bench(llm, requests[:2], seed=args.seed)  # first steps of each shape, outside both timings

    directs, serveds = [], []
    for _ in range(args.repeats):
        # The engine belongs to one thread at a time: a server's loop lives only while it serves.
        server = Server(lambda: llm, served_model_name="bench")
        http, thread, url = serve_in_thread(server)
        try:
            serveds.append(asyncio.run(run_serving_bench(url, requests, seed=args.seed)))
        finally:
            http.should_exit = True
            thread.join()
            server.loop.stop()
        directs.append(run_bench(llm, requests, seed=args.seed))
    direct = max(directs, key=lambda r: r["requests_per_s"])
    served = max(serveds, key=lambda r: r["requests_per_s"])

    assert served["completed"] == len(requests) and served["output_tokens"] == direct["output_tokens"]
    rows = [("requests/s", direct["requests_per_s"], served["requests_per_s"]),
            ("output tokens/s", direct["output_tokens_per_s"], served["output_tokens_per_s"]),
            ("TTFT p50 ms", direct["ttft_ms"]["p50"], served["ttft_ms"]["p50"]),
            ("TTFT p99 ms", direct["ttft_ms"]["p99"], served["ttft_ms"]["p99"]),
            ("ITL p50 ms", direct["itl_ms"]["p50"], served["itl_ms"]["p50"]),
            ("ITL p99 ms", direct["itl_ms"]["p99"], served["itl_ms"]["p99"])]
    if args.json:
        print(json.dumps({"direct": direct, "served": served}, indent=1))
        return
    device = torch.cuda.get_device_name(llm.device) if llm.device.type == "cuda" else platform.processor() or "cpu"
    print(f"{llm.path.name} on {llm.device} ({device}, {llm.backend}): {len(requests)} requests at once, "
          f"{direct['prompt_tokens']} prompt + {direct['output_tokens']} output tokens, torch {torch.__version__}")
    print("| measure | LLM (direct) | ggtriton serve (HTTP) | served / direct |")
    print("|---|---:|---:|---:|")
    for name, a, b in rows:
        print(f"| {name} | {a:.2f} | {b:.2f} | {b / a if a else float('nan'):.3f} |")


if __name__ == "__main__":
    main()
