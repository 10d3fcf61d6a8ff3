"""`EngineClient`: the frontend's side of the tokenizer pool, one ROUTER socket on `zmq.asyncio`.

Tokenizers connect DEALER sockets, say `Hello` and heartbeat; the client sends each request to
the least-loaded live tokenizer and routes every reply back to that request's queue by its id.
It runs on whatever asyncio loop calls `start()`: uvloop under uvicorn, or a plain loop in a
background thread for the offline `LLM` API.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from protocol import Decoder, EngineConfig, bind_router, encode
from protocol.messages import (
    Abort,
    ErrorReply,
    FrontendInbound,
    Heartbeat,
    Hello,
    SchedulerStats,
    TextBatch,
    TextOutput,
    TokenizeRequest,
)

logger = logging.getLogger(__name__)

# A tokenizer not heard from for this many heartbeat intervals is declared dead.
DEAD_AFTER_HEARTBEATS = 5
# What a client told the queue is full should wait before it tries again.
RETRY_AFTER_S = 1


class EngineError(Exception):
    """A request the engine cannot serve; the API answers it as OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.headers = headers

    @classmethod
    def unavailable(cls, message: str) -> EngineError:
        return cls(503, message, "server_error")


@dataclass
class _Tokenizer:
    """What the client knows of one pool member; `in_flight` is its load."""

    identity: bytes
    pid: int
    last_seen: float
    ready: bool = False
    in_flight: set[str] = field(default_factory=set)


@dataclass
class _Pending:
    owner: bytes
    queue: asyncio.Queue[TextOutput | EngineError] = field(default_factory=asyncio.Queue)


