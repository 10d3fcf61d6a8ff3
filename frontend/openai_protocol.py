"""OpenAI's requests: pydantic models that validate every field, with vLLM's extra parameters.

Every bad field gets a message naming it and its allowed range; checks that involve two fields
live in `check()`, which raises `APIError` with the field to blame. The responses are in
`openai_responses.py`.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

import msgspec
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from frontend.errors import APIError
from frontend.tool_parsers import named_tool_schema, required_tools_schema
from protocol.messages import ChatMessage, SamplingParams, StructuredOutputs

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
TOKEN_ID_MAX = 2**31 - 1
# Limits that keep one request from costing the server out of proportion (see ARCHITECTURE.md).
MAX_N = 128  # OpenAI's own maximum
MAX_LOGPROBS = 20  # vLLM's default max_logprobs; OpenAI's top_logprobs maximum
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256  # each is held back from the stream that many characters
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 1024
MAX_TOOLS = 128  # OpenAI's
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names

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


def _function_name(value: str) -> str:
    if not FUNCTION_NAME.fullmatch(value):
        raise PydanticCustomError("invalid_name", "must be 1 to 64 letters, digits, underscores or dashes")
    return value


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


def _completion_max_tokens(value: int | None) -> int | None:
    if value is not None and not 0 <= value <= INT64_MAX:
        raise PydanticCustomError("out_of_range", f"must be at least 1 (0 only with echo), got {value}")
    return value


def at_most(limit: int, what: str) -> Any:
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


def _schema_text(schema: dict[str, Any] | str, field: str) -> str:
    """A JSON schema as JSON text; a string must already be JSON."""
    if isinstance(schema, str):
        try:
            json.loads(schema)
        except (ValueError, RecursionError) as e:  # RecursionError: nested past Python's limit
            raise APIError(400, f"Invalid '{field}': the JSON schema is not valid JSON ({e}).", param=field) from None
        return schema
    return json.dumps(schema)


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: text, any JSON object, or JSON following a schema."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def to_protocol(self) -> StructuredOutputs:
        if self.type == "json_object":
            return StructuredOutputs(json_object=True)
        if self.json_schema is None:
            message = "Invalid 'response_format': type json_schema needs a json_schema."
            raise APIError(400, message, param="response_format")
        # No schema given: any JSON object, as OpenAI's non-strict mode allows.
        schema = self.json_schema.json_schema if self.json_schema.json_schema is not None else {"type": "object"}
        return StructuredOutputs(json=json.dumps(schema))


class StructuredOutputsIn(BaseModel):
    """vLLM's `structured_outputs` extra field (exactly one constraint)."""

    model_config = ConfigDict(extra="ignore")

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def to_protocol(self) -> StructuredOutputs:
        spec = StructuredOutputs(
            json=_schema_text(self.json_, "structured_outputs") if self.json_ is not None else None,
            regex=self.regex,
            choice=self.choice,
            grammar=self.grammar,
            json_object=bool(self.json_object),
            disable_any_whitespace=self.disable_any_whitespace,
        )
        if len(spec.constraints()) != 1:
            kinds = ", ".join(spec.constraints()) or "none"
            allowed = "json, regex, choice, grammar, json_object"
            message = f"Invalid 'structured_outputs': give exactly one of {allowed}, not {kinds}."
            raise APIError(400, message, param="structured_outputs")
        return spec


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
        list[Annotated[int, _bounded(0, TOKEN_ID_MAX)]] | None, at_most(MAX_STOP_TOKEN_IDS, "token ids")
    ] = None
    include_stop_str_in_output: bool | None = None
    min_tokens: Annotated[int | None, _bounded(0)] = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    logit_bias: Annotated[
        dict[str, Annotated[float, _bounded(-100, 100)]] | None, at_most(MAX_LOGIT_BIAS, "entries")
    ] = None
    # vLLM's: logprobs name tokens as "token_id:<id>", so a client can use the ids.
    return_tokens_as_token_ids: bool | None = None
    prompt_logprobs: Annotated[int | None, _bounded(0, MAX_LOGPROBS)] = None  # vLLM's: the prompt tokens' logprobs
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsIn | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.isdigit() or int(key) > TOKEN_ID_MAX:
                raise PydanticCustomError("invalid_key", f"keys must be token ids, got {key!r}")
        return value

    def _check_prompt_logprobs(self) -> None:
        if self.prompt_logprobs and self.stream:  # vLLM's rule: they come in the whole response only
            message = "Invalid 'prompt_logprobs': prompt logprobs are not available when stream is true."
            raise APIError(400, message, param="prompt_logprobs")

    def structured(self) -> StructuredOutputs | None:
        """The request's one output constraint, from whichever field set it (400 for two)."""
        given: dict[str, StructuredOutputs] = {}
        if self.response_format is not None and self.response_format.type != "text":
            given["response_format"] = self.response_format.to_protocol()
        if self.structured_outputs is not None:
            given["structured_outputs"] = self.structured_outputs.to_protocol()
        if self.guided_json is not None:
            given["guided_json"] = StructuredOutputs(json=_schema_text(self.guided_json, "guided_json"))
        if self.guided_regex is not None:
            given["guided_regex"] = StructuredOutputs(regex=self.guided_regex)
        if self.guided_choice is not None:
            given["guided_choice"] = StructuredOutputs(choice=self.guided_choice)
        if self.guided_grammar is not None:
            given["guided_grammar"] = StructuredOutputs(grammar=self.guided_grammar)
        if len(given) > 1:
            first = next(iter(given))
            message = f"Invalid '{first}': give one output constraint, got {', '.join(given)}."
            raise APIError(400, message, param=first)
        return next(iter(given.values()), None)

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
            "prompt_logprobs": self.prompt_logprobs,
        }
        return SamplingParams(
            max_tokens=max_tokens,
            structured_outputs=self.structured(),
            stop=self.stop or [],  # type: ignore[arg-type]  # a list once validated
            logprobs=logprobs,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            **{k: v for k, v in given.items() if v is not None},
        )


