"""Server-sent events: a streamed response as OpenAI sends it, `data: {chunk}` events then `data: [DONE]`.

The first output is awaited before the response starts (see `api_server._serve`), so the stream
itself opens with a 200. An error after that point can only travel inside the stream, as one
OpenAI error event before `[DONE]`. A client that hangs up mid-stream makes Starlette close this
generator; closing it closes the outputs, which aborts the request all the way down.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import msgspec
from fastapi.responses import StreamingResponse

from frontend.engine_client import EngineError
from frontend.errors import error_body
from frontend.openai_responses import ResponseFormatter
from protocol.messages import Logprobs, TextOutput

# No caching, and no buffering by a proxy (nginx reads X-Accel-Buffering), so each event arrives at once.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_encoder = msgspec.json.Encoder()


def sse_response(fmt: ResponseFormatter, first: TextOutput, outputs: AsyncIterator[TextOutput]) -> StreamingResponse:
    """Stream `first` and the rest of `outputs` as `fmt`'s chunks."""
    return StreamingResponse(_events(fmt, first, outputs), media_type="text/event-stream", headers=SSE_HEADERS)


async def _events(
    fmt: ResponseFormatter, first: TextOutput, outputs: AsyncIterator[TextOutput]
) -> AsyncIterator[bytes]:
    async with aclosing(outputs):
        try:
            for chunk in fmt.opening():
                yield _event(chunk)
            if chunk := fmt.chunk(first):
                yield _event(chunk)
            async for out in outputs:
                if chunk := fmt.chunk(out):
                    yield _event(chunk)
            if fmt.include_usage:
                yield _event(fmt.usage_chunk())
        except EngineError as e:
            yield _event(error_body(e.message, e.error_type, e.param))
    yield b"data: [DONE]\n\n"


# JSON leaves U+0085, U+2028 and U+2029 unescaped, but readers that split lines as
# str.splitlines does (httpx's `aiter_lines`, for one) end an event's line at them, cutting
# its JSON in two. Escaped, each event is one line for every client.
_LINE_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def _event(payload: object) -> bytes:
    data = _encoder.encode(payload)
    for raw, escaped in _LINE_BREAKS:
        if raw in data:
            data = data.replace(raw, escaped)
    return b"data: " + data + b"\n\n"


def named_event(name: str, payload: object) -> bytes:
    """An event with an `event:` line before its data (the Responses API's), escaped as above."""
    return b"event: " + name.encode() + b"\n" + _event(payload)


# ---- --stream-interval -------------------------------------------------------------------


async def group_outputs(outputs: AsyncIterator[TextOutput], interval: int) -> AsyncIterator[TextOutput]:
    """`outputs` with each sample's outputs merged until they hold `interval` new tokens (vLLM's
    --stream-interval): a sample's first output and its finishing one pass at once. The text,
    token ids and logprobs are those of `outputs`, only carried by fewer events. Closing this
    closes `outputs` (the request is aborted down)."""
    held: dict[int, TextOutput] = {}
    started: set[int] = set()
    async with aclosing(outputs):  # type: ignore[type-var]
        try:
            async for out in outputs:
                merged = _merge(held.pop(out.index), out) if out.index in held else out
                if out.index not in started or merged.finish_reason is not None or len(merged.token_ids) >= interval:
                    started.add(out.index)
                    yield merged
                else:
                    held[out.index] = merged
        except EngineError:
            for out in list(held.values()):  # what the client was owed goes out before the error
                yield out
            raise
        for out in list(held.values()):
            yield out


def _merge(a: TextOutput, b: TextOutput) -> TextOutput:
    """One output carrying `a` then `b` (of one sample); `b`'s finish, counts and stop reason."""
    logprobs = a.logprobs if b.logprobs is None else b.logprobs if a.logprobs is None else Logprobs(
        a.logprobs.token_logprobs + b.logprobs.token_logprobs,
        a.logprobs.top_token_ids + b.logprobs.top_token_ids,
        a.logprobs.top_logprobs + b.logprobs.top_logprobs,
        a.logprobs.tokens + b.logprobs.tokens,
        a.logprobs.top_tokens + b.logprobs.top_tokens,
    )
    # Anything else only one of the two carries (the first output's prompt_text) is kept.
    kept = {f: getattr(a, f) for f in a.__struct_fields__ if getattr(b, f) is None and getattr(a, f) is not None}
    return msgspec.structs.replace(
        b, **{**kept, "text": a.text + b.text, "token_ids": a.token_ids + b.token_ids, "logprobs": logprobs}
    )
