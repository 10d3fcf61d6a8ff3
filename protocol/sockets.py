"""ZeroMQ helpers: hubs bind ROUTER, pool members connect DEALER; `encode` to send, a `Decoder` per inbound socket."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import zmq

logger = logging.getLogger(__name__)

# One encoder for every socket: any message encodes the same whoever receives it.
_encoder = msgspec.msgpack.Encoder()


def bind_router(ctx: zmq.Context, addr: str) -> zmq.Socket:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    # Fail loudly instead of silently dropping a message to a member that went away.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(addr)
    return sock


def connect_dealer(ctx: zmq.Context, addr: str, identity: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(addr)
    return sock


def encode(msg: msgspec.Struct) -> bytes:
    """The frame that carries `msg` to any socket."""
    return _encoder.encode(msg)


class Decoder:
    """Reads the frames arriving on one socket: only the union of messages that socket accepts."""

    def __init__(self, accepts: Any) -> None:
        self._decoder = msgspec.msgpack.Decoder(accepts)

    def decode(self, frame: bytes) -> Any | None:
        """The message, or None for a malformed or unexpected frame (logged, never raised)."""
        try:
            return self._decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            logger.warning("dropping a malformed frame of %d bytes: %s", len(frame), e)
            return None