class EngineClient:
    """Sends `TokenizeRequest`s to the tokenizer pool and streams back their `TextOutput`s."""

    def __init__(self, config: EngineConfig) -> None:
        if not config.frontend_addr:
            raise ValueError("config.frontend_addr is empty: call EngineConfig.with_addresses() first")
        self.config = config
        self._from_tokenizers = Decoder(FrontendInbound)
        self._dead_after_s = DEAD_AFTER_HEARTBEATS * config.heartbeat_interval_s
        self._members: dict[bytes, _Tokenizer] = {}
        self._requests: dict[str, _Pending] = {}
        self._ctx: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # The latest scheduler figures any tokenizer passed on (for /metrics).
        self.scheduler_stats = SchedulerStats()
        # Requests sent to each tokenizer since start, by member id (for /metrics).
        self.requests_routed: Counter[str] = Counter()

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the ROUTER and start the receive and liveness tasks on the running loop."""
        if self._socket is not None:
            return
        self._ctx = zmq.asyncio.Context()
        self._socket = bind_router(self._ctx, self.config.frontend_addr)
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="engine-client-recv"),
            asyncio.create_task(self._liveness_loop(), name="engine-client-liveness"),
        ]

    async def close(self) -> None:
        """Fail every open request, stop the tasks and release the socket."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for pending in self._requests.values():
            pending.queue.put_nowait(EngineError.unavailable("The server is shutting down."))
        self._members.clear()
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # ---- state ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once at least one live tokenizer reports that the engine behind it is up."""
        # list() first: the offline API reads this from another thread than the loop's.
        return any(m.ready for m in list(self._members.values()))

    @property
    def num_tokenizers_live(self) -> int:
        return len(self._members)

    @property
    def num_tokenizers_ready(self) -> int:
        return sum(m.ready for m in list(self._members.values()))

    @property
    def num_in_flight(self) -> int:
        return len(self._requests)

    @property
    def num_waiting_estimate(self) -> int:
        """Requests not running yet: the scheduler's last count, or more if requests came since.

        The scheduler's figures arrive at most every 0.2 s, so a burst is counted here by what
        is in flight and not running; the scheduler's count covers requests whose client left.
        """
        stats = self.scheduler_stats
        return max(stats.num_waiting, len(self._requests) - stats.num_running)

    def tokenizer_loads(self) -> dict[str, int]:
        """In-flight requests per live tokenizer, by member id."""
        return {_name(ident): len(m.in_flight) for ident, m in list(self._members.items())}

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until `ready` (polling at a fraction of the heartbeat); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poll_s = min(0.05, self.config.heartbeat_interval_s / 4)
        while not self.ready:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(poll_s)
        return True

    # ---- requests ------------------------------------------------------------------------

    async def generate(self, req: TokenizeRequest, max_waiting: int | None = None) -> AsyncIterator[TextOutput]:
        """Yield the request's outputs until each of its `n` samples has finished.

        Raises `EngineError` when the engine rejects the request or its tokenizer dies, and a
        503 (with Retry-After) when `max_waiting` requests or more are already waiting. A
        consumer that stops early (client gone: `GeneratorExit` or `CancelledError`) aborts
        the request all the way down.
        """
        if self._socket is None:
            raise RuntimeError("EngineClient.generate() called before start()")
        if req.request_id in self._requests:
            raise ValueError(f"request id {req.request_id!r} is already in flight")
        # Checked here, with no await before the request is counted in flight, so that a
        # burst of requests cannot all pass the check before any of them is counted.
        if max_waiting is not None and self.num_waiting_estimate >= max_waiting:
            raise EngineError(
                503,
                f"The server is overloaded: {max_waiting} requests are already waiting. Retry shortly.",
                "server_error",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        member = self._pick_tokenizer()
        rid = req.request_id
        pending = _Pending(owner=member.identity)
        self._requests[rid] = pending
        member.in_flight.add(rid)
        self.requests_routed[_name(member.identity)] += 1
        finished = False
        unfinished = set(range(req.sampling.n))
        try:
            self._send(member.identity, req)
            while True:
                item = await pending.queue.get()
                if isinstance(item, EngineError):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    unfinished.discard(item.index)
                    finished = not unfinished
                yield item
                if finished:
                    return
        finally:
            self._forget(rid)
            if not finished and pending.owner in self._members:
                self._send(pending.owner, Abort([rid]))

    def _pick_tokenizer(self) -> _Tokenizer:
        candidates = [m for m in self._members.values() if m.ready]
        if not candidates:
            if self._members:
                raise EngineError.unavailable("The engine is still starting up; try again shortly.")
            raise EngineError.unavailable("No tokenizer is connected to the server; try again shortly.")
        return min(candidates, key=lambda m: (len(m.in_flight), m.identity))

    def _forget(self, request_id: str) -> None:
        pending = self._requests.pop(request_id, None)
        if pending is not None:
            member = self._members.get(pending.owner)
            if member is not None:
                member.in_flight.discard(request_id)

    def _send(self, identity: bytes, msg: msgspec.Struct) -> None:
        """Send without awaiting, so that it also works while a generator is being torn down.

        With an unbounded send queue a ROUTER send completes at once; a peer that is gone
        makes it fail at once too (ROUTER_MANDATORY), and that peer is then declared dead.
        """
        assert self._socket is not None
        future = self._socket.send_multipart([identity, encode(msg)])
        if future.done():
            error = future.exception()
            if isinstance(error, zmq.ZMQError):
                self._declare_dead(identity, f"unreachable ({error})")
            elif error is not None:
                raise error
        else:
            future.add_done_callback(_log_send_failure)

    # ---- receiving -----------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        assert self._socket is not None
        while True:
            frames = await self._socket.recv_multipart()
            if len(frames) != 2:
                logger.warning("dropping a message of %d frames (expected 2)", len(frames))
                continue
            identity, payload = frames
            msg = self._from_tokenizers.decode(payload)
            if msg is None:
                continue
            try:
                self._handle(identity, msg)
            except Exception:
                logger.exception("error handling %s from %s", type(msg).__name__, _name(identity))

    def _handle(self, identity: bytes, msg: Hello | Heartbeat | TextBatch | ErrorReply) -> None:
        now = time.monotonic()
        member = self._members.get(identity)
        if isinstance(msg, Hello):
            if member is not None and member.pid not in (0, msg.pid):
                # A restarted tokenizer has forgotten the requests its predecessor owned.
                self._fail_requests(member, "The tokenizer serving this request restarted.")
                member = None
            if member is None:
                logger.info("tokenizer %s (pid %d) joined", _name(identity), msg.pid)
                member = self._members[identity] = _Tokenizer(identity, msg.pid, now)
            member.pid = msg.pid
            member.last_seen = now
            return
        if member is None:
            # A tokenizer that outlived a frontend restart heartbeats without a new Hello.
            logger.info("tokenizer %s joined without a Hello", _name(identity))
            member = self._members[identity] = _Tokenizer(identity, pid=0, last_seen=now)
        member.last_seen = now
        if isinstance(msg, Heartbeat):
            member.ready = msg.ready
            if msg.stats is not None:
                self.scheduler_stats = msg.stats
        elif isinstance(msg, TextBatch):
            for out in msg.outputs:
                self._deliver(identity, out.request_id, out)
        else:
            error = EngineError(msg.status, msg.message, msg.error_type, msg.param)
            self._deliver(identity, msg.request_id, error)

    def _deliver(self, identity: bytes, request_id: str, item: TextOutput | EngineError) -> None:
        pending = self._requests.get(request_id)
        if pending is None:
            return  # aborted or finished here while the reply was on its way
        if pending.owner != identity:
            logger.warning(
                "dropping a reply for %s from %s, which does not own it", request_id, _name(identity)
            )
            return
        pending.queue.put_nowait(item)

    # ---- liveness ------------------------------------------------------------------------

    async def _liveness_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            cutoff = time.monotonic() - self._dead_after_s
            for identity in [i for i, m in self._members.items() if m.last_seen < cutoff]:
                self._declare_dead(identity, f"silent for over {self._dead_after_s:g}s")

    def _declare_dead(self, identity: bytes, why: str) -> None:
        member = self._members.pop(identity, None)
        if member is None:
            return
        logger.warning("tokenizer %s is dead: %s", _name(identity), why)
        self._fail_requests(member, "The tokenizer serving this request stopped responding.")

    def _fail_requests(self, member: _Tokenizer, message: str) -> None:
        orphans = list(member.in_flight)
        member.in_flight.clear()
        for rid in orphans:
            pending = self._requests.get(rid)
            if pending is not None:
                pending.queue.put_nowait(EngineError.unavailable(message))
        if orphans:
            # Best effort: a tokenizer that was only stalled, or restarted under the same id,
            # passes this on so the scheduler stops generating for requests failed here.
            self._send(member.identity, Abort(orphans))


def _log_send_failure(future: asyncio.Future[object]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("a deferred send to a tokenizer failed: %s", future.exception())


def _name(identity: bytes) -> str:
    """A member's zmq identity is its member id (`tokenizer-0`)."""
    return identity.decode(errors="replace")
