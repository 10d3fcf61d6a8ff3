"""OpenAI's requests: pydantic models that validate every field, with vLLM's extra parameters.

Every bad field gets a message naming it and its allowed range; checks that involve two fields
live in `check()`, which raises `APIError` with the field to blame. The responses are in
`openai_responses.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, field_validator
from pydantic_core import PydanticCustomError

from frontend.errors import APIError
from protocol.messages import ChatMessage, SamplingParams

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
TOKEN_ID_MAX = 2**31 - 1
# Limits that keep one request from costing the server out of proportion (see ARCHITECTURE.md).
MAX_N = 128  # OpenAI's own maximum
MAX_LOGPROBS = 20  # vLLM's default max_logprobs; OpenAI's top_logprobs maximum
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256  # each is held back from the stream that many characters
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 1024

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


def _stop_strings(value: str | list[str] | None) -> list[str]:
    stop = [value] if isinstance(value, str) else value or []
    if len(stop) > MAX_STOP_STRINGS:
        raise PydanticCustomError("too_long", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    if any(len(s) > MAX_STOP_STRING_CHARS for s in stop):
        raise PydanticCustomError("too_long", f"each stop string must be at most {MAX_STOP_STRING_CHARS} characters")
    return [s for s in stop if s]  # an empty stop string would stop at once; OpenAI ignores it


def _at_most(limit: int, what: str) -> Any:
    def check(value: list[Any] | dict[Any, Any] | None) -> Any:
        if value is not None and len(value) > limit:
            raise PydanticCustomError("too_long", f"at most {limit} {what}, got {len(value)}")
        return value

    return AfterValidator(check)


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
    n: Annotated[int | None, _bounded(1, MAX_N)] = 1
    seed: Annotated[int | None, _bounded(INT64_MIN, INT64_MAX)] = None
    stop: Annotated[str | list[str] | None, AfterValidator(_stop_strings)] = None
    stop_token_ids: Annotated[
        list[Annotated[int, _bounded(0, TOKEN_ID_MAX)]] | None, _at_most(MAX_STOP_TOKEN_IDS, "token ids")
    ] = None
    include_stop_str_in_output: bool | None = None
    min_tokens: Annotated[int | None, _bounded(0)] = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    logit_bias: Annotated[
        dict[str, Annotated[float, _bounded(-100, 100)]] | None, _at_most(MAX_LOGIT_BIAS, "entries")
    ] = None
    # vLLM's: logprobs name tokens as "token_id:<id>", so a client can use the ids.
    return_tokens_as_token_ids: bool | None = None
    prompt_logprobs: int | None = None  # vLLM's; refused until the worker computes them
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

    @field_validator("prompt_logprobs")
    @classmethod
    def _no_prompt_logprobs(cls, value: int | None) -> int | None:
        if value is not None:
            raise _unsupported()
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def n_samples(self) -> int:
        return self.n or 1

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The protocol's `SamplingParams`; fields the client left out keep the engine defaults."""
        given = {
            "n": self.n,
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
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "skip_special_tokens": self.skip_special_tokens,
        }
        return SamplingParams(
            max_tokens=max_tokens,
            stop=self.stop or [],  # type: ignore[arg-type]  # a list once validated
            logprobs=logprobs,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            **{k: v for k, v in given.items() if v is not None},
        )


class CompletionRequest(_SamplingRequest):
    prompt: Annotated[str | list[int], BeforeValidator(_single_prompt)]
    max_tokens: Annotated[int | None, _bounded(1)] = 16  # OpenAI's default for completions
    echo: bool | None = False
    logprobs: Annotated[int | None, _bounded(0, MAX_LOGPROBS)] = None
    suffix: str | None = None
    best_of: Annotated[int | None, AfterValidator(_only_one)] = None

    @field_validator("suffix")
    @classmethod
    def _not_supported(cls, value: Any) -> Any:
        if value not in (None, ""):
            raise _unsupported()
        return value

    def check(self) -> None:
        if self.echo and self.logprobs is not None:
            # It would need the prompt's logprobs, which the worker does not compute yet.
            raise APIError(400, "Invalid 'echo': echo together with logprobs is not supported yet.", param="echo")

    def to_sampling_params(self) -> SamplingParams:
        return self.sampling_params(self.max_tokens, self.logprobs)


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
    continue_final_message: bool = False
    logprobs: bool | None = False
    top_logprobs: Annotated[int | None, _bounded(0, MAX_LOGPROBS)] = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, value: list[ChatMessageIn]) -> list[ChatMessageIn]:
        if not value:
            raise PydanticCustomError("empty", "must contain at least one message")
        return value

    @field_validator("tools")
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

    def check(self) -> None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(
                400, "Invalid 'top_logprobs': logprobs must be set to true to use top_logprobs.", param="top_logprobs"
            )
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise APIError(
                    400,
                    "Invalid 'continue_final_message': it cannot be true together with add_generation_prompt; "
                    "set add_generation_prompt to false.",
                    param="continue_final_message",
                )
            if self.messages[-1].role != "assistant":
                raise APIError(
                    400,
                    "Invalid 'continue_final_message': the last message must be the assistant's.",
                    param="continue_final_message",
                )

    def to_sampling_params(self) -> SamplingParams:
        # None lets the tokenizer fill in what the context has left.
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)


