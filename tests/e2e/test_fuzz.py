"""Garbage on every internal socket: random bytes, truncated and oversized frames, messages of
the wrong type for the socket, multi-part messages, and well-formed messages that claim what
their sender is not. Each one is logged and dropped; no process dies and serving goes on.

The hubs (scheduler, frontend) are fuzzed inside a real `pagoda serve` on a tiny random Llama,
through DEALER sockets of the test's own on the hubs' ipc:// addresses; after each generated
batch every member has the pid it had, and a real greedy completion gives the text it gave
before. The members (a tokenizer, a worker) are started alone, pointed at ROUTER sockets the
test binds where their hubs would be, fuzzed from the hub side, and must then still answer a
valid message as they did before.

Every HTTP route is fuzzed too, from the app's OpenAPI schema (schemathesis), against the app
under uvicorn with a fake tokenizer: no 5xx, no hang.

`PAGODA_FUZZ_EXAMPLES` and `PAGODA_HTTP_FUZZ_EXAMPLES` raise the number of generated batches
and requests for a longer run by hand.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import pytest
import uvicorn
import zmq
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from protocol import Decoder, EngineConfig, bind_router, encode
from protocol.messages import (
    Abort,
    CachedRequestData,
    ChatMessage,
    EngineReady,
    EngineRequest,
    ErrorReply,
    FrontendInbound,
    Heartbeat,
    Hello,
    Logprobs,
    NewRequestData,
    SamplingParams,
    SchedulerInbound,
    SchedulerStats,
    StepPlan,
    StepResult,
    TextBatch,
    TextOutput,
    TokenBatch,
    TokenizeRequest,
    TokenOutput,
)
from tests.conftest import Server, child_pids, start_server

MODEL = "tiny-llama"
VOCAB = 320  # tests/tiny_models.py's tokenizer, and so the tiny models' embedding rows
MAX_MODEL_LEN = 256
PROMPT = "Here is a short story about a lighthouse keeper named Ann:"
_fuzzer_ids = itertools.count()

# ---- what is generated -------------------------------------------------------------------

# Small numbers hit the edge cases of ids and counts, wide ones the overflows.
ints = st.one_of(st.integers(-2, VOCAB + 2), st.integers(-(2**63), 2**64 - 1))
floats = st.floats(width=64)  # NaN and the infinities included
names = st.one_of(st.sampled_from(["tokenizer-0", "worker-0", "worker-0.hb", "", "r-1"]), st.text(max_size=12))
token_ids = st.lists(ints, max_size=24)
# Every field absurd at times, save the amount of work: a few samples, a few tokens (or
# numbers too large to be anything but refused), so that what is accepted ends in seconds.
huge = st.integers(2**31, 2**64 - 1)


def samplings(max_tokens: st.SearchStrategy[int | None]) -> st.SearchStrategy[SamplingParams]:
    return st.builds(
        SamplingParams,
        n=st.integers(-1, 3) | huge,
        temperature=st.sampled_from([0.0, 1.0]) | floats,
        top_p=floats, top_k=ints, min_p=floats,
        presence_penalty=floats, frequency_penalty=floats, repetition_penalty=floats,
        seed=st.none() | ints,
        max_tokens=max_tokens,
        min_tokens=st.integers(-2, 20) | huge,
        stop=st.lists(st.text(max_size=4), max_size=2),
        stop_token_ids=st.lists(ints, max_size=3),
        ignore_eos=st.booleans(),
        logprobs=st.none() | st.integers(-2, 30) | ints,
        logit_bias=st.dictionaries(ints, floats, max_size=3),
        skip_special_tokens=st.booleans(),
    )


sampling = samplings(st.none() | st.integers(-2, 16) | huge)
logprobs = st.builds(Logprobs, st.lists(floats, max_size=3), st.lists(st.lists(ints, max_size=2), max_size=3),
                     st.lists(st.lists(floats, max_size=2), max_size=3))
scheduler_stats = st.builds(SchedulerStats, num_running=ints, num_waiting=ints, kv_cache_usage=floats)

hello = st.builds(
    Hello, role=st.sampled_from(["worker", "tokenizer", "frontend"]) | st.text(max_size=8), member_id=names,
    pid=ints, rank=ints, capacity=ints, num_blocks=ints, max_model_len=ints,
    eos_token_ids=st.lists(ints, max_size=3), max_num_batched_tokens=ints,
)
# Not ready: the frontend would route real requests to a made-up tokenizer that is ready,
# and wait 5 s of its silence to route them again (explicit examples claim readiness).
heartbeat = st.builds(Heartbeat, member_id=names, load=ints, ready=st.just(False), stats=st.none() | scheduler_stats,
                      serving=st.booleans(), max_model_len=ints)
engine_ready = st.builds(EngineReady, max_model_len=ints, num_blocks=ints, block_size=ints,
                         eos_token_ids=st.lists(ints, max_size=3), serving=st.booleans())
tokenize_request = st.builds(
    TokenizeRequest, request_id=names, sampling=sampling, prompt=st.none() | st.text(max_size=40),
    prompt_token_ids=st.none() | token_ids,
    messages=st.none() | st.lists(st.builds(ChatMessage, role=st.sampled_from(["user", "system", "assistant", "x"]),
                                            content=st.none() | st.text(max_size=20)), max_size=3),
    add_generation_prompt=st.booleans(), continue_final_message=st.booleans(), echo=st.booleans(),
    resume=st.booleans(),
)
# Token ids out of the vocabulary or negative, prompts longer than the model, absurd samplings.
engine_request = st.builds(EngineRequest, request_id=names, prompt_token_ids=token_ids | st.lists(
    st.integers(0, VOCAB - 1), min_size=MAX_MODEL_LEN - 2, max_size=MAX_MODEL_LEN + 2), sampling=sampling,
    reply_to=names, arrival_time=floats, resume=st.booleans())
# Runnable prompts with absurd samplings: what reaches the worker.
runnable_request = st.builds(EngineRequest, request_id=names, prompt_token_ids=st.lists(
    st.integers(0, VOCAB - 1), min_size=1, max_size=16), sampling=samplings(st.integers(-2, 16)), reply_to=names,
    arrival_time=floats)
abort = st.builds(Abort, request_ids=st.lists(names, max_size=3), reason=st.text(max_size=8),
                  indices=st.none() | st.lists(ints, max_size=3))
error_reply = st.builds(ErrorReply, request_id=names, status=ints, message=st.text(max_size=20),
                        error_type=st.text(max_size=8), param=st.none() | st.text(max_size=8))
token_output = st.builds(TokenOutput, request_id=names, new_token_ids=token_ids,
                         finish_reason=st.none() | st.sampled_from(["stop", "length", "abort"]) | st.text(max_size=6),
                         num_prompt_tokens=ints, index=ints, logprobs=st.none() | logprobs)
token_batch = st.builds(TokenBatch, st.lists(token_output, max_size=4))
text_batch = st.builds(TextBatch, st.lists(st.builds(
    TextOutput, request_id=names, text=st.text(max_size=12), token_ids=token_ids,
    finish_reason=st.none() | st.text(max_size=6), prompt_tokens=ints, completion_tokens=ints, index=ints,
    logprobs=st.none() | logprobs, stop_reason=st.none() | st.text(max_size=4) | ints,
    prompt_text=st.none() | st.text(max_size=8)), max_size=4))
# A result for a step that is not in flight (step ids are never reused, so any id the test
# makes up is one), with ragged columns.
step_result = st.builds(StepResult, step_id=ints, request_ids=st.lists(names, max_size=4), token_ids=token_ids,
                        logprobs=st.none() | st.lists(floats, max_size=4), idle_s=floats, execute_s=floats)
step_plan = st.builds(
    StepPlan, step_id=ints,
    new_requests=st.lists(st.builds(NewRequestData, names, token_ids, sampling, token_ids, ints, ints), max_size=2),
    cached_requests=st.lists(st.builds(CachedRequestData, names, token_ids, ints), max_size=2),
    num_scheduled_tokens=st.dictionaries(names, ints, max_size=3), finished_request_ids=st.lists(names, max_size=3),
)

EVERY_MESSAGE = st.one_of(hello, heartbeat, engine_ready, tokenize_request, engine_request, abort, error_reply,
                          token_batch, text_batch, step_result, step_plan, scheduler_stats)


class Oversized:
    """A frame of `mb` megabytes, made only when sent (hypothesis would print it whole)."""

    def __init__(self, mb: int) -> None:
        self.mb = mb

    def __repr__(self) -> str:
        return f"Oversized({self.mb})"

    def __bytes__(self) -> bytes:
        return os.urandom(256) * (self.mb * 4096)


def frames(
    messages: st.SearchStrategy[msgspec.Struct], whole: st.SearchStrategy[msgspec.Struct] | None = None
) -> st.SearchStrategy[list[bytes | Oversized]]:
    """One message as the frames a DEALER or a ROUTER sends: usually one, sometimes several.

    `messages` are sent whole (or `whole`, when given) and cut short.
    """
    one = st.one_of(
        st.binary(max_size=256),  # random bytes
        # Well-formed: a message of any type, for this socket or not.
        (messages if whole is None else whole).map(encode),
        st.tuples(messages.map(encode), st.floats(0, 1)).map(lambda m: m[0][: int(len(m[0]) * m[1])]),  # truncated
        st.sampled_from([
            b"\xdd\xff\xff\xff\xff",  # an array header claiming 4 billion items, and nothing after
            b"\xdb\xff\xff\xff\xff" + b"x" * 100,  # a string of 4 GB, 100 bytes of it
            b"\xc1",  # the one byte msgpack never uses
            b"\x91" * 100_000 + b"\xc0",  # arrays nested 100,000 deep
        ]),
        st.integers(1, 8).map(Oversized),  # 1 to 8 MB
    )
    # Mostly single frames: a hub drops a multi-part message whole, so only single frames
    # reach its decoder (a member reads each part as a frame of its own).
    single = one.map(lambda frame: [frame])
    return st.one_of(single, single, st.lists(one, min_size=2, max_size=3))


def hub_messages() -> st.SearchStrategy[msgspec.Struct]:
    """What the hubs get: any message, weighted to the hubs' own with made-up claims (a worker's
    hello with absurd numbers, a result of a step not in flight, token ids outside the
    vocabulary, a heartbeat from an unknown id)."""
    return st.one_of(hello, heartbeat, engine_request, runnable_request, runnable_request, step_result, abort,
                     text_batch, error_reply, EVERY_MESSAGE)


FUZZ = settings(
    max_examples=int(os.environ.get("PAGODA_FUZZ_EXAMPLES", "30")),
    deadline=None,
    database=None,
    # A crash poisons every later example, so shrinking would only repeat it: the failing batch
    # is printed, and the process's log says what went wrong.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


def _dealer(ctx: zmq.Context, addr: str, identity: bytes) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(addr)
    return sock


def _alive(pids: set[int]) -> set[int]:
    """Those of `pids` that still run (a zombie does not)."""
    alive = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.add(pid)
        except OSError:
            pass
    return alive


# ---- the hubs, in a real server --------------------------------------------------------------


@dataclass
class Served:
    server: Server
    config: EngineConfig
    pids: set[int]
    text: str  # the greedy completion of PROMPT before any fuzzing

    def complete(self) -> str:
        deadline = time.monotonic() + 5
        while True:
            resp = httpx.post(self.server.base_url + "/v1/completions", timeout=60, json={
                "model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
            # A made-up heartbeat's figures (requests waiting) may refuse a request until the
            # real tokenizer's next heartbeat: a client told to retry does, as here.
            if resp.status_code != 503 or "Retry-After" not in resp.headers or time.monotonic() > deadline:
                break
            time.sleep(float(resp.headers["Retry-After"]) / 4)
        assert resp.status_code == 200, resp.text
        return resp.json()["choices"][0]["text"]

    def check(self, what: str) -> None:
        assert _alive(self.pids) == self.pids, f"a member died after {what}:\n{self.server.log()[-4000:]}"
        assert set(child_pids(self.server.proc.pid)) == self.pids, f"a member was restarted after {what}"
        assert self.complete() == self.text, f"a real request went wrong after {what}"


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory) -> Iterator[Served]:
    folder, _ = tiny("llama")
    # A short run dir of our own: ipc:// paths are limited to about 100 bytes, and the test
    # needs the hubs' socket paths, which `EngineConfig.with_addresses` puts in it.
    run_dir = tempfile.mkdtemp(prefix="pagoda-fuzz-")
    server = start_server(str(tmp_path_factory.mktemp("fuzz")), "--model", str(folder), "--served-model-name",
                          MODEL, "--kv-cache-memory-gb", "0.05", "--max-model-len", str(MAX_MODEL_LEN),
                          "--num-tokenizers", "1", "--run-dir", run_dir)
    try:
        config = EngineConfig(run_dir=run_dir).with_addresses()
        pids = set(child_pids(server.proc.pid))
        assert len(pids) == 4, pids  # frontend, tokenizer, scheduler, worker
        served = Served(server, config, pids, "")
        served.text = served.complete()
        yield served
    finally:
        server.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def _fuzz_hub(served: Served, addr: str, batch: list[list[bytes | Oversized]]) -> None:
    """Send `batch` from a fresh DEALER (a new member id each time), then close it."""
    ctx = zmq.Context.instance()
    sock = _dealer(ctx, addr, f"fuzz-{next(_fuzzer_ids)}".encode())
    try:
        for parts in batch:
            sock.send_multipart([bytes(p) for p in parts])
    finally:
        sock.close(linger=5000)  # what it still queues is delivered first


def _claims(*messages: msgspec.Struct) -> list[list[bytes | Oversized]]:
    return [[encode(m)] for m in messages]


LIVE = SamplingParams(n=2, max_tokens=16, ignore_eos=True)


@pytest.mark.slow
def test_scheduler_drops_garbage_frames_and_serving_goes_on(served: Served) -> None:
    @FUZZ
    @given(st.lists(frames(hub_messages()), min_size=1, max_size=12))
    # The claims the generator may take long to hit: a worker's hello with absurd numbers, a
    # result for steps not in flight, token ids outside the vocabulary, a heartbeat from an
    # unknown id, and an abort whose indices do not match its ids, for a live request.
    @example(_claims(Hello("worker", "worker-0", pid=-1, rank=0, num_blocks=2**62, max_model_len=-5)))
    @example(_claims(Hello("worker", "worker-7", pid=1, rank=7, num_blocks=10, max_model_len=64)))
    @example(_claims(StepResult(0, ["a"], [1, 2]), StepResult(2**63 - 1, [], []), StepResult(-1, ["b"], [])))
    @example(_claims(EngineRequest("bad-ids", [5, -1, VOCAB, 2**63], SamplingParams(), "tokenizer-0"),
                     EngineRequest("too-long", [5] * 300, SamplingParams(), "tokenizer-0"),
                     EngineRequest("empty", [], SamplingParams(), "tokenizer-0"),
                     EngineRequest("many", [5], SamplingParams(n=2**40), "tokenizer-0")))
    @example(_claims(Heartbeat("nobody", load=-1, ready=True, stats=SchedulerStats(num_running=-1))))
    @example(_claims(EngineRequest("live", [5, 6, 7], LIVE, "nobody"), Abort(["live", "other"], indices=[0]),
                     Abort(["live"], indices=[]), Abort(["live"], indices=[2**40])))
    def fuzz(batch: list[list[bytes | Oversized]]) -> None:
        _fuzz_hub(served, served.config.scheduler_addr, batch)
        served.check(f"{sum(map(len, batch))} frames on the scheduler's socket")

    fuzz()
    assert "Traceback" not in served.server.log()
    # Made-up requests that passed the checks ran on the worker (the explicit "live" one at least).
    ran = {rid for step in served.server.steps() for rid in step["new"] if not rid.startswith("cmpl-")}
    assert ran, "no made-up request reached the worker"


@pytest.mark.slow
def test_frontend_drops_garbage_frames_and_serving_goes_on(served: Served) -> None:
    @FUZZ
    @given(st.lists(frames(hub_messages()), min_size=1, max_size=12))
    # A member's figures, passed on from the scheduler, that no scheduler sends.
    @example(_claims(Heartbeat("nobody", ready=True, serving=True, stats=SchedulerStats(num_running=-1))))
    @example(_claims(Heartbeat("nobody", stats=SchedulerStats(num_running=2**64 - 1, kv_cache_usage=float("nan")))))
    @example(_claims(Hello("tokenizer", "tokenizer-0", pid=-1), TextBatch([TextOutput("x", "y", [1], None, 1, 1)]),
                     ErrorReply("x", 2**40, "no")))
    def fuzz(batch: list[list[bytes | Oversized]]) -> None:
        _fuzz_hub(served, served.config.frontend_addr, batch)
        served.check(f"{sum(map(len, batch))} frames on the frontend's socket")

    fuzz()
    assert "Traceback" not in served.server.log()


# ---- the members, alone, with the test as their hubs ---------------------------------------


class Hubs:
    """ROUTER sockets bound where a member's hubs would be: the test speaks for both hubs."""

    def __init__(self, run_dir: str) -> None:
        self.config = EngineConfig(run_dir=run_dir).with_addresses()
        self.ctx = zmq.Context()
        self.frontend = bind_router(self.ctx, self.config.frontend_addr)
        self.scheduler = bind_router(self.ctx, self.config.scheduler_addr)
        self.decoders = {self.frontend: Decoder(FrontendInbound), self.scheduler: Decoder(SchedulerInbound)}
        self.skipped: Counter[str] = Counter()  # messages `expect` passed over, by type

    def send(self, sock: zmq.Socket, member: str, *parts: bytes | Oversized) -> None:
        sock.send_multipart([member.encode(), *(bytes(p) for p in parts)])

    def expect(self, sock: zmq.Socket, accept: Callable[[Any], bool], what: str, timeout: float = 30) -> Any:
        """The first message on `sock` that `accept`s, skipping the others (heartbeats, replies
        to generated requests)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if sock.poll(int(left * 1000)):
                _, frame = sock.recv_multipart()
                msg = self.decoders[sock].decode(frame)
                if msg is not None and accept(msg):
                    return msg
                self.skipped[type(msg).__name__] += 1
        raise AssertionError(f"no {what} within {timeout} s")

    def close(self) -> None:
        self.frontend.close()
        self.scheduler.close()
        self.ctx.term()


@dataclass
class Member:
    proc: subprocess.Popen
    hubs: Hubs
    log_path: str

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def assert_alive(self, what: str) -> None:
        code = self.proc.poll()
        assert code is None, f"the member exited ({code}) after {what}:\n{self.log()[-4000:]}"


@contextlib.contextmanager
def _member(tmp_path_factory, role: str, *args: str) -> Iterator[Member]:
    """`pagoda <role>` alone, started once the test's hubs are bound, after its hello."""
    run_dir = tempfile.mkdtemp(prefix=f"pagoda-{role}-")
    hubs = Hubs(run_dir)
    log_path = str(tmp_path_factory.mktemp(role) / "member.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pagoda", role, "--run-dir", run_dir, *args],
                                stdout=log, stderr=subprocess.STDOUT)
    member = Member(proc, hubs, log_path)
    try:
        hubs.expect(hubs.scheduler, lambda m: isinstance(m, Hello), f"{role}'s hello", timeout=120)
        yield member
    finally:
        proc.terminate()
        proc.wait(30)
        hubs.close()
        shutil.rmtree(run_dir, ignore_errors=True)


