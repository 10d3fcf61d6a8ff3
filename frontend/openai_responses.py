"""OpenAI's responses as msgspec Structs, and the formatters that build them from `TextOutput`s.

Structs rather than pydantic because they are built per token while streaming, and because
they must carry OpenAI's explicit nulls (`"logprobs": null`, `"finish_reason": null`). Choices
carry vLLM's `stop_reason` too (the stop string or token id that ended them).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import msgspec

from protocol.messages import Logprobs, TextOutput

# vLLM's floor for logprobs: JSON has no -Infinity.
MIN_LOGPROB = -9999.0


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(msgspec.Struct, kw_only=True):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct, kw_only=True):
    text: str
    index: int = 0
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


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


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: str = "assistant"
    content: str


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


class Delta(msgspec.Struct):
    """Only the fields that changed: UNSET fields are left out of the JSON."""

    role: str | msgspec.UnsetType = msgspec.UNSET
    content: str | msgspec.UnsetType = msgspec.UNSET


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
                )
            )
        return self._completion(choices, self.usage)

    def _logprobs(
        self, choice: _Choice, outputs: Iterable[TextOutput], prompt_text: str | None
    ) -> CompletionLogprobs | None:
        runs = [(o.token_ids, o.logprobs) for o in outputs if o.logprobs is not None]
        if not runs:
            return None
        if prompt_text:
            choice.text_offset += len(prompt_text)
        result = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
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

    def _completion(self, choices: list[CompletionChoice], usage: Any) -> Completion:
        return Completion(id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage)


class ChatFormatter(ResponseFormatter):
    def opening(self) -> list[msgspec.Struct]:
        return [self._chunk(i, Delta(role="assistant", content=""), None) for i in range(len(self.choices))]

    def chunk(self, out: TextOutput) -> ChatCompletionChunk | None:
        self.add(out)
        if self._skip(out):
            return None
        delta = Delta(content=out.text) if out.text or out.finish_reason is None else Delta()
        return self._chunk(out.index, delta, out.finish_reason, out.stop_reason, self._logprobs([out]))

    def usage_chunk(self) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=[], usage=self.usage
        )

    def whole(self) -> ChatCompletion:
        choices = [
            ChatChoice(
                index=index,
                message=AssistantMessage(content="".join(c.text)),
                logprobs=self._logprobs(c.outputs),
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for index, c in enumerate(self.choices)
        ]
        return ChatCompletion(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=self.usage
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
