"""Tool calling through the real server and the official openai SDK, on the embedded model.

`required` and named choices are enforced by structured outputs, so their arguments always parse
and validate; "auto" reads the model's text with `--tool-call-parser` (here hermes, the model's
output forced into that format by a regex so the parser has calls to find); streamed deltas
reassemble into exactly the whole response's calls; a tool result round-trips through a chat
template that shows tools (a hermes-style one given with --chat-template).
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from protocol import EMBEDDED_MODEL_NAME
from tests.conftest import start_server

pytestmark = pytest.mark.slow

MODEL = EMBEDDED_MODEL_NAME

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PROMPTS = ["What is the weather in Paris?", "How warm is it in Tokyo today?", "What is 2 plus 3?",
           "Add 40 and 2.", "Is it raining in Oslo?", "Weather for Lima, please."]

# A Qwen2.5-style (hermes) template: tools in the system turn, calls in <tool_call>, results in
# <tool_response>.
HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
You may call these functions:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# What the model is made to write for "auto": two hermes calls.
HERMES_CALLS = (
    r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,8}", "unit": "celsius"\}\}\n'
    r'</tool_call>\n<tool_call>\n\{"name": "add", "arguments": \{"a": [1-9], "b": [1-9]\}\}\n</tool_call>'
)


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tools")
    template = folder / "hermes.jinja"
    template.write_text(HERMES_TEMPLATE)
    # The CPU's default 4-bit path (1.7x faster than fp32 here): each comparison below is of two
    # requests run alone, so bf16 rounding cannot tell them apart.
    server = start_server(str(folder), "--max-model-len", "1024", "--enable-auto-tool-choice",
                          "--tool-call-parser", "hermes", "--chat-template", str(template), "--quantization", "gguf")
    yield server
    server.stop()


@pytest.fixture()
def tclient(tool_server):
    return openai.OpenAI(base_url=tool_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _ask(client, prompt: str, stream: bool = False, **kw):
    kw.setdefault("max_tokens", 120)
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], tools=TOOLS, temperature=0, stream=stream, **kw
    )


def _reassemble(chunks) -> tuple[list[tuple[str, str, str]], str | None, str]:
    """Streamed tool-call deltas as whole calls (id, name, arguments), the finish reason, the content."""
    calls: dict[int, list[str]] = {}
    finish, content = None, []
    for chunk in chunks:
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            for delta in choice.delta.tool_calls or []:
                if delta.index not in calls:
                    assert delta.id and delta.type == "function" and delta.function.name, delta
                    calls[delta.index] = [delta.id, delta.function.name, ""]
                else:
                    assert delta.id is None and delta.function.name is None, delta  # only the first names it
                calls[delta.index][2] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert sorted(calls) == list(range(len(calls)))  # indexes 0, 1, ... in order
    return [tuple(calls[i]) for i in sorted(calls)], finish, "".join(content)


@pytest.mark.parametrize("choice", ["required", "get_weather", "add"])
def test_required_and_named_choices_give_arguments_that_validate(tclient, choice):
    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    finished = 0
    for prompt in PROMPTS:
        out = _ask(tclient, prompt, tool_choice=tool_choice)
        message = out.choices[0].message
        assert message.tool_calls, message
        # A small model may repeat calls in the array until max_tokens: the calls it closed still count.
        finished += out.choices[0].finish_reason == ("tool_calls" if choice == "required" else "stop")
        assert out.choices[0].finish_reason in ("tool_calls" if choice == "required" else "stop", "length")
        for call in message.tool_calls:
            assert call.type == "function" and re.fullmatch(r"chatcmpl-tool-[0-9a-f]{32}", call.id)
            if choice != "required":
                assert call.function.name == choice
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert finished >= len(PROMPTS) - 1


def test_parallel_tool_calls_false_gives_one_call(tclient):
    for prompt in PROMPTS[:3]:
        out = _ask(tclient, prompt, tool_choice="required", parallel_tool_calls=False)
        assert len(out.choices[0].message.tool_calls) == 1


@pytest.mark.parametrize("mode", ["required", "named", "auto"])
def test_streamed_deltas_reassemble_into_the_whole_responses_calls(tclient, mode):
    kw: dict = {"tool_choice": "required"} if mode == "required" else {}
    if mode == "named":
        kw = {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    if mode == "auto":
        kw = {"extra_body": {"guided_regex": HERMES_CALLS}}
    for prompt in PROMPTS[:3]:
        whole = _ask(tclient, prompt, **kw)
        streamed, finish, content = _reassemble(_ask(tclient, prompt, stream=True, **kw))
        calls = whole.choices[0].message.tool_calls
        assert calls, whole
        assert [(name, args) for _, name, args in streamed] == [(c.function.name, c.function.arguments) for c in calls]
        assert finish == whole.choices[0].finish_reason
        assert content == (whole.choices[0].message.content or "")
        if mode == "auto":
            assert [c.function.name for c in calls] == ["get_weather", "add"]
            assert finish == "tool_calls" and whole.choices[0].message.content is None
            jsonschema.validate(json.loads(calls[1].function.arguments), SCHEMAS["add"])


def test_auto_without_a_call_is_plain_content(tclient):
    out = _ask(tclient, "Say hello.", max_tokens=12)  # the model writes no <tool_call>
    assert out.choices[0].message.tool_calls is None
    assert out.choices[0].message.content and out.choices[0].finish_reason in ("stop", "length")


def test_a_tool_result_round_trips_through_the_chat_template(tool_server, tclient):
    history = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
        }]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    body = {"model": MODEL, "messages": history, "tools": TOOLS}
    ids = httpx.post(tool_server.base_url + "/tokenize", json=body, timeout=60).json()["tokens"]
    text = httpx.post(tool_server.base_url + "/detokenize", json={"tokens": ids}, timeout=60).json()["prompt"]
    assert json.dumps(WEATHER) in text  # the template showed the tools
    call = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
    assert f"<tool_call>\n{call}\n</tool_call>" in text
    assert "<tool_response>\n{\"temperature\": 21}\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
    # The same history as a chat: its prompt is exactly those tokens.
    out = tclient.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=8, temperature=0)
    assert out.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize(
    ("kw", "param", "words"),
    [
        ({"tools": TOOLS}, "tool_choice", "--enable-auto-tool-choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
         "cannot be combined"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}], "tool_choice": "none"},
         "tools[0].function.name", "letters"),
    ],
)
def test_bad_tool_requests_are_400s_naming_the_field(client, kw, param, words):
    """On the session server (started without --enable-auto-tool-choice)."""
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], **kw)
    assert err.value.body["param"] == param and words in err.value.body["message"], err.value.body


def test_bad_arguments_in_the_history_are_a_400(client):
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                               "function": {"name": "add", "arguments": "{not json"}}]},
    ]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none")
    assert err.value.body["param"] == "messages[1].tool_calls[0].function", err.value.body
    assert "arguments" in err.value.body["message"]
