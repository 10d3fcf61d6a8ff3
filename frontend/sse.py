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
from protocol.messages import TextOutput

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
