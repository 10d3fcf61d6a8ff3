"""`/engine/stream` on a real server (the embedded model): what it shows under load, that the
scheduler builds nothing while nobody watches, and a killed tokenizer going down and back."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import Server, start_server
from tests.e2e.streams import member_pid, run_streams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(str(tmp_path_factory.mktemp("engine-view")), "--num-tokenizers", "2",
                       "--max-model-len", "512")
    yield srv
    srv.stop()


def engine_views(server: Server) -> float:
    """The scheduler's count of views built, from /metrics."""
    for line in httpx.get(server.base_url + "/metrics").text.splitlines():
        if m := re.fullmatch(r"pagoda:engine_views_total\{.*\} (\S+)", line):
            return float(m.group(1))
    raise AssertionError("no pagoda:engine_views_total in /metrics")


async def read_events(server: Server, until: Callable[[list[dict]], bool], timeout: float = 180) -> list[dict]:
    """Events of /engine/stream until `until(events)` holds (or the timeout)."""
    events: list[dict] = []
    async with httpx.AsyncClient(timeout=None) as http:
        async with http.stream("GET", server.base_url + "/engine/stream") as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            deadline = time.monotonic() + timeout
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    if until(events) or time.monotonic() > deadline:
                        break
    return events


def test_nothing_is_built_while_nobody_watches_and_a_watch_expires_by_itself(server):
    asyncio.run(run_streams(server))  # load, unwatched
    assert engine_views(server) == 0  # no stream was ever opened on this server yet

    events = asyncio.run(read_events(server, lambda evs: len(evs) >= 8))  # two seconds watched
    assert all(ev["members"]["tokenizers"] for ev in events)
    time.sleep(1.0)
    assert engine_views(server) > 0
    time.sleep(4.0)  # past the 3 s the last Watch asked for: the scheduler stops without a message
    stopped = engine_views(server)
    time.sleep(2.0)  # watched, it would have built one at each wake-up (at least every second)
    assert engine_views(server) == stopped


def test_the_stream_shows_the_load_running_and_its_kv_blocks_freed_after(server):
    async def scenario() -> list[dict]:
        load_done = asyncio.Event()

        async def load() -> None:
            await asyncio.sleep(1.0)
            await run_streams(server)
            load_done.set()

        def settled(evs: list[dict]) -> bool:
            # After the load: nothing running, every block free or cached.
            last = evs[-1]
            return load_done.is_set() and last["running"] == 0 and last["kv"]["groups"] and \
                last["kv"]["used_blocks"] == 0

        task = asyncio.create_task(load())
        events = await read_events(server, settled)
        await task
        return events

    events = asyncio.run(scenario())
    busy = [ev for ev in events if ev["running"] > 0]
    assert busy, "no event saw a running request"
    assert any(ev["kv"]["used_blocks"] > 0 for ev in busy)
    steps = [s for ev in events for s in ev["steps"]]
    assert any(p > 0 for p, _ in steps) and any(d > 0 for _, d in steps)  # prefill and decode steps
    assert any(ev["output_tokens_per_s"] > 0 for ev in events)
    assert any(ev["ttft_s"]["count"] > 0 for ev in events) and any(ev["itl_s"]["count"] > 0 for ev in events)
    last = events[-1]
    kv = last["kv"]
    (group,) = kv["groups"]
    assert len(group["used"]) == len(group["cached"]) <= 2048
    assert kv["used_blocks"] == 0 and kv["cached_blocks"] > 0  # the prompts' blocks stay reusable
    assert kv["free_blocks"] + kv["cached_blocks"] == kv["num_blocks"] == group["num_blocks"]
    assert last["prefix_cache"]["queries"] > 0
    (wg,) = last["members"]["worker_groups"]
    assert wg["state"] == "serving" and [r["id"] for r in wg["ranks"]] == ["worker-0"] and wg["load"] == 0
    assert {t["id"]: t["state"] for t in last["members"]["tokenizers"]} == {"tokenizer-0": "up", "tokenizer-1": "up"}
    assert last["members"]["drafts"] == []


def test_a_killed_tokenizer_shows_down_then_back_with_one_restart(server):
    victim = member_pid(server, "tokenizer", "tokenizer-0")

    def state(ev: dict) -> dict:
        return next(t for t in ev["members"]["tokenizers"] if t["id"] == "tokenizer-0")

    async def scenario() -> list[dict]:
        killed = False

        def back(evs: list[dict]) -> bool:
            nonlocal killed
            if not killed and len(evs) >= 4:  # watched for a second: every member was told
                os.kill(victim, signal.SIGKILL)
                killed = True
            t = state(evs[-1])
            return killed and t["state"] == "up" and t["restarts"] == 1

        return await read_events(server, back, timeout=120)

    events = asyncio.run(scenario())
    states = [(state(ev)["state"], state(ev)["restarts"], state(ev)["pid"]) for ev in events]
    changes = [x for i, x in enumerate(states) if i == 0 or x != states[i - 1]]
    print(f"\ntokenizer-0 killed: {changes} over {len(events) / 4:.1f} s of events")
    assert all(s == "up" and r == 0 and pid == victim for s, r, pid in states[:4]), states
    down = [i for i, (s, _, _) in enumerate(states) if s in ("dead", "silent")]
    assert down and down[0] >= 4, states  # seen down after the kill, before it was back
    assert states[-1][:2] == ("up", 1) and states[-1][2] != victim, states
    # The other tokenizer was never taken for dead.
    assert all(next(t for t in ev["members"]["tokenizers"] if t["id"] == "tokenizer-1")["state"] != "dead"
               for ev in events)
