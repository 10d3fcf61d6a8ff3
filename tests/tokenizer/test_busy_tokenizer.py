"""A tokenizer kept busy by a burst of long prompts still beats, so the frontend does not take
a busy member for a dead one (and reroute everything it holds)."""

from __future__ import annotations

import time

from protocol import ErrorReply, Heartbeat, Hello, SamplingParams, TokenizeRequest
from protocol.messages import SchedulerInbound
from tests.tokenizer.conftest import Hub, ready

NUM_PROMPTS = 60
PROMPT = "The pagoda by the sea has nine roofs, and every roof has a bell. " * 1500  # ~100 KB


def test_a_burst_of_long_prompts_does_not_silence_the_heartbeats(tokenizer):
    ctx, config, frontend = tokenizer
    scheduler = Hub(ctx, config.scheduler_addr, SchedulerInbound)
    scheduler.expect(Hello)
    scheduler.send(ready("s"))
    frontend.expect(Heartbeat, lambda hb: hb.serving)
    for i in range(NUM_PROMPTS):  # each is tokenized, then refused as longer than the context
        frontend.send(TokenizeRequest(f"long-{i}", SamplingParams(max_tokens=4), prompt=PROMPT))
    began = time.monotonic()
    beats, refused = [], 0
    while refused < NUM_PROMPTS:
        assert frontend.sock.poll(30_000), "the tokenizer stopped answering"
        msg = frontend.decoder.decode(frontend.sock.recv_multipart()[1])
        if isinstance(msg, Heartbeat):
            beats.append(time.monotonic())
        elif isinstance(msg, ErrorReply):
            assert msg.status == 400
            refused += 1
    took = time.monotonic() - began
    gaps = [b - a for a, b in zip([began, *beats], [*beats, time.monotonic()])]
    print(f"\n{NUM_PROMPTS} long prompts in {took:.2f} s; longest heartbeat gap {max(gaps):.3f} s")
    assert took > 10 * config.heartbeat_interval_s  # busy for many intervals...
    assert max(gaps) < 5 * config.heartbeat_interval_s  # ...and never silent for a death's worth
