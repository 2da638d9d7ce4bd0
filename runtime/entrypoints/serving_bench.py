"""`ggtriton bench --url`: measures a running OpenAI-compatible server over HTTP, as `vllm bench serve` does.

Requests go to /v1/completions, streamed, every one at once or with Poisson arrivals at `request_rate`, at most
`max_concurrency` in flight. Per request: time to first token (TTFT, from sending to the first text), the gaps
between text chunks (ITL) and time per output token after the first (TPOT); prompt and output token counts
come from the server's usage report. It speaks only HTTP, so one table compares ggtriton serve, llama-server
and vllm serve on the same workload.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

from .bench import BenchRequest, percentiles

# Words of one token each in common BPE vocabularies: random prompts of about `input_len` tokens.
_WORDS = ("the of and to in is was for on that with as by at from his her it an are were which be this has "
          "had not but or have one their new first been after who its also two they can year time all more "
          "other some would into city world state over most only when used people such school three then "
          "many made team part these life may film game well back where work later before between both").split()


def random_text_requests(n: int, input_len: int, output_len: int, seed: int) -> list[BenchRequest]:
    """`n` prompts of random words, lengths uniform in [input_len / 2, 3 input_len / 2] words."""
    rng = random.Random(seed)
    return [BenchRequest(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(max(1, input_len // 2),
                                                                              max(1, input_len * 3 // 2)))),
                         output_len) for _ in range(n)]


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)


async def _one(client, url: str, headers: dict[str, str], body: dict[str, Any]) -> RequestResult:
    result = RequestResult()
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = str(event["error"].get("message", event["error"]))
                    return result
                if event.get("usage"):
                    result.prompt_tokens = event["usage"]["prompt_tokens"]
                    result.output_tokens = event["usage"]["completion_tokens"]
                if any(c.get("text") for c in event.get("choices", [])):
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency = time.perf_counter() - start
    result.ok = True
    return result


async def _model_name(client, url: str, headers: dict[str, str]) -> str:
    r = await client.get(f"{url}/v1/models", headers=headers)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def run_serving_bench(url: str, requests: list[BenchRequest], *, request_rate: float = float("inf"),
                            max_concurrency: int | None = None, model: str | None = None, api_key: str | None = None,
                            temperature: float = 0.8, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Send every request and measure; request i samples with seed + i and ignores end-of-sequence, so that
    each produces its full `output_len`."""
    import httpx
    from tqdm import tqdm

    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_concurrency or len(requests) or 1)
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0), limits=limits) as client:
        model = model or await _model_name(client, url, headers)
        gate = asyncio.Semaphore(max_concurrency or len(requests) or 1)
        bar = tqdm(total=len(requests), desc="bench", unit="req", disable=not progress)

        async def send(i: int, req: BenchRequest) -> RequestResult:
            body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": temperature,
                    "seed": seed + i, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            async with gate:
                result = await _one(client, url, headers, body)
            bar.update()
            return result

        start = time.perf_counter()
        tasks = []
        for i, req in enumerate(requests):
            tasks.append(asyncio.create_task(send(i, req)))
            if request_rate != float("inf") and i + 1 < len(requests):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        bar.close()
    return serving_report(model, url, results, elapsed, request_rate, max_concurrency)


def serving_report(model: str, url: str, results: list[RequestResult], elapsed: float, request_rate: float,
                   max_concurrency: int | None) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "model": model, "url": url, "request_rate": request_rate, "max_concurrency": max_concurrency,
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "elapsed_s": elapsed,
        "requests_per_s": len(ok) / elapsed, "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed,
        "ttft_ms": percentiles([r.ttft for r in ok]), "tpot_ms": percentiles(tpot),
        "itl_ms": percentiles([g for r in ok for g in r.itl]),
        "e2e_ms": percentiles([r.latency for r in ok]),
    }


def format_serving_report(r: dict[str, Any]) -> str:
    rate = "all at once" if r["request_rate"] == float("inf") else f"Poisson, {r['request_rate']:g} requests/s"
    line = "  {name:<19} p50 {p50:.1f}  p90 {p90:.1f}  p99 {p99:.1f}"
    return "\n".join([
        f"{r['model']} at {r['url']} ({rate}): {r['completed']} of {r['requests']} requests completed, "
        f"{r['prompt_tokens']} prompt + {r['output_tokens']} output tokens in {r['elapsed_s']:.2f} s",
        *([f"  failed              {r['failed']}: {'; '.join(r['errors'])}"] if r["failed"] else []),
        f"  requests/s          {r['requests_per_s']:.2f}",
        f"  output tokens/s     {r['output_tokens_per_s']:.1f}",
        f"  total tokens/s      {r['total_tokens_per_s']:.1f}",
        line.format(name="TTFT ms", **r["ttft_ms"]),
        line.format(name="TPOT ms", **r["tpot_ms"]),
        line.format(name="ITL ms", **r["itl_ms"]),
        line.format(name="E2E ms", **r["e2e_ms"]),
    ])
