"""`/metrics` in Prometheus' text format, named as vLLM names them, with `pagoda:` in front.

Two sources: the scheduler's figures (running, waiting, KV usage, prefix cache, preemptions),
which the tokenizers pass on to the `EngineClient` and which are read at scrape time (the
counters mirror the scheduler's own totals); and the requests this frontend serves (tokens,
finishes, latencies), recorded as their outputs go by. Every metric has vLLM's `model_name`
label. Each app has its own registry, so several apps can live in one process (tests).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from frontend.engine_client import EngineClient, EngineError
from protocol.messages import TextOutput

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST

# vLLM's buckets, so that its dashboards read these as they read its own.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


class _EngineCollector(Collector):
    """The scheduler's latest figures and the tokenizer pool's routing, read when scraped."""

    def __init__(self, client: EngineClient, model_name: str) -> None:
        self.client = client
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        s = self.client.scheduler_stats
        for name, doc, value in (
            ("num_requests_running", "Requests in the running batch.", s.num_running),
            ("num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting),
            ("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).", s.kv_cache_usage),
        ):
            gauge = GaugeMetricFamily(f"pagoda:{name}", doc, labels=["model_name"])
            gauge.add_metric([self.model_name], value)
            yield gauge
        for name, doc, value in (
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
            ("num_preemptions", "Requests preempted to free KV cache blocks.", s.num_preemptions),
            ("engine_views", "Engine views the scheduler built (only while /engine/stream is watched).",
             s.num_engine_views),
            # vLLM's speculative decoding counters.
            ("spec_decode_num_drafts", "Requests scheduled with draft tokens (one per request per step).",
             s.spec_num_drafts),
            ("spec_decode_num_draft_tokens", "Draft tokens scheduled.", s.spec_num_draft_tokens),
            ("spec_decode_num_accepted_tokens", "Draft tokens the target model kept.", s.spec_num_accepted_tokens),
        ):
            counter = CounterMetricFamily(f"pagoda:{name}", doc, labels=["model_name"])
            counter.add_metric([self.model_name], value)
            yield counter
        per_pos = CounterMetricFamily("pagoda:spec_decode_num_accepted_tokens_per_pos",
                                      "Draft tokens kept, by position in the draft.", labels=["model_name", "position"])
        for position, value in enumerate(s.spec_num_accepted_tokens_per_pos):
            per_pos.add_metric([self.model_name, str(position)], value)
        yield per_pos
        # What each process still holds: all 0 when the server is idle (the soak checks it).
        held = GaugeMetricFamily(
            "pagoda:requests_held", "Requests a process holds state for, by process.", labels=["model_name", "process"]
        )
        held.add_metric([self.model_name, "frontend"], self.client.num_in_flight)
        held.add_metric([self.model_name, "scheduler"], s.num_held)
        for tokenizer, count in sorted(self.client.tokenizer_held().items()):
            held.add_metric([self.model_name, tokenizer], count)
        yield held
        routed = CounterMetricFamily(
            "pagoda:tokenizer_requests", "Requests sent to each tokenizer.", labels=["model_name", "tokenizer"]
        )
        for tokenizer, count in sorted(self.client.requests_routed.items()):
            routed.add_metric([self.model_name, tokenizer], count)
        yield routed


class LiveLatency:
    """TTFT and inter-token latency of the streams this frontend serves, kept only while the
    engine view (/engine/stream) has a client (`watchers`), and its output tokens always (a sum)."""

    def __init__(self, max_samples: int = 8192) -> None:
        self.watchers = 0
        self.output_tokens = 0
        self.ttft: deque[tuple[float, float]] = deque(maxlen=max_samples)  # (when, seconds)
        self.itl: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def window(self, which: str, since: float) -> dict[str, float | int | None]:
        """Count, mean, p50 and p90 (seconds) of the `which` samples taken since `since`."""
        values = sorted(v for t, v in getattr(self, which) if t >= since)
        if not values:
            return {"count": 0, "mean": None, "p50": None, "p90": None}
        p50, p90 = (values[min(len(values) - 1, int(q * len(values)))] for q in (0.5, 0.9))
        return {"count": len(values), "mean": sum(values) / len(values), "p50": p50, "p90": p90}


class Metrics:
    def __init__(self, client: EngineClient, model_name: str) -> None:
        prometheus_client.disable_created_metrics()  # vLLM leaves the `_created` series out too
        self.registry = registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        self.prompt_tokens = Counter(
            "pagoda:prompt_tokens", "Prompt tokens of the requests served.", labels, registry=registry
        ).labels(model_name)
        self.generation_tokens = Counter(
            "pagoda:generation_tokens", "Tokens generated.", labels, registry=registry
        ).labels(model_name)
        self.request_success = Counter(
            "pagoda:request_success",
            "Finished samples (each of a request's n), by finish reason.",
            [*labels, "finished_reason"],
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "pagoda:time_to_first_token_seconds",
            "From a request's arrival to its first token.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=registry,
        ).labels(model_name)
        self.time_per_output_token = Histogram(
            "pagoda:time_per_output_token_seconds",
            "Time between a sample's consecutive tokens.",
            labels,
            buckets=TPOT_BUCKETS,
            registry=registry,
        ).labels(model_name)
        self.e2e_request_latency = Histogram(
            "pagoda:e2e_request_latency_seconds",
            "From a request's arrival to its end.",
            labels,
            buckets=E2E_BUCKETS,
            registry=registry,
        ).labels(model_name)
        registry.register(_EngineCollector(client, model_name))
        self.live = LiveLatency()

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)

    async def track(self, outputs: AsyncIterator[TextOutput], arrival: float, n: int) -> AsyncIterator[TextOutput]:
        """Pass `outputs` through, recording tokens, finishes and latencies on the way.

        Samples that had not finished when the consumer stopped (client gone) count as
        "abort"; a request the engine rejected counts nowhere.
        """
        first = True
        last_token_at: dict[int, float] = {}
        unfinished = set(range(n))
        rejected = False
        try:
            async for out in outputs:
                now = time.time()
                live = self.live if self.live.watchers else None
                if first:
                    first = False
                    self.time_to_first_token.observe(max(now - arrival, 0.0))
                    self.prompt_tokens.inc(out.prompt_tokens)
                    if live is not None:
                        live.ttft.append((now, max(now - arrival, 0.0)))
                previous = last_token_at.get(out.index)
                if previous is not None and out.token_ids:
                    self.time_per_output_token.observe((now - previous) / len(out.token_ids))
                    if live is not None:
                        live.itl.append((now, (now - previous) / len(out.token_ids)))
                last_token_at[out.index] = now
                self.generation_tokens.inc(len(out.token_ids))
                self.live.output_tokens += len(out.token_ids)
                if out.finish_reason is not None:
                    unfinished.discard(out.index)
                    self.request_success.labels(self.model_name, out.finish_reason).inc()
                yield out
        except EngineError:
            rejected = first
            raise
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]
            if not rejected:
                if unfinished:
                    self.request_success.labels(self.model_name, "abort").inc(len(unfinished))
                self.e2e_request_latency.observe(max(time.time() - arrival, 0.0))
