"""The frontend on its own: request validation and OpenAI's error shape, the SSE format, and the
`EngineClient` against real DEALER sockets driven by the test as fake tokenizers."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import msgspec
import openai
import pytest
import zmq
from fastapi.testclient import TestClient

from frontend import engine_client
from frontend.api_server import build_app
from frontend.engine_client import EngineClient, EngineError
from protocol import Decoder, EngineConfig, connect_dealer, encode
from protocol.messages import (
    Abort,
    ErrorReply,
    Heartbeat,
    Hello,
    Logprobs,
    PromptLogprobs,
    SamplingParams,
    TextBatch,
    TextOutput,
    TokenizeRequest,
    TokenizerFromFrontend,
)

Script = Callable[[TokenizeRequest], list[msgspec.Struct]]


class FakeTokenizer:
    """A real DEALER peer on the frontend's socket, speaking the tokenizer's side of the protocol.

    It runs in its own thread (as a tokenizer runs in its own process); `script`, if given,
    answers each `TokenizeRequest` with the messages to send back.
    """

    def __init__(
        self,
        config: EngineConfig,
        member_id: str = "tokenizer-0",
        ready: bool = True,
        script: Script | None = None,
    ) -> None:
        self.config, self.member_id, self.ready, self.script = config, member_id, ready, script
        self.serving = ready  # the scheduler behind it has a worker
        self.received: list[Any] = []
        self._outbox: queue.Queue[bytes] = queue.Queue()
        self._from_frontend = Decoder(TokenizerFromFrontend)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> FakeTokenizer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def send(self, msg: msgspec.Struct) -> None:
        self._outbox.put(encode(msg))

    def send_raw(self, frame: bytes) -> None:
        self._outbox.put(frame)

    def requests(self) -> list[TokenizeRequest]:
        return [m for m in self.received if isinstance(m, TokenizeRequest)]

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = connect_dealer(ctx, self.config.frontend_addr, self.member_id)
        sock.send(encode(Hello(role="tokenizer", member_id=self.member_id, pid=os.getpid())))
        next_beat = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= next_beat:
                sock.send(encode(Heartbeat(self.member_id, ready=self.ready, serving=self.serving)))
                next_beat = time.monotonic() + self.config.heartbeat_interval_s
            while not self._outbox.empty():
                sock.send(self._outbox.get_nowait())
            if sock.poll(10):
                msg = self._from_frontend.decode(sock.recv())
                self.received.append(msg)
                if self.script is not None and isinstance(msg, TokenizeRequest):
                    for reply in self.script(msg):
                        sock.send(encode(reply))
        sock.close(linger=0)
        ctx.term()


def out(rid: str, text: str, finish: str | None = None, n: int = 1) -> TextOutput:
    return TextOutput(rid, text, [7] * len(text), finish, prompt_tokens=5, completion_tokens=n)


def hello_world(req: TokenizeRequest) -> list[msgspec.Struct]:
    rid = req.request_id
    return [
        TextBatch([out(rid, "Hello")]),
        TextBatch([out(rid, "", n=2)]),
        TextBatch([out(rid, " world", "stop", 3)]),
    ]


def too_long(req: TokenizeRequest) -> list[msgspec.Struct]:
    msg = "This model's maximum context length is 1024 tokens; ask for fewer."
    return [ErrorReply(req.request_id, 400, msg, param="max_tokens")]


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


async def async_wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.fixture()
def config() -> Iterator[EngineConfig]:
    # A short run dir: ipc:// paths are limited to about 100 bytes.
    run_dir = tempfile.mkdtemp(prefix="pagoda-fe-")
    yield EngineConfig(run_dir=run_dir, heartbeat_interval_s=0.1, num_tokenizers=1).with_addresses()
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture()
def api(config: EngineConfig) -> Iterator[TestClient]:
    with TestClient(build_app(config, EngineClient(config))) as client:
        yield client


def chat_body(**kw: Any) -> dict[str, Any]:
    return {"model": EngineConfig().model_name, "messages": [{"role": "user", "content": "Hi"}], **kw}


def assert_openai_error(resp: Any, status: int, param: str | None = None, *words: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    for word in words:
        assert word in error["message"], error["message"]
    return error


# ---- validation, with no tokenizer connected ----------------------------------------------


def test_malformed_json_is_a_400_in_openai_shape(api: TestClient) -> None:
    resp = api.post(
        "/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"}
    )
    error = assert_openai_error(resp, 400, None, "JSON")
    assert error["type"] == "invalid_request_error"


def test_unknown_model_is_a_404_naming_it(api: TestClient) -> None:
    resp = api.post("/v1/chat/completions", json=chat_body(model="gpt-9"))
    error = assert_openai_error(resp, 404, "model", "The model 'gpt-9' does not exist.")
    assert error["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("max_tokens", -1, "at least 1"),
        ("max_completion_tokens", 0, "at least 1"),
        ("temperature", 5, "between 0 and 2"),
        ("temperature", -1, "between 0 and 2"),
        ("top_p", 2, "between 0 and 1"),
        ("presence_penalty", 3, "between -2 and 2"),
        ("n", 0, "between 1 and 128"),
        ("n", 129, "between 1 and 128"),
        ("seed", 2**70, "between"),
        ("temperature", "hot", "valid number"),
        ("top_logprobs", 21, "between 0 and 20"),
        ("stop", ["x"] * 17, "at most 16 stop strings"),
        ("stop", "x" * 257, "at most 256 characters"),
        ("stop_token_ids", list(range(257)), "at most 256 token ids"),
    ],
)
def test_out_of_range_field_is_a_400_naming_field_and_range(
    api: TestClient, field: str, value: Any, expected: str
):
    resp = api.post("/v1/chat/completions", json=chat_body(**{field: value}))
    assert_openai_error(resp, 400, field, field, expected)


def test_completion_fields_are_checked_too(api: TestClient) -> None:
    resp = api.post("/v1/completions", json={"prompt": "Hi", "max_tokens": -1})
    assert_openai_error(resp, 400, "max_tokens", "max_tokens", "at least 1")
    resp = api.post("/v1/completions", json={"prompt": ["a", "b"]})
    assert_openai_error(resp, 400, "prompt", "one per request")
    resp = api.post("/v1/completions", json={})
    assert_openai_error(resp, 400, "prompt", "Missing required parameter: 'prompt'")
    resp = api.post("/v1/completions", json={"prompt": "Hi", "logprobs": 21})
    assert_openai_error(resp, 400, "logprobs", "between 0 and 20")
    resp = api.post("/v1/completions", json={"prompt": "Hi", "logit_bias": {"1": 101}})
    assert_openai_error(resp, 400, "logit_bias.1", "between -100 and 100")
    resp = api.post("/v1/completions", json={"prompt": "Hi", "prompt_logprobs": 21})
    assert_openai_error(resp, 400, "prompt_logprobs", "between 0 and 20")
    resp = api.post("/v1/completions", json={"prompt": "Hi", "prompt_logprobs": 1, "stream": True})
    assert_openai_error(resp, 400, "prompt_logprobs", "not available when stream is true")
    resp = api.post("/v1/chat/completions", json=chat_body(prompt_logprobs=1, stream=True))
    assert_openai_error(resp, 400, "prompt_logprobs", "not available when stream is true")
    # max_tokens 0 is the prompt alone: only with echo (vLLM's).
    resp = api.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 0})
    assert_openai_error(resp, 400, "max_tokens", "at least 1", "only with echo")


@pytest.mark.parametrize(
    ("body", "param", "expected"),
    [
        ({"top_logprobs": 2}, "top_logprobs", "logprobs must be set to true"),
        ({"continue_final_message": True}, "continue_final_message", "add_generation_prompt"),
        (
            {"continue_final_message": True, "add_generation_prompt": False},
            "continue_final_message",
            "last message must be the assistant's",
        ),
    ],
)
def test_fields_that_conflict_are_a_400_naming_one(api: TestClient, body: dict, param: str, expected: str) -> None:
    assert_openai_error(api.post("/v1/chat/completions", json=chat_body(**body)), 400, param, expected)


def test_missing_or_bad_messages_are_400s(api: TestClient) -> None:
    assert_openai_error(api.post("/v1/chat/completions", json={"model": "x"}), 400, "messages", "messages")
    assert_openai_error(api.post("/v1/chat/completions", json=chat_body(messages=[])), 400, "messages")
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    resp = api.post("/v1/chat/completions", json=chat_body(messages=image))
    assert_openai_error(resp, 400, "messages[0].content", "text")
    resp = api.post("/v1/chat/completions", json=chat_body(messages=[{"role": "robot", "content": "x"}]))
    assert_openai_error(resp, 400, "messages[0].role")


DEEP = "[" * 100_000 + "]" * 100_000  # nested past Python's recursion limit once parsed


@pytest.mark.parametrize(
    ("body", "param", "expected"),
    [
        ({"guided_json": DEEP}, "guided_json", "not valid JSON"),
        ({"structured_outputs": {"json": DEEP}}, "structured_outputs", "not valid JSON"),
        ({"messages": [{"role": "user", "content": "Hi"},
                       {"role": "assistant", "tool_calls": [{"id": "a", "type": "function",
                                                             "function": {"name": "f", "arguments": DEEP}}]},
                       {"role": "tool", "tool_call_id": "a", "content": "x"}]},
         "messages[1].tool_calls[0].function", "JSON text of an object"),
    ],
)
def test_json_text_nested_too_deep_is_a_400_not_a_500(api: TestClient, body: dict, param: str, expected: str) -> None:
    """JSON given as text inside a field is parsed by the frontend: nested deeper than Python's
    recursion limit, that raised RecursionError (a 500) before it became a 400 naming the field."""
    assert_openai_error(api.post("/v1/chat/completions", json=chat_body(**body)), 400, param, expected)
    head = json.dumps(chat_body())[:-1]  # the body's object left open for one more field
    deep_body = (head + ', "x": ' + DEEP + "}").encode()
    resp = api.post("/v1/chat/completions", content=deep_body, headers={"content-type": "application/json"})
    assert_openai_error(resp, 400, None, "JSON", "recursion")


def test_no_422_ever_reaches_a_client(api: TestClient) -> None:
    for body in (b"", b"[]", b'"text"', b"null", b'{"messages": "not a list"}'):
        resp = api.post("/v1/chat/completions", content=body)
        assert_openai_error(resp, 400, resp.json()["error"]["param"])


def test_valid_request_with_no_live_tokenizer_is_a_503(api: TestClient) -> None:
    error = assert_openai_error(api.post("/v1/chat/completions", json=chat_body()), 503, None, "tokenizer")
    assert error["type"] == "server_error"
    assert_openai_error(api.post("/v1/completions", json={"prompt": [1, 2, 3], "stream": True}), 503)


def test_health_and_ready_are_503_without_a_tokenizer(api: TestClient) -> None:
    health = api.get("/health")
    assert health.status_code == 503 and health.json() == {"status": "unavailable", "tokenizers": {}}
    assert_openai_error(api.get("/ready"), 503)


def test_models_lists_the_served_name(config: EngineConfig) -> None:
    named = msgspec.structs.replace(config, served_model_name="my-model")
    with TestClient(build_app(named, EngineClient(named))) as api:
        body = api.get("/v1/models").json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"]) for m in body["data"]] == [("my-model", "model")]


def test_api_key_is_required_on_every_route_but_the_probes(config: EngineConfig) -> None:
    keyed = msgspec.structs.replace(config, api_key="s3cret")
    with TestClient(build_app(keyed, EngineClient(keyed))) as api:
        assert_openai_error(api.get("/v1/models"), 401)
        error = assert_openai_error(api.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        assert error["code"] == "invalid_api_key"
        assert api.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        for method, path in [("GET", "/metrics"), ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json"),
                             ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/nowhere")]:
            assert_openai_error(api.request(method, path, json={}), 401)
        with_key = {"Authorization": "Bearer s3cret"}
        assert api.get("/metrics", headers=with_key).status_code == 200
        assert api.get("/openapi.json", headers=with_key).status_code == 200
        assert api.get("/health").status_code == 503  # open to probes: no tokenizer, not 401
        assert api.get("/ready").status_code == 503


def test_api_key_file_is_read_stripped_and_excludes_api_key(config: EngineConfig, tmp_path) -> None:
    from frontend.auth import ApiKeyError

    (tmp_path / "key").write_text("from-file\n")
    keyed = msgspec.structs.replace(config, api_key_file=str(tmp_path / "key"))
    with TestClient(build_app(keyed, EngineClient(keyed))) as api:
        assert api.get("/v1/models", headers={"Authorization": "Bearer from-file"}).status_code == 200
        assert_openai_error(api.get("/v1/models", headers={"Authorization": "Bearer from-fil"}), 401)
    with pytest.raises(ApiKeyError, match="not both"):
        build_app(msgspec.structs.replace(keyed, api_key="x"), EngineClient(keyed))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ApiKeyError, match="empty"):
        build_app(msgspec.structs.replace(config, api_key_file=str(tmp_path / "empty")), EngineClient(config))
    with pytest.raises(ApiKeyError, match="cannot read"):
        build_app(msgspec.structs.replace(config, api_key_file=str(tmp_path / "missing")), EngineClient(config))


# ---- the API with a fake tokenizer ---------------------------------------------------------


def test_ready_turns_200_once_a_tokenizer_reports_ready(config: EngineConfig, api: TestClient) -> None:
    tok = FakeTokenizer(config, ready=False).start()
    try:
        time.sleep(3 * config.heartbeat_interval_s)
        assert api.get("/ready").status_code == 503
        tok.ready = True
        wait_for(lambda: api.get("/ready").status_code == 200)
    finally:
        tok.stop()


def test_health_is_200_only_while_a_tokenizer_can_serve_and_names_the_members(
    config: EngineConfig, api: TestClient
) -> None:
    tok = FakeTokenizer(config, ready=False).start()
    try:
        wait_for(lambda: "tokenizer-0" in api.get("/health").json()["tokenizers"])
        assert api.get("/health").status_code == 503
        tok.ready = tok.serving = True
        wait_for(lambda: api.get("/health").status_code == 200)
        body = api.get("/health").json()
        assert body["status"] == "ok" and body["tokenizers"]["tokenizer-0"]["serving"] is True
        tok.serving = False  # its scheduler lost the worker: requests would wait, not run
        wait_for(lambda: api.get("/health").status_code == 503)
        assert api.get("/health").json()["tokenizers"]["tokenizer-0"] == {
            "pid": os.getpid(), "ready": True, "serving": False, "requests": 0
        }
    finally:
        tok.stop()


def test_ready_waits_for_every_tokenizer_of_the_pool(config: EngineConfig) -> None:
    pool = msgspec.structs.replace(config, num_tokenizers=2)
    toks = [FakeTokenizer(pool, member_id=f"tokenizer-{i}") for i in range(2)]
    with TestClient(build_app(pool, EngineClient(pool))) as api:
        try:
            toks[0].start()
            time.sleep(3 * config.heartbeat_interval_s)
            assert_openai_error(api.get("/ready"), 503, None, "1 of 2 tokenizers")
            toks[1].start()
            wait_for(lambda: api.get("/ready").status_code == 200)
        finally:
            for tok in toks:
                tok.stop()


def test_completion_returns_the_whole_text_with_usage(config: EngineConfig, api: TestClient) -> None:
    tok = FakeTokenizer(config, script=hello_world).start()
    try:
        wait_for(lambda: api.get("/ready").status_code == 200)
        resp = api.post(
            "/v1/completions", json={"prompt": "Say hi", "max_tokens": 8, "stop": "\n", "seed": 3}
        )
    finally:
        tok.stop()
    body = resp.json()
    assert resp.status_code == 200 and body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [
        {"text": "Hello world", "index": 0, "logprobs": None, "finish_reason": "stop", "stop_reason": None}
    ]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    [req] = tok.requests()
    assert req.request_id == body["id"] and req.prompt == "Say hi"
    assert req.sampling == SamplingParams(max_tokens=8, stop=["\n"], seed=3)


def echo_with_prompt_logprobs(req: TokenizeRequest) -> list[msgspec.Struct]:
    """A 3-token prompt "a b c" and one generated token, as the tokenizer sends them."""
    prompt = PromptLogprobs(1, [-1.0, -2.5], [1, 3], [[5, 8], [8, 9]], [[-1.0, -1.5], [-0.5, -1.0]],
                            [4, 5, 6], ["a", " b", " c"], [[" b", " x"], [" x", " y"]])
    lp = Logprobs([-0.5], [[8, 9]], [[-0.5, -1.0]], [" x"], [[" x", " y"]])
    first = TextOutput(req.request_id, " x", [8], "length", 3, 1, logprobs=lp, prompt_text="a b c",
                       prompt_logprobs=prompt)
    return [TextBatch([first])]


def test_echo_with_max_tokens_0_answers_the_prompt_and_its_logprobs(config: EngineConfig, api: TestClient) -> None:
    """lm-evaluation-harness' log-likelihood request: the prompt tokens come first in logprobs
    (the first without a logprob), the generated token is left out, and vLLM's prompt_logprobs."""
    tok = FakeTokenizer(config, script=echo_with_prompt_logprobs).start()
    try:
        wait_for(lambda: api.get("/ready").status_code == 200)
        body = {"prompt": "a b c", "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
        resp = api.post("/v1/completions", json=body)
    finally:
        tok.stop()
    [req] = tok.requests()
    assert req.echo and req.sampling == SamplingParams(temperature=0, max_tokens=1, logprobs=1, prompt_logprobs=1)
    [choice] = resp.json()["choices"]
    assert choice["text"] == "a b c" and choice["finish_reason"] == "length"
    assert choice["logprobs"] == {
        "tokens": ["a", " b", " c"], "token_logprobs": [None, -1.0, -2.5],
        "top_logprobs": [None, {" b": -1.0}, {" x": -0.5}], "text_offset": [0, 1, 3],
    }
    def entry(logprob: float, rank: int, token: str) -> dict[str, Any]:
        return {"logprob": logprob, "rank": rank, "decoded_token": token}

    assert choice["prompt_logprobs"] == [
        None,
        {"5": entry(-1.0, 1, " b"), "8": entry(-1.5, 2, " x")},
        {"6": entry(-2.5, 3, " c"), "8": entry(-0.5, 1, " x"), "9": entry(-1.0, 2, " y")},
    ]
    assert resp.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}


