"""The HTTP face of Pagoda: OpenAI's `/v1/completions`, `/v1/chat/completions` and `/v1/models`.

Routes validate the request, hand a `TokenizeRequest` to the `EngineClient` and answer the
outputs as one JSON body or as SSE chunks (`frontend.sse`) in OpenAI's exact format. A client
that goes away aborts its request: the engine stops generating for nobody.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from typing import TypeVar

import msgspec
import pydantic
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from frontend.auth import ApiKeyError, RequireApiKey, read_api_key
from frontend.chat_page import add_chat_page
from frontend.engine_client import EngineClient
from frontend.engine_view import add_engine_routes
from frontend.errors import APIError, error_response, install_error_handlers
from frontend.metrics import CONTENT_TYPE, Metrics
from frontend.openai_protocol import ChatCompletionRequest, CompletionRequest
from frontend.openai_responses import ChatFormatter, CompletionFormatter, ModelCard, ModelList, ResponseFormatter
from frontend.responses_api import ResponsesFormatter, ResponsesRequest, responses_sse
from frontend.sse import group_outputs, sse_response
from frontend.tokenize_api import DetokenizeBody, DetokenizeResponse, TokenizeBody, TokenizeResponse
from frontend.tool_parsers import NamedToolCallParser, RequiredToolCallParser, ToolParser, get_tool_parser
from protocol import EMBEDDED_MODEL_NAME, EngineConfig
from protocol.messages import DetokenizeReply, TextOutput, TokenizeOnlyReply, TokenizeRequest

T = TypeVar("T")
logger = logging.getLogger("pagoda.frontend")
RequestModel = TypeVar("RequestModel", bound=pydantic.BaseModel)

_encoder = msgspec.json.Encoder()

# The largest body a prompt filling the whole context could need: 64 bytes a token covers text
# with JSON escapes and token-id lists alike; below 1 MiB refusing saves nothing.
BODY_BYTES_PER_TOKEN = 64
MIN_BODY_BYTES = 1 << 20
DRAIN_MAX_BYTES = 64 << 20  # past this a refused upload is cut off, not read to its end
DEFAULT_CONTEXT = 131072  # until a tokenizer has told the frontend the model's context


def _max_body_bytes(client: EngineClient, config: EngineConfig) -> int:
    context = client.max_model_len or config.max_model_len or DEFAULT_CONTEXT
    return max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * context)


def run_frontend(config: EngineConfig) -> None:
    """Serve the API on `config.host:config.port` until the process is told to stop."""
    client = EngineClient(config)
    try:
        app = build_app(config, client)
    except ApiKeyError as e:
        raise SystemExit(f"pagoda frontend: {e}") from None
    server_config = uvicorn.Config(
        app, host=config.host, port=config.port, loop="uvloop", log_level=config.log_level,
        timeout_graceful_shutdown=5,
    )
    _DrainingServer(server_config, client, config.shutdown_timeout).run()


class _DrainingServer(uvicorn.Server):
    """On SIGTERM or SIGINT, drain before stopping: new requests get 503 (and /health 503)
    while the port stays open, the running ones have `timeout_s` to finish, the rest then end
    with an error; then uvicorn shuts down as usual. A second SIGINT stops at once."""

    def __init__(self, config: uvicorn.Config, client: EngineClient, timeout_s: float) -> None:
        super().__init__(config)
        self.client, self.timeout_s = client, timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: object) -> None:
        if self.client.draining and sig == signal.SIGTERM:
            return  # Ctrl-C started the drain and the supervisor's SIGTERM followed: keep draining
        if self.client.draining or self._loop is None:
            super().handle_exit(sig, frame)  # type: ignore[arg-type]
            return
        self.client.draining = True
        # A signal handler may run in the middle of the loop's own code: hand over safely.
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))  # type: ignore[union-attr]

    async def _drain(self) -> None:
        began = time.monotonic()
        running = self.client.num_in_flight
        logger.info("draining: %d requests running, up to %g s (--shutdown-timeout)", running, self.timeout_s)
        while self.client.num_in_flight and time.monotonic() - began < self.timeout_s:
            await asyncio.sleep(0.05)
        if left := self.client.fail_all("The server stopped before this request finished (--shutdown-timeout)."):
            logger.warning("%d requests did not finish within %g s", left, self.timeout_s)
            await asyncio.sleep(0.5)  # their error events go out before the connections close
        self.should_exit = True


def build_app(config: EngineConfig, client: EngineClient) -> FastAPI:
    """The FastAPI app; its lifespan starts and closes `client`. Raises ApiKeyError when the
    key's file cannot be read."""
    api_key = read_api_key(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await client.start()
        try:
            yield
        finally:
            await client.close()

    app = FastAPI(title="Pagoda", lifespan=lifespan)
    install_error_handlers(app)
    if api_key:  # every route but /health and /ready (frontend/auth.py)
        app.add_middleware(RequireApiKey, api_key=api_key)
    started = int(time.time())
    metrics = Metrics(client, config.model_name)

    @app.get("/health")
    async def health() -> Response:
        # 200 only while a request can be served now: a ready tokenizer whose scheduler has a
        # worker. The body names the members, so a probe's log says which one is missing.
        serving = client.serving
        status = "ok" if serving else "draining" if client.draining else "unavailable"
        body = {"status": status, "tokenizers": client.members()}
        return JSONResponse(body, status_code=200 if serving else 503)

    @app.get("/ready")
    async def ready() -> Response:
        # Ready means the model is loaded and every tokenizer of the pool is up; requests are
        # served as soon as one is (`client.ready`), so a degraded pool still answers.
        num_ready = client.num_tokenizers_ready
        if num_ready >= max(config.num_tokenizers, 1):
            return JSONResponse({"status": "ready", "tokenizers": num_ready})
        return error_response(
            503, f"The engine is not ready yet: {num_ready} of {config.num_tokenizers} tokenizers are ready."
        )

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    v1 = APIRouter(prefix="/v1")

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": importlib.metadata.version("pagoda")})

    @v1.get("/models")
    async def models() -> Response:
        card = ModelCard(id=config.model_name, created=started, root=config.model or EMBEDDED_MODEL_NAME,
                         max_model_len=client.max_model_len or config.max_model_len)
        return _json(ModelList(data=[card]))

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        req = await _parse(request, CompletionRequest, _max_body_bytes(client, config))
        _check_model(req.model, config)
        req.check()
        prompt_text, prompt_ids = (req.prompt, None) if isinstance(req.prompt, str) else (None, req.prompt)
        treq = TokenizeRequest(
            request_id=f"cmpl-{uuid.uuid4().hex}",
            sampling=req.to_sampling_params(),
            prompt=prompt_text,
            prompt_token_ids=prompt_ids,
            arrival_time=time.time(),
            echo=bool(req.echo),
        )
        fmt = CompletionFormatter(
            treq.request_id, config.model_name, req.include_usage, req.n_samples, bool(req.return_tokens_as_token_ids),
            logprobs=req.logprobs, echo_only=req.echo_only,
        )
        return await _serve(request, client, metrics, treq, fmt, bool(req.stream), config)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await _parse(request, ChatCompletionRequest, _max_body_bytes(client, config))
        _check_model(req.model, config)
        req.check()
        req.check_tools(config.enable_auto_tool_choice)
        treq = TokenizeRequest(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            sampling=req.to_sampling_params(),
            messages=[m.to_protocol() for m in req.messages],
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            tools=req.tool_dicts(),
            arrival_time=time.time(),
        )
        fmt = ChatFormatter(
            treq.request_id, config.model_name, req.include_usage, req.n_samples, bool(req.return_tokens_as_token_ids),
            tool_parser=_tool_parser(req, config), tool_finish=req.tool_mode != "named",
        )
        return await _serve(request, client, metrics, treq, fmt, bool(req.stream), config)

    @v1.post("/responses")
    async def responses(request: Request) -> Response:
        req = await _parse(request, ResponsesRequest, _max_body_bytes(client, config))
        _check_model(req.model, config)
        treq = req.to_tokenize_request(f"resp_{uuid.uuid4().hex}")
        fmt = ResponsesFormatter(treq.request_id, config.model_name, req, treq.sampling)
        return await _serve(request, client, metrics, treq, fmt, bool(req.stream), config, stream=responses_sse)

    # vLLM's, outside /v1: a round trip to a tokenizer of the pool (the frontend has none).
    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        body = await _parse(request, TokenizeBody, _max_body_bytes(client, config))
        _check_model(body.model, config)
        body.check()
        reply = await client.call(body.to_message)
        assert isinstance(reply, TokenizeOnlyReply)
        return _json(TokenizeResponse(count=len(reply.tokens), max_model_len=reply.max_model_len,
                                      tokens=reply.tokens, token_strs=reply.token_strs))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        body = await _parse(request, DetokenizeBody, _max_body_bytes(client, config))
        _check_model(body.model, config)
        reply = await client.call(body.to_message)
        assert isinstance(reply, DetokenizeReply)
        return _json(DetokenizeResponse(prompt=reply.prompt))

    app.include_router(v1)
    add_chat_page(app)  # GET / and /static/ (frontend/chat_page.py)
    add_engine_routes(app, client, metrics)  # GET /engine and /engine/stream (frontend/engine_view.py)
    return app


# ---- request handling ------------------------------------------------------------------


def _tool_parser(req: ChatCompletionRequest, config: EngineConfig) -> Callable[[], ToolParser] | None:
    """What reads each sample's tool calls: the server's parser for "auto", the JSON the
    constraint makes for "required" and a named function; none when tools cannot be called."""
    mode = req.tool_mode
    if mode == "auto":
        return functools.partial(get_tool_parser, config.tool_call_parser)
    if mode == "required":
        return RequiredToolCallParser
    if mode == "named":
        return functools.partial(NamedToolCallParser, req.named_tool()["function"]["name"])
    return None


async def _parse(request: Request, model: type[RequestModel], max_bytes: int) -> RequestModel:
    """Validate the body whatever its Content-Type, so `curl -d` without a header works too."""
    try:
        return model.model_validate_json(await _read_body(request, max_bytes))
    except pydantic.ValidationError as e:
        raise APIError.from_validation(e.errors()) from None


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The body, or a 413 before any parsing or tokenizing when it is larger than any prompt
    the model could take: one huge request must not stall the processes serving the others."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            # Read what is left (discarded, up to a bound) so the client gets the answer rather
            # than a reset connection in the middle of its upload.
            async for rest in request.stream():
                size += len(rest)
                if size > DRAIN_MAX_BYTES:
                    break
            raise APIError(
                413,
                f"The request body is larger than {max_bytes} bytes: more than any prompt that fits the "
                f"model's context could take.",
                code="request_too_large",
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _check_model(name: str | None, config: EngineConfig) -> None:
    if name is not None and name != config.model_name:
        raise APIError(404, f"The model '{name}' does not exist.", param="model", code="model_not_found")


def _json(obj: msgspec.Struct) -> Response:
    return Response(_encoder.encode(obj), media_type="application/json")


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work` until it is done or the client hangs up; then cancel it (aborting the request).

    Starlette notices a disconnect only while it streams, so a request that is still waiting
    for its first token, or whose whole answer is being collected, is watched here.
    """

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        client_gone = not task.done()
        if client_gone:
            task.cancel()
    if client_gone:
        await asyncio.gather(task, return_exceptions=True)
        return None
    return task.result()


async def _serve(
    request: Request,
    client: EngineClient,
    metrics: Metrics,
    treq: TokenizeRequest,
    fmt: ResponseFormatter,
    streaming: bool,
    config: EngineConfig,
    stream: Callable[[ResponseFormatter, TextOutput, AsyncIterator[TextOutput]], Response] = sse_response,
) -> Response:
    limits = (config.max_num_queued_reqs, config.max_num_queued_tokens)
    outputs = metrics.track(client.generate(treq, *limits), treq.arrival_time, treq.sampling.n)
    if not streaming:
        done = await _unless_disconnected(request, _collect(outputs, fmt))
        if done is None:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        return _json(fmt.whole())
    if config.stream_interval > 1:  # a chunk every N tokens of each sample; the first and last at once
        outputs = group_outputs(outputs, config.stream_interval)
    # Wait for the first output before answering, so that a rejected request (prompt too
    # long, engine down) gets its own status instead of a 200 with an error inside the stream.
    first = await _unless_disconnected(request, anext(outputs))
    if first is None:
        return Response(status_code=499)
    return stream(fmt, first, outputs)


async def _collect(outputs: AsyncIterator[TextOutput], fmt: ResponseFormatter) -> bool:
    """Feed every output to `fmt`, for its `whole()` answer."""
    async with aclosing(outputs):
        async for out in outputs:
            fmt.add(out)
    return True