TOKENIZER = "tokenizer-0"
_contexts = itertools.count()


@pytest.fixture(scope="module")
def tokenizer_member(tiny, tmp_path_factory) -> Iterator[Member]:
    folder, _ = tiny("llama")
    with _member(tmp_path_factory, "tokenizer", "--model", str(folder), "--member-id", TOKENIZER) as member:
        yield member


def _tokenizer_round_trip(member: Member, rid: str) -> tuple[list[int], str]:
    """A request through the tokenizer and its tokens back: the prompt's ids it sends the
    scheduler, and the text it sends the frontend for them."""
    hubs = member.hubs
    # Sent again each time, as a generated EngineReady may have left the tokenizer absurd
    # limits, with a context of its own to know when it has been read: the request must not
    # overtake it (they come through different sockets).
    context = 10_000 + next(_contexts)
    hubs.send(hubs.scheduler, TOKENIZER, encode(EngineReady(context, 100, 16, [0])))
    hubs.expect(hubs.frontend, lambda m: isinstance(m, Heartbeat) and m.max_model_len == context, "heartbeat")
    sampling = SamplingParams(temperature=0, max_tokens=8)
    hubs.send(hubs.frontend, TOKENIZER, encode(TokenizeRequest(rid, sampling, prompt=PROMPT)))
    req = hubs.expect(hubs.scheduler, lambda m: isinstance(m, EngineRequest) and m.request_id == rid, "EngineRequest")
    outs = [TokenOutput(rid, req.prompt_token_ids[:8], "length", len(req.prompt_token_ids))]
    hubs.send(hubs.scheduler, TOKENIZER, encode(TokenBatch(outs)))
    texts: list[str] = []

    def finished_text(msg: Any) -> bool:
        mine = [o for o in msg.outputs if o.request_id == rid] if isinstance(msg, TextBatch) else []
        texts.extend(o.text for o in mine)
        return any(o.finish_reason is not None for o in mine)

    hubs.expect(hubs.frontend, finished_text, "TextBatch")
    return req.prompt_token_ids, "".join(texts)


