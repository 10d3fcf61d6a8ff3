"""The HTTP face of Pagoda: OpenAI's `/v1/completions`, `/v1/chat/completions` and `/v1/models`.

Routes validate the request, hand a `TokenizeRequest` to the `EngineClient` and answer the
outputs as one JSON body or as SSE chunks (`frontend.sse`) in OpenAI's exact format. A client
that goes away aborts its request: the engine stops generating for nobody.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from typing import TypeVar

import msgspec
import pydantic
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from frontend.engine_client import EngineClient
from frontend.errors import APIError, error_response, install_error_handlers
from frontend.metrics import CONTENT_TYPE, Metrics
from frontend.openai_protocol import ChatCompletionRequest, CompletionRequest
from frontend.openai_responses import ChatFormatter, CompletionFormatter, ModelCard, ModelList, ResponseFormatter
from frontend.sse import sse_response
from protocol import EngineConfig
from protocol.messages import TextOutput, TokenizeRequest

T = TypeVar("T")
RequestModel = TypeVar("RequestModel", bound=pydantic.BaseModel)

_encoder = msgspec.json.Encoder()


def run_frontend(config: EngineConfig) -> None:
    """Serve the API on `config.host:config.port` until the process is told to stop."""
    client = EngineClient(config)
    app = build_app(config, client)
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        loop="uvloop",
        log_level=config.log_level,
        timeout_graceful_shutdown=5,
    )


def build_app(config: EngineConfig, client: EngineClient) -> FastAPI:
    """The FastAPI app; its lifespan starts and closes `client`."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await client.start()
        try:
            yield
        finally:
            await client.close()

    app = FastAPI(title="Pagoda", lifespan=lifespan)
    install_error_handlers(app)
    started = int(time.time())
    metrics = Metrics(client, config.model_name)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

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

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_api_key_check(config.api_key))])

    @v1.get("/models")
    async def models() -> Response:
        return _json(ModelList(data=[ModelCard(id=config.model_name, created=started)]))

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        req = await _parse(request, CompletionRequest)
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
            treq.request_id, config.model_name, req.include_usage, req.n_samples, bool(req.return_tokens_as_token_ids)
        )
        return await _serve(request, client, metrics, treq, fmt, bool(req.stream), config.max_queue_len)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await _parse(request, ChatCompletionRequest)
        _check_model(req.model, config)
        req.check()
        treq = TokenizeRequest(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            sampling=req.to_sampling_params(),
            messages=[m.to_protocol() for m in req.messages],
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            arrival_time=time.time(),
        )
        fmt = ChatFormatter(
            treq.request_id, config.model_name, req.include_usage, req.n_samples, bool(req.return_tokens_as_token_ids)
        )
        return await _serve(request, client, metrics, treq, fmt, bool(req.stream), config.max_queue_len)

    app.include_router(v1)
    return app


# ---- request handling ------------------------------------------------------------------


def _api_key_check(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(
                401,
                "You didn't provide an API key. Send it in an Authorization header: "
                "'Authorization: Bearer YOUR_KEY'.",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(token.strip().encode(), expected):
            raise APIError(
                401,
                "Incorrect API key provided.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


async def _parse(request: Request, model: type[RequestModel]) -> RequestModel:
    """Validate the body whatever its Content-Type, so `curl -d` without a header works too."""
    try:
        return model.model_validate_json(await request.body())
    except pydantic.ValidationError as e:
        raise APIError.from_validation(e.errors()) from None


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
    max_waiting: int,
) -> Response:
    outputs = metrics.track(client.generate(treq, max_waiting), treq.arrival_time, treq.sampling.n)
    if not streaming:
        done = await _unless_disconnected(request, _collect(outputs, fmt))
        if done is None:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        return _json(fmt.whole())
    # Wait for the first output before answering, so that a rejected request (prompt too
    # long, engine down) gets its own status instead of a 200 with an error inside the stream.
    first = await _unless_disconnected(request, anext(outputs))
    if first is None:
        return Response(status_code=499)
    return sse_response(fmt, first, outputs)


async def _collect(outputs: AsyncIterator[TextOutput], fmt: ResponseFormatter) -> bool:
    """Feed every output to `fmt`, for its `whole()` answer."""
    async with aclosing(outputs):
        async for out in outputs:
            fmt.add(out)
    return True
