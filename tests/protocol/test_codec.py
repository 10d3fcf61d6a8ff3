"""The wire codec: `encode` any message, and each socket's `Decoder` reads back exactly its own union."""

from __future__ import annotations

import logging
import typing

import msgspec
import pytest

from protocol import Decoder, encode
from protocol.messages import (
    Abort,
    CachedRequestData,
    ChatMessage,
    DetokenizeReply,
    DetokenizeRequest,
    DraftPlan,
    DraftRequest,
    DraftResult,
    DraftSetup,
    DraftWorkerInbound,
    EngineReady,
    EngineRequest,
    EngineView,
    ErrorReply,
    FrontendInbound,
    GroupView,
    Heartbeat,
    Hello,
    KVGrid,
    Logprobs,
    NewRequestData,
    SamplingParams,
    SchedulerInbound,
    SchedulerStats,
    Shutdown,
    StepPlan,
    StepResult,
    TextBatch,
    TextOutput,
    TokenBatch,
    TokenizeOnlyReply,
    TokenizeOnlyRequest,
    TokenizeRequest,
    TokenizerFromFrontend,
    TokenizerFromScheduler,
    TokenOutput,
    Watch,
    WorkerInbound,
)

SAMPLING = SamplingParams(n=2, temperature=0.7, stop=["\n"], logit_bias={5: -100.0}, logprobs=2)
LOGPROBS = Logprobs([-0.5], [[3, 4]], [[-0.5, -1.5]], ["a"], [["a", "b"]])

# One message of every type that crosses a socket, its optional fields filled in.
EXAMPLES: list[msgspec.Struct] = [
    Hello("worker", "worker-0", 42, rank=0, num_blocks=64, max_model_len=512, eos_token_ids=[2]),
    Heartbeat("tokenizer-0", load=3, ready=True, stats=SchedulerStats(num_running=1, kv_cache_usage=0.25)),
    SchedulerStats(num_running=2, num_waiting=1, num_preemptions=3, worker_busy_s=1.5),
    SchedulerStats(num_running=1, num_engine_views=4, engine_view=EngineView(
        4, "sched", [GroupView(0, "serving", 2, ["worker-0", "worker-1"], [10, 11], {"worker-1": 1}, 1, 2,
                               KVGrid(5, 2, [2, 0, 1], [0, 1, 0]))], steps=[(30, 2), (0, 3)])),
    Watch(ttl_s=2.5),
    EngineReady(max_model_len=512, num_blocks=64, block_size=16, eos_token_ids=[2]),
    TokenizeRequest("chatcmpl-1", SAMPLING, messages=[ChatMessage("user", "Hi")], arrival_time=1.0),
    EngineRequest("cmpl-1", [1, 2, 3], SAMPLING, "tokenizer-0", 1.0),
    Abort(["cmpl-1"], reason="stop", indices=[1]),
    ErrorReply("cmpl-1", 400, "the prompt is empty", param="prompt"),
    TokenizeOnlyRequest("call-1", messages=[ChatMessage("user", "Hi")], add_special_tokens=False,
                        return_token_strs=True),
    TokenizeOnlyReply("call-1", [1, 2], 512, token_strs=["a", "b"]),
    DetokenizeRequest("call-2", [1, 2]),
    DetokenizeReply("call-2", "ab"),
    StepPlan(
        step_id=7,
        new_requests=[NewRequestData("a", [1, 2], SAMPLING, [0], 0, num_output_tokens=1)],
        cached_requests=[CachedRequestData("b", [3], 16)],
        num_scheduled_tokens={"a": 2, "b": 1},
        finished_request_ids=["c"],
        block_copies=[(1, 2)],
    ),
    StepResult(7, ["a", "b"], [5, 6], [-0.1, -0.2], [[5], [6]], [[-0.1], [-0.2]], idle_s=0.5, execute_s=0.25),
    Shutdown("scheduler stopping"),
    DraftSetup(num_blocks=64, max_model_len=512, vocab_size=320),
    DraftPlan(7, [DraftRequest("a", [1, 2, 3], 1, [0, 4], num_drafts=3)]),
    DraftResult(7, {"a": [4, 5, 6]}, execute_s=0.01),
    TokenBatch([TokenOutput("a", [5], "stop", 2, index=1, logprobs=LOGPROBS)]),
    TextBatch([TextOutput("a", "Hi", [5], "stop", 2, 1, index=1, logprobs=LOGPROBS, stop_reason="\n")]),
]

UNIONS = {
    "frontend": FrontendInbound,
    "tokenizer from the frontend": TokenizerFromFrontend,
    "tokenizer from the scheduler": TokenizerFromScheduler,
    "scheduler": SchedulerInbound,
    "worker": WorkerInbound,
    "draft worker": DraftWorkerInbound,
}


def accepts(union: object, msg: msgspec.Struct) -> bool:
    return type(msg) in typing.get_args(union)


@pytest.mark.parametrize("socket", UNIONS)
def test_every_message_of_a_sockets_union_round_trips(socket: str) -> None:
    union, inbound = UNIONS[socket], Decoder(UNIONS[socket])
    mine = [m for m in EXAMPLES if accepts(union, m)]
    assert {type(m) for m in mine} == set(typing.get_args(union))  # EXAMPLES covers the union
    for msg in mine:
        assert inbound.decode(encode(msg)) == msg


@pytest.mark.parametrize("socket", UNIONS)
def test_a_message_of_another_sockets_union_is_dropped(socket: str, caplog: pytest.LogCaptureFixture) -> None:
    union, inbound = UNIONS[socket], Decoder(UNIONS[socket])
    others = [m for m in EXAMPLES if not accepts(union, m)]
    assert others
    with caplog.at_level(logging.WARNING, logger="protocol.sockets"):
        for msg in others:
            assert inbound.decode(encode(msg)) is None
    assert len(caplog.records) == len(others)


@pytest.mark.parametrize("frame", [b"", b"\xc1 not msgpack", encode(SAMPLING), msgspec.msgpack.encode([1, 2])])
def test_a_malformed_frame_is_dropped_not_raised(frame: bytes, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="protocol.sockets"):
        assert Decoder(SchedulerInbound).decode(frame) is None
    assert "dropping a malformed frame" in caplog.text


@pytest.mark.parametrize("socket", UNIONS)
def test_a_field_nested_past_the_recursion_limit_is_dropped_not_raised(
    socket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by tests/e2e/test_fuzz.py: an unknown field whose value is 100,000 nested arrays
    (msgspec walks it to skip it, and Python's recursion limit ends the walk) killed the worker."""
    union = UNIONS[socket]
    msg = next(m for m in EXAMPLES if accepts(union, m))
    head = msgspec.msgpack.encode({"type": type(msg).__name__})
    frame = bytes([head[0] + 1]) + head[1:] + msgspec.msgpack.encode("junk") + b"\x91" * 100_000 + b"\x00"
    with caplog.at_level(logging.WARNING, logger="protocol.sockets"):
        assert Decoder(union).decode(frame) is None
    assert "dropping a malformed frame" in caplog.text and "recursion" in caplog.text
    assert Decoder(union).decode(encode(msg)) == msg  # the next frame still decodes