# What the tokenizer gets from each hub: anything, weighted to that hub's own messages.
from_frontend = st.one_of(tokenize_request, abort, EVERY_MESSAGE)
from_scheduler = st.one_of(token_batch, engine_ready, error_reply, scheduler_stats, EVERY_MESSAGE)


@pytest.mark.slow
def test_tokenizer_drops_garbage_frames_from_both_hubs_and_still_answers(tokenizer_member: Member) -> None:
    member, hubs = tokenizer_member, tokenizer_member.hubs
    expected = _tokenizer_round_trip(member, "before")
    checks = itertools.count()

    # One well-formed request always goes in, so the last check below does not hang on chance.
    explicit = TokenizeRequest(request_id="fuzz-explicit", sampling=SamplingParams(max_tokens=1), prompt="hi")

    @FUZZ
    @example([("frontend", [encode(explicit)])])
    @given(st.lists(st.one_of(frames(from_frontend).map(lambda f: ("frontend", f)),
                              frames(from_scheduler).map(lambda f: ("scheduler", f))), min_size=1, max_size=12))
    def fuzz(batch: list[tuple[str, list[bytes | Oversized]]]) -> None:
        for hub, parts in batch:
            hubs.send(hubs.frontend if hub == "frontend" else hubs.scheduler, TOKENIZER, *parts)
        what = f"{sum(len(p) for _, p in batch)} frames"
        assert _tokenizer_round_trip(member, f"check-{next(checks)}") == expected, f"a wrong answer after {what}"
        member.assert_alive(what)

    fuzz()
    # A message that fails to be handled (a generated TokenBatch with ids outside the
    # vocabulary, for a request it holds) is logged with its traceback and dropped, by design.
    log = member.log()
    assert log.count("Traceback") == log.count("failed to handle")
    # Generated requests were tokenized, or refused: they got past the decoder.
    assert hubs.skipped["EngineRequest"] + hubs.skipped["ErrorReply"] > 0, hubs.skipped


