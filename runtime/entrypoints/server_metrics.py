"""The server's Prometheus metrics: engine gauges and counters read at scrape time, latency histograms
observed by the front end as tokens reach it (what a client sees, less the network)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..engine.engine_loop import LoopStats

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class _EngineCollector:
    """Collects from the engine loop's last published `LoopStats` (None while the model loads)."""

    def __init__(self, stats: Callable[[], LoopStats | None]):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats() or LoopStats()
        yield GaugeMetricFamily("ggtriton:num_requests_running", "Requests in the running batch", s.running)
        yield GaugeMetricFamily("ggtriton:num_requests_waiting", "Requests waiting to run", s.waiting)
        yield GaugeMetricFamily("ggtriton:kv_cache_pages_used", "KV cache pages in use", s.pages_used)
        yield GaugeMetricFamily("ggtriton:kv_cache_pages_total", "KV cache pages in all", s.pages_total)
        yield GaugeMetricFamily("ggtriton:kv_cache_usage_ratio", "Share of the KV cache pages in use",
                                s.pages_used / s.pages_total if s.pages_total else 0.0)
        yield CounterMetricFamily("ggtriton:engine_steps", "Engine steps run", s.steps)
        yield CounterMetricFamily("ggtriton:num_preemptions", "Sequences preempted for lack of pages",
                                  s.preemptions)
        yield CounterMetricFamily("ggtriton:spec_decode_draft_tokens", "Draft tokens proposed", s.draft_tokens)
        yield CounterMetricFamily("ggtriton:spec_decode_accepted_tokens", "Draft tokens accepted",
                                  s.accepted_tokens)
        yield GaugeMetricFamily("ggtriton:spec_decode_acceptance_ratio", "Accepted over proposed draft tokens",
                                s.accepted_tokens / s.draft_tokens if s.draft_tokens else 0.0)


class ServerMetrics:
    """One registry per server, so that servers in one process do not share counters."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, stats: Callable[[], LoopStats | None]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        r = self.registry
        self.prompt_tokens = Counter("ggtriton:prompt_tokens", "Prompt tokens of requests admitted", registry=r)
        self.generation_tokens = Counter("ggtriton:generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("ggtriton:request_success", "Requests finished, by reason", ["finished_reason"],
                                registry=r)
        self.ttft = Histogram("ggtriton:time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("ggtriton:inter_token_latency_seconds", "Time between two tokens of a request",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("ggtriton:e2e_request_latency_seconds", "Time from arrival to the last token",
                             buckets=_LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
