"""Prometheus metrics of one server (its own registry, so several servers never mix)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from softprompt.engine import Completion, Engine

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _EngineCollector:
    """Prefix-cache and queue figures read from the engine at scrape time."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        yield CounterMetricFamily("softprompt_prefix_cache_hits", "KV prefix cache hits",
                                  value=s["prefix_hits"])
        yield CounterMetricFamily("softprompt_prefix_cache_misses",
                                  "KV prefixes computed (first use or after eviction)",
                                  value=s["prefix_misses"])
        yield CounterMetricFamily("softprompt_prefix_cache_evictions",
                                  "KV prefixes evicted to stay within the budget",
                                  value=s["prefix_evictions"])
        yield GaugeMetricFamily("softprompt_prefix_cache_bytes", "Bytes of cached KV prefixes",
                                value=s["prefix_bytes"])
        yield GaugeMetricFamily("softprompt_requests_running", "Rows in the decoding batch",
                                value=s["running"])
        yield GaugeMetricFamily("softprompt_requests_waiting", "Requests waiting for a row",
                                value=s["waiting"])


class ServerMetrics:
    """Request counts, latencies, throughput and batch sizes, by prompt."""

    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("softprompt_requests", "Finished requests",
                                ["prompt", "endpoint", "status"], registry=r)
        self.queue = Histogram("softprompt_queue_seconds", "Submitted to prefill",
                               ["prompt"], buckets=_SECONDS, registry=r)
        self.ttft = Histogram("softprompt_time_to_first_token_seconds",
                              "Submitted to first token", ["prompt"], buckets=_SECONDS,
                              registry=r)
        self.tokens = Counter("softprompt_generated_tokens", "Generated tokens", ["prompt"],
                              registry=r)
        self.tokens_per_s = Histogram("softprompt_tokens_per_second",
                                      "Generated tokens per second of each request",
                                      ["prompt"], registry=r,
                                      buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
        self.batch_size = Histogram("softprompt_batch_size", "Rows in each decoding step",
                                    registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        r.register(_EngineCollector(engine))

    def record(self, prompt: str, endpoint: str, completion: Completion | None) -> None:
        if completion is None:
            self.requests.labels(prompt, endpoint, "cancelled").inc()
            return
        status = "error" if completion.finish_reason == "error" else "ok"
        self.requests.labels(prompt, endpoint, status).inc()
        if status == "error":
            return
        self.queue.labels(prompt).observe(completion.queue_seconds)
        self.ttft.labels(prompt).observe(completion.first_token_seconds)
        n = len(completion.token_ids)
        self.tokens.labels(prompt).inc(n)
        decoding = completion.seconds - completion.first_token_seconds
        if n > 1 and decoding > 0:
            self.tokens_per_s.labels(prompt).observe((n - 1) / decoding)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
