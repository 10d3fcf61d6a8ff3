"""Tokenization and the chat template, without processes: what reaches the scheduler and what is rejected."""

from __future__ import annotations

import pytest

from protocol import EngineConfig, SamplingParams, TokenizeRequest
from protocol.messages import ChatMessage
from tokenizer_svc.chat_template import read_chat_template
from tokenizer_svc.tokenization import RequestRejected, tokenize_request
from tokenizer_svc.tokenizer_loader import load_tokenizer

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(EngineConfig())


def request(max_tokens: int | None = 16, **kw) -> TokenizeRequest:
    return TokenizeRequest("r", SamplingParams(max_tokens=max_tokens), **kw)


def rejected(tokenizer, req: TokenizeRequest, max_model_len: int = 512) -> RequestRejected:
    with pytest.raises(RequestRejected) as e:
        tokenize_request(tokenizer, req, max_model_len)
    return e.value


def test_a_chat_is_rendered_by_the_template_without_adding_special_tokens_twice(tokenizer) -> None:
    messages = [ChatMessage("user", "Hi")]
    ids, max_tokens = tokenize_request(tokenizer, request(messages=messages), 512)
    chat = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ids == tokenizer.encode(text, add_special_tokens=False) and max_tokens == 16


def test_chat_template_errors_name_the_messages(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizer, "chat_template", None)
    e = rejected(tokenizer, request(messages=[ChatMessage("user", "Hi")]))
    assert (e.status, e.param) == (400, "messages") and "--chat-template" in e.message
    monkeypatch.setattr(tokenizer, "chat_template", "{{ raise_exception('roles must alternate') }}")
    e = rejected(tokenizer, request(messages=[ChatMessage("user", "Hi")]))
    assert e.param == "messages" and e.message == "The chat template rejected the messages: roles must alternate"


def test_chat_template_flag_is_a_file_or_the_text(tmp_path) -> None:
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    assert read_chat_template(str(path)) == TEMPLATE == read_chat_template(TEMPLATE)


def test_token_ids_outside_the_vocabulary_are_rejected(tokenizer) -> None:
    vocab = len(tokenizer)
    assert rejected(tokenizer, request(prompt_token_ids=[1, vocab])).param == "prompt"
    req = TokenizeRequest("r", SamplingParams(logit_bias={vocab: 1.0}), prompt="Hi")
    assert rejected(tokenizer, req).param == "logit_bias"
    req = TokenizeRequest("r", SamplingParams(stop_token_ids=[vocab]), prompt="Hi")
    assert rejected(tokenizer, req).param == "stop_token_ids"


def test_prompt_and_max_tokens_must_fit_the_context(tokenizer) -> None:
    ids = list(range(1, 11))
    assert tokenize_request(tokenizer, request(None, prompt_token_ids=ids), 64) == (ids, 54)
    e = rejected(tokenizer, request(prompt_token_ids=ids), 10)
    assert e.param == "prompt" and "your prompt has 10 tokens" in e.message
    e = rejected(tokenizer, request(60, prompt_token_ids=ids), 64)
    assert e.param == "max_tokens" and "you requested 70 tokens" in e.message


def test_an_empty_or_missing_prompt_is_rejected(tokenizer) -> None:
    assert rejected(tokenizer, request()).message == "either a prompt or messages is required"
    assert rejected(tokenizer, request(prompt_token_ids=[])).message == "the prompt is empty"
