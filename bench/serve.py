"""Workload S: the whole pipeline through HTTP, streaming, with Poisson arrivals.

Per request: TTFT (send to first token), TPOT ((end - first) / (tokens - 1)), and ITL (the
gaps between streamed chunks). Token counts come from the final usage chunk, so a chunk
that held back half a character is not miscounted.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.workloads import Req


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


async def _one(client: httpx.AsyncClient, url: str, model: str, req: Req) -> Result:
    body = {"model": model, "prompt": req.prompt_ids, "max_tokens": req.output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    itl: list[float] = []
    tokens = 0
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return Result(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                if first is None:
                    first = now
                else:
                    itl.append(now - last)
                last = now
    except httpx.HTTPError as e:
        return Result(False, error=repr(e))
    end = time.perf_counter()
    if first is None:
        return Result(False, error="no token")
    return Result(True, first - start, end - start, tokens, itl)


def auth_headers() -> dict[str, str]:
    """For a server that requires a key: the one the OpenAI SDK would send, $OPENAI_API_KEY
    (as vLLM's bench does)."""
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def prefix_cache_counters(base_url: str, since: tuple[float, float] = (0.0, 0.0),
                          at_least: int = 0, timeout_s: float = 10.0) -> tuple[float, float]:
    """The server's prefix cache (queries, hits) counters from /metrics, minus `since`.

    The figures reach the frontend with the scheduler's periodic stats, so a reading just
    after a run may lag: wait (up to timeout_s) until at least `at_least` queries are counted.
    """
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout_s
    while True:
        values = {"pagoda:prefix_cache_queries": 0.0, "pagoda:prefix_cache_hits": 0.0}
        for family in text_string_to_metric_families(httpx.get(base_url + "/metrics", headers=auth_headers()).text):
            if family.name in values:
                values[family.name] = sum(s.value for s in family.samples)
        queries = values["pagoda:prefix_cache_queries"] - since[0]
        hits = values["pagoda:prefix_cache_hits"] - since[1]
        if queries >= at_least or time.monotonic() > deadline:
            return queries, hits
        time.sleep(0.2)


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def run_rate(base_url: str, model: str, reqs: list[Req], rate: float, seed: int,
                   slo_ttft_s: float, slo_tpot_s: float) -> dict[str, Any]:
    """Send `reqs` at Poisson arrivals of `rate` req/s (inf: all at once); summary figures.

    $OPENAI_API_KEY, if set, goes with every request as the bearer token."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits, headers=auth_headers()) as client:
        tasks = []
        start = time.perf_counter()
        for req in reqs:
            tasks.append(asyncio.create_task(_one(client, base_url + "/v1/completions", model, req)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        results: list[Result] = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    itl = [x for r in ok for x in r.itl]
    good = [r for r in ok if r.ttft <= slo_ttft_s and r.tpot <= slo_tpot_s]
    summary: dict[str, Any] = {
        "request_rate": "inf" if rate == float("inf") else rate,
        "num_requests": len(reqs),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "elapsed_s": elapsed,
        "output_tokens": out_tokens,
        "requested_output_tokens": sum(r.output_len for r in reqs),
        "requests_per_s": len(ok) / elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "goodput_requests_per_s": len(good) / elapsed,
        "slo": {"ttft_s": slo_ttft_s, "tpot_s": slo_tpot_s},
    }
    for name, xs in (("ttft_s", [r.ttft for r in ok]), ("tpot_s", [r.tpot for r in ok]), ("itl_s", itl)):
        summary[name] = {"mean": statistics.fmean(xs) if xs else 0.0,
                         **{f"p{p}": _pct(xs, p) for p in (50, 90, 99)}}
    return summary
