"""A tokenizer whose scheduler dies, on real sockets between two stand-in hubs: it holds what
arrives meanwhile, says hello to the restarted scheduler and re-submits each live request with its
outputs so far; with no scheduler for SCHEDULER_WAIT_S its requests end with a 503."""

from __future__ import annotations

import pytest

import tokenizer_svc.service
from protocol import (
    EngineRequest,
    ErrorReply,
    Heartbeat,
    Hello,
    SamplingParams,
    TextBatch,
    TokenBatch,
    TokenizeRequest,
    TokenOutput,
)
from protocol.messages import SchedulerInbound
from tests.tokenizer.conftest import Hub, ready


def ask(frontend: Hub, rid: str) -> None:
    sampling = SamplingParams(max_tokens=8, temperature=0)
    frontend.send(TokenizeRequest(rid, sampling, prompt="Tell me about the sea."))


def test_a_new_scheduler_gets_every_live_request_with_its_outputs_so_far_and_the_same_one_only_the_held_ones(
    tokenizer, monkeypatch
):
    ctx, config, frontend = tokenizer
    scheduler = Hub(ctx, config.scheduler_addr, SchedulerInbound)
    scheduler.expect(Hello)
    scheduler.send(ready("first"))
    frontend.expect(Heartbeat, lambda hb: hb.serving)  # it knows the engine: "a" is not refused
    ask(frontend, "a")
    sent = scheduler.expect(EngineRequest)
    assert (sent.request_id, sent.scheduler_id, sent.output_token_ids) == ("a", "first", [])
    scheduler.send(TokenBatch([TokenOutput("a", [1000, 2000], None, len(sent.prompt_token_ids))]))
    frontend.expect(TextBatch)

    scheduler.sock.close()  # it dies
    frontend.expect(Heartbeat, lambda hb: not hb.serving)  # so /health says 503
    ask(frontend, "b")  # held: no scheduler to send it to

    scheduler = Hub(ctx, config.scheduler_addr, SchedulerInbound)  # its restart
    scheduler.expect(Hello)
    scheduler.send(ready("second"))
    again = {m.request_id: m for m in (scheduler.expect(EngineRequest), scheduler.expect(EngineRequest))}
    assert again["a"].output_token_ids == [[1000, 2000]] and again["a"].prompt_token_ids == sent.prompt_token_ids
    assert again["b"].output_token_ids == [[]]
    assert {m.scheduler_id for m in again.values()} == {"second"} and all(m.resume for m in again.values())
    frontend.expect(Heartbeat, lambda hb: hb.serving)

    # The connection drops and the same scheduler (its id) answers: it still runs a and b.
    scheduler.sock.close()
    frontend.expect(Heartbeat, lambda hb: not hb.serving)
    ask(frontend, "c")
    scheduler = Hub(ctx, config.scheduler_addr, SchedulerInbound)
    scheduler.expect(Hello)
    scheduler.send(ready("second"))
    assert scheduler.expect(EngineRequest).request_id == "c"
    with pytest.raises(AssertionError):
        scheduler.expect(EngineRequest, timeout=0.5)

    # Gone for good: past SCHEDULER_WAIT_S the requests end with a 503 instead of hanging.
    monkeypatch.setattr(tokenizer_svc.service, "SCHEDULER_WAIT_S", 0.3)
    scheduler.sock.close()
    failed = [frontend.expect(ErrorReply) for _ in range(3)]
    assert sorted(e.request_id for e in failed) == ["a", "b", "c"] and {e.status for e in failed} == {503}
