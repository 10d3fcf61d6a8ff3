"""The live engine view: `GET /engine` (a page: frontend/static/engine.html, with engine.js and
engine.css under `/static/`) fed by `GET /engine/stream`, server-sent events of JSON four times a
second. The page is open like the chat page (it holds no secret); the stream needs the API key.

Where each figure comes from:
- running, waiting, KV usage, prefix-cache counters: the scheduler's `SchedulerStats`, which the
  tokenizers pass on in their heartbeats (as for /metrics);
- the KV grid, the worker groups and each step's prefill/decode tokens: the `EngineView` inside
  those stats, which the scheduler builds only while a frontend watches (`EngineClient.watch`,
  refreshed every 0.5 s while a stream is open, expiring 3 s after the last refresh);
- output tok/s, TTFT and inter-token latency: measured here on the streams this frontend serves
  (`Metrics.live`; latencies are kept only while someone watches);
- the tokenizers (state, load, restarts): this frontend's own record of their hellos and
  heartbeats (`EngineClient.member_records`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response, StreamingResponse

from frontend.chat_page import CONTENT_SECURITY_POLICY, HEADERS, STATIC_DIR
from frontend.engine_client import EngineClient
from frontend.metrics import Metrics
from protocol.messages import EngineView

EVENT_INTERVAL_S = 0.25  # events per stream: four a second
RATE_WINDOW_S = 5.0  # output tok/s and the recent prefix-cache hit rate are over this long
LATENCY_WINDOW_S = 5.0  # TTFT and ITL of the streams served in this long
MAX_STEPS_PER_EVENT = 512

_encoder = msgspec.json.Encoder()


class EngineStream:
    """The events of one `/engine/stream` client: it counts as a watcher while it runs."""

    def __init__(self, client: EngineClient, metrics: Metrics) -> None:
        self.client = client
        self.metrics = metrics
        self.steps_sent = client.num_steps_seen  # steps of views seen before this stream are not sent
        # (monotonic time, output tokens, prefix-cache queries, hits), for rates over RATE_WINDOW_S.
        self.samples: deque[tuple[float, int, int, int]] = deque()

    def event(self) -> dict[str, Any]:
        client, stats = self.client, self.client.scheduler_stats
        now = time.monotonic()
        self.samples.append((now, self.metrics.live.output_tokens, stats.prefix_cache_queries, stats.prefix_cache_hits))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW_S:
            self.samples.popleft()
        t0, tokens0, queries0, hits0 = self.samples[0]
        span = now - t0
        new_steps = min(client.num_steps_seen - self.steps_sent, MAX_STEPS_PER_EVENT, len(client.recent_steps))
        steps = list(client.recent_steps)[len(client.recent_steps) - new_steps :] if new_steps > 0 else []
        self.steps_sent = client.num_steps_seen
        view = client.engine_view
        since = time.time() - LATENCY_WINDOW_S
        queries = stats.prefix_cache_queries - queries0
        total = stats.prefix_cache_queries
        return {
            "time": time.time(),
            "running": stats.num_running,
            "waiting": stats.num_waiting,
            "kv_usage": stats.kv_cache_usage,
            "kv": kv_summary(view),
            "steps": steps,
            "prefix_cache": {
                "queries": stats.prefix_cache_queries,
                "hits": stats.prefix_cache_hits,
                "hit_rate": stats.prefix_cache_hits / total if total else None,
                "recent_hit_rate": (stats.prefix_cache_hits - hits0) / queries if queries > 0 else None,
            },
            "output_tokens_per_s": (self.metrics.live.output_tokens - tokens0) / span if span > 0 else 0.0,
            "ttft_s": self.metrics.live.window("ttft", since),
            "itl_s": self.metrics.live.window("itl", since),
            "preemptions": stats.num_preemptions,
            "in_flight": client.num_in_flight,
            "engine_views": stats.num_engine_views,
            "members": {
                "tokenizers": client.tokenizer_states(),
                "worker_groups": groups_summary(view),
                "drafts": [],  # no draft workers exist yet; the page shows the section only when some do
            },
        }

    async def events(self, request: Request) -> AsyncIterator[bytes]:
        live = self.metrics.live
        live.watchers += 1
        try:
            while not self.client.draining and not await request.is_disconnected():
                self.client.watch()
                yield b"data: " + _encoder.encode(self.event()) + b"\n\n"
                await asyncio.sleep(EVENT_INTERVAL_S)
        finally:
            live.watchers -= 1
            if not live.watchers:
                live.ttft.clear()
                live.itl.clear()


def kv_summary(view: EngineView | None) -> dict[str, Any]:
    """The KV grid of each group and the block totals; empty before the scheduler sent a view."""
    groups, used, cached, total = [], 0, 0, 0
    for g in view.groups if view is not None else []:
        if g.kv is None:
            continue
        kv = g.kv
        u, c = sum(kv.used), sum(kv.cached)
        used, cached, total = used + u, cached + c, total + kv.num_blocks
        groups.append({
            "group": g.group, "num_blocks": kv.num_blocks, "blocks_per_cell": kv.blocks_per_cell,
            "used": kv.used, "cached": kv.cached, "used_blocks": u, "cached_blocks": c,
            "free_blocks": kv.num_blocks - u - c,
        })
    return {"groups": groups, "num_blocks": total, "used_blocks": used, "cached_blocks": cached,
            "free_blocks": total - used - cached}


def groups_summary(view: EngineView | None) -> list[dict[str, Any]]:
    return [
        {
            "group": g.group, "state": g.state, "size": g.size, "running": g.running, "waiting": g.waiting,
            "load": g.running + g.waiting,
            "ranks": [{"id": m, "pid": pid, "restarts": g.restarts.get(m, 0)} for m, pid in zip(g.ranks, g.pids)],
            "restarts": sum(g.restarts.values()),
            "kv_usage": sum(g.kv.used) / g.kv.num_blocks if g.kv is not None and g.kv.num_blocks else 0.0,
        }
        for g in (view.groups if view is not None else [])
    ]


def add_engine_routes(app: FastAPI, client: EngineClient, metrics: Metrics) -> None:
    """`/engine` (the page; its assets are under `/static/`) and `/engine/stream` (its events)."""

    @app.get("/engine", include_in_schema=False)
    async def engine_page() -> Response:
        headers = {**HEADERS, "Content-Security-Policy": CONTENT_SECURITY_POLICY}
        return FileResponse(STATIC_DIR / "engine.html", headers=headers)

    # Not in the OpenAPI schema: an endless stream, which a client generated from it (schemathesis
    # in tests/e2e/test_fuzz.py) would read forever.
    @app.get("/engine/stream", include_in_schema=False)
    async def engine_stream(request: Request) -> Response:
        """Server-sent events, one JSON object each, four a second: the engine as /engine draws it."""
        stream = EngineStream(client, metrics)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream.events(request), media_type="text/event-stream", headers=headers)