@pytest.fixture(scope="module")
def worker_member(tiny, tmp_path_factory) -> Iterator[Member]:
    folder, _ = tiny("llama")
    with _member(tmp_path_factory, "worker", "--model", str(folder), "--device", "cpu", "--kv-cache-memory-gb",
                 "0.01", "--max-model-len", str(MAX_MODEL_LEN)) as member:
        yield member


_step_ids = itertools.count(1)


def _worker_step(member: Member, rid: str) -> int:
    """A one-request prefill through the worker: the token it samples (greedy)."""
    prompt = [5, 6, 7, 8, 9]
    step_id = next(_step_ids)
    plan = StepPlan(step_id, [NewRequestData(rid, prompt, SamplingParams(temperature=0), [1], 0)], [],
                    {rid: len(prompt)}, [])
    member.hubs.send(member.hubs.scheduler, "worker-0", encode(plan))
    result = member.hubs.expect(member.hubs.scheduler, lambda m: isinstance(m, StepResult) and m.step_id == step_id,
                                "StepResult")
    assert result.request_ids == [rid]
    # Let it forget the request: a step that only finishes it.
    member.hubs.send(member.hubs.scheduler, "worker-0", encode(StepPlan(next(_step_ids), [], [], {}, [rid])))
    return result.token_ids[0]


