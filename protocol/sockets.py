"""ZeroMQ helpers: hubs bind ROUTER, pool members connect DEALER; `encode` to send, a `Decoder` per inbound socket.

Over tcp:// every socket is CURVE-encrypted and authenticated (protocol/curve.py): a hub is a
CURVE server whose ZAP handler (one thread per ZeroMQ context) lets in only the public keys of
the roles it serves, and then drops any message whose sender's identity is not of its key's
role; a member is a CURVE client that knows its hub's public key. ipc:// needs none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio
import zmq.auth
import zmq.utils.z85

from protocol.config import EngineConfig
from protocol.curve import VettedAsyncRouter, VettedRouter, Vetting, needs_keys, transport_keys, zap_handler

logger = logging.getLogger(__name__)

# One encoder for every socket: any message encodes the same whoever receives it.
_encoder = msgspec.msgpack.Encoder()

def bind_router(ctx: zmq.Context, addr: str, config: EngineConfig | None = None) -> zmq.Socket:
    """The hub's ROUTER bound at `addr` (exactly). Over tcp:// a CURVE server that lets in only
    the members `HUB_ACCEPTS` names; which hub it is comes from `addr` in `config`."""
    curve = transport_keys(config, addr) if needs_keys(addr) else None
    if curve is not None:
        socket_class = VettedAsyncRouter if isinstance(ctx, zmq.asyncio.Context) else VettedRouter
        sock = ctx.socket(zmq.ROUTER, socket_class=socket_class)
        sock.curve_server = True
        sock.curve_secretkey = curve.secret
        sock.curve_publickey = curve.public
        domain = zap_handler(ctx).admit(curve.role, addr, curve.peers)
        sock.zap_domain = domain.encode()
        sock._vetting = Vetting(curve.role, addr)
    else:
        sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    # Fail loudly instead of silently dropping a message to a member that went away.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(addr)
    return sock


def connect_dealer(
    ctx: zmq.Context,
    addr: str,
    identity: str,
    config: EngineConfig | None = None,
    before_connect: Callable[[zmq.Socket], object] | None = None,
) -> zmq.Socket:
    """A member's DEALER to the hub at `addr`. Over tcp:// a CURVE client with the key pair of
    its role (from `identity`: `tokenizer*`, `worker*`) and the public key of the hub `addr` is.
    `before_connect` gets the socket first (to attach a monitor that sees the first connect)."""
    curve = transport_keys(config, addr, identity) if needs_keys(addr) else None
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    if curve is not None:
        sock.curve_secretkey = curve.secret
        sock.curve_publickey = curve.public
        sock.curve_serverkey = curve.server
    if before_connect is not None:
        before_connect(sock)
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
        """The message, or None for a malformed or unexpected frame (logged, never raised).

        RecursionError too: msgspec skips a field it does not know by walking its value, and a
        value nested deeper than Python's recursion limit (a few bytes a level) raises that."""
        try:
            return self._decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as e:
            logger.warning("dropping a malformed frame of %d bytes: %s", len(frame), e)
            return None


