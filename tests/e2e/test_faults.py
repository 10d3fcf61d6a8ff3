"""Members killed under load with a real SIGKILL: `pagoda serve` restarts them and no request is
lost; past its restart rate it stops everything and exits 1.

On a tiny random Llama (tests/tiny_models.py), whose wide init leaves greedy tokens no near-ties
and whose worker restarts in seconds on 2 CPU cores; a tokenizer's and the scheduler's deaths
also under the streams of tests/e2e/streams.py on the embedded model.

A server that a test leaves whole again (the member it killed restarted, the same answers
after) is shared with the next test of the same flags: one start-up (~10 s) fewer each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.conftest import Server, child_pids, start_server
from tests.e2e.streams import NUM_STREAMS as NUM_CHAT_STREAMS
from tests.e2e.streams import member_pid, run_streams

MODEL = "tiny-llama"
NUM_STREAMS = 8
MAX_TOKENS = 48
SEED = 1234


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:  # gone
        return b""


def _role(pid: int) -> str | None:
    """The `pagoda <role>` a process runs (None once it is gone)."""
    args = _cmdline(pid).split(b"\0")
    return args[args.index(b"pagoda") + 1].decode() if b"pagoda" in args else None


def _pids(server: Server, role: str) -> set[int]:
    return {p for p in child_pids(server.proc.pid) if _role(p) == role}


def _wait_for(what: str, check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.05)
    return value


def _ready(server: Server) -> bool:
    try:
        return httpx.get(server.base_url + "/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class _Stream:
    """One streamed completion: its text, its token ids and when each chunk arrived."""

    def __init__(self) -> None:
        self.text = ""
        self.token_ids: list[int] = []
        self.arrivals: list[float] = []


def _start(tiny, tmp_path, *args: str) -> Server:
    folder, _ = tiny("llama")
    return start_server(str(tmp_path), "--model", str(folder), "--served-model-name", MODEL,
                        "--kv-cache-memory-gb", "0.05", "--max-model-len", "256", *args)


@pytest.fixture(scope="module")
def one_tokenizer_server(tiny, tmp_path_factory):
    """The tiny model with one tokenizer, for the tests whose worker dies or falls silent and is
    restarted: each leaves the server whole again (2 restarts in all, far from the limit of 5)."""
    server = _start(tiny, tmp_path_factory.mktemp("one-tokenizer"), "--num-tokenizers", "1")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def embedded_server(tmp_path_factory):
    """The embedded model, for the tests that kill a tokenizer or the scheduler under the streams
    of tests/e2e/streams.py: each checks the server whole again after (the same answers)."""
    server = start_server(str(tmp_path_factory.mktemp("embedded")), "--num-tokenizers", "2",
                          "--max-model-len", "512")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def undisturbed_chats(embedded_server) -> list[str]:
    """The streams' texts on `embedded_server`, undisturbed."""
    expected, _ = asyncio.run(run_streams(embedded_server))
    assert all(len(t) > 40 for t in expected)
    return expected


async def _run_streams(server: Server, streams: list[_Stream]) -> None:
    client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(i: int, s: _Stream) -> None:
        # The last stream is seeded sampling, the others greedy.
        kw = dict(temperature=1.0, seed=SEED) if i == len(streams) - 1 else dict(temperature=0)
        resp = await client.completions.create(
            model=MODEL, prompt=f"Here is a short story about a lighthouse keeper named Ann {i}:",
            max_tokens=MAX_TOKENS, stream=True, logprobs=0,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True}, **kw,
        )
        async for chunk in resp:
            if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.tokens:
                s.text += chunk.choices[0].text
                s.token_ids += [int(t.removeprefix("token_id:")) for t in chunk.choices[0].logprobs.tokens]
                s.arrivals.append(time.monotonic())

    try:
        await asyncio.gather(*(one(i, s) for i, s in enumerate(streams)))
    finally:
        await client.close()


