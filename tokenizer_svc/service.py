"""A tokenizer pool member: between the frontend (text) and the scheduler (token ids).

Two DEALER sockets, one to each hub, both with this member's id as identity. Requests come
from the frontend, are tokenized and checked, and go to the scheduler; token batches come
back from the scheduler once per step and leave for the frontend as one text batch.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from protocol import (
    Abort,
    Decoder,
    EngineConfig,
    EngineReady,
    EngineRequest,
    ErrorReply,
    Heartbeat,
    Hello,
    SchedulerStats,
    Shutdown,
    TextBatch,
    TokenBatch,
    TokenizeRequest,
    connect_dealer,
    encode,
)
from protocol.messages import (
    DetokenizeReply,
    DetokenizeRequest,
    TokenizeOnlyReply,
    TokenizeOnlyRequest,
    TokenizerFromFrontend,
    TokenizerFromScheduler,
    Watch,
)
from tokenizer_svc.output_processor import OutputProcessor
from tokenizer_svc.structured_outputs import GrammarCompiler
from tokenizer_svc.tokenization import RequestRejected, detokenize, tokenize_only, tokenize_request
from tokenizer_svc.tokenizer_loader import TokenizerLoadError, load_tokenizer

logger = logging.getLogger("pagoda.tokenizer")

# How long requests wait for a scheduler after the connection to it dropped, then fail with 503:
# a restarted one answers once its restarted worker has loaded the model (on a GPU, captured graphs).
SCHEDULER_WAIT_S = 120.0


class TokenizerService:
    def __init__(self, config: EngineConfig, member_id: str) -> None:
        self.config = config
        self.member_id = member_id
        self.tokenizer = load_tokenizer(config)
        self.ctx = zmq.Context()
        self.frontend = connect_dealer(self.ctx, config.frontend_addr, member_id, config)
        self.scheduler = connect_dealer(self.ctx, config.scheduler_addr, member_id, config)
        # The connection dropping, then coming back: the scheduler died and was restarted (or a
        # network blip), and a new one must hear this member's hello. See `_on_scheduler_events`.
        self.scheduler_monitor = self.scheduler.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.from_frontend = Decoder(TokenizerFromFrontend)
        self.from_scheduler = Decoder(TokenizerFromScheduler)
        self.engine: EngineReady | None = None
        self.outputs = OutputProcessor(self.tokenizer)
        self.grammars = GrammarCompiler(self.tokenizer)
        self.stats: SchedulerStats | None = None
        self._stopping = False
        self._next_beat = 0.0  # when the next heartbeat is due
        # From the scheduler connection's drop until a scheduler answers with `EngineReady`:
        # requests are held, and a new scheduler (another `scheduler_id`) gets every live one again.
        self._scheduler_lost_at: float | None = None
        self._held: list[str] = []  # requests that arrived meanwhile, sent to no scheduler yet

    # ---- messages from the frontend ----------------------------------------------------

    def _on_tokenize(self, req: TokenizeRequest) -> None:
        try:
            if self.engine is None:
                raise RequestRejected("The engine is not ready yet.", None, 503)
            if self._scheduler_gone_too_long:
                raise RequestRejected(f"The scheduler is unreachable for over {SCHEDULER_WAIT_S:g} s.", None, 503)
            ids, max_tokens = tokenize_request(self.tokenizer, req, self.engine.max_model_len)
            sampling = self.grammars.compile(req.sampling)
        except RequestRejected as e:
            self._send_frontend(ErrorReply(req.request_id, e.status, e.message, param=e.param))
            return
        except Exception:
            logger.exception("%s: cannot tokenize %s", self.member_id, req.request_id)
            msg = "The server had an error while tokenizing your request."
            self._send_frontend(ErrorReply(req.request_id, 500, msg, "server_error"))
            return
        sampling = msgspec.structs.replace(sampling, max_tokens=max_tokens)
        prompt_text = None
        if req.echo:
            prompt_text = req.prompt if req.prompt is not None else self.tokenizer.decode(ids)
        arrival_time = req.arrival_time or time.time()
        self.outputs.add_request(req.request_id, ids, sampling, prompt_text, arrival_time)
        if self._scheduler_lost_at is not None:
            self._held.append(req.request_id)  # sent once a scheduler answers, within SCHEDULER_WAIT_S
            return
        engine_request = EngineRequest(
            req.request_id, ids, sampling, self.member_id, arrival_time, resume=req.resume,
            scheduler_id=self.engine.scheduler_id,
        )
        self.scheduler.send(encode(engine_request))

    def _on_abort(self, msg: Abort) -> None:
        for rid in msg.request_ids:
            self.outputs.forget(rid)
        self.scheduler.send(encode(msg))

    def _on_tokenize_only(self, req: TokenizeOnlyRequest | DetokenizeRequest) -> None:
        """/tokenize and /detokenize: answered at once, with the code generation requests use;
        nothing goes to the scheduler and nothing is kept."""
        reply: msgspec.Struct
        try:
            if self.engine is None:
                raise RequestRejected("The engine is not ready yet.", None, 503)
            if isinstance(req, DetokenizeRequest):
                reply = DetokenizeReply(req.request_id, detokenize(self.tokenizer, req.tokens))
            else:
                ids = tokenize_only(self.tokenizer, req)
                strs = self.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
                reply = TokenizeOnlyReply(req.request_id, ids, self.engine.max_model_len, strs)
        except RequestRejected as e:
            reply = ErrorReply(req.request_id, e.status, e.message, param=e.param)
        except Exception:
            logger.exception("%s: cannot answer %s", self.member_id, req.request_id)
            reply = ErrorReply(req.request_id, 500, "The server had an error while tokenizing.", "server_error")
        self._send_frontend(reply)

    # ---- messages from the scheduler ---------------------------------------------------

    def _on_tokens(self, batch: TokenBatch) -> None:
        texts, aborts = self.outputs.process(batch.outputs)
        for abort in aborts:
            self.scheduler.send(encode(abort))
        if texts:
            self._send_frontend(TextBatch(texts))

    def _on_engine_ready(self, msg: EngineReady) -> None:
        previous = self.engine
        self.engine = msg
        self.outputs.eos_token_ids = set(msg.eos_token_ids)
        if previous is None:
            logger.info("%s: engine ready, max_model_len %d", self.member_id, msg.max_model_len)
        elif not msg.serving:
            logger.warning("%s: the engine lost its worker; requests wait for it", self.member_id)
        if self._scheduler_lost_at is not None:
            self._rejoined(restarted=previous is None or previous.scheduler_id != msg.scheduler_id)
        self._heartbeat()

    # ---- the scheduler's connection ----------------------------------------------------

    def _on_scheduler_events(self) -> None:
        """The scheduler's connection dropped (it died, or the network failed): requests wait
        until a scheduler answers. It came back: say hello, as a new scheduler knows nobody."""
        while self.scheduler_monitor.poll(0):
            event = recv_monitor_message(self.scheduler_monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED and self._scheduler_lost_at is None:
                self._scheduler_lost_at = time.monotonic()
                # Debug when nothing waits: at a normal shutdown the scheduler goes first, and this is no news.
                log = logger.warning if self.outputs.requests else logger.debug
                log("%s: lost the scheduler at %s; %d requests wait for it to answer again",
                    self.member_id, self.config.scheduler_addr, len(self.outputs))
                self._heartbeat()  # not serving, from now
            elif event == zmq.EVENT_CONNECTED and self._scheduler_lost_at is not None:
                self.scheduler.send(encode(self._hello()))

    def _rejoined(self, restarted: bool) -> None:
        """A scheduler answered after the connection dropped. A new one (restarted) holds no
        request: each live one goes again with its outputs so far, to continue exactly where
        its text is. The same one still runs them: only the held requests go."""
        assert self._scheduler_lost_at is not None
        waited = time.monotonic() - self._scheduler_lost_at
        self._scheduler_lost_at = None
        ids = list(self.outputs.requests) if restarted else [r for r in self._held if r in self.outputs.requests]
        self._held.clear()
        assert self.engine is not None
        for rid in ids:
            self.scheduler.send(encode(self.outputs.resubmission(rid, self.member_id, self.engine.scheduler_id)))
        what = "live requests re-submitted with their outputs so far" if restarted else "held requests sent"
        logger.warning("%s: %s scheduler answered after %.1f s; %d %s", self.member_id,
                       "a new" if restarted else "the same", waited, len(ids), what)

    @property
    def _scheduler_gone_too_long(self) -> bool:
        lost_at = self._scheduler_lost_at
        return lost_at is not None and time.monotonic() - lost_at > SCHEDULER_WAIT_S

    def _fail_waiting_requests(self) -> None:
        """No scheduler for SCHEDULER_WAIT_S: the requests waiting for one end with a 503."""
        if not self._scheduler_gone_too_long or not self.outputs.requests:
            return
        logger.error("%s: no scheduler for over %g s: failing %d requests", self.member_id, SCHEDULER_WAIT_S,
                     len(self.outputs))
        message = f"The scheduler is unreachable for over {SCHEDULER_WAIT_S:g} s."
        for rid in list(self.outputs.requests):
            self._send_frontend(ErrorReply(rid, 503, message, "service_unavailable"))
            self.outputs.forget(rid)
        self._held.clear()

    # ---- the loop ----------------------------------------------------------------------

    def _send_frontend(self, msg: msgspec.Struct) -> None:
        self.frontend.send(encode(msg))

    def _heartbeat(self) -> None:
        hb = Heartbeat(self.member_id, load=len(self.outputs), ready=self.engine is not None)
        self.scheduler.send(encode(hb))
        hb.stats, hb.serving = self.stats, self._serving
        hb.max_model_len = self.engine.max_model_len if self.engine is not None else 0
        self._send_frontend(hb)

    @property
    def _serving(self) -> bool:
        """Requests run now: a scheduler is connected and has a worker group."""
        return self.engine is not None and self.engine.serving and self._scheduler_lost_at is None

    def _hello(self) -> Hello:
        return Hello(role="tokenizer", member_id=self.member_id, pid=os.getpid())

    def run(self) -> None:
        self._send_frontend(self._hello())
        self.scheduler.send(encode(self._hello()))
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.scheduler, zmq.POLLIN)
        poller.register(self.scheduler_monitor, zmq.POLLIN)
        self._next_beat = time.monotonic() + self.config.heartbeat_interval_s
        try:
            while not self._stopping:
                events = dict(poller.poll(max(0.0, self._next_beat - time.monotonic()) * 1000))
                if self.scheduler in events:
                    self._drain(self.scheduler, self.from_scheduler)
                if self.scheduler_monitor in events:
                    self._on_scheduler_events()
                if self.frontend in events:
                    self._drain(self.frontend, self.from_frontend)
                self._beat_if_due()
        finally:
            self.frontend.close()
            self.scheduler.disable_monitor()
            self.scheduler_monitor.close()
            self.scheduler.close()
            self.ctx.term()

    def _drain(self, sock: zmq.Socket, inbound: Decoder) -> None:
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = inbound.decode(frame)
            if msg is None:
                continue
            try:
                self._dispatch(msg)
            except Exception:
                # A bug with one request must not take the pool member down with it.
                logger.exception("%s: failed to handle %s", self.member_id, type(msg).__name__)
            # A burst of long prompts keeps this loop busy for seconds: beat meanwhile, so a
            # busy member is not taken for a dead one.
            self._beat_if_due()

    def _beat_if_due(self) -> None:
        if time.monotonic() >= self._next_beat:
            self._fail_waiting_requests()
            self._heartbeat()
            self._next_beat = time.monotonic() + self.config.heartbeat_interval_s

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, TokenizeRequest):
            self._on_tokenize(msg)
        elif isinstance(msg, TokenizeOnlyRequest | DetokenizeRequest):
            self._on_tokenize_only(msg)
        elif isinstance(msg, Abort):
            self._on_abort(msg)
        elif isinstance(msg, Watch):
            self.scheduler.send(encode(msg))  # a frontend watches /engine: the scheduler builds its view
        elif isinstance(msg, TokenBatch):
            self._on_tokens(msg)
        elif isinstance(msg, EngineReady):
            self._on_engine_ready(msg)
        elif isinstance(msg, SchedulerStats):
            # The scheduler throttles these; pass each on at once so /metrics is current.
            self.stats = msg
            ready = self.engine is not None
            self._send_frontend(Heartbeat(self.member_id, len(self.outputs), ready, msg, self._serving))
        elif isinstance(msg, ErrorReply):
            self.outputs.forget(msg.request_id)
            self._send_frontend(msg)
        elif isinstance(msg, Shutdown):
            self._stopping = True


def run_tokenizer(config: EngineConfig, member_id: str) -> None:
    try:
        service = TokenizerService(config, member_id)
    except TokenizerLoadError as e:
        logger.error("%s", e)  # one line, no traceback: the supervisor stops the rest
        raise SystemExit(1) from None
    logger.info("%s (pid %d) connecting to %s", member_id, os.getpid(), config.frontend_addr)
    service.run()
