"""OpenAI's wire format: pydantic models that validate requests, msgspec Structs for responses.

Requests are validated with pydantic so that every bad field gets a message naming it and its
allowed range; responses are msgspec Structs because they are built per token while streaming
and must carry OpenAI's explicit nulls (`"logprobs": null`, `"finish_reason": null`).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import msgspec
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, field_validator
from pydantic_core import PydanticCustomError

from protocol.messages import ChatMessage, SamplingParams, TextOutput

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
TOKEN_ID_MAX = 2**31 - 1

# ---- validation helpers ----------------------------------------------------------------


def _bounded(lo: float | None = None, hi: float | None = None, *, lo_exclusive: bool = False) -> Any:
    """A validator whose error names the allowed range (the field name comes from the loc)."""
    if lo is not None and hi is not None:
        expected = f"must be between {lo} and {hi}"
    elif lo is not None:
        expected = f"must be greater than {lo}" if lo_exclusive else f"must be at least {lo}"
    else:
        expected = f"must be at most {hi}"

    def check(value: float | int | None) -> float | int | None:
        if value is None:
            return value
        above_lo = lo is None or (value > lo if lo_exclusive else value >= lo)
        below_hi = hi is None or value <= hi
        # Ints travel as msgpack integers, which stop at 64 bits.
        fits = not isinstance(value, int) or INT64_MIN <= value <= INT64_MAX
        if not (above_lo and below_hi and fits):
            raise PydanticCustomError("out_of_range", f"{expected}, got {value}")
        return value

    return AfterValidator(check)


def _single_prompt(value: Any) -> Any:
    """Normalize a completions prompt to one string or one list of token ids."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str | list) for v in value):
        raise PydanticCustomError("unsupported", "batched prompts are not supported; send one per request")
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        if not value:
            raise PydanticCustomError("empty", "must not be empty")
        if not all(0 <= t <= TOKEN_ID_MAX for t in value):
            raise PydanticCustomError("out_of_range", f"token ids must be between 0 and {TOKEN_ID_MAX}")
        return value
    raise PydanticCustomError("prompt_type", "must be a string, a list of one string, or a list of token ids")


def _text_content(value: Any) -> Any:
    """Flatten a list of `{"type": "text", "text": ...}` parts into one string."""
    if not isinstance(value, list):
        return value
    texts = []
    for part in value:
        if not isinstance(part, dict) or not isinstance(part.get("text"), str) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise PydanticCustomError(
                "unsupported",
                f"only text parts ({{'type': 'text', 'text': ...}}) are supported, got {kind!r}",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _only_one(value: int | None) -> int | None:
    if value is not None and value != 1:
        raise PydanticCustomError("unsupported", f"only 1 is supported for now, got {value}")
    return value


def _unsupported(detail: str = "") -> PydanticCustomError:
    return PydanticCustomError(
        "unsupported", f"{detail} is not supported yet" if detail else "not supported yet"
    )


# ---- requests --------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class _SamplingRequest(BaseModel):
    """The fields completions and chat share; unknown fields are ignored, as OpenAI's SDK adds some."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # None: the one served model
    temperature: Annotated[float | None, _bounded(0, 2)] = None
    top_p: Annotated[float | None, _bounded(0, 1)] = None
    top_k: Annotated[int | None, _bounded(-1)] = None  # -1 and 0 both mean "all tokens"
    min_p: Annotated[float | None, _bounded(0, 1)] = None
    presence_penalty: Annotated[float | None, _bounded(-2, 2)] = None
    frequency_penalty: Annotated[float | None, _bounded(-2, 2)] = None
    repetition_penalty: Annotated[float | None, _bounded(0, lo_exclusive=True)] = None
    n: Annotated[int | None, AfterValidator(_only_one)] = 1
    seed: Annotated[int | None, _bounded(INT64_MIN, INT64_MAX)] = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, _bounded(0, TOKEN_ID_MAX)]] | None = None
    min_tokens: Annotated[int | None, _bounded(0)] = None
    ignore_eos: bool | None = None
    logit_bias: dict[str, Annotated[float, _bounded(-100, 100)]] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.isdigit() or int(key) > TOKEN_ID_MAX:
                raise PydanticCustomError("invalid_key", f"keys must be token ids, got {key!r}")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int | None) -> SamplingParams:
        """The protocol's `SamplingParams`; fields the client left out keep the engine defaults."""
        given = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": -1 if self.top_k == 0 else self.top_k,
            "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos,
            "stop_token_ids": self.stop_token_ids,
        }
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return SamplingParams(
            max_tokens=max_tokens,
            stop=[s for s in stop if s],
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            **{k: v for k, v in given.items() if v is not None},
        )