def _disturbed_streams(server: Server, disturb) -> float:
    """Run the streams undisturbed, then again with `disturb()` called once every stream is
    midway; both runs' tokens and texts must be equal. The recovery time: from the disturbance
    to the first token after it, the end of the longest silence across the streams."""
    undisturbed = [_Stream() for _ in range(NUM_STREAMS)]
    asyncio.run(_run_streams(server, undisturbed))
    assert {len(s.token_ids) for s in undisturbed} == {MAX_TOKENS}
    streams = [_Stream() for _ in range(NUM_STREAMS)]
    disturbed_at = 0.0
    done_then: list[int] = []

    async def midway() -> None:
        nonlocal disturbed_at
        while min(len(s.token_ids) for s in streams) < 8:
            await asyncio.sleep(0.005)
        disturbed_at = time.monotonic()
        done_then.extend(len(s.token_ids) for s in streams)
        await asyncio.to_thread(disturb)

    async def both() -> None:
        await asyncio.gather(_run_streams(server, streams), midway())

    asyncio.run(both())
    assert max(done_then) < MAX_TOKENS - 8, f"every stream must be midway: {done_then}"
    assert [s.token_ids for s in streams] == [s.token_ids for s in undisturbed]
    assert [s.text for s in streams] == [s.text for s in undisturbed]
    arrivals = sorted([disturbed_at] + [t for s in streams for t in s.arrivals if t >= disturbed_at])
    gap_end = max(range(1, len(arrivals)), key=lambda k: arrivals[k] - arrivals[k - 1])
    return arrivals[gap_end] - disturbed_at


def test_a_killed_worker_is_restarted_and_every_stream_completes_with_the_undisturbed_text(one_tokenizer_server):
    server = one_tokenizer_server
    (worker,) = _pids(server, "worker")
    recovery_s = _disturbed_streams(server, lambda: os.kill(worker, signal.SIGKILL))
    print(f"\nworker killed: first token after the kill {recovery_s:.2f} s later")
    (new_worker,) = _pids(server, "worker")
    assert new_worker != worker
    assert f"worker-0 (pid {worker}) was killed by SIGKILL" in server.log()


def test_a_worker_silent_for_5_heartbeats_is_declared_lost_and_its_streams_complete_on_its_successor(
    one_tokenizer_server,
):
    server = one_tokenizer_server
    (worker,) = _pids(server, "worker")

    def hang_then_wake() -> None:
        os.kill(worker, signal.SIGSTOP)
        _wait_for("the worker declared lost", lambda: "lost the worker group (worker-0 silent" in server.log())
        # Woken, it beats again: the scheduler tells it to stop, and its restart rejoins.
        os.kill(worker, signal.SIGCONT)

    recovery_s = _disturbed_streams(server, hang_then_wake)
    print(f"\nworker stopped: first token after SIGSTOP {recovery_s:.2f} s later")
    assert f"worker-0 (pid {worker}) exited with status 0" in server.log()
    assert worker not in _pids(server, "worker")


def test_a_killed_tokenizer_frontend_and_scheduler_are_restarted_and_a_request_sent_meanwhile_is_served(
    tiny, tmp_path
):
    server = _start(tiny, tmp_path, "--num-tokenizers", "2")
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def served() -> bool:
        text = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                         temperature=0).choices[0].text
        return bool(text)

    try:
        for role in ("tokenizer", "frontend", "scheduler"):
            before = _pids(server, role)
            victim = next(p for p in before if role != "tokenizer" or b"tokenizer-0" in _cmdline(p))
            started = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            if role == "scheduler":
                # Sent while it is down: a tokenizer holds it until the new scheduler answers.
                assert served()
            (new,) = _wait_for(f"a new {role}", lambda r=role, b=before: _pids(server, r) - b)
            if role == "tokenizer":  # it rejoined both hubs
                for hub in ("frontend", "scheduler"):
                    _wait_for(f"the new tokenizer's hello to the {hub}",
                              lambda h=hub, p=new: f"[{h}] tokenizer tokenizer-0 (pid {p}) joined" in server.log())
            _wait_for("/ready after the restart", lambda: _ready(server))
            assert served()
            print(f"\n{role} killed: /ready and serving again {time.monotonic() - started:.2f} s later")
            assert f"(pid {victim}) was killed by SIGKILL" in server.log()
        assert server.proc.poll() is None
    finally:
        server.stop()


