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

import jinja2
import msgspec
import zmq

from protocol import (
    Abort,
    Codec,
    EngineConfig,
    EngineReady,
    EngineRequest,
    ErrorReply,
    Heartbeat,
    Hello,
    SamplingParams,
    SchedulerStats,
    Shutdown,
    TextBatch,
    TokenBatch,
    TokenizeRequest,
    connect_dealer,
)
from protocol.messages import TokenizerFromFrontend, TokenizerFromScheduler
from tokenizer_svc.output_processor import OutputProcessor
from tokenizer_svc.tokenizer_loader import TokenizerLoadError, load_tokenizer

logger = logging.getLogger("pagoda.tokenizer")


class RequestRejected(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


class TokenizerService:
    def __init__(self, config: EngineConfig, member_id: str) -> None:
        self.config = config
        self.member_id = member_id
        self.tokenizer = load_tokenizer(config)
        self.ctx = zmq.Context()
        self.frontend = connect_dealer(self.ctx, config.frontend_addr, member_id)
        self.scheduler = connect_dealer(self.ctx, config.scheduler_addr, member_id)
        self.from_frontend = Codec(TokenizerFromFrontend)
        self.from_scheduler = Codec(TokenizerFromScheduler)
        self.engine: EngineReady | None = None
        self.outputs = OutputProcessor(self.tokenizer)
        self.stats: SchedulerStats | None = None
        self._stopping = False

    # ---- tokenization ------------------------------------------------------------------

    def tokenize(self, req: TokenizeRequest) -> list[int]:
        if req.prompt_token_ids is not None:
            ids = list(req.prompt_token_ids)
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in ids):
                raise RequestRejected(f"prompt token ids must be in [0, {vocab})", "prompt")
        elif req.messages is not None:
            if self.tokenizer.chat_template is None:
                raise RequestRejected(
                    "This model has no chat template; pass one with --chat-template.", "messages"
                )
            messages = [msgspec.structs.asdict(m) for m in req.messages]
            try:
                text = self.tokenizer.apply_chat_template(
                    messages,
                    tokenize=False,
                    add_generation_prompt=req.add_generation_prompt,
                    continue_final_message=req.continue_final_message,
                )
            except (jinja2.TemplateError, ValueError) as e:
                # The template's own checks (roles must alternate, ...) are the client's to fix.
                raise RequestRejected(f"The chat template rejected the messages: {e}", "messages") from None
            # The template already wrote the special tokens it wants.
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        elif req.prompt is not None:
            ids = self.tokenizer.encode(req.prompt)
        else:
            raise RequestRejected("either a prompt or messages is required", "prompt")
        if not ids:
            raise RequestRejected("the prompt is empty", "messages" if req.messages is not None else "prompt")
        return ids

    def _check_token_ids(self, sampling: SamplingParams) -> None:
        vocab = len(self.tokenizer)
        if any(t >= vocab for t in sampling.logit_bias):
            raise RequestRejected(f"logit_bias keys must be token ids in [0, {vocab})", "logit_bias")
        if any(t >= vocab for t in sampling.stop_token_ids):
            raise RequestRejected(f"stop_token_ids must be in [0, {vocab})", "stop_token_ids")

    def _check_length(self, req: TokenizeRequest, ids: list[int]) -> int:
        """The request's max_tokens, after checking prompt + max_tokens against max_model_len."""
        assert self.engine is not None
        limit = self.engine.max_model_len
        param = "messages" if req.messages is not None else "prompt"
        max_tokens = req.sampling.max_tokens
        if len(ids) >= limit:
            raise RequestRejected(
                f"This model's maximum context length is {limit} tokens. However, your prompt has "
                f"{len(ids)} tokens. Please reduce the length of the {param}.",
                param,
            )
        if max_tokens is None:
            return limit - len(ids)
        if len(ids) + max_tokens > limit:
            raise RequestRejected(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in the {param}, {max_tokens} in the "
                f"completion). Please reduce the length of the {param} or of max_tokens.",
                "max_tokens",
            )
        return max_tokens

    # ---- messages from the frontend ----------------------------------------------------

    def _on_tokenize(self, req: TokenizeRequest) -> None:
        try:
            if self.engine is None:
                raise RequestRejected("The engine is not ready yet.", None, 503)
            ids = self.tokenize(req)
            self._check_token_ids(req.sampling)
            max_tokens = self._check_length(req, ids)
        except RequestRejected as e:
            self._send_frontend(ErrorReply(req.request_id, e.status, e.message, param=e.param))
            return
        except Exception:
            logger.exception("%s: cannot tokenize %s", self.member_id, req.request_id)
            msg = "The server had an error while tokenizing your request."
            self._send_frontend(ErrorReply(req.request_id, 500, msg, "server_error"))
            return
        sampling = msgspec.structs.replace(req.sampling, max_tokens=max_tokens)
        prompt_text = None
        if req.echo:
            prompt_text = req.prompt if req.prompt is not None else self.tokenizer.decode(ids)
        self.outputs.add_request(req.request_id, ids, sampling, prompt_text)
        self.scheduler.send(
            self.from_scheduler.encode(
                EngineRequest(req.request_id, ids, sampling, self.member_id, req.arrival_time or time.time())
            )
        )

    def _on_abort(self, msg: Abort) -> None:
        for rid in msg.request_ids:
            self.outputs.forget(rid)
        self.scheduler.send(self.from_scheduler.encode(msg))

    # ---- messages from the scheduler ---------------------------------------------------

    def _on_tokens(self, batch: TokenBatch) -> None:
        texts, aborts = self.outputs.process(batch.outputs)
        for abort in aborts:
            self.scheduler.send(self.from_scheduler.encode(abort))
        if texts:
            self._send_frontend(TextBatch(texts))

    def _on_engine_ready(self, msg: EngineReady) -> None:
        first = self.engine is None
        self.engine = msg
        self.outputs.eos_token_ids = set(msg.eos_token_ids)
        if first:
            logger.info("%s: engine ready, max_model_len %d", self.member_id, msg.max_model_len)
        self._heartbeat()

    # ---- the loop ----------------------------------------------------------------------

    def _send_frontend(self, msg: msgspec.Struct) -> None:
        self.frontend.send(self.from_frontend.encode(msg))

    def _heartbeat(self) -> None:
        hb = Heartbeat(self.member_id, load=len(self.outputs), ready=self.engine is not None)
        self.scheduler.send(self.from_scheduler.encode(hb))
        hb.stats = self.stats
        self._send_frontend(hb)

    def run(self) -> None:
        hello = Hello(role="tokenizer", member_id=self.member_id, pid=os.getpid())
        self._send_frontend(hello)
        self.scheduler.send(self.from_scheduler.encode(hello))
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.scheduler, zmq.POLLIN)
        interval = self.config.heartbeat_interval_s
        next_beat = time.monotonic() + interval
        try:
            while not self._stopping:
                events = dict(poller.poll(max(0.0, next_beat - time.monotonic()) * 1000))
                if self.scheduler in events:
                    self._drain(self.scheduler, self.from_scheduler)
                if self.frontend in events:
                    self._drain(self.frontend, self.from_frontend)
                if time.monotonic() >= next_beat:
                    self._heartbeat()
                    next_beat = time.monotonic() + interval
        finally:
            self.frontend.close()
            self.scheduler.close()
            self.ctx.term()

    def _drain(self, sock: zmq.Socket, codec: Codec) -> None:
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = codec.decode(frame)
            try:
                self._dispatch(msg)
            except Exception:
                # A bug with one request must not take the pool member down with it.
                logger.exception("%s: failed to handle %s", self.member_id, type(msg).__name__)

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, TokenizeRequest):
            self._on_tokenize(msg)
        elif isinstance(msg, Abort):
            self._on_abort(msg)
        elif isinstance(msg, TokenBatch):
            self._on_tokens(msg)
        elif isinstance(msg, EngineReady):
            self._on_engine_ready(msg)
        elif isinstance(msg, SchedulerStats):
            # The scheduler throttles these; pass each on at once so /metrics is current.
            self.stats = msg
            self._send_frontend(Heartbeat(self.member_id, len(self.outputs), self.engine is not None, msg))
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
