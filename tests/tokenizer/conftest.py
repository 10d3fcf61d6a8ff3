"""The tokenizer on real sockets between stand-in hubs: a ROUTER for the frontend (and, in a
test, one for the scheduler), the real `TokenizerService` in a thread."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from protocol import Decoder, EngineConfig, EngineReady, Shutdown, bind_router, encode
from protocol.messages import FrontendInbound
from tokenizer_svc.service import TokenizerService

MEMBER = "tokenizer-0"


class Hub:
    """A ROUTER standing in for the frontend or the scheduler."""

    def __init__(self, ctx: zmq.Context, addr: str, accepts) -> None:
        self.sock = bind_router(ctx, addr)
        self.decoder = Decoder(accepts)

    def send(self, msg) -> None:
        self.sock.send_multipart([MEMBER.encode(), encode(msg)])

    def expect(self, kind, check=lambda m: True, timeout: float = 10.0):
        """The next message of type `kind` that passes `check` (others are skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                msg = self.decoder.decode(self.sock.recv_multipart()[1])
                if isinstance(msg, kind) and check(msg):
                    return msg
        raise AssertionError(f"no {kind.__name__} within {timeout} s")


@pytest.fixture()
def tokenizer(tmp_path):
    ctx = zmq.Context()
    config = EngineConfig(frontend_addr=f"ipc://{tmp_path}/frontend.sock", scheduler_addr=f"ipc://{tmp_path}/s.sock",
                          heartbeat_interval_s=0.05)
    frontend = Hub(ctx, config.frontend_addr, FrontendInbound)
    service = TokenizerService(config, MEMBER)
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    yield ctx, config, frontend
    frontend.send(Shutdown())
    thread.join(10)
    ctx.destroy(linger=0)  # the stand-in hubs too, whatever the test left open


def ready(scheduler_id: str) -> EngineReady:
    return EngineReady(max_model_len=512, num_blocks=100, block_size=16, scheduler_id=scheduler_id)