def test_killing_a_tokenizer_under_load_loses_and_repeats_nothing(embedded_server, undisturbed_chats):
    """A tokenizer killed (SIGKILL) under load: its streams go on through the other tokenizer, and
    each client's text is exactly that of an undisturbed run (nothing lost, nothing repeated)."""
    server, expected = embedded_server, undisturbed_chats
    victim = member_pid(server, "tokenizer", "tokenizer-0")

    async def kill() -> None:
        os.kill(victim, signal.SIGKILL)

    texts, recovery_s = asyncio.run(run_streams(server, kill))
    print(f"\ntokenizer-0 killed under {NUM_CHAT_STREAMS} streams: all had text again {recovery_s:.2f} s later")
    assert texts == expected
    # The pool is whole again (tokenizer-0 restarted) and serves the same answers.
    again, _ = asyncio.run(run_streams(server))
    assert again == expected


def test_a_killed_scheduler_is_restarted_and_streams_resubmitted_by_the_tokenizers_end_with_the_undisturbed_text(
    embedded_server, undisturbed_chats,
):
    server, expected = embedded_server, undisturbed_chats
    victim = member_pid(server, "scheduler")

    async def kill() -> None:
        os.kill(victim, signal.SIGKILL)

    texts, recovery_s = asyncio.run(run_streams(server, kill))
    print(f"\nscheduler killed under {len(texts)} streams: all had text again {recovery_s:.2f} s later")
    assert texts == expected
    log = server.log()
    assert f"scheduler (pid {victim}) was killed by SIGKILL" in log
    # Every stream was live at the kill, and went again to the new scheduler with its outputs so far.
    resubmitted = re.findall(r"a new scheduler answered after [\d.]+ s; (\d+) live requests re-submitted", log)
    assert sum(map(int, resubmitted)) == len(texts)
    again, _ = asyncio.run(run_streams(server))
    assert again == expected


def test_pagoda_serve_exits_1_when_the_worker_dies_more_than_5_times_in_60_s(tiny, tmp_path):
    server = _start(tiny, tmp_path, "--num-tokenizers", "1")
    try:
        killed: set[int] = set()
        deadline = time.monotonic() + 50
        # The worker dies each time it comes back, before it can say hello.
        while server.proc.poll() is None and time.monotonic() < deadline:
            for pid in _pids(server, "worker") - killed:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            time.sleep(0.02)
        assert server.proc.wait(10) == 1
        assert len(killed) == 6
        log = server.log()
        assert "past the restart rate (5 restarts within 60 s already); stopping every process" in log
        (line,) = [line for line in log.splitlines() if "ERROR" in line and "restart rate" in line]
        assert "worker-0 (pid" in line and "was killed by SIGKILL" in line
    finally:
        server.stop()


def test_the_offline_llm_restarts_a_killed_worker_and_generates_the_same_tokens(tiny):
    from frontend import LLM, SamplingParams

    folder, _ = tiny("llama")
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=MAX_TOKENS)
    prompts = [f"Here is a short story about a lighthouse keeper named Ann {i}:" for i in range(4)]
    with LLM(str(folder), kv_cache_memory_gb=0.05, max_model_len=256) as llm:
        before = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        worker = llm._group.pids()["worker-0"]
        os.kill(worker, signal.SIGKILL)
        after = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm._group.pids()["worker-0"] != worker
    assert after == before