class CompletionRequest(_SamplingRequest):
    prompt: Annotated[str | list[int], BeforeValidator(_single_prompt)]
    # OpenAI's default for completions; 0 only with echo (vLLM's): the prompt alone, e.g. its logprobs.
    max_tokens: Annotated[int | None, AfterValidator(_completion_max_tokens)] = 16
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

    @property
    def echo_only(self) -> bool:
        """max_tokens 0 with echo: the engine runs one token (vLLM's), which the answer leaves out."""
        return bool(self.echo) and self.max_tokens == 0

    def check(self) -> None:
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "Invalid 'max_tokens': must be at least 1 (0 only with echo), got 0.",
                           param="max_tokens")
        self._check_prompt_logprobs()

    def to_sampling_params(self) -> SamplingParams:
        params = self.sampling_params(1 if self.echo_only else self.max_tokens, self.logprobs)
        if self.echo and self.prompt_logprobs is None and self.logprobs is not None:
            # vLLM's: echo with logprobs shows the prompt tokens' too, computed as prompt logprobs.
            params = msgspec.structs.replace(params, prompt_logprobs=self.logprobs)
        return params


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: str  # JSON text, as OpenAI sends an assistant's earlier calls


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn

    @field_validator("function")
    @classmethod
    def _arguments_are_an_object(cls, value: FunctionCallIn) -> FunctionCallIn:
        try:
            arguments = json.loads(value.arguments)
        except (ValueError, RecursionError):  # RecursionError: nested past Python's limit
            arguments = None
        if not isinstance(arguments, dict):
            raise PydanticCustomError("invalid_arguments", "arguments must be the JSON text of an object")
        return value


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str | None, BeforeValidator(_text_content)] = None
    tool_calls: Annotated[list[ToolCallIn] | None, at_most(MAX_TOOLS, "tool calls")] = None  # an assistant's
    tool_call_id: str | None = None  # a tool result: the call it answers
    name: str | None = None

    def to_protocol(self) -> ChatMessage:
        # Chat templates know "system"; OpenAI's newer "developer" role means the same. Templates
        # read tool call arguments as objects (vLLM hands them over the same way).
        calls = [
            {"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                         "arguments": json.loads(c.function.arguments)}}
            for c in self.tool_calls or []
        ]
        role = "system" if self.role == "developer" else self.role
        return ChatMessage(role, self.content, calls or None, self.tool_call_id, self.name)


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Annotated[str, AfterValidator(_function_name)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionDefinition

    def as_dict(self) -> dict[str, Any]:
        """The tool as chat templates and the tool-call schemas read it."""
        return {"type": "function", "function": self.function.model_dump(exclude_none=True)}


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessageIn]
    max_tokens: Annotated[int | None, _bounded(1)] = None  # deprecated by OpenAI, still sent
    max_completion_tokens: Annotated[int | None, _bounded(1)] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    logprobs: bool | None = False
    top_logprobs: Annotated[int | None, _bounded(0, MAX_LOGPROBS)] = None
    tools: Annotated[list[ToolDefinition] | None, at_most(MAX_TOOLS, "tools")] = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, value: list[ChatMessageIn]) -> list[ChatMessageIn]:
        if not value:
            raise PydanticCustomError("empty", "must contain at least one message")
        return value

    @property
    def tool_mode(self) -> str:
        """none, auto, required or named: how the output may call the tools."""
        if not self.tools:
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"  # OpenAI's default once tools are given

    def named_tool(self) -> dict[str, Any]:
        assert isinstance(self.tool_choice, NamedToolChoice) and self.tools
        return next(t.as_dict() for t in self.tools if t.function.name == self.tool_choice.function.name)

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        return [t.as_dict() for t in self.tools] if self.tools else None

    def check_tools(self, auto_tool_choice: bool) -> None:
        """The tool fields against each other and the server's flags (`--enable-auto-tool-choice`)."""
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise APIError(400, "Invalid 'tool_choice': it needs tools to choose from.", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice.function.name not in names:
                raise APIError(
                    400, f"Invalid 'tool_choice': no tool is named {self.tool_choice.function.name!r} "
                    f"(tools: {', '.join(names)}).", param="tool_choice",
                )
        if self.tool_mode == "auto" and not auto_tool_choice:
            raise APIError(
                400,
                'Invalid \'tool_choice\': "auto" tool choice needs the server started with '
                "--enable-auto-tool-choice and --tool-call-parser; or send tool_choice \"required\", \"none\" "
                "or a named function.",
                param="tool_choice",
            )

    def structured(self) -> StructuredOutputs | None:
        """The tool choice's constraint (required: a JSON array of calls; named: the function's
        arguments), else whatever the other fields ask; not both."""
        constraint = super().structured()
        if self.tool_mode not in ("required", "named"):
            return constraint
        if constraint is not None:
            raise APIError(
                400, "Invalid 'tool_choice': a required or named tool choice cannot be combined with "
                "response_format or structured outputs.", param="tool_choice",
            )
        if self.tool_mode == "named":
            schema = named_tool_schema(self.named_tool())
        else:
            schema = required_tools_schema(self.tool_dicts() or [])
            if self.parallel_tool_calls is False:
                schema["maxItems"] = 1
        # Calls as json.dumps writes them: no whitespace for a small model to wander in.
        return StructuredOutputs(json=json.dumps(schema), disable_any_whitespace=True)

    def check(self) -> None:
        self._check_prompt_logprobs()
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