@pytest.mark.slow
def test_worker_drops_garbage_frames_and_still_runs_steps(worker_member: Member) -> None:
    member = worker_member
    expected = _worker_step(member, "before")
    checks = itertools.count()

    # A well-formed plan is the scheduler's to get right (one naming requests the worker never
    # saw makes it exit, to be restarted and rejoin): plans are only sent cut short here.
    @FUZZ
    @given(st.lists(frames(EVERY_MESSAGE, whole=EVERY_MESSAGE.filter(lambda m: not isinstance(m, StepPlan))),
                    min_size=1, max_size=12))
    def fuzz(batch: list[list[bytes | Oversized]]) -> None:
        for parts in batch:
            member.hubs.send(member.hubs.scheduler, "worker-0", *parts)
        what = f"{sum(map(len, batch))} frames"
        assert _worker_step(member, f"check-{next(checks)}") == expected, f"a wrong token after {what}"
        member.assert_alive(what)

    fuzz()
    assert "Traceback" not in member.log()


# ---- every HTTP route, from the app's OpenAPI schema -----------------------------------------


# A token's text may hold any character: these three are line breaks to str.splitlines.
ANSWER = "Hi\u2028there\x85\u2029"


def _answer(req: TokenizeRequest) -> list[msgspec.Struct]:
    """A tokenizer's answer, at once: each of the n samples one token, with what was asked for."""
    p, outs = req.sampling, []
    for i in range(max(p.n, 1)):
        k = p.logprobs or 0
        logprobs = None if p.logprobs is None else Logprobs([-0.5], [[7] * k], [[-0.5] * k], [ANSWER], [[ANSWER] * k])
        prompt_text = (req.prompt or "Hi") if req.echo else None
        outs.append(TextOutput(req.request_id, ANSWER, [7], "length", 3, 1, i, logprobs, None, prompt_text))
    return [TextBatch(outs)]


