"""vLLM's /tokenize and /detokenize against the real processes: the ids are transformers' own on
the same model file and those a generation request gets, detokenize undoes tokenize, bad input
is a 400 naming the field, the API key guards them, and a tokenizer killed (or stopped) while it
holds calls costs the client nothing: the frontend asks another one, or answers 503 when none
is left."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from protocol import EMBEDDED_MODEL_NAME
from tests.conftest import start_server
from tests.e2e.streams import member_pid

TEXTS = [
    "Hello world",
    "The capital of France is Paris.\nAnd of Italy, Rome.",
    "  leading spaces, tabs\tand unicode: héllo wörld, 東京, emoji 🐉🏯",
    "<|im_start|>user\nspecial tokens written as text<|im_end|>",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is a pagoda?"},
]
KEY = "tokenize-test-key"


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_gguf_tokenizer):
    """transformers' tokenizer read straight from the embedded GGUF file (not Pagoda's cached copy)."""
    return smollm2_gguf_tokenizer


def tokenize(base_url: str, **body) -> dict:
    r = httpx.post(base_url + "/tokenize", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def detokenize(base_url: str, tokens: list[int]) -> str:
    r = httpx.post(base_url + "/detokenize", json={"tokens": tokens}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["prompt"]


def error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# ---- the session server (2 tokenizers, max_model_len 1024) -------------------------------


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_prompt_ids_are_transformers_ids(server, hf_tokenizer, add_special_tokens):
    for text in TEXTS:
        got = tokenize(server.base_url, model=EMBEDDED_MODEL_NAME, prompt=text, add_special_tokens=add_special_tokens)
        expected = hf_tokenizer.encode(text, add_special_tokens=add_special_tokens)
        assert got == {"count": len(expected), "max_model_len": 1024, "tokens": expected, "token_strs": None}


def test_token_strs_are_the_vocabulary_spellings(server, hf_tokenizer):
    got = tokenize(server.base_url, prompt=TEXTS[2], return_token_strs=True)
    assert got["token_strs"] == hf_tokenizer.convert_ids_to_tokens(got["tokens"])
    assert len(got["token_strs"]) == got["count"] > 10


def test_chat_ids_are_the_templates_and_what_a_chat_request_counts(server, client, hf_tokenizer):
    got = tokenize(server.base_url, messages=CHAT)
    text = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert got["tokens"] == hf_tokenizer.encode(text, add_special_tokens=False)
    assert got["count"] == len(got["tokens"]) and got["max_model_len"] == 1024
    chat = client.chat.completions.create(model=EMBEDDED_MODEL_NAME, messages=CHAT, max_tokens=1, temperature=0)
    assert chat.usage.prompt_tokens == got["count"]
    # Without the generation prompt the template's assistant header is left out.
    bare = tokenize(server.base_url, messages=CHAT, add_generation_prompt=False)["tokens"]
    assert bare == hf_tokenizer.encode(
        hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=False), add_special_tokens=False
    )
    assert got["tokens"][: len(bare)] == bare and len(got["tokens"]) > len(bare)
    # continue_final_message: the assistant's last message stays open (no end-of-turn token after it).
    prefill = [*CHAT, {"role": "assistant", "content": "A pagoda is"}]
    cont = tokenize(server.base_url, messages=prefill, add_generation_prompt=False, continue_final_message=True)
    assert detokenize(server.base_url, cont["tokens"]).endswith("A pagoda is")


def test_completion_usage_counts_the_tokenized_prompt(server, client):
    for text in TEXTS[:3]:
        usage = client.completions.create(model=EMBEDDED_MODEL_NAME, prompt=text, max_tokens=1, temperature=0).usage
        assert usage.prompt_tokens == tokenize(server.base_url, prompt=text)["count"]


def test_detokenize_undoes_tokenize(server, hf_tokenizer):
    for text in TEXTS:
        assert detokenize(server.base_url, tokenize(server.base_url, prompt=text)["tokens"]) == text
    # Special tokens are kept in the text (vLLM's): a chat's ids give back the template's text.
    chat_ids = tokenize(server.base_url, messages=CHAT)["tokens"]
    assert detokenize(server.base_url, chat_ids) == hf_tokenizer.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True
    )
    assert detokenize(server.base_url, []) == ""


def test_a_prompt_longer_than_the_context_is_still_tokenized(server, client):
    text = "pagoda " * 1500
    got = tokenize(server.base_url, prompt=text)
    assert got["count"] > got["max_model_len"] == 1024
    with pytest.raises(openai.BadRequestError):  # while a completion of it is refused
        client.completions.create(model=EMBEDDED_MODEL_NAME, prompt=text, max_tokens=1)
    assert tokenize(server.base_url, prompt="")["count"] == 0


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/detokenize", {"tokens": [1, 2, 49152]}, "tokens"),  # one past the vocabulary
        ("/detokenize", {"tokens": [10**12]}, "tokens"),
        ("/detokenize", {"tokens": [5, -1]}, "tokens"),
        ("/detokenize", {}, "tokens"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": CHAT}, "messages"),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ("/tokenize", {"messages": CHAT, "continue_final_message": True}, "continue_final_message"),
        ("/tokenize", {"messages": CHAT, "tools": [{"type": "function"}]}, "tools[0].function"),  # no function
        ("/tokenize", {"prompt": "a", "model": "gpt-4"}, "model"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(server, path, body, param):
    r = httpx.post(server.base_url + path, json=body, timeout=60)
    err = error(r, 404 if param == "model" else 400)
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error" and err["message"]


def test_out_of_vocabulary_message_names_the_range(server):
    err = error(httpx.post(server.base_url + "/detokenize", json={"tokens": [49152]}, timeout=60), 400)
    assert "49152" in err["message"] and err["param"] == "tokens"


# ---- a server of its own: API key, tokenizers killed and stopped --------------------------


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    srv = start_server(str(tmp_path_factory.mktemp("tokenize")), "--num-tokenizers", "2", "--api-key", KEY,
                       "--max-model-len", "512")
    yield srv
    srv.stop()


def authed(srv, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(srv.base_url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=timeout)


def test_the_api_key_guards_both_routes(keyed):
    for path, body in [("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})]:
        assert httpx.post(keyed.base_url + path, json=body, timeout=60).status_code == 401
        wrong = httpx.post(keyed.base_url + path, json=body, headers={"Authorization": "Bearer nope"}, timeout=60)
        assert error(wrong, 401)["code"] == "invalid_api_key"
        assert authed(keyed, path, body).status_code == 200


def test_calls_held_by_a_killed_tokenizer_are_answered_by_the_other(keyed, hf_tokenizer):
    """tokenizer-0 is stopped (SIGSTOP) so the calls sent to it wait, then SIGKILLed: each call goes
    again to tokenizer-1 and every client gets its right answer."""
    victim = member_pid(keyed, "tokenizer", "tokenizer-0")
    texts = [f"{i}: {TEXTS[i % len(TEXTS)]}" for i in range(8)]
    os.kill(victim, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(len(texts)) as pool:
            futures = [pool.submit(authed, keyed, "/tokenize", {"prompt": t}) for t in texts]
            time.sleep(1.5)  # the calls are spread over both tokenizers: tokenizer-0's wait
            assert sum(f.done() for f in futures) < len(texts)
            os.kill(victim, signal.SIGKILL)
            replies = [f.result() for f in futures]
    finally:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for text, r in zip(texts, replies):
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == hf_tokenizer.encode(text)
    # tokenizer-0 is restarted and the pool is whole again.
    deadline = time.monotonic() + 120
    while httpx.get(keyed.base_url + "/ready", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "tokenizer-0 did not come back"
        time.sleep(0.3)
    assert member_pid(keyed, "tokenizer", "tokenizer-0") != victim
    again = authed(keyed, "/detokenize", {"tokens": hf_tokenizer.encode("back again")})
    assert again.json() == {"prompt": "back again"}


def test_no_tokenizer_left_is_a_503_and_their_return_serves_again(keyed):
    """Both tokenizers stopped: once the frontend has declared them dead (5 heartbeats), a call is
    a 503 at once; continued, they heartbeat again and are known again without a hello."""
    pids = [member_pid(keyed, "tokenizer", f"tokenizer-{i}") for i in range(2)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 30
        while httpx.get(keyed.base_url + "/health", timeout=10).json()["tokenizers"]:
            assert time.monotonic() < deadline, "the stopped tokenizers were never declared dead"
            time.sleep(0.3)
        err = error(authed(keyed, "/tokenize", {"prompt": "anyone there?"}, timeout=60), 503)
        assert err["type"] == "server_error" and "tokenizer" in err["message"].lower()
        began = time.monotonic()
        assert authed(keyed, "/detokenize", {"tokens": [1]}).status_code == 503
        assert time.monotonic() - began < 5  # at once, not after a wait
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while (r := authed(keyed, "/tokenize", {"prompt": "back"})).status_code != 200:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.3)
    assert r.json()["count"] == len(r.json()["tokens"]) >= 1
