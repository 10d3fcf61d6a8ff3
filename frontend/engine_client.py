"""`EngineClient`: the frontend's side of the tokenizer pool, one ROUTER socket on `zmq.asyncio`.

Tokenizers connect DEALER sockets, say `Hello` and heartbeat; the client sends each request to
the least-loaded live tokenizer and routes every reply back to that request's queue by its id.
It runs on whatever asyncio loop calls `start()`: uvloop under uvicorn, or a plain loop in a
background thread for the offline `LLM` API.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from frontend.pending import Pending, estimate_prompt_tokens
from protocol import Decoder, EngineConfig, bind_router, encode
from protocol.messages import (
    Abort,
    DetokenizeReply,
    DetokenizeRequest,
    EngineView,
    ErrorReply,
    FrontendInbound,
    Heartbeat,
    Hello,
    SchedulerStats,
    TextBatch,
    TextOutput,
    TokenizeOnlyReply,
    TokenizeOnlyRequest,
    TokenizeRequest,
    Watch,
)

logger = logging.getLogger(__name__)

# A tokenizer not heard from for this many heartbeat intervals is declared dead.
DEAD_AFTER_HEARTBEATS = 5
# How long a request whose tokenizer died waits for another one before it fails.
REROUTE_WAIT_S = 30.0
# What a client told the queue is full should wait before it tries again.
RETRY_AFTER_S = 1
# A /tokenize or /detokenize call: how long one tokenizer has to answer, and how many it is sent
# to (each after the previous one died or stayed silent) before the call fails with 503.
CALL_TIMEOUT_S = 30.0
CALL_ATTEMPTS = 3
_LOST = object()  # a call's answer when its tokenizer died before answering
# While /engine/stream has a client: how often every tokenizer is told (`Watch`), and for how
# long each one keeps the scheduler building its view. Missed refreshes let it expire.
WATCH_EVERY_S = 0.5
WATCH_TTL_S = 3.0
DEAD_SHOWN_S = 300.0  # a dead tokenizer that never came back leaves the engine view after this long


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
    ready: bool = False  # it knows the engine's limits: it can take requests
    serving: bool = False  # and they run now: the scheduler has a worker
    load: int = 0  # requests it holds, by its own count
    in_flight: set[str] = field(default_factory=set)
    calls: int = 0  # /tokenize and /detokenize calls waiting for its answer


@dataclass
class MemberRecord:
    """A tokenizer as the engine view (/engine) shows it, kept after it died: its latest pid,
    how often it restarted (said hello again with a new pid) and since when it is dead."""

    pid: int
    restarts: int = 0
    dead_since: float | None = None  # declared dead (silent, unreachable), until heard again


class EngineClient:
    """Sends `TokenizeRequest`s to the tokenizer pool and streams back their `TextOutput`s."""

    def __init__(self, config: EngineConfig) -> None:
        if not config.frontend_addr:
            raise ValueError("config.frontend_addr is empty: call EngineConfig.with_addresses() first")
        self.config = config
        self._from_tokenizers = Decoder(FrontendInbound)
        self._dead_after_s = DEAD_AFTER_HEARTBEATS * config.heartbeat_interval_s
        self._members: dict[bytes, _Tokenizer] = {}
        self._requests: dict[str, Pending] = {}
        self._parked: list[str] = []  # requests whose tokenizer died, waiting for a ready one
        # Round trips that run nothing (/tokenize, /detokenize), by call id: (tokenizer, answer).
        self._calls: dict[str, tuple[bytes, asyncio.Future[object]]] = {}
        self._tokens_in_flight = 0  # the estimated prompt tokens of every request in flight
        self._ctx: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # The latest scheduler figures any tokenizer passed on (for /metrics).
        self.scheduler_stats = SchedulerStats()
        self.max_model_len: int | None = None  # the engine's context, once a tokenizer knows it
        self.draining = False  # stopping: new requests are refused, running ones finish
        # Requests sent to each tokenizer since start, by member id (for /metrics).
        self.requests_routed: Counter[str] = Counter()
        # The engine view (/engine): every tokenizer ever heard, by member id, with its restarts;
        # the latest `EngineView` and the steps of the views received, counted since start.
        self.member_records: dict[str, MemberRecord] = {}
        self.engine_view: EngineView | None = None
        self.recent_steps: deque[tuple[int, int]] = deque(maxlen=1024)
        self.num_steps_seen = 0
        self._watch_sent_at = 0.0

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the ROUTER and start the receive and liveness tasks on the running loop."""
        if self._socket is not None:
            return
        self._ctx = zmq.asyncio.Context()
        self._socket = bind_router(self._ctx, self.config.frontend_addr, self.config)
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
        for _, future in self._calls.values():
            if not future.done():
                future.set_result(EngineError.unavailable("The server is shutting down."))
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
    def serving(self) -> bool:
        """True while a request can run now: a ready tokenizer whose scheduler has a worker."""
        return not self.draining and any(m.ready and m.serving for m in list(self._members.values()))

    def fail_all(self, message: str) -> int:
        """End every request in flight with a 503 `message` (and abort it down); how many."""
        for pending in self._requests.values():
            pending.queue.put_nowait(EngineError.unavailable(message))
        return len(self._requests)

    def members(self) -> dict[str, dict[str, object]]:
        """Each live tokenizer's state, by member id (for /health)."""
        return {
            _name(ident): {"pid": m.pid, "ready": m.ready, "serving": m.serving, "requests": len(m.in_flight)}
            for ident, m in list(self._members.items())
        }

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

    def waiting_tokens_estimate(self) -> int:
        """Prompt tokens of the requests not running yet: those in flight but for the oldest
        `num_running` (the scheduler admits in arrival order; at most max_num_seqs to skip)."""
        # Clamped: the figure comes off the wire, and islice raises on a negative or huge count.
        running = max(0, min(self.scheduler_stats.num_running, len(self._requests)))
        oldest = itertools.islice(self._requests.values(), running)
        return self._tokens_in_flight - sum(p.tokens for p in oldest)

    def tokenizer_held(self) -> dict[str, int]:
        """Requests each live tokenizer holds, by its own count (its heartbeat's `load`)."""
        return {_name(ident): m.load for ident, m in list(self._members.items())}

    def watch(self) -> None:
        """Someone watches /engine/stream: tell every tokenizer, which tells the scheduler, to
        build its view for WATCH_TTL_S more (at most every WATCH_EVERY_S, whoever calls)."""
        now = time.monotonic()
        if now - self._watch_sent_at < WATCH_EVERY_S:
            return
        self._watch_sent_at = now
        for identity in list(self._members):  # a member gone makes the send fail: it is dead
            self._send(identity, Watch(WATCH_TTL_S))

    def tokenizer_states(self) -> list[dict[str, object]]:
        """Every tokenizer heard since start, live or dead, for the engine view."""
        now = time.monotonic()
        out = []
        for name, rec in sorted(self.member_records.items()):
            m = self._members.get(name.encode())
            if m is None and rec.dead_since is not None and now - rec.dead_since > DEAD_SHOWN_S:
                del self.member_records[name]  # scaled down, or a pod whose name changed on restart
                continue
            if m is None:
                state = "dead"
            elif not m.ready:
                state = "restarting" if rec.restarts else "starting"
            elif now - m.last_seen > 2 * self.config.heartbeat_interval_s:
                state = "silent"  # no heartbeat for two intervals; dead after DEAD_AFTER_HEARTBEATS
            else:
                state = "up"
            out.append({
                "id": name, "state": state, "pid": rec.pid, "restarts": rec.restarts,
                "load": 0 if m is None else m.load, "in_flight": 0 if m is None else len(m.in_flight),
                "serving": bool(m is not None and m.serving),
                "dead_for_s": None if rec.dead_since is None else round(now - rec.dead_since, 1),
            })
        return out

    def _on_view(self, view: EngineView) -> None:
        """Keep the newest view; each comes through every tokenizer, its steps are counted once."""
        last = self.engine_view
        if last is not None and last.scheduler_id == view.scheduler_id and view.seq <= last.seq:
            return
        self.engine_view = view
        self.recent_steps.extend(view.steps)
        self.num_steps_seen += len(view.steps)

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

    async def generate(
        self, req: TokenizeRequest, max_waiting: int | None = None, max_waiting_tokens: int | None = None
    ) -> AsyncIterator[TextOutput]:
        """Yield the request's outputs until each of its `n` samples has finished.

        Raises `EngineError` when the engine rejects the request or its tokenizer dies, and a
        503 (with Retry-After) when `max_waiting` requests or more are already waiting, or when
        this one's prompt would take the tokens waiting past `max_waiting_tokens`. A
        consumer that stops early (client gone: `GeneratorExit` or `CancelledError`) aborts
        the request all the way down.
        """
        if self._socket is None:
            raise RuntimeError("EngineClient.generate() called before start()")
        if req.request_id in self._requests:
            raise ValueError(f"request id {req.request_id!r} is already in flight")
        if self.draining:
            raise EngineError(
                503, "The server is shutting down; retry on another replica or after it restarts.",
                "server_error", headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        # Checked here, with no await before the request is counted in flight, so that a
        # burst of requests cannot all pass the check before any of them is counted.
        if max_waiting is not None and self.num_waiting_estimate >= max_waiting:
            raise _overloaded(f"{max_waiting} requests are already waiting")
        tokens = estimate_prompt_tokens(req)
        if max_waiting_tokens is not None and self.waiting_tokens_estimate() + tokens > max_waiting_tokens:
            raise _overloaded(f"the prompts waiting would pass {max_waiting_tokens} tokens")
        member = self._pick_tokenizer()
        rid = req.request_id
        pending = Pending(owner=member.identity, request=req, tokens=tokens)
        self._requests[rid] = pending
        self._tokens_in_flight += tokens
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
            if not finished:
                # Through its tokenizer, or any live one if it waited for a new one: every
                # tokenizer passes an Abort on to the scheduler.
                owner = pending.owner if pending.owner in self._members else next(iter(self._members), None)
                if owner is not None:
                    self._send(owner, Abort([rid]))

    async def call(
        self, make: Callable[[str], TokenizeOnlyRequest | DetokenizeRequest]
    ) -> TokenizeOnlyReply | DetokenizeReply:
        """One round trip to a ready tokenizer that runs nothing: `make(call_id)` is sent, its
        reply returned (an `ErrorReply` raised as `EngineError`).

        A tokenizer that dies before it answers (silent, restarted, unreachable) or stays silent
        for CALL_TIMEOUT_S: the call goes again, under a new id, to another ready one (one not
        tried yet first), up to CALL_ATTEMPTS tokenizers. None ready: 503 at once, as for
        `generate`; after a loss, the call waits up to REROUTE_WAIT_S for one.
        """
        if self._socket is None:
            raise RuntimeError("EngineClient.call() called before start()")
        if self.draining:
            raise EngineError(
                503, "The server is shutting down; retry on another replica or after it restarts.",
                "server_error", headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        tried: set[bytes] = set()
        for attempt in range(CALL_ATTEMPTS):
            member = self._pick_tokenizer(avoid=tried) if attempt == 0 else await self._ready_tokenizer(tried)
            tried.add(member.identity)
            call_id = f"call-{uuid.uuid4().hex}"
            future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            self._calls[call_id] = (member.identity, future)
            member.calls += 1
            try:
                self._send(member.identity, make(call_id))
                reply = await asyncio.wait_for(future, CALL_TIMEOUT_S)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                logger.warning("tokenizer %s did not answer %s within %g s", _name(member.identity), call_id,
                               CALL_TIMEOUT_S)
                continue
            finally:
                self._calls.pop(call_id, None)
                member.calls -= 1
            if reply is _LOST:
                continue
            if isinstance(reply, EngineError):
                raise reply
            assert isinstance(reply, TokenizeOnlyReply | DetokenizeReply)
            return reply
        raise EngineError.unavailable(f"No tokenizer answered this request ({CALL_ATTEMPTS} tried); try again.")

    async def _ready_tokenizer(self, avoid: set[bytes]) -> _Tokenizer:
        """A ready tokenizer, waiting up to REROUTE_WAIT_S for one (a call whose tokenizer died)."""
        deadline = time.monotonic() + REROUTE_WAIT_S
        while not any(m.ready for m in self._members.values()):
            if time.monotonic() >= deadline:
                raise EngineError.unavailable(f"No tokenizer came back within {REROUTE_WAIT_S:g} s to answer.")
            await asyncio.sleep(min(0.05, self.config.heartbeat_interval_s / 4))
        return self._pick_tokenizer(avoid)

    def _answer_call(self, identity: bytes, call_id: str, reply: object) -> bool:
        """Hand a call its reply; False if `call_id` is no call in flight."""
        call = self._calls.get(call_id)
        if call is None:
            return False
        owner, future = call
        if owner != identity:
            logger.warning("dropping a reply for %s from %s, which does not own it", call_id, _name(identity))
        elif not future.done():
            future.set_result(reply)
        return True

    def _pick_tokenizer(self, avoid: Collection[bytes] = ()) -> _Tokenizer:
        candidates = [m for m in self._members.values() if m.ready]
        if not candidates:
            if self._members:
                raise EngineError.unavailable("The engine is still starting up; try again shortly.")
            raise EngineError.unavailable("No tokenizer is connected to the server; try again shortly.")
        return min(candidates, key=lambda m: (m.identity in avoid, len(m.in_flight) + m.calls, m.identity))

    def _forget(self, request_id: str) -> None:
        pending = self._requests.pop(request_id, None)
        if pending is not None:
            self._tokens_in_flight -= pending.tokens
        if pending is not None and pending.owner is not None:
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
                logger.warning("tokenizer %s restarted (pid %d)", _name(identity), msg.pid)
                del self._members[identity]
                self._reroute(member)
                member = None
            if member is None:
                logger.info("tokenizer %s (pid %d) joined", _name(identity), msg.pid)
                member = self._members[identity] = _Tokenizer(identity, msg.pid, now)
            member.pid = msg.pid
            member.last_seen = now
            record = self.member_records.setdefault(_name(identity), MemberRecord(msg.pid))
            if record.pid not in (0, msg.pid):
                record.restarts += 1
            record.pid, record.dead_since = msg.pid, None
            return
        if member is None:
            # A tokenizer that outlived a frontend restart heartbeats without a new Hello.
            logger.info("tokenizer %s joined without a Hello", _name(identity))
            member = self._members[identity] = _Tokenizer(identity, pid=0, last_seen=now)
            self.member_records.setdefault(_name(identity), MemberRecord(0)).dead_since = None
        member.last_seen = now
        if isinstance(msg, Heartbeat):
            member.ready, member.serving, member.load = msg.ready, msg.serving, msg.load
            if msg.max_model_len:
                self.max_model_len = msg.max_model_len
            if msg.stats is not None:
                self.scheduler_stats = msg.stats
                if msg.stats.engine_view is not None:
                    self._on_view(msg.stats.engine_view)
            if member.ready and self._parked:
                self._place_parked()
        elif isinstance(msg, TextBatch):
            for out in msg.outputs:
                self._deliver(identity, out.request_id, out)
        elif isinstance(msg, TokenizeOnlyReply | DetokenizeReply):
            self._answer_call(identity, msg.request_id, msg)
        else:
            error = EngineError(msg.status, msg.message, msg.error_type, msg.param)
            if not self._answer_call(identity, msg.request_id, error):
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
        if isinstance(item, TextOutput) and (item := pending.resumed(item)) is None:
            return  # its consumer has all of it already (a resumed request's first outputs)
        pending.queue.put_nowait(item)

    # ---- liveness ------------------------------------------------------------------------

    async def _liveness_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            cutoff = time.monotonic() - self._dead_after_s
            for identity in [i for i, m in self._members.items() if m.last_seen < cutoff]:
                self._declare_dead(identity, f"silent for over {self._dead_after_s:g}s")
            self._place_parked()

    def _declare_dead(self, identity: bytes, why: str) -> None:
        member = self._members.pop(identity, None)
        if member is None:
            return
        logger.warning("tokenizer %s is dead: %s", _name(identity), why)
        if (record := self.member_records.get(_name(identity))) is not None:
            record.dead_since = time.monotonic()
        self._reroute(member)

    def _reroute(self, member: _Tokenizer) -> None:
        """The requests of a tokenizer that died go on through another one.

        The new tokenizer tokenizes each again (the same ids), the scheduler hands it the
        request and every output token so far, and `Pending.resumed` drops what the client
        already has, so the stream goes on where it stopped. Nothing is sent to the dead
        member: an Abort passed on by one that was only stalled would stop the request.
        """
        for owner, future in self._calls.values():
            if owner == member.identity and not future.done():
                future.set_result(_LOST)  # the call goes again to another tokenizer
        now = time.monotonic()
        for rid in sorted(member.in_flight):
            pending = self._requests.get(rid)
            if pending is not None:
                pending.owner, pending.parked_at = None, now
                self._parked.append(rid)
        member.in_flight.clear()
        if self._parked:
            logger.warning("%d requests of tokenizer %s go on elsewhere", len(self._parked), _name(member.identity))
            self._place_parked()

    def _place_parked(self) -> None:
        """Send each parked request to a ready tokenizer; fail those that waited too long."""
        parked, self._parked = self._parked, []
        now = time.monotonic()
        for rid in parked:
            pending = self._requests.get(rid)
            if pending is None or pending.owner is not None:
                continue  # finished (its client left) while it waited
            candidates = [m for m in self._members.values() if m.ready]
            if not candidates:
                if now - pending.parked_at > REROUTE_WAIT_S:
                    msg = f"No tokenizer came back within {REROUTE_WAIT_S:g} s to go on with this request."
                    pending.queue.put_nowait(EngineError.unavailable(msg))
                else:
                    self._parked.append(rid)
                continue
            member = min(candidates, key=lambda m: (len(m.in_flight), m.identity))
            pending.owner = member.identity
            pending.rerouted()
            member.in_flight.add(rid)
            self.requests_routed[_name(member.identity)] += 1
            self._send(member.identity, msgspec.structs.replace(pending.request, resume=True))


def _log_send_failure(future: asyncio.Future[object]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("a deferred send to a tokenizer failed: %s", future.exception())


def _name(identity: bytes) -> str:
    """A member's zmq identity is its member id (`tokenizer-0`)."""
    return identity.decode(errors="replace")


def _overloaded(why: str) -> EngineError:
    return EngineError(
        503, f"The server is overloaded: {why}. Retry shortly.", "server_error",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )
