"""Structured outputs through the real server and the official openai SDK, on the embedded model.

Every constrained output must parse and validate; unconstrained rows in the same batches must
not change; bad constraints get a 400 naming the field and hurt nobody; a worker killed under
constrained streams loses none of them (the restarted worker replays each request's outputs
into a fresh matcher).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal

import jsonschema
import openai
import pydantic
import pytest

from protocol import EMBEDDED_MODEL_NAME
from tests.e2e.streams import member_pid

pytestmark = pytest.mark.slow

MODEL = EMBEDDED_MODEL_NAME

# Nested objects, an enum, an array with bounds, a string pattern, integer bounds.
ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 30},
                "tier": {"type": "string", "enum": ["bronze", "silver", "gold"]},
            },
            "required": ["name", "tier"],
            "additionalProperties": False,
        },
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
    },
    "required": ["customer", "sku", "quantity", "tags"],
    "additionalProperties": False,
}

QUESTIONS = [
    "Describe a person.", "Who wrote Hamlet?", "Tell me about a city you like.", "Invent a character for a story.",
    "Describe your best friend.", "Who is a famous scientist?", "Make up a pen pal.", "Describe a teacher.",
    "Who lives next door?", "Describe an astronaut.", "Tell me about a chef.", "Describe a painter.",
    "Who is the main character of a novel?", "Describe a musician.", "Invent a detective.", "Describe a farmer.",
    "Tell me about a pilot.", "Describe a sailor.", "Who is your hero?", "Describe a doctor.",
]


class Address(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=30)
    country: str = pydantic.Field(max_length=30)


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    age: int
    address: Address


@pytest.fixture()
def aclient(server):
    """An async client for one `asyncio.run` (its connections belong to that loop)."""
    return openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_parse_returns_a_parsed_object_for_every_prompt(aclient):
    async def ask(question: str):
        return await aclient.chat.completions.parse(
            model=MODEL, messages=[{"role": "user", "content": question}], response_format=Person,
            temperature=0, max_tokens=200,
        )

    async def main():
        return await asyncio.gather(*(ask(q) for q in QUESTIONS))

    for completion in asyncio.run(main()):
        message = completion.choices[0].message
        assert isinstance(message.parsed, Person), message.content
        assert completion.choices[0].finish_reason == "stop"


def test_json_schema_outputs_validate_sampled_n_and_streamed(aclient):
    response_format = {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER_SCHEMA, "strict": True}}

    async def whole(question: str, seed: int):
        out = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], response_format=response_format,
            temperature=1.0, seed=seed, n=2, max_tokens=200,
        )
        return [c.message.content for c in out.choices]

    async def streamed(question: str, seed: int):
        chunks = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], response_format=response_format,
            temperature=0.8, seed=seed, max_tokens=200, stream=True,
        )
        return ["".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])]

    async def main():
        questions = [f"Write an order for {thing}." for thing in ("apples", "a bike", "paper", "tea", "shoes", "ink")]
        jobs = [whole(q, i) for i, q in enumerate(questions)] + [streamed(q, 100 + i) for i, q in enumerate(questions)]
        return [text for texts in await asyncio.gather(*jobs) for text in texts]

    texts = asyncio.run(main())
    assert len(texts) == 18
    for text in texts:
        jsonschema.validate(json.loads(text), ORDER_SCHEMA)
    assert len(set(texts)) > 1  # sampled: the constraint leaves room to differ


def test_unconstrained_rows_are_unchanged_beside_constrained_ones(server):
    """Half of a batch constrained: the other half's greedy tokens equal those of the same batch
    with nothing constrained (same batch sizes: only the masks differ)."""
    free = ["Tell me about the sea.", "What is a pagoda?", "Name three colors.", "Why is the sky blue?"]
    other = ["Describe a cat.", "What do bees do?", "Explain rain.", "Write about autumn."]

    async def ask(aclient: openai.AsyncOpenAI, question: str, constrained: bool):
        extra = {"guided_json": ORDER_SCHEMA} if constrained else {}
        out = await aclient.completions.create(
            model=MODEL, prompt=question, temperature=0, max_tokens=40, logprobs=0,
            extra_body={"ignore_eos": True, **extra},
        )
        return out.choices[0].text, out.choices[0].logprobs.tokens

    async def batch(constrained: bool):
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0) as aclient:
            return await asyncio.gather(
                *(ask(aclient, q, False) for q in free), *(ask(aclient, q, constrained) for q in other)
            )

    with_constraints = asyncio.run(batch(True))
    without = asyncio.run(batch(False))
    assert with_constraints[:4] == without[:4]
    assert with_constraints[4:] != without[4:]  # the constraint did act on its rows


def test_choice_regex_grammar_and_stop_strings(client):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Is the sky blue?"}], temperature=0,
        extra_body={"guided_choice": ["yes", "no", "it depends"]},
    )
    assert out.choices[0].message.content in ("yes", "no", "it depends")
    assert out.choices[0].finish_reason == "stop"

    out = client.completions.create(
        model=MODEL, prompt="My phone number is", temperature=0, max_tokens=20,
        extra_body={"structured_outputs": {"regex": r"\(\d{3}\) \d{3}-\d{4}"}},
    )
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", out.choices[0].text), out.choices[0].text

    # A stop string still ends a constrained output (and is not part of it).
    out = client.completions.create(
        model=MODEL, prompt="My phone number is", temperature=0, max_tokens=20, stop=["-"],
        extra_body={"guided_regex": r"\d{3}-\d{4}"},
    )
    assert re.fullmatch(r"\d{3}", out.choices[0].text) and out.choices[0].finish_reason == "stop"

    gbnf = 'root ::= "The answer is " digit digit "."\ndigit ::= [0-9]'
    lark = 'start: "The answer is " DIGIT DIGIT "."\nDIGIT: /[0-9]/'
    for grammar in (gbnf, lark):
        out = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What is 6 times 7?"}], temperature=0,
            extra_body={"guided_grammar": grammar},
        )
        assert re.fullmatch(r"The answer is \d\d\.", out.choices[0].message.content), out.choices[0].message.content

    for ask, extra in (
        ("Return a JSON object with your name.", {"response_format": {"type": "json_object"}}),
        ("Give me a JSON object.",  # free whitespace off: compact JSON, as json.dumps writes it
         {"extra_body": {"structured_outputs": {"json_object": True, "disable_any_whitespace": True}}}),
    ):
        out = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": ask}], temperature=0, max_tokens=300, **extra
        )
        text = out.choices[0].message.content
        assert isinstance(json.loads(text), dict) and out.choices[0].finish_reason == "stop", text
    assert "\n" not in text and ", " in text and '": ' in text


DEEP_SCHEMA = '{"type": "string"}'
for _ in range(95):
    DEEP_SCHEMA = '{"type": "object", "properties": {"a": ' + DEEP_SCHEMA + '}, "required": ["a"]}'


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"extra_body": {"guided_regex": "[a-"}}, "structured_outputs", "regex"),
        ({"extra_body": {"guided_grammar": "start: nowhere"}}, "structured_outputs", "grammar"),
        ({"extra_body": {"guided_json": "{not json"}}, "guided_json", "not valid JSON"),
        ({"extra_body": {"guided_json": {"type": "no-such-type"}}}, "response_format", "json"),
        ({"extra_body": {"guided_regex": "a", "guided_choice": ["a"]}}, "guided_regex", "one output constraint"),
        ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}}, "structured_outputs", "exactly one"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
        # Valid JSON, nested past llguidance's limit for a schema (128): was a 500.
        ({"extra_body": {"guided_json": DEEP_SCHEMA}}, "response_format", "recursion limit"),
    ],
)
def test_bad_constraints_are_400s_naming_the_field(client, body, param, words):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], **body)
    error = err.value.body
    assert error["param"] == param and words.lower() in error["message"].lower(), error
    # Nothing else broke: the next request is served.
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert out.choices[0].finish_reason in ("length", "stop")


def test_constrained_streams_survive_a_worker_kill(server):
    """On the session's server (its worker is back, the server whole, once the streams end)."""
    client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    response_format = {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER_SCHEMA}}
    started = [asyncio.Event() for _ in range(6)]
    killed: list[int] = []

    async def stream(i: int) -> str:
        chunks = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Order number {i}, please."}],
            response_format=response_format, temperature=0, max_tokens=200, stream=True,
        )
        text = []
        async for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
                if len(text) >= 3:
                    started[i].set()
        return "".join(text)

    async def main():
        tasks = [asyncio.create_task(stream(i)) for i in range(6)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
        killed.append(member_pid(server, "worker"))
        os.kill(killed[0], signal.SIGKILL)
        texts = await asyncio.gather(*tasks)
        await client.close()
        return texts

    undisturbed = asyncio.run(_undisturbed(server, response_format))
    log_before = len(server.log())
    texts = asyncio.run(main())
    for text in texts:
        jsonschema.validate(json.loads(text), ORDER_SCHEMA)
    assert texts == undisturbed  # greedy: the replayed matcher continued exactly where it was
    # This kill's own lines (the session's log may hold earlier restarts).
    log = server.log()[log_before:]
    assert f"worker-0 (pid {killed[0]}) was killed by SIGKILL" in log and "worker-0 restarted" in log


async def _undisturbed(server, response_format) -> list[str]:
    client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    outs = await asyncio.gather(*(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Order number {i}, please."}],
            response_format=response_format, temperature=0, max_tokens=200,
        )
        for i in range(6)
    ))
    await client.close()
    return [o.choices[0].message.content for o in outs]
