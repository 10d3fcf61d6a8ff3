"""`POST /v1/responses` through the official SDK against the real processes: the text is the chat
route's for the same messages, the object and the stream events parse as the SDK's own types
(`client.responses.create`, `stream=True`, `client.responses.stream`), and what it cannot do is
a 400 naming the field."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai.types.responses import Response

from protocol import EMBEDDED_MODEL_NAME

MODEL = EMBEDDED_MODEL_NAME
QUESTION = "What is the capital of France?"
QUICK_EOS = "Reply with one word: yes or no?"  # the model answers in a few tokens, then EOS
INSTRUCTIONS = "You are a helpful geography teacher."


def chat_text(client: openai.OpenAI, messages: list[dict], max_tokens: int) -> tuple[str, openai.types.CompletionUsage]:
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)
    return out.choices[0].message.content, out.usage


def test_a_response_is_the_chats_answer_with_instructions_as_system(client):
    resp = client.responses.create(model=MODEL, input=QUESTION, instructions=INSTRUCTIONS, max_output_tokens=24,
                                   temperature=0)
    text, usage = chat_text(client, [{"role": "system", "content": INSTRUCTIONS},
                                     {"role": "user", "content": QUESTION}], 24)
    assert isinstance(resp, Response) and resp.object == "response" and resp.id.startswith("resp_")
    assert resp.output_text == text and len(text) > 10
    [message] = resp.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert [c.type for c in message.content] == ["output_text"] and message.content[0].annotations == []
    assert resp.usage.input_tokens == usage.prompt_tokens
    assert resp.usage.output_tokens == usage.completion_tokens
    assert resp.usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert resp.instructions == INSTRUCTIONS and resp.temperature == 0 and resp.max_output_tokens == 24


def test_status_completed_at_eos_and_incomplete_at_max_output_tokens(client):
    done = client.responses.create(model=MODEL, input=QUICK_EOS, max_output_tokens=64, temperature=0)
    assert done.status == "completed" and done.incomplete_details is None
    assert done.output[0].status == "completed" and done.usage.output_tokens < 64
    cut = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=3, temperature=0)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.output[0].status == "incomplete" and cut.usage.output_tokens == 3


def test_message_items_with_text_parts_are_the_same_chat(client):
    items = [
        {"type": "message", "role": "developer", "content": INSTRUCTIONS},
        {"role": "user", "content": [{"type": "input_text", "text": "Name a country."}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "France."}]},
        {"role": "user", "content": [{"type": "input_text", "text": "Its capital?"},
                                     {"type": "input_text", "text": "One word."}]},
    ]
    resp = client.responses.create(model=MODEL, input=items, max_output_tokens=16, temperature=0)
    text, usage = chat_text(client, [
        {"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": "Name a country."},
        {"role": "assistant", "content": "France."}, {"role": "user", "content": "Its capital?\nOne word."},
    ], 16)
    assert resp.output_text == text and resp.usage.input_tokens == usage.prompt_tokens


EVENTS_IN_ORDER = [
    "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
]
CLOSING = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


def test_stream_true_gives_the_sdks_events_in_order(client):
    whole = client.responses.create(model=MODEL, input=QUICK_EOS, max_output_tokens=64, temperature=0)
    events = list(client.responses.create(model=MODEL, input=QUICK_EOS, max_output_tokens=64, temperature=0,
                                          stream=True))
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds == EVENTS_IN_ORDER + ["response.output_text.delta"] * len(deltas) + CLOSING + ["response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    text = "".join(d.delta for d in deltas)
    assert text == whole.output_text and len(deltas) >= 2
    item_id = events[2].item.id
    assert all(e.item_id == item_id for e in deltas)
    assert events[-4].text == text and events[-3].part.text == text
    assert events[-2].item.content[0].text == text and events[-2].item.status == "completed"
    final = events[-1].response
    assert final.id == events[0].response.id and final.status == "completed" and final.output_text == text
    assert final.output[0].id == item_id and final.usage.output_tokens == whole.usage.output_tokens


def test_a_stream_cut_by_max_output_tokens_ends_incomplete(client):
    events = list(client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=5, temperature=0,
                                          stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.status == "incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-2].item.status == "incomplete"


def test_the_sdks_stream_helper_accumulates_the_answer(client):
    whole = client.responses.create(model=MODEL, input=QUICK_EOS, max_output_tokens=64, temperature=0)
    with client.responses.stream(model=MODEL, input=QUICK_EOS, max_output_tokens=64, temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == whole.output_text


def test_each_event_has_an_event_line_naming_its_type(server):
    body = {"model": MODEL, "input": QUICK_EOS, "max_output_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/responses", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    blocks = [b for b in raw.split("\n\n") if b.strip()]
    assert blocks and "[DONE]" not in raw
    for block in blocks:
        event_line, data_line = block.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        assert f'"type":"{event_line.removeprefix("event: ")}"' in data_line


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"text": {"format": {"type": "json_object"}}}, "text"),
        ({"input": []}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input[0].type"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"temperature": 3}, "temperature"),
    ],
)
def test_what_it_cannot_do_is_a_400_naming_the_field(client, extra, param):
    kw = {"model": MODEL, "input": QUESTION, "max_output_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(**kw)
    assert info.value.body["param"] == param, info.value.body


def test_their_harmless_values_are_taken_and_an_unknown_model_is_a_404(client):
    resp = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=2, store=False, tools=[],
                                   background=False, text={"format": {"type": "text"}}, metadata={"k": "v"})
    assert resp.status == "incomplete" and resp.usage.output_tokens == 2
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-5", input=QUESTION, max_output_tokens=2)
