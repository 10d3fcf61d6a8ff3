"""OpenAI's responses as msgspec Structs, and the formatters that build them from `TextOutput`s.

Structs rather than pydantic because they are built per token while streaming, and because
they must carry OpenAI's explicit nulls (`"logprobs": null`, `"finish_reason": null`). Choices
carry vLLM's `stop_reason` too (the stop string or token id that ended them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import msgspec

from frontend.tool_parsers import ToolCallDelta, ToolParser
from protocol.messages import Logprobs, PromptLogprobs, TextOutput

# vLLM's floor for logprobs: JSON has no -Infinity.
MIN_LOGPROB = -9999.0


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(msgspec.Struct, kw_only=True):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: the first prompt token (echo)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(msgspec.Struct, kw_only=True):
    """vLLM's `Logprob`, in its `prompt_logprobs`: keyed by token id."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's prompt_logprobs: None for the first prompt token, then per token its own entry and the
# k most likely, by token id. Only in answers to requests that computed them.
PromptLogprobsField = list[dict[int, PromptLogprob] | None] | msgspec.UnsetType


class CompletionChoice(msgspec.Struct, kw_only=True):
    text: str
    index: int = 0
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobsField = msgspec.UNSET


class Completion(msgspec.Struct, kw_only=True):
    """A whole completion, or one streamed chunk of one (same object type, as OpenAI has it)."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    # Left out of chunks unless the client asked for usage; then null until the last chunk.
    usage: Usage | None | msgspec.UnsetType = msgspec.UNSET


class TopLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct, kw_only=True):
    content: list[TokenLogprob]


class FunctionCall(msgspec.Struct, kw_only=True):
    name: str
    arguments: str  # JSON text


class ToolCallOut(msgspec.Struct, kw_only=True):
    id: str
    type: str = "function"
    function: FunctionCall


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: str = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | msgspec.UnsetType = msgspec.UNSET


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobsField = msgspec.UNSET  # vLLM's, for the whole response


class FunctionCallDelta(msgspec.Struct, kw_only=True):
    name: str | msgspec.UnsetType = msgspec.UNSET
    arguments: str = ""


class ToolCallChunk(msgspec.Struct, kw_only=True):
    """A streamed piece of a tool call: the first carries its id, type and name."""

    index: int
    id: str | msgspec.UnsetType = msgspec.UNSET
    type: str | msgspec.UnsetType = msgspec.UNSET
    function: FunctionCallDelta


class Delta(msgspec.Struct):
    """Only the fields that changed: UNSET fields are left out of the JSON."""

    role: str | msgspec.UnsetType = msgspec.UNSET
    content: str | msgspec.UnsetType = msgspec.UNSET
    tool_calls: list[ToolCallChunk] | msgspec.UnsetType = msgspec.UNSET


class ChatChunkChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


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
    # vLLM's additions: the model it loaded, and the context a request may fill (None until a
    # worker has said how much its KV pool holds).
    root: str
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[ModelCard]


# ---- response builders -------------------------------------------------------------------

Entry = TypeVar("Entry")


def prompt_logprob_dicts(
    prompt: PromptLogprobs, entry: Callable[[float, int | None, str], Entry]
) -> list[dict[int, Entry] | None]:
    """vLLM's `prompt_logprobs` shape: None for each prompt token without an entry (the first),
    then a dict by token id: the prompt token's own entry (its rank in the vocabulary) first,
    then the k most likely (ranks 1..k). `entry(logprob, rank, text)` makes each value."""
    dicts: list[dict[int, Entry] | None] = [None] * prompt.first
    for i, logprob in enumerate(prompt.token_logprobs):
        j = prompt.first + i
        own = {prompt.prompt_token_ids[j]: entry(logprob, prompt.token_ranks[i], prompt.prompt_tokens[j])}
        top = zip(prompt.top_token_ids[i], prompt.top_logprobs[i], prompt.top_tokens[i])
        dicts.append(own | {t: entry(v, rank, text) for rank, (t, v, text) in enumerate(top, 1) if t not in own})
    return dicts


def _json_prompt_logprobs(prompt: PromptLogprobs | None) -> PromptLogprobsField:
    if prompt is None:
        return msgspec.UNSET

    def entry(logprob: float, rank: int | None, text: str) -> PromptLogprob:
        return PromptLogprob(logprob=max(logprob, MIN_LOGPROB), rank=rank, decoded_token=text)

    return prompt_logprob_dicts(prompt, entry)



class _Choice:
    """What one of the `n` samples has produced so far."""

    __slots__ = ("text", "outputs", "finish_reason", "stop_reason", "completion_tokens", "text_offset")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.outputs: list[TextOutput] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.completion_tokens = 0
        self.text_offset = 0  # completions' logprobs: where the next token's text begins


class ResponseFormatter:
    """Turns one request's `TextOutput`s (of its `n` samples) into OpenAI objects.

    `add()` every output; then `whole()` answers them all at once, or, streaming, `chunk()`
    answers each as it comes. Usage counts the prompt once and every sample's tokens.
    """

    def __init__(self, request_id: str, model: str, include_usage: bool, n: int = 1, token_ids: bool = False) -> None:
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self.token_ids = token_ids  # name tokens "token_id:<id>" in logprobs
        self.choices = [_Choice() for _ in range(n)]
        self.prompt_tokens = 0
        self.prompt_logprobs: PromptLogprobs | None = None  # they come with sample 0's first output
        # OpenAI sends "usage": null in every chunk when usage was asked for, else no key.
        self.chunk_usage: Any = None if include_usage else msgspec.UNSET

    @property
    def usage(self) -> Usage:
        completion = sum(c.completion_tokens for c in self.choices)
        return Usage(self.prompt_tokens, completion, self.prompt_tokens + completion)

    def add(self, out: TextOutput) -> _Choice:
        choice = self.choices[out.index]
        if out.prompt_text is not None:
            out.text = out.prompt_text + out.text  # echo: the prompt comes first
        choice.text.append(out.text)
        choice.outputs.append(out)
        choice.completion_tokens = out.completion_tokens
        if out.finish_reason is not None:
            choice.finish_reason, choice.stop_reason = out.finish_reason, out.stop_reason
        self.prompt_tokens = out.prompt_tokens
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        return choice

    def opening(self) -> list[msgspec.Struct]:
        return []

    def chunk(self, out: TextOutput) -> msgspec.Struct | None:
        raise NotImplementedError

    def usage_chunk(self) -> msgspec.Struct:
        raise NotImplementedError

    def whole(self) -> msgspec.Struct:
        raise NotImplementedError

    def _token_name(self, token_id: int, text: str) -> str:
        return f"token_id:{token_id}" if self.token_ids else text

    @staticmethod
    def _skip(out: TextOutput) -> bool:
        """Nothing to tell: the detokenizer or the stop strings are holding text back."""
        return not out.text and out.finish_reason is None and out.logprobs is None


class CompletionFormatter(ResponseFormatter):
    """`logprobs`: the request's; with echo the prompt tokens' entries come first (from its
    prompt logprobs; the first token's logprob is None). `echo_only`: echo with max_tokens 0,
    the prompt alone: the one token the engine ran for is left out (vLLM's)."""

    def __init__(self, *args: Any, logprobs: int | None = None, echo_only: bool = False, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.logprobs = logprobs
        self.echo_only = echo_only

    def add(self, out: TextOutput) -> _Choice:
        if self.echo_only:
            out.text, out.token_ids, out.logprobs, out.completion_tokens = "", [], None, 0
        return super().add(out)

    def chunk(self, out: TextOutput) -> Completion | None:
        choice = self.add(out)
        if self._skip(out):
            return None
        logprobs = self._logprobs(choice, [out], out.prompt_text)
        choice_out = CompletionChoice(
            text=out.text,
            index=out.index,
            logprobs=logprobs,
            finish_reason=out.finish_reason,
            stop_reason=out.stop_reason,
        )
        return self._completion([choice_out], self.chunk_usage)

    def usage_chunk(self) -> Completion:
        return self._completion([], self.usage)

    def whole(self) -> Completion:
        choices = []
        for index, c in enumerate(self.choices):
            prompt = next((o.prompt_text for o in c.outputs if o.prompt_text is not None), None)
            choices.append(
                CompletionChoice(
                    text="".join(c.text),
                    index=index,
                    logprobs=self._logprobs(c, c.outputs, prompt),
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                    prompt_logprobs=_json_prompt_logprobs(self.prompt_logprobs),
                )
            )
        return self._completion(choices, self.usage)

    def _logprobs(
        self, choice: _Choice, outputs: Iterable[TextOutput], prompt_text: str | None
    ) -> CompletionLogprobs | None:
        runs = [(o.token_ids, o.logprobs) for o in outputs if o.logprobs is not None]
        prompt = self.prompt_logprobs if prompt_text is not None and self.logprobs is not None else None
        if not runs and prompt is None:
            return None
        result = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        if prompt is not None:
            self._prompt_entries(result, prompt, choice.text_offset)
        if prompt_text:
            choice.text_offset += len(prompt_text)
        for token_ids, lp in runs:
            for i, token_id in enumerate(token_ids):
                result.tokens.append(self._token_name(token_id, lp.tokens[i]))
                result.token_logprobs.append(max(lp.token_logprobs[i], MIN_LOGPROB))
                result.top_logprobs.append(
                    {
                        self._token_name(t, text): max(v, MIN_LOGPROB)
                        for t, text, v in zip(lp.top_token_ids[i], lp.top_tokens[i], lp.top_logprobs[i])
                    }
                )
                result.text_offset.append(choice.text_offset)
                choice.text_offset += len(lp.tokens[i])
        return result

    def _prompt_entries(self, result: CompletionLogprobs, prompt: PromptLogprobs, offset: int) -> None:
        """Echo with logprobs: each prompt token first, its offset counted from the tokens' texts."""
        k = self.logprobs
        for j, (token_id, text) in enumerate(zip(prompt.prompt_token_ids, prompt.prompt_tokens)):
            result.tokens.append(self._token_name(token_id, text))
            result.text_offset.append(offset)
            offset += len(text)
            i = j - prompt.first
            if not 0 <= i < len(prompt.token_logprobs):
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            result.token_logprobs.append(max(prompt.token_logprobs[i], MIN_LOGPROB))
            top = zip(prompt.top_token_ids[i][:k], prompt.top_tokens[i][:k], prompt.top_logprobs[i][:k])
            result.top_logprobs.append({self._token_name(t, name): max(v, MIN_LOGPROB) for t, name, v in top})

    def _completion(self, choices: list[CompletionChoice], usage: Any) -> Completion:
        return Completion(id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage)


class ChatFormatter(ResponseFormatter):
    """`tool_parser`: makes the parser that reads tool calls out of each sample's text (none: the
    text is all content); `tool_finish`: with calls found, finish_reason "tool_calls" instead of
    "stop" (OpenAI's, except for a named tool choice)."""

    def __init__(
        self, *args: Any, tool_parser: Callable[[], ToolParser] | None = None, tool_finish: bool = True, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.tool_parser = tool_parser
        self.tool_finish = tool_finish
        self._parsers = [tool_parser() for _ in self.choices] if tool_parser else []
        self._called = [False] * len(self.choices)  # whether the sample sent a tool call so far

    def opening(self) -> list[msgspec.Struct]:
        return [self._chunk(i, Delta(role="assistant", content=""), None) for i in range(len(self.choices))]

    def chunk(self, out: TextOutput) -> ChatCompletionChunk | None:
        self.add(out)
        if not self._parsers:
            if self._skip(out):
                return None
            delta = Delta(content=out.text) if out.text or out.finish_reason is None else Delta()
            return self._chunk(out.index, delta, out.finish_reason, out.stop_reason, self._logprobs([out]))
        parser = self._parsers[out.index]
        content, calls = parser.feed(out.text)
        if out.finish_reason is not None:
            more_content, more_calls = parser.finish()
            content, calls = content + more_content, calls + more_calls
        if not content and not calls and out.finish_reason is None and out.logprobs is None:
            return None  # held back: it may be the start of a tool call
        self._called[out.index] |= bool(calls)
        delta = Delta(
            content=content if content else msgspec.UNSET,
            tool_calls=[_tool_call_chunk(c) for c in calls] if calls else msgspec.UNSET,
        )
        finish = self._finish_reason(out.finish_reason, self._called[out.index])
        return self._chunk(out.index, delta, finish, out.stop_reason, self._logprobs([out]))

    def _finish_reason(self, finish_reason: str | None, called: bool) -> str | None:
        return "tool_calls" if finish_reason == "stop" and called and self.tool_finish else finish_reason

    def _message(self, text: str) -> tuple[AssistantMessage, bool]:
        if self.tool_parser is None:
            return AssistantMessage(content=text), False
        content, calls = self.tool_parser().extract(text)
        if not calls:
            return AssistantMessage(content=text), False
        tool_calls = [ToolCallOut(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]
        return AssistantMessage(content=content, tool_calls=tool_calls), True

    def usage_chunk(self) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=[], usage=self.usage
        )

    def whole(self) -> ChatCompletion:
        choices = []
        for index, c in enumerate(self.choices):
            message, called = self._message("".join(c.text))
            choices.append(
                ChatChoice(
                    index=index,
                    message=message,
                    logprobs=self._logprobs(c.outputs),
                    finish_reason=self._finish_reason(c.finish_reason, called),
                    stop_reason=c.stop_reason,
                )
            )
        return ChatCompletion(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=self.usage,
            prompt_logprobs=_json_prompt_logprobs(self.prompt_logprobs),
        )

    def _logprobs(self, outputs: Iterable[TextOutput]) -> ChatLogprobs | None:
        runs = [(o.token_ids, o.logprobs) for o in outputs if o.logprobs is not None]
        if not runs:
            return None
        return ChatLogprobs(content=[entry for ids, lp in runs for entry in self._entries(ids, lp)])

    def _entries(self, token_ids: list[int], lp: Logprobs) -> list[TokenLogprob]:
        return [
            TokenLogprob(
                token=self._token_name(token_id, lp.tokens[i]),
                logprob=max(lp.token_logprobs[i], MIN_LOGPROB),
                bytes=list(lp.tokens[i].encode()),
                top_logprobs=[
                    TopLogprob(token=self._token_name(t, text), logprob=max(v, MIN_LOGPROB), bytes=list(text.encode()))
                    for t, text, v in zip(lp.top_token_ids[i], lp.top_tokens[i], lp.top_logprobs[i])
                ],
            )
            for i, token_id in enumerate(token_ids)
        ]

    def _chunk(
        self,
        index: int,
        delta: Delta,
        finish_reason: str | None,
        stop_reason: int | str | None = None,
        logprobs: ChatLogprobs | None = None,
    ) -> ChatCompletionChunk:
        choice = ChatChunkChoice(
            index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason, stop_reason=stop_reason
        )
        return ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=[choice], usage=self.chunk_usage
        )


def _tool_call_chunk(delta: ToolCallDelta) -> ToolCallChunk:
    first = delta.id is not None
    return ToolCallChunk(
        index=delta.index,
        id=delta.id if first else msgspec.UNSET,
        type="function" if first else msgspec.UNSET,
        function=FunctionCallDelta(
            name=delta.name if delta.name is not None else msgspec.UNSET, arguments=delta.arguments
        ),
    )