class CompletionRequest(_SamplingRequest):
    prompt: Annotated[str | list[int], BeforeValidator(_single_prompt)]
    max_tokens: Annotated[int | None, _bounded(1)] = 16  # OpenAI's default for completions
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: Annotated[int | None, AfterValidator(_only_one)] = None

    @field_validator("echo", "logprobs", "suffix")
    @classmethod
    def _not_supported(cls, value: Any) -> Any:
        if value not in (None, False):
            raise _unsupported()
        return value


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str | None, BeforeValidator(_text_content)] = None

    def to_protocol(self) -> ChatMessage:
        # Chat templates know "system"; OpenAI's newer "developer" role means the same.
        return ChatMessage("system" if self.role == "developer" else self.role, self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessageIn]
    max_tokens: Annotated[int | None, _bounded(1)] = None  # deprecated by OpenAI, still sent
    max_completion_tokens: Annotated[int | None, _bounded(1)] = None
    add_generation_prompt: bool = True
    logprobs: bool | None = False
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, value: list[ChatMessageIn]) -> list[ChatMessageIn]:
        if not value:
            raise PydanticCustomError("empty", "must contain at least one message")
        return value

    @field_validator("logprobs", "tools")
    @classmethod
    def _not_supported(cls, value: Any) -> Any:
        if value:
            raise _unsupported()
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type", "text") != "text":
            raise _unsupported(f"type {value.get('type')!r}")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        """None lets the tokenizer fill in what the context has left."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- responses -------------------------------------------------------------------------


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, out: TextOutput) -> Usage:
        return cls(out.prompt_tokens, out.completion_tokens, out.prompt_tokens + out.completion_tokens)


class CompletionChoice(msgspec.Struct, kw_only=True):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: str | None = None


class Completion(msgspec.Struct, kw_only=True):
    """A whole completion, or one streamed chunk of one (same object type, as OpenAI has it)."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    # Left out of chunks unless the client asked for usage; then null until the last chunk.
    usage: Usage | None | msgspec.UnsetType = msgspec.UNSET


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: str = "assistant"
    content: str


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(msgspec.Struct):
    """Only the fields that changed: UNSET fields are left out of the JSON."""

    role: str | msgspec.UnsetType = msgspec.UNSET
    content: str | msgspec.UnsetType = msgspec.UNSET


class ChatChunkChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None | msgspec.UnsetType = msgspec.UNSET


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "pagoda"


class ModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[ModelCard]


# ---- response builders -------------------------------------------------------------------


class ResponseFormatter:
    """Turns one request's `TextOutput`s into OpenAI objects: whole, or as stream chunks."""

    def __init__(self, request_id: str, model: str, include_usage: bool) -> None:
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        # OpenAI sends "usage": null in every chunk when usage was asked for, else no key.
        self.chunk_usage: Any = None if include_usage else msgspec.UNSET

    def opening(self) -> list[msgspec.Struct]:
        return []

    def chunk(self, out: TextOutput) -> msgspec.Struct | None:
        raise NotImplementedError

    def usage_chunk(self, usage: Usage) -> msgspec.Struct:
        raise NotImplementedError

    def whole(self, text: str, last: TextOutput) -> msgspec.Struct:
        raise NotImplementedError


class CompletionFormatter(ResponseFormatter):
    def chunk(self, out: TextOutput) -> Completion | None:
        if not out.text and out.finish_reason is None:
            return None  # the detokenizer is holding back part of a character
        choice = CompletionChoice(text=out.text, finish_reason=out.finish_reason)
        return self._completion([choice], self.chunk_usage)

    def usage_chunk(self, usage: Usage) -> Completion:
        return self._completion([], usage)

    def whole(self, text: str, last: TextOutput) -> Completion:
        return self._completion(
            [CompletionChoice(text=text, finish_reason=last.finish_reason)], Usage.of(last)
        )

    def _completion(self, choices: list[CompletionChoice], usage: Any) -> Completion:
        return Completion(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        )


class ChatFormatter(ResponseFormatter):
    def opening(self) -> list[msgspec.Struct]:
        return [self._chunk(Delta(role="assistant", content=""), None)]

    def chunk(self, out: TextOutput) -> ChatCompletionChunk | None:
        if not out.text and out.finish_reason is None:
            return None
        return self._chunk(Delta(content=out.text) if out.text else Delta(), out.finish_reason)

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=[], usage=usage
        )

    def whole(self, text: str, last: TextOutput) -> ChatCompletion:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=last.finish_reason)
        return ChatCompletion(
            id=self.request_id, created=self.created, model=self.model, choices=[choice], usage=Usage.of(last)
        )

    def _chunk(self, delta: Delta, finish_reason: str | None) -> ChatCompletionChunk:
        choice = ChatChunkChoice(delta=delta, finish_reason=finish_reason)
        return ChatCompletionChunk(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=[choice],
            usage=self.chunk_usage,
        )
