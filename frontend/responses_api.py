"""OpenAI's Responses API (`POST /v1/responses`), its basic text form: one chat turn, stateless.

`input` (a string, or message items whose content is a string or text parts) and `instructions`
(a system message first) become a chat request, run as `/v1/chat/completions` runs one; the
answer is a `response` object with one assistant message, or, streamed, the event sequence the
official SDK accumulates (`response.created` ... `response.completed`), each SSE with an
`event:` line and a `sequence_number`. Nothing is stored: `store`, `previous_response_id`,
`conversation`, `background` and tools are refused with a 400 naming the field.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Annotated, Any, Literal

import msgspec
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, field_validator
from pydantic_core import PydanticCustomError

from frontend.engine_client import EngineError
from frontend.openai_protocol import _bounded
from frontend.openai_responses import ResponseFormatter
from frontend.sse import SSE_HEADERS, named_event
from protocol.messages import ChatMessage, SamplingParams, TextOutput, TokenizeRequest

# ---- the request ---------------------------------------------------------------------------

_TEXT_PARTS = ("input_text", "output_text")  # a user's text, and an assistant's earlier answer


def _content_text(value: Any) -> Any:
    """A message item's content as one string: the string itself, or its text parts joined."""
    if not isinstance(value, list):
        return value
    texts = []
    for part in value:
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise PydanticCustomError(
                "unsupported", f"only text parts ({{'type': 'input_text', 'text': ...}}) are supported, got {kind!r}"
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _input_items(value: Any) -> Any:
    """A string `input` is one user message."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return value


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Annotated[str, BeforeValidator(_content_text)]

    @field_validator("type")
    @classmethod
    def _message_only(cls, value: str) -> str:
        if value != "message":
            raise PydanticCustomError("unsupported", f"only message items are supported, got {value!r}")
        return value

    def to_protocol(self) -> ChatMessage:
        return ChatMessage("system" if self.role == "developer" else self.role, self.content)


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields are ignored, as on the other routes

    model: str | None = None
    input: Annotated[list[InputMessage], BeforeValidator(_input_items)]
    instructions: str | None = None
    max_output_tokens: Annotated[int | None, _bounded(1)] = None  # None: what the context leaves
    temperature: Annotated[float | None, _bounded(0, 2)] = None
    top_p: Annotated[float | None, _bounded(0, 1)] = None
    stream: bool | None = False
    # Refused: each needs what Pagoda does not have (stored responses, tools, background runs).
    tools: list[Any] | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    store: bool | None = None
    background: bool | None = None
    text: dict[str, Any] | None = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: list[InputMessage]) -> list[InputMessage]:
        if not value:
            raise PydanticCustomError("empty", "must contain at least one message")
        return value

    @field_validator("tools", "previous_response_id", "conversation")
    @classmethod
    def _not_supported(cls, value: Any) -> Any:
        if value:
            raise PydanticCustomError("unsupported", "is not supported: responses are not stored, and tools not run")
        return value

    @field_validator("store", "background")
    @classmethod
    def _not_true(cls, value: bool | None) -> bool | None:
        if value:
            raise PydanticCustomError("unsupported", "only false is supported: responses are not stored")
        return value

    @field_validator("text")
    @classmethod
    def _plain_text(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        fmt = (value or {}).get("format") or {}
        if fmt.get("type", "text") != "text":
            raise PydanticCustomError("unsupported", f"format type {fmt.get('type')!r} is not supported yet")
        return value

    def to_tokenize_request(self, request_id: str) -> TokenizeRequest:
        messages = [m.to_protocol() for m in self.input]
        if self.instructions is not None:
            messages.insert(0, ChatMessage("system", self.instructions))
        given = {"temperature": self.temperature, "top_p": self.top_p}
        given = {k: v for k, v in given.items() if v is not None}
        sampling = SamplingParams(max_tokens=self.max_output_tokens, **given)  # type: ignore[arg-type]
        return TokenizeRequest(request_id=request_id, sampling=sampling, messages=messages, arrival_time=time.time())


# ---- the response --------------------------------------------------------------------------


class OutputText(msgspec.Struct, kw_only=True):
    type: str = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class OutputMessage(msgspec.Struct, kw_only=True):
    type: str = "message"
    id: str
    status: str  # in_progress | completed | incomplete
    role: str = "assistant"
    content: list[OutputText]


class InputTokensDetails(msgspec.Struct):
    cached_tokens: int = 0


class OutputTokensDetails(msgspec.Struct):
    reasoning_tokens: int = 0


class ResponseUsage(msgspec.Struct, kw_only=True):
    input_tokens: int
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(msgspec.Struct):
    reason: str  # max_output_tokens


class ResponseObject(msgspec.Struct, kw_only=True):
    id: str
    object: str = "response"
    created_at: int
    status: str  # in_progress | completed | incomplete
    error: None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputMessage]
    parallel_tool_calls: bool = True
    previous_response_id: None = None
    store: bool = False
    temperature: float
    text: dict[str, Any] = msgspec.field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: str = "auto"
    tools: list[Any] = []
    top_p: float
    truncation: str = "disabled"
    usage: ResponseUsage | None = None
    metadata: dict[str, str] = {}


class ResponsesFormatter(ResponseFormatter):
    """One request's outputs as a `response` object (`whole()`), or as the Responses API's
    stream events (`opening_events`, `delta_event` per output, `closing_events`)."""

    def __init__(self, request_id: str, model: str, req: ResponsesRequest, sampling: SamplingParams) -> None:
        super().__init__(request_id, model, include_usage=False)
        self.req, self.sampling = req, sampling
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.sequence_number = 0

    @property
    def text(self) -> str:
        return "".join(self.choices[0].text)

    @property
    def status(self) -> str:
        reason = self.choices[0].finish_reason
        return "in_progress" if reason is None else "incomplete" if reason == "length" else "completed"

    def response(self, done: bool) -> ResponseObject:
        status = self.status if done else "in_progress"
        output = [self._message(status, self.text)] if done else []
        usage = ResponseUsage(
            input_tokens=self.usage.prompt_tokens, output_tokens=self.usage.completion_tokens,
            total_tokens=self.usage.total_tokens,
        ) if done else None
        return ResponseObject(
            id=self.request_id, created_at=self.created, status=status, model=self.model, output=output,
            incomplete_details=IncompleteDetails("max_output_tokens") if status == "incomplete" else None,
            instructions=self.req.instructions, max_output_tokens=self.req.max_output_tokens,
            temperature=self.sampling.temperature, top_p=self.sampling.top_p, usage=usage,
        )

    def whole(self) -> ResponseObject:
        return self.response(done=True)

    def _message(self, status: str, text: str | None) -> OutputMessage:
        content = [] if text is None else [OutputText(text=text)]
        return OutputMessage(id=self.item_id, status=status, content=content)

    # ---- streaming -----------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return named_event(kind, payload)

    def _part(self, text: str) -> dict[str, Any]:
        return {"item_id": self.item_id, "output_index": 0, "content_index": 0, "part": OutputText(text=text)}

    def opening_events(self) -> list[bytes]:
        return [
            self._event("response.created", response=self.response(done=False)),
            self._event("response.in_progress", response=self.response(done=False)),
            self._event("response.output_item.added", output_index=0, item=self._message("in_progress", None)),
            self._event("response.content_part.added", **self._part("")),
        ]

    def delta_event(self, out: TextOutput) -> bytes | None:
        self.add(out)
        if not out.text:
            return None
        return self._event(
            "response.output_text.delta", item_id=self.item_id, output_index=0, content_index=0, delta=out.text,
            logprobs=[],
        )

    def closing_events(self) -> list[bytes]:
        text, status = self.text, self.status
        final = "response.incomplete" if status == "incomplete" else "response.completed"
        return [
            self._event(
                "response.output_text.done", item_id=self.item_id, output_index=0, content_index=0, text=text,
                logprobs=[],
            ),
            self._event("response.content_part.done", **self._part(text)),
            self._event("response.output_item.done", output_index=0, item=self._message(status, text)),
            self._event(final, response=self.response(done=True)),
        ]

    def error_event(self, error: EngineError) -> bytes:
        return self._event("error", code=None, message=error.message, param=error.param)


def responses_sse(fmt: ResponseFormatter, first: TextOutput, outputs: AsyncIterator[TextOutput]) -> StreamingResponse:
    """Stream `first` and the rest of `outputs` as the Responses API's events (no `[DONE]`)."""
    assert isinstance(fmt, ResponsesFormatter)
    return StreamingResponse(_events(fmt, first, outputs), media_type="text/event-stream", headers=SSE_HEADERS)


async def _events(
    fmt: ResponsesFormatter, first: TextOutput, outputs: AsyncIterator[TextOutput]
) -> AsyncIterator[bytes]:
    async with aclosing(outputs):  # type: ignore[type-var]
        try:
            for event in fmt.opening_events():
                yield event
            if event := fmt.delta_event(first):
                yield event
            async for out in outputs:
                if event := fmt.delta_event(out):
                    yield event
            for event in fmt.closing_events():
                yield event
        except EngineError as e:
            yield fmt.error_event(e)