@dataclass
class Api:
    base_url: str
    schema: dict[str, Any]
    log: list[str]


@pytest.fixture(scope="module")
def api() -> Iterator[Api]:
    """The frontend's app under uvicorn in a thread, with a fake tokenizer that answers at once:
    only the frontend is fuzzed here, so each request costs milliseconds."""
    from frontend.api_server import build_app
    from frontend.engine_client import EngineClient
    from tests.conftest import free_port
    from tests.frontend.test_validation import FakeTokenizer

    run_dir = tempfile.mkdtemp(prefix="pagoda-http-")
    port = free_port()
    config = EngineConfig(run_dir=run_dir, port=port, heartbeat_interval_s=0.2, num_tokenizers=1).with_addresses()
    app = build_app(config, EngineClient(config))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    tokenizer = FakeTokenizer(config, script=_answer).start()
    errors: list[str] = []
    handler = _ListHandler(errors)
    logging.getLogger().addHandler(handler)
    try:
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while not _get_ok(base_url + "/ready"):
            assert time.monotonic() < deadline, "the app is not ready"
            time.sleep(0.05)
        yield Api(base_url, _fuzz_schema(app), errors)
    finally:
        logging.getLogger().removeHandler(handler)
        server.should_exit = True
        thread.join(10)
        tokenizer.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


