"""The engine view's scheduler side: the KV grid (exact counts, downsampled), each step's prefill
and decode tokens, the watch rule, and a real `SchedulerService` that builds nothing unwatched."""

from __future__ import annotations

import random
import time

import msgspec
import zmq

from protocol import EngineConfig, Hello, SamplingParams, SchedulerStats, StepPlan, Watch, connect_dealer
from protocol.messages import TokenizerFromScheduler, WorkerInbound
from protocol.sockets import Decoder
from scheduler_svc.block_pool import BlockPool
from scheduler_svc.engine_view import MAX_WATCH_TTL_S, ViewRecorder, kv_grid, step_split
from scheduler_svc.request import Request
from scheduler_svc.service import SchedulerService
from tests.scheduler.test_scheduler import make_request, make_scheduler, run_step


def truth(pool: BlockPool) -> list[str]:
    """Each block's state, from the pool's own fields."""
    return ["used" if pool.ref_counts[b] else "cached" if pool.block_hash[b] else "free"
            for b in range(pool.num_blocks)]


def test_the_grid_counts_every_block_exactly_when_the_pool_fits():
    pool = BlockPool(10)
    blocks = pool.allocate(7)
    for i, b in enumerate(blocks[:5]):
        assert pool.cache_block(b, bytes([i]) * 32)
    pool.share(blocks[:2])  # a prefix hit: held twice, counted once
    pool.free(blocks[2:4])  # cached, nobody holds them: reusable
    pool.free([blocks[6]])  # never cached: free
    grid = kv_grid(pool, max_cells=16)
    assert (grid.num_blocks, grid.blocks_per_cell, len(grid.used)) == (10, 1, 10)
    states = truth(pool)
    assert grid.used == [int(s == "used") for s in states]
    assert grid.cached == [int(s == "cached") for s in states]
    # Blocks 0-6 were taken in order: 0, 1 (shared), 4 (cached) and 5 held; 2, 3 cached; 6-9 free.
    assert grid.used == [1, 1, 0, 0, 1, 1, 0, 0, 0, 0] and grid.cached == [0, 0, 1, 1, 0, 0, 0, 0, 0, 0]


def test_a_large_pool_is_downsampled_to_at_most_max_cells_with_exact_counts_per_cell():
    rng = random.Random(0)
    pool = BlockPool(5000)
    held = pool.allocate(4000)
    for i, b in enumerate(held):
        if rng.random() < 0.6:
            pool.cache_block(b, i.to_bytes(32, "big"))
    pool.share(held[:50])
    pool.free([b for b in held if rng.random() < 0.5])  # some cached ones become reusable
    grid = kv_grid(pool, max_cells=2048)
    per = grid.blocks_per_cell
    assert per == 3 and len(grid.used) == len(grid.cached) == 1667 <= 2048  # ceil(5000 / 3)
    states = truth(pool)
    for cell in range(len(grid.used)):
        mine = states[cell * per : (cell + 1) * per]
        assert grid.used[cell] == mine.count("used") and grid.cached[cell] == mine.count("cached")
    assert sum(grid.used) == pool.num_blocks - pool.num_free
    assert sum(grid.cached) == states.count("cached") > 0


def test_a_step_is_split_into_prefill_and_decode_tokens():
    s = make_scheduler(max_num_batched_tokens=40)
    s.add_request(make_request("a", 20, max_tokens=5))
    plan, _ = run_step(s)  # a's whole prompt
    assert step_split(s, plan) == (20, 0)
    s.add_request(make_request("b", 70, max_tokens=5))
    plan = s.schedule()  # a decodes one token, b's first chunk fills the rest of the budget
    assert plan is not None and plan.num_scheduled_tokens == {"a": 1, "b": 39}
    assert step_split(s, plan) == (39, 1)


def test_a_watch_expires_without_a_message_and_forgets_its_steps():
    view = ViewRecorder("sched")
    assert not view.tick(100.0)
    view.watch(3.0, now=100.0)
    assert view.watching and view.tick(102.9)
    view.steps.append((5, 1))
    assert not view.tick(103.1) and not view.steps
    view.watch(1e9, now=200.0)  # a huge ttl is capped
    assert view.tick(200.0 + MAX_WATCH_TTL_S - 0.1) and not view.tick(200.0 + MAX_WATCH_TTL_S + 0.1)