def test_chat_request_reaches_the_tokenizer_as_sent(config: EngineConfig, api: TestClient) -> None:
    tok = FakeTokenizer(config, script=hello_world).start()
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
    ]
    sampling = {"temperature": 0.5, "top_p": 0.9, "top_k": 40, "max_completion_tokens": 9, "stop": ["a", "b"]}
    try:
        wait_for(lambda: api.get("/ready").status_code == 200)
        resp = api.post("/v1/chat/completions", json=chat_body(messages=messages, user="u1", **sampling))
    finally:
        tok.stop()
    body = resp.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello world"}
    [req] = tok.requests()
    assert [(m.role, m.content) for m in req.messages] == [("system", "Be brief."), ("user", "Hi\nthere")]
    assert req.sampling == SamplingParams(temperature=0.5, top_p=0.9, top_k=40, max_tokens=9, stop=["a", "b"])


def sse_events(text: str) -> list[str]:
    assert text.endswith("data: [DONE]\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events)
    return [e.removeprefix("data: ") for e in events]


def test_streamed_chat_is_role_then_deltas_then_finish_then_usage(
    config: EngineConfig, api: TestClient
) -> None:
    tok = FakeTokenizer(config, script=hello_world).start()
    try:
        wait_for(lambda: api.get("/ready").status_code == 200)
        body = chat_body(stream=True, stream_options={"include_usage": True})
        resp = api.post("/v1/chat/completions", json=body)
    finally:
        tok.stop()
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    choices = [c["choices"][0] for c in chunks[:-1]]
    assert [c["delta"] for c in choices] == [
        {"role": "assistant", "content": ""},
        {"content": "Hello"},
        {"content": " world"},
    ]
    assert [c["finish_reason"] for c in choices] == [None, None, "stop"]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 8


def test_streamed_completion_without_usage_has_no_usage_key(config: EngineConfig, api: TestClient) -> None:
    tok = FakeTokenizer(config, script=hello_world).start()
    try:
        wait_for(lambda: api.get("/ready").status_code == 200)
        resp = api.post("/v1/completions", json={"prompt": [1, 2], "stream": True})
    finally:
        tok.stop()
    chunks = [json.loads(e) for e in sse_events(resp.text)[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == ["Hello", " world"]
    assert all("usage" not in c and c["object"] == "text_completion" for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
def test_engine_error_reply_keeps_its_status(config: EngineConfig, api: TestClient, stream: bool) -> None:
    tok = FakeTokenizer(config, script=too_long).start()
    try:
        wait_for(lambda: api.get("/ready").status_code == 200)
        resp = api.post("/v1/chat/completions", json=chat_body(stream=stream, max_tokens=5000))
    finally:
        tok.stop()
    assert_openai_error(resp, 400, "max_tokens", "maximum context length is 1024")


def test_openai_sdk_reads_streams_and_errors(config: EngineConfig, api: TestClient) -> None:
    tok = FakeTokenizer(config, script=hello_world).start()
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=api, max_retries=0)
    try:
        wait_for(lambda: api.get("/ready").status_code == 200)
        stream = sdk.chat.completions.create(
            model=config.model_name, messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream) == "Hello world"
        with pytest.raises(openai.BadRequestError, match="between 0 and 2"):
            sdk.completions.create(model=config.model_name, prompt="Hi", temperature=3)
    finally:
        tok.stop()


# ---- EngineClient against fake tokenizers ----------------------------------------------------


def run_with_client(config: EngineConfig, scenario: Callable[[EngineClient], Any]) -> None:
    async def main() -> None:
        client = EngineClient(config)
        await client.start()
        try:
            await scenario(client)
        finally:
            await client.close()

    asyncio.run(main())


def request(rid: str = "r1") -> TokenizeRequest:
    return TokenizeRequest(request_id=rid, sampling=SamplingParams(max_tokens=4), prompt="Hi")


async def collect(client: EngineClient, rid: str = "r1") -> list[TextOutput]:
    return [o async for o in client.generate(request(rid))]


def test_generate_streams_what_the_tokenizer_sends(config: EngineConfig) -> None:
    tok = FakeTokenizer(config, script=hello_world).start()

    async def scenario(client: EngineClient) -> None:
        assert await client.wait_ready(5)
        outputs = await collect(client)
        assert [(o.text, o.finish_reason) for o in outputs] == [
            ("Hello", None),
            ("", None),
            (" world", "stop"),
        ]
        assert client.tokenizer_loads() == {"tokenizer-0": 0} and client.num_tokenizers_live == 1

    try:
        run_with_client(config, scenario)
    finally:
        tok.stop()
    assert tok.requests() == [request()]


def test_error_reply_raises_engine_error(config: EngineConfig) -> None:
    tok = FakeTokenizer(config, script=too_long).start()

    async def scenario(client: EngineClient) -> None:
        await client.wait_ready(5)
        with pytest.raises(EngineError) as caught:
            await collect(client)
        assert (caught.value.status, caught.value.param) == (400, "max_tokens")
        assert "1024" in caught.value.message

    try:
        run_with_client(config, scenario)
    finally:
        tok.stop()


def first_output_only(req: TokenizeRequest) -> list[msgspec.Struct]:
    return [TextBatch([out(req.request_id, "Hel")])]


def test_closing_the_generator_early_sends_abort(config: EngineConfig) -> None:
    tok = FakeTokenizer(config, script=first_output_only).start()

    async def scenario(client: EngineClient) -> None:
        await client.wait_ready(5)
        gen = client.generate(request("early"))
        assert (await anext(gen)).text == "Hel"
        await gen.aclose()
        assert client.tokenizer_loads() == {"tokenizer-0": 0}
        await async_wait_for(lambda: Abort(["early"]) in tok.received)

    try:
        run_with_client(config, scenario)
    finally:
        tok.stop()


def test_cancelled_consumer_sends_abort(config: EngineConfig) -> None:
    tok = FakeTokenizer(config).start()  # never answers

    async def scenario(client: EngineClient) -> None:
        await client.wait_ready(5)
        task = asyncio.create_task(collect(client, "gone"))
        await async_wait_for(lambda: len(tok.requests()) == 1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await async_wait_for(lambda: Abort(["gone"]) in tok.received)

    try:
        run_with_client(config, scenario)
    finally:
        tok.stop()


def test_requests_go_to_the_least_loaded_tokenizer(config: EngineConfig) -> None:
    toks = [FakeTokenizer(config, member_id=f"tokenizer-{i}").start() for i in range(2)]

    async def scenario(client: EngineClient) -> None:
        await async_wait_for(lambda: client.num_tokenizers_live == 2 and client.ready)
        tasks = []
        for i in range(4):
            tasks.append(asyncio.create_task(collect(client, f"r{i}")))
            await async_wait_for(lambda i=i: sum(client.tokenizer_loads().values()) == i + 1)
        assert client.tokenizer_loads() == {"tokenizer-0": 2, "tokenizer-1": 2}
        await async_wait_for(lambda: sum(len(t.requests()) for t in toks) == 4)
        for tok in toks:
            tok.send(TextBatch([out(r.request_id, "x", "length") for r in tok.requests()]))
        results = await asyncio.gather(*tasks)
        assert [[o.text for o in r] for r in results] == [["x"]] * 4
        assert client.tokenizer_loads() == {"tokenizer-0": 0, "tokenizer-1": 0}

    try:
        run_with_client(config, scenario)
    finally:
        for tok in toks:
            tok.stop()
    assert [len(t.requests()) for t in toks] == [2, 2]


def test_malformed_frames_are_dropped_and_the_client_goes_on(config: EngineConfig) -> None:
    tok = FakeTokenizer(config, script=hello_world).start()

    async def scenario(client: EngineClient) -> None:
        await client.wait_ready(5)
        tok.send_raw(b"\xc1 not msgpack")
        tok.send(request("not-for-the-frontend"))  # valid msgpack, but not a FrontendInbound type
        tok.send(TextBatch([out("nobody-asked", "x", "stop")]))  # a reply for an unknown request
        assert [o.text for o in await collect(client)] == ["Hello", "", " world"]

    try:
        run_with_client(config, scenario)
    finally:
        tok.stop()


def test_a_dead_tokenizers_request_goes_on_through_another_with_only_the_missing_text(config: EngineConfig) -> None:
    def partial(req: TokenizeRequest) -> list[msgspec.Struct]:
        return [TextBatch([out(req.request_id, "Hel")])]

    def replay(req: TokenizeRequest) -> list[msgspec.Struct]:
        # The new owner rebuilds the sample's text from its first token, as a tokenizer does.
        rid = req.request_id
        return [TextBatch([out(rid, "Hello")]), TextBatch([out(rid, " world", "stop", 3)])]

    first = FakeTokenizer(config, "tokenizer-0", script=partial).start()
    second = FakeTokenizer(config, "tokenizer-1", script=replay)

    async def scenario(client: EngineClient) -> None:
        await client.wait_ready(5)
        task = asyncio.create_task(collect(client))
        await async_wait_for(lambda: len(first.requests()) == 1)
        second.start()
        await async_wait_for(lambda: client.num_tokenizers_ready == 2)
        first.stop()  # silent from now on: declared dead after 5 heartbeats
        outputs = await task
        assert [o.text for o in outputs] == ["Hel", "lo", " world"]
        assert sum(len(o.token_ids) for o in outputs) == len("Hello world")  # no token twice
        assert [r.resume for r in second.requests()] == [True]
        assert client.tokenizer_loads() == {"tokenizer-1": 0}

    try:
        run_with_client(config, scenario)
    finally:
        second.stop()


def test_a_dead_tokenizers_request_fails_with_503_when_none_comes_back(
    config: EngineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_client, "REROUTE_WAIT_S", 0.3)
    tok = FakeTokenizer(config).start()  # never answers

    async def scenario(client: EngineClient) -> None:
        await client.wait_ready(5)
        task = asyncio.create_task(collect(client))
        await async_wait_for(lambda: len(tok.requests()) == 1)
        tok.stop()  # no more heartbeats
        with pytest.raises(EngineError, match="No tokenizer came back") as caught:
            await task
        assert caught.value.status == 503
        assert not client.ready and client.num_tokenizers_live == 0
        with pytest.raises(EngineError, match="No tokenizer"):
            await collect(client, "r2")

    run_with_client(config, scenario)


def test_a_restarted_tokenizer_is_sent_the_requests_it_forgot_again(config: EngineConfig) -> None:
    tok = FakeTokenizer(config, script=lambda req: hello_world(req) if req.resume else []).start()

    async def scenario(client: EngineClient) -> None:
        await client.wait_ready(5)
        task = asyncio.create_task(collect(client))
        await async_wait_for(lambda: len(tok.requests()) == 1)
        tok.send(Hello(role="tokenizer", member_id=tok.member_id, pid=os.getpid() + 1))
        outputs = await task
        assert "".join(o.text for o in outputs) == "Hello world"
        assert [r.resume for r in tok.requests()] == [False, True]
        assert client.num_tokenizers_live == 1

    try:
        run_with_client(config, scenario)
    finally:
        tok.stop()


def test_tokenizer_that_is_not_ready_gets_no_requests(config: EngineConfig) -> None:
    tok = FakeTokenizer(config, ready=False).start()

    async def scenario(client: EngineClient) -> None:
        await async_wait_for(lambda: client.num_tokenizers_live == 1)
        assert not client.ready
        with pytest.raises(EngineError, match="starting up") as caught:
            await collect(client)
        assert caught.value.status == 503

    try:
        run_with_client(config, scenario)
    finally:
        tok.stop()
    assert tok.requests() == []


def test_prompt_tokens_waiting_past_the_cap_are_a_503_before_any_tokenizing(config: EngineConfig) -> None:
    tok = FakeTokenizer(config).start()  # never answers: every request stays waiting

    def ids(rid: str, n: int) -> TokenizeRequest:
        return TokenizeRequest(rid, SamplingParams(max_tokens=4), prompt_token_ids=[5] * n)

    async def scenario(client: EngineClient) -> None:
        await client.wait_ready(5)
        waiting = [asyncio.create_task(consume(client.generate(ids(f"r{i}", 400), None, 1000))) for i in range(2)]
        await async_wait_for(lambda: client.num_in_flight == 2)
        assert client.waiting_tokens_estimate() == 800
        with pytest.raises(EngineError) as caught:
            await anext(client.generate(ids("big", 201), None, 1000))
        assert caught.value.status == 503 and caught.value.headers == {"Retry-After": "1"}
        assert "1000 tokens" in caught.value.message
        # A text prompt is estimated from its bytes: 4000 bytes are about 1000 tokens.
        text = TokenizeRequest("text", SamplingParams(max_tokens=4), prompt="abcd" * 1000)
        with pytest.raises(EngineError, match="overloaded"):
            await anext(client.generate(text, None, 1000))
        small = asyncio.create_task(consume(client.generate(ids("small", 200), None, 1000)))
        await async_wait_for(lambda: client.num_in_flight == 3)
        for task in [*waiting, small]:
            task.cancel()
        await asyncio.gather(*waiting, small, return_exceptions=True)
        assert client.waiting_tokens_estimate() == 0
        assert [r.request_id for r in tok.requests()] == ["r0", "r1", "small"]  # the refused never left

    try:
        run_with_client(config, scenario)
    finally:
        tok.stop()


async def consume(outputs: AsyncIterator[TextOutput]) -> list[TextOutput]:
    return [o async for o in outputs]


def test_a_full_queue_is_a_503_with_retry_after(config: EngineConfig) -> None:
    tok = FakeTokenizer(config).start()  # never answers: every request stays waiting

    async def scenario(client: EngineClient) -> None:
        await client.wait_ready(5)
        waiting = [asyncio.create_task(collect(client, f"r{i}")) for i in range(2)]
        await async_wait_for(lambda: client.num_in_flight == 2)
        with pytest.raises(EngineError) as caught:
            await anext(client.generate(request("r3"), max_waiting=2))
        assert caught.value.status == 503 and caught.value.headers == {"Retry-After": "1"}
        assert "overloaded" in caught.value.message and client.num_in_flight == 2
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)

    try:
        run_with_client(config, scenario)
    finally:
        tok.stop()