class _ListHandler(logging.Handler):
    """Keeps the ERROR records (an unhandled exception in a route is logged so)."""

    def __init__(self, records: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


def _get_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _fuzz_schema(app: Any) -> dict[str, Any]:
    """The app's OpenAPI schema, with the request bodies the completion routes read themselves
    (they parse the body with their pydantic model, so FastAPI does not describe it)."""
    from frontend.openai_protocol import ChatCompletionRequest, CompletionRequest

    schema = copy.deepcopy(app.openapi())
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, model in {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}.items():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        content = {"application/json": {"schema": body}}
        schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": content}
    return schema


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_every_http_route_answers_generated_requests_without_a_5xx_or_a_hang(api: Api, mode: str) -> None:
    """Bodies that fit the schema (their values out of range as often as not: the schema has no
    ranges) and bodies that do not (wrong types, missing fields), on every route."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(api.schema)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/health", "/ready", "/metrics", "/v1/models", "/v1/completions",
                                              "/v1/chat/completions"}
    cases = st.one_of([op.as_strategy(generation_mode=GenerationMode(mode)) for op in operations])
    statuses: Counter[int] = Counter()

    @settings(max_examples=int(os.environ.get("PAGODA_HTTP_FUZZ_EXAMPLES", "150")), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(cases)
    def fuzz(case: Any) -> None:
        # requests' timeout bounds every wait for a byte: a hang fails the example.
        response = case.call(base_url=api.base_url, timeout=10)
        statuses[response.status_code] += 1
        assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:500]}"

    fuzz()
    assert not api.log, api.log[:3]
    print(f"{mode}: statuses {dict(statuses)}")


def _nested(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.slow
def test_completion_routes_answer_bodies_that_are_not_requests_with_a_4xx(api: Api) -> None:
    """What a schema never generates: bytes that are not JSON, JSON cut short, nested past any
    parser's depth, numbers past any float, every content type."""
    valid = json.dumps({"prompt": "Hi", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}).encode()
    bodies = st.one_of(
        st.binary(max_size=200),
        st.integers(0, len(valid) - 1).map(lambda n: valid[:n]),
        st.sampled_from([_nested(10_000), _nested(1_000_000), b'{"prompt": "Hi", "n": 1e400}',
                         b'{"prompt": "Hi", "max_tokens": NaN}', b'{"prompt": "\\ud800"}', b"\xff\xfe{}",
                         b'{"prompt": "Hi", "logit_bias": {"1": 1e308, "-1": 0}}', b'{"prompt": [1, -1, 1e20]}']),
        st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
                     max_leaves=12).map(lambda v: json.dumps(v).encode()),
    )
    statuses: Counter[int] = Counter()

    @settings(max_examples=int(os.environ.get("PAGODA_HTTP_FUZZ_EXAMPLES", "150")), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), bodies,
           st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]))
    def fuzz(path: str, body: bytes, content_type: str) -> None:
        resp = httpx.post(api.base_url + path, content=body, headers={"content-type": content_type}, timeout=10)
        statuses[resp.status_code] += 1
        assert 400 <= resp.status_code < 500, f"{path} {body[:200]!r}: {resp.status_code} {resp.text[:300]}"

    fuzz()
    assert not api.log, api.log[:3]
    print(f"statuses {dict(statuses)}")


@pytest.mark.slow
def test_each_streamed_event_is_one_line_even_for_readers_that_split_at_unicode_line_breaks(api: Api) -> None:
    """httpx's `aiter_lines` splits as str.splitlines does, at U+0085, U+2028 and U+2029 too,
    which JSON leaves unescaped: the soak found events cut in two by a token's text."""
    body = {"prompt": "Hi", "max_tokens": 1, "stream": True, "logprobs": 1}
    texts = []
    with httpx.stream("POST", api.base_url + "/v1/completions", json=body, timeout=10) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                texts.append(json.loads(line[6:])["choices"][0]["text"])
    assert "".join(texts) == ANSWER