def test_a_worker_restart_is_counted_when_its_id_says_hello_with_a_new_pid():
    view = ViewRecorder("sched")
    view.on_hello(0, "worker-0", 10)
    view.on_hello(0, "worker-0", 10)  # the same process again (nothing new)
    view.on_hello(1, "worker-g1-0", 20)
    view.on_hello(0, "worker-0", 11)
    assert view.restarts == {0: {"worker-0": 1}, 1: {"worker-g1-0": 0}}


def _service(tmp_path) -> tuple[SchedulerService, zmq.Socket, zmq.Socket, EngineConfig]:
    config = EngineConfig(run_dir=str(tmp_path)).with_addresses()
    svc = SchedulerService(config)
    worker = connect_dealer(svc.ctx, config.scheduler_addr, "worker-0", config)
    tokenizer = connect_dealer(svc.ctx, config.scheduler_addr, "tokenizer-0", config)
    return svc, worker, tokenizer, config


def _pump(svc: SchedulerService, msg: msgspec.Struct, sender: str) -> None:
    """Hand `msg` from `sender` to the service as its loop would (the sockets only make the
    members routable, so that what the service sends them arrives)."""
    svc._handle(sender, msg)


def test_the_service_builds_views_and_records_steps_only_while_watched(tmp_path):
    svc, worker, tokenizer, _ = _service(tmp_path)
    try:
        _pump(svc, Hello("tokenizer", "tokenizer-0", 1), "tokenizer-0")
        _pump(svc, Hello("worker", "worker-0", 2, num_blocks=64, max_model_len=512, vocab_size=1000),
              "worker-0")
        time.sleep(0.2)  # the ROUTER learns both identities
        group = svc.groups[0]
        assert group.serving
        svc.max_steps_in_flight = 1  # one step at a time: the steps below are exactly these
        svc._add(Request("r1", list(range(10, 40)), SamplingParams(max_tokens=4), "tokenizer-0", 4), [], {})
        svc.view.tick(time.monotonic())
        svc._maybe_schedule()
        svc._sent_stats_at = 0.0
        svc._send_stats()
        assert svc.view.num_views == 0 and not svc.view.steps  # nobody watches: nothing built
        assert svc._sent_stats is not None and svc._sent_stats.engine_view is None

        _pump(svc, Watch(3.0), "tokenizer-0")
        svc._add(Request("r2", list(range(50, 70)), SamplingParams(max_tokens=4), "tokenizer-0", 4), [], {})
        group.steps_in_flight.clear()  # as if the first step's result came back
        svc._maybe_schedule()
        assert list(svc.view.steps) == [(20, 1)]  # r2's prompt, and r1's first decode
        svc._sent_stats_at = 0.0
        svc._send_stats()
        stats = svc._sent_stats
        assert stats is not None and stats.num_engine_views == 1 and stats.engine_view is not None
        (g,) = stats.engine_view.groups
        assert (g.state, g.ranks, g.pids, g.running, g.waiting) == ("serving", ["worker-0"], [2], 2, 0)
        assert g.kv is not None and sum(g.kv.used) == 4 and stats.engine_view.steps == [(20, 1)]
        # What the tokenizer got decodes as its socket's union.
        got = [Decoder(TokenizerFromScheduler).decode(f) for f in _drain(tokenizer)]
        views = [m for m in got if isinstance(m, SchedulerStats) and m.engine_view is not None]
        assert views and views[-1].engine_view.seq == 1
        assert all(isinstance(Decoder(WorkerInbound).decode(f), StepPlan) for f in _drain(worker))

        svc.view.watched_until = time.monotonic() - 0.01  # the watch expired: no refresh came
        svc.view.tick(time.monotonic())
        svc._sent_stats_at = 0.0
        svc._send_stats()
        assert svc._sent_stats.engine_view is None and svc.view.num_views == 1
    finally:
        worker.close(0)
        tokenizer.close(0)
        svc.sock.close(0)
        svc.ctx.term()


def _drain(sock: zmq.Socket) -> list[bytes]:
    frames = []
    while sock.poll(200):
        frames.append(sock.recv())
    return frames
