"""The engine view's frontend side against real DEALER peers (tests/frontend/test_validation.py's
FakeTokenizer): the watch sent to every tokenizer, views passed on twice counted once, a
tokenizer's restart counted by its member id, and the page open while its stream needs the key."""

from __future__ import annotations

import asyncio
import os

import msgspec
from fastapi.testclient import TestClient

from frontend.api_server import build_app
from frontend.engine_client import EngineClient
from frontend.engine_view import EngineStream
from frontend.metrics import Metrics
from protocol import EngineConfig, Heartbeat, Hello, SchedulerStats, Watch
from protocol.messages import EngineView, GroupView, KVGrid
from tests.frontend.test_validation import FakeTokenizer, async_wait_for, config  # noqa: F401


def view(seq: int, steps: list[tuple[int, int]]) -> SchedulerStats:
    grid = KVGrid(num_blocks=5, blocks_per_cell=2, used=[2, 0, 0], cached=[0, 1, 0])
    group = GroupView(0, "serving", 1, ["worker-0"], [42], {"worker-0": 2}, running=1, waiting=3, kv=grid)
    return SchedulerStats(num_running=1, num_waiting=3, num_engine_views=seq,
                          engine_view=EngineView(seq, "sched-a", [group], steps))


def test_a_watcher_tells_every_tokenizer_and_sees_each_view_once(config: EngineConfig) -> None:  # noqa: F811
    async def scenario() -> None:
        client = EngineClient(config)
        await client.start()
        a, b = FakeTokenizer(config, "tokenizer-0").start(), FakeTokenizer(config, "tokenizer-1").start()
        try:
            await async_wait_for(lambda: client.num_tokenizers_ready == 2)
            stream = EngineStream(client, Metrics(client, "m"))
            first = stream.event()
            assert first["kv"]["groups"] == [] and first["members"]["worker_groups"] == []
            assert {t["id"]: t["state"] for t in first["members"]["tokenizers"]} == {
                "tokenizer-0": "up", "tokenizer-1": "up"}

            client.watch()
            client.watch()  # within WATCH_EVERY_S: not sent again
            await async_wait_for(lambda: any(isinstance(m, Watch) for m in a.received)
                                 and any(isinstance(m, Watch) for m in b.received))
            assert sum(isinstance(m, Watch) for m in a.received) == 1

            # Both tokenizers pass on each view; an older one arriving late changes nothing.
            for stats in (view(1, [(30, 0)]), view(2, [(0, 1), (4, 1)])):
                a.send(Heartbeat("tokenizer-0", ready=True, stats=stats, serving=True))
                b.send(Heartbeat("tokenizer-1", ready=True, stats=stats, serving=True))
            a.send(Heartbeat("tokenizer-0", ready=True, stats=view(1, [(30, 0)]), serving=True))
            await async_wait_for(lambda: client.num_steps_seen == 3)
            await asyncio.sleep(0.2)
            ev = stream.event()
            assert ev["steps"] == [(30, 0), (0, 1), (4, 1)] and client.num_steps_seen == 3
            assert stream.event()["steps"] == []  # each step goes out once per stream
            assert ev["kv"]["used_blocks"] == 2 and ev["kv"]["cached_blocks"] == 1 and ev["kv"]["free_blocks"] == 2
            (g,) = ev["members"]["worker_groups"]
            assert (g["state"], g["load"], g["restarts"]) == ("serving", 4, 2)
            assert g["ranks"] == [{"id": "worker-0", "pid": 42, "restarts": 2}]

            # tokenizer-0 restarted: the same member id says hello with another pid.
            a.send(Hello(role="tokenizer", member_id="tokenizer-0", pid=os.getpid() + 1))
            await async_wait_for(lambda: client.member_records["tokenizer-0"].restarts == 1)
            t0 = next(t for t in stream.event()["members"]["tokenizers"] if t["id"] == "tokenizer-0")
            assert t0["restarts"] == 1 and t0["pid"] == os.getpid() + 1
            a.stop()  # then it dies: silent, then declared dead, and shown so
            await async_wait_for(lambda: b"tokenizer-0" not in client._members, timeout=10)
            t0 = next(t for t in stream.event()["members"]["tokenizers"] if t["id"] == "tokenizer-0")
            assert t0["state"] == "dead" and t0["restarts"] == 1 and t0["load"] == 0
        finally:
            a.stop()
            b.stop()
            await client.close()

    asyncio.run(scenario())


def test_the_page_is_open_and_its_stream_needs_the_key(config: EngineConfig) -> None:  # noqa: F811
    keyed = msgspec.structs.replace(config, api_key="s3cret")
    with TestClient(build_app(keyed, EngineClient(keyed))) as api:
        page = api.get("/engine")
        assert page.status_code == 200 and 'src="/static/engine.js"' in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for asset in ("/static/engine.js", "/static/engine.css"):
            assert api.get(asset).status_code == 200
        assert api.get("/engine/stream").status_code == 401