def test_a_worker_whose_scheduler_went_away_exits_1_when_one_is_back_so_a_restart_says_hello(tiny, tmp_path):
    folder, _ = tiny("llama")
    args = ["--run-dir", str(tmp_path / "run"), "--model", str(folder), "--kv-cache-memory-gb", "0.05",
            "--max-model-len", "256"]
    logs = {name: open(tmp_path / f"{name}.log", "w+") for name in ("scheduler", "worker", "scheduler2")}  # noqa: SIM115

    def start(role: str, log: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "pagoda", role, *args], stdout=logs[log],
                                stderr=subprocess.STDOUT)

    def log(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text()

    scheduler = start("scheduler", "scheduler")
    worker = start("worker", "worker")
    procs = [scheduler, worker]
    try:
        _wait_for("the worker's hello", lambda: "worker worker-0 (rank 0" in log("scheduler"))
        scheduler.kill()
        time.sleep(0.5)  # the worker sees the connection drop, then a new scheduler binds
        procs.append(start("scheduler", "scheduler2"))
        assert worker.wait(30) == 1
        assert "the scheduler is back, maybe a new one that never heard its hello" in log("worker")
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for f in logs.values():
            f.close()


def test_a_killed_rank_takes_its_tensor_parallel_group_down_and_every_stream_completes(tiny, tmp_path):
    server = _start(tiny, tmp_path, "--num-tokenizers", "1", "--tensor-parallel-size", "2")
    try:
        ranks = _pids(server, "worker")
        (rank1,) = [p for p in ranks if b"--rank\x001\x00" in _cmdline(p)]
        recovery_s = _disturbed_streams(server, lambda: os.kill(rank1, signal.SIGKILL))
        print(f"\nrank 1 of 2 killed: first token after the kill {recovery_s:.2f} s later")
        # Both ranks were replaced: rank 0 shared a process group with the dead one.
        new_ranks = _wait_for("both ranks back", lambda: p if len(p := _pids(server, "worker")) == 2 else None)
        assert not new_ranks & ranks
        log = server.log()
        assert f"worker-1 (pid {rank1}) was killed by SIGKILL" in log
        assert "worker-1 died: stopping the other ranks of its worker group" in log
        assert "worker worker-1 (rank 1" in log.split("stopping the other ranks")[1]
    finally:
        server.stop()


def _step_groups(path) -> list[int]:
    """The worker group of each step in a --step-log file, in order."""
    with open(path) as f:
        return [json.loads(line)["group"] for line in f if line.strip()]


def test_two_worker_groups_share_the_load_and_a_lost_one_hands_its_streams_to_the_other(tiny, tmp_path):
    server = _start(tiny, tmp_path, "--num-tokenizers", "1", "--data-parallel-size", "2")
    try:
        (group1,) = [p for p in _pids(server, "worker") if b"--group\x001\x00" in _cmdline(p)]
        # Stopped, group 1's worker falls silent: after 5 heartbeats its group is lost, and its
        # requests move to group 0, which recomputes them (a killed one that is back within
        # those 5 s says hello again and recomputes them itself).
        recovery_s = _disturbed_streams(server, lambda: os.kill(group1, signal.SIGSTOP))
        print(f"\ngroup 1 of 2 stopped: first token after it {recovery_s:.2f} s later")
        assert re.search(r"lost the worker group 1 \(worker-g1-0 silent .*\): [1-9]\d* running requests; 1 other group",
                         server.log())
        # The undisturbed run spread its streams over both groups.
        steps = _step_groups(server.step_log)
        assert {0, 1} <= set(steps[: len(steps) // 2])
        os.kill(group1, signal.SIGCONT)  # it hears its group is lost, exits and is restarted

        def rejoined() -> bool:
            return "worker worker-g1-0 (rank 0, pid" in server.log().split("lost the worker group 1")[1]

        _wait_for("group 1 back", rejoined)
        # Back, it takes new work at once (the least loaded).
        before = len(_step_groups(server.step_log))
        asyncio.run(_run_streams(server, [_Stream() for _ in range(NUM_STREAMS)]))
        assert 1 in _step_groups(server.step_log)[before:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(group1, signal.SIGCONT)
        server.stop()
