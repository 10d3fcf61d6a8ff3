"""Tool-call parsers (frontend/tool_parsers.py): each format read whole and streamed.

The central property: for any split of an output into deltas (1-character ones included), the content streamed
equals `extract`'s content and the calls streamed, reassembled, equal `extract`'s calls. Every case below is checked
against its expected result whole and then over many seeded random splits; a fuzz test checks the property on
random texts made of markers, brackets, quotes and call fragments.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator

import pytest

from frontend.tool_parsers import (
    TOOL_PARSERS,
    HermesToolParser,
    Llama3JsonToolParser,
    MistralToolParser,
    NamedToolCallParser,
    PythonicToolParser,
    RequiredToolCallParser,
    ToolCallDelta,
    ToolParser,
    get_tool_parser,
    named_tool_schema,
    required_tools_schema,
)

OPENAI_ID = re.compile(r"chatcmpl-tool-[0-9a-f]{32}")
MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")

Factory = Callable[[], ToolParser]


def id_pattern(parser: ToolParser) -> re.Pattern[str]:
    return MISTRAL_ID if isinstance(parser, MistralToolParser) else OPENAI_ID


def splits(text: str, rng: random.Random, rounds: int) -> Iterator[list[str]]:
    """The whole text, 1-character deltas, then `rounds` random splits (with some empty deltas)."""
    yield [text]
    yield list(text)
    for _ in range(rounds):
        pieces, i = [], 0
        while i < len(text):
            if rng.random() < 0.05:
                pieces.append("")
            step = rng.choice((1, 1, 2, 3, 4, 7, 12, 30))
            pieces.append(text[i : i + step])
            i += step
        yield pieces


def stream(parser: ToolParser, pieces: list[str]) -> tuple[str, list[ToolCallDelta]]:
    content, deltas = [], []
    for piece in pieces:
        text, new = parser.feed(piece)
        content.append(text)
        deltas += new
    text, new = parser.finish()
    return "".join(content) + text, deltas + new


def reassemble(deltas: list[ToolCallDelta], pattern: re.Pattern[str]) -> list[tuple[str, str, str]]:
    """(id, name, arguments) per call, checking the deltas' shape: a new call takes the next index and its first
    delta (only) carries a well-formed id and a name."""
    calls: list[list[str]] = []
    for delta in deltas:
        if delta.index == len(calls):
            assert delta.id is not None and pattern.fullmatch(delta.id), delta
            assert delta.name, delta
            calls.append([delta.id, delta.name, delta.arguments])
        else:
            assert delta.index < len(calls) and delta.id is None and delta.name is None, delta
            calls[delta.index][2] += delta.arguments
    return [(c[0], c[1], c[2]) for c in calls]


def check_streaming_matches_extract(make: Factory, text: str, rounds: int = 40) -> tuple[str | None, list]:
    """Assert the central property for `text` and return `extract`'s result."""
    content, calls = make().extract(text)
    assert content is None or content.strip(), "content is None when there is none"
    rng = random.Random(text)
    for pieces in splits(text, rng, rounds):
        parser = make()
        streamed, deltas = stream(parser, pieces)
        assert streamed == (content or ""), pieces
        got = reassemble(deltas, id_pattern(parser))
        assert [(name, arguments) for _, name, arguments in got] == [(c.name, c.arguments) for c in calls], pieces
        assert len({call_id for call_id, _, _ in got}) == len(got)
    for call in calls:
        assert isinstance(json.loads(call.arguments), dict)
        assert id_pattern(make()).fullmatch(call.id)
    assert len({call.id for call in calls}) == len(calls)
    return content, calls


def call(name: str, **arguments: object) -> tuple[str, str]:
    return name, json.dumps(arguments, ensure_ascii=False)


# (parser factory, model output, expected content, expected (name, arguments) per call)
CASES: list[tuple[str, Factory, str, str | None, list[tuple[str, str]]]] = [
    # hermes
    (
        "hermes-one",
        HermesToolParser,
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "SF", "days": 3}}\n</tool_call>',
        None,
        [call("get_weather", city="SF", days=3)],
    ),
    (
        "hermes-content-then-two",
        HermesToolParser,
        'Let me check both.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>\n',
        "Let me check both.",
        [call("f", a=1), call("g")],
    ),
    (
        "hermes-content-after",
        HermesToolParser,
        '<tool_call>{"name": "f", "arguments": {}}</tool_call>\n\nDone,  then more.\n',
        "Done,  then more.\n",
        [call("f")],
    ),
    (
        "hermes-unclosed-at-end",
        HermesToolParser,
        'Sure <tool_call>\n{"name": "f", "arguments": {"x": [1, 2]}}\n',
        "Sure",
        [call("f", x=[1, 2])],
    ),
    (
        "hermes-braces-and-escapes-in-strings",
        HermesToolParser,
        '<tool_call>{"name": "run", "arguments": {"code": "if (x) { return \\"}\\"; } // ]", '
        '"nested": {"l": [[1, {"k": "]}"}]]}}}</tool_call>',
        None,
        [call("run", code='if (x) { return "}"; } // ]', nested={"l": [[1, {"k": "]}"}]]})],
    ),
    (
        "hermes-unicode",
        HermesToolParser,
        '<tool_call>{"name": "find", "arguments": {"city": "Zürich", "note": "東京 🌸", "esc": "\\u00e9"}}</tool_call>',
        None,
        [call("find", city="Zürich", note="東京 🌸", esc="é")],
    ),
    (
        "hermes-arguments-as-json-string",
        HermesToolParser,
        '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
        None,
        [call("f", a=1)],
    ),
    (
        "hermes-malformed-json",
        HermesToolParser,
        'Hi <tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',
        'Hi <tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',
        [],
    ),
    (
        "hermes-malformed-then-good",
        HermesToolParser,
        '<tool_call>{"arguments": {}}</tool_call>\n<tool_call>{"name": "g", "arguments": {"b": null}}</tool_call>',
        '<tool_call>{"arguments": {}}</tool_call>',
        [call("g", b=None)],
    ),
    (
        "hermes-arguments-not-an-object",
        HermesToolParser,
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        [],
    ),
    (
        "hermes-plain-text",
        HermesToolParser,
        "Compare a < b and <tool> or <tool_cal. Done.",
        "Compare a < b and <tool> or <tool_cal. Done.",
        [],
    ),
    # llama3_json
    (
        "llama3-one",
        Llama3JsonToolParser,
        '{"name": "get_weather", "parameters": {"city": "SF"}}',
        None,
        [call("get_weather", city="SF")],
    ),
    (
        "llama3-tag-two-calls",
        Llama3JsonToolParser,
        '<|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "arguments": {"b": [1, 2]}}',
        None,
        [call("f", a=1), call("g", b=[1, 2])],
    ),
    (
        "llama3-leading-whitespace-and-strings",
        Llama3JsonToolParser,
        '\n {"name": "q", "parameters": {"s": "a \\"quoted\\" {brace} [bracket] ; {\\\\"}}\n',
        None,
        [call("q", s='a "quoted" {brace} [bracket] ; {\\')],
    ),
    (
        "llama3-json-not-at-start-is-content",
        Llama3JsonToolParser,
        'Here it is: {"name": "f", "parameters": {}}',
        'Here it is: {"name": "f", "parameters": {}}',
        [],
    ),
    (
        "llama3-malformed",
        Llama3JsonToolParser,
        '<|python_tag|>{"name": "f", "parameters": {"a": }}',
        '<|python_tag|>{"name": "f", "parameters": {"a": }}',
        [],
    ),
    (
        "llama3-nan-is-not-json",
        Llama3JsonToolParser,
        '{"name": "f", "parameters": {"x": NaN}}',
        '{"name": "f", "parameters": {"x": NaN}}',
        [],
    ),
    (
        "llama3-second-call-malformed",
        Llama3JsonToolParser,
        '{"name": "f", "parameters": {}}; {"name": 3}',
        '{"name": 3}',
        [call("f")],
    ),
    ("llama3-plain-text", Llama3JsonToolParser, "Paris is the capital.", "Paris is the capital.", []),
    ("llama3-partial-tag", Llama3JsonToolParser, "<|python", "<|python", []),
    # mistral
    (
        "mistral-array",
        MistralToolParser,
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "SF"}}]',
        None,
        [call("get_weather", city="SF")],
    ),
    (
        "mistral-content-then-array-of-two",
        MistralToolParser,
        'Checking. [TOOL_CALLS] [{"name": "f", "arguments": {"q": "é \\"]\\""}}, {"name": "g", "arguments": {}}]',
        "Checking.",
        [call("f", q='é "]"'), call("g")],
    ),
    (
        "mistral-v11-args-marker",
        MistralToolParser,
        '[TOOL_CALLS]get_weather[ARGS]{"city": "SF"}[TOOL_CALLS]f{"x": {"y": "}{"}}',
        None,
        [call("get_weather", city="SF"), call("f", x={"y": "}{"})],
    ),
    (
        "mistral-malformed-array",
        MistralToolParser,
        'Hm [TOOL_CALLS][{"name": "f", "arguments": {"a": 1]}]',
        'Hm [TOOL_CALLS][{"name": "f", "arguments": {"a": 1]}]',
        [],
    ),
    (
        "mistral-second-element-malformed",
        MistralToolParser,
        '[TOOL_CALLS][{"name": "f", "arguments": {}}, {"name": "g", "arguments": "x"}]',
        '{"name": "g", "arguments": "x"}]',
        [call("f")],
    ),
    (
        "mistral-malformed-name",
        MistralToolParser,
        "ok [TOOL_CALLS]get weather{}",
        "ok [TOOL_CALLS]get weather{}",
        [],
    ),
    ("mistral-empty-array", MistralToolParser, "[TOOL_CALLS][]", "[TOOL_CALLS][]", []),
    ("mistral-plain-text", MistralToolParser, "Use [TOOLS] and [TOOL_C wisely.", "Use [TOOLS] and [TOOL_C wisely.", []),
    # pythonic
    (
        "pythonic-one",
        PythonicToolParser,
        "[get_weather(city='SF', days=3)]",
        None,
        [call("get_weather", city="SF", days=3)],
    ),
    (
        "pythonic-two-with-literals",
        PythonicToolParser,
        "[get_weather(city='San Francisco', metric=True), "
        "get_time(tz=None, offsets=[-1, +2.5], opts={'a': \"b\", 'n': {'x': []}})]",
        None,
        [
            call("get_weather", city="San Francisco", metric=True),
            call("get_time", tz=None, offsets=[-1, 2.5], opts={"a": "b", "n": {"x": []}}),
        ],
    ),
    (
        "pythonic-brackets-and-quotes-in-strings",
        PythonicToolParser,
        "[f(a='x)]\\'', b=\"it's [ok]\", c='''tri'ple\"\"\"''', d=\"\")]",
        None,
        [call("f", a="x)]'", b="it's [ok]", c='tri\'ple"""', d="")],
    ),
    ("pythonic-unicode", PythonicToolParser, "[f(city='Zürich 東京')]", None, [call("f", city="Zürich 東京")]),
    ("pythonic-no-arguments-then-text", PythonicToolParser, "[f()]\nDone.", "Done.", [call("f")]),
    ("pythonic-variable", PythonicToolParser, "[f(x=y)]", "[f(x=y)]", []),
    ("pythonic-positional", PythonicToolParser, "[f(1)]", "[f(1)]", []),
    ("pythonic-expression", PythonicToolParser, "[f(x=1+2)]", "[f(x=1+2)]", []),
    ("pythonic-kwargs", PythonicToolParser, "[f(**k)]", "[f(**k)]", []),
    ("pythonic-attribute", PythonicToolParser, "[a.b(x=1)]", "[a.b(x=1)]", []),
    ("pythonic-repeated-keyword", PythonicToolParser, "[f(x=1, x=2)]", "[f(x=1, x=2)]", []),
    ("pythonic-tuple", PythonicToolParser, "[f(x=(1, 2))]", "[f(x=(1, 2))]", []),
    ("pythonic-second-call-malformed", PythonicToolParser, "[f(), g(x=y)]", "g(x=y)]", [call("f")]),
    ("pythonic-list-of-numbers", PythonicToolParser, "[1, 2, 3] are numbers", "[1, 2, 3] are numbers", []),
    ("pythonic-empty-list", PythonicToolParser, "[]", "[]", []),
    ("pythonic-plain-text", PythonicToolParser, "  Sure: no call here.", "  Sure: no call here.", []),
    # tool_choice="required"
    (
        "required-two",
        RequiredToolCallParser,
        '[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {"s": "}]\\"{[", "u": "ü"}}]',
        None,
        [call("f", a=1), call("g", s='}]"{[', u="ü")],
    ),
    (
        "required-pretty-printed",
        RequiredToolCallParser,
        ' [\n  {"name": "f", "parameters": {}}\n]\n',
        None,
        [call("f")],
    ),
    ("required-empty-array", RequiredToolCallParser, "[]", "[]", []),
    (
        "required-cut-short",
        RequiredToolCallParser,
        '[{"name": "f", "parameters": {}}, {"name": "g", "param',
        '{"name": "g", "param',
        [call("f")],
    ),
]


@pytest.mark.parametrize(("make", "text", "content", "calls"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_format_whole_and_streamed(make: Factory, text: str, content: str | None, calls: list) -> None:
    got_content, got_calls = check_streaming_matches_extract(make, text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls


FUZZ_PIECES = [
    "<tool_call>",
    "</tool_call>",
    "<tool_",
    "[TOOL_CALLS]",
    "[TOOL_",
    "[ARGS]",
    "<|python_tag|>",
    '{"name": "f", "arguments": {"a": "}"}}',
    '{"name": "g", "parameters": {"b": [1, {"c": null}]}}',
    "f(x='])')",
    "g()",
    "get",
    "{",
    "}",
    "[",
    "]",
    "(",
    ")",
    '"',
    "'",
    "\\",
    ",",
    ";",
    " ",
    "\n",
    "text",
    "é🌸",
]


@pytest.mark.parametrize("name", ["hermes", "llama3_json", "mistral", "pythonic", "required"])
def test_fuzzed_outputs_stream_as_extracted(name: str) -> None:
    """Any text at all, not only well-formed outputs, streams exactly as `extract` reads it."""
    make: Factory = RequiredToolCallParser if name == "required" else TOOL_PARSERS[name]
    rng = random.Random(name)
    found_calls = 0
    for _ in range(150):
        text = "".join(rng.choice(FUZZ_PIECES) for _ in range(rng.randint(1, 12)))
        if rng.random() < 0.5:
            text = rng.choice(["[", "", "<tool_call>", "[TOOL_CALLS]", "<|python_tag|>"]) + text
        _, calls = check_streaming_matches_extract(make, text, rounds=4)
        found_calls += len(calls)
    assert found_calls > 0  # the fuzz reaches the call paths, not only content


@pytest.mark.parametrize(
    ("make", "text"),
    [
        (HermesToolParser, "It is 3 < 4, and <tools> are fine. The end"),
        (Llama3JsonToolParser, "No tools needed: the answer is {42}."),
        (MistralToolParser, "Brackets [like this] and [TOOL] pass."),
        (PythonicToolParser, "Plain answer, with (parentheses) and [brackets]."),
        (RequiredToolCallParser, "not an array"),
    ],
)
def test_plain_text_streams_through(make: Factory, text: str) -> None:
    """Without a call, content goes out as it comes: after each delta, all of it but the trailing whitespace and a
    possible marker start; nothing is left for finish() when the text ends in neither."""
    parser, sent = make(), ""
    for i in range(len(text)):
        content, deltas = parser.feed(text[i])
        sent += content
        assert deltas == []
        assert text[: i + 1].startswith(sent)
        assert len(text[: i + 1]) - len(sent) <= len("<|python_tag|>")
    assert sent == text
    assert parser.finish() == ("", [])


def test_marker_start_is_held_back_until_it_is_not_one() -> None:
    parser = HermesToolParser()
    assert parser.feed("Hello <tool_") == ("Hello", [])
    assert parser.feed("box>") == (" <tool_box>", [])
    assert parser.feed("\n<tool_ca") == ("", [])
    assert parser.finish() == ("\n<tool_ca", [])


def test_trailing_whitespace_of_plain_text_is_content() -> None:
    parser = HermesToolParser()
    assert parser.feed("Line one\n") == ("Line one", [])
    assert parser.finish() == ("\n", [])
    assert HermesToolParser().extract("Line one\n") == ("Line one\n", [])
    assert HermesToolParser().extract(" \n\t") == (None, [])


def test_each_call_goes_out_as_soon_as_it_closes() -> None:
    first = '{"name": "f", "parameters": {"s": "}]"}}'
    parser = RequiredToolCallParser()
    assert parser.feed("[" + first[:-1]) == ("", [])
    content, deltas = parser.feed(first[-1])
    assert content == "" and [(d.index, d.name, d.arguments) for d in deltas] == [(0, "f", '{"s": "}]"}')]
    assert parser.feed(', {"name": "g", "parameters": {}') == ("", [])
    content, deltas = parser.feed("}")
    assert [(d.index, d.id is not None, d.name) for d in deltas] == [(1, True, "g")]
    assert parser.feed("]") == ("", [])
    assert parser.finish() == ("", [])

    pythonic = PythonicToolParser()
    assert pythonic.feed("[f(a='x)'") == ("", [])
    assert [d.name for d in pythonic.feed(")")[1]] == ["f"]

    mistral = MistralToolParser()
    assert mistral.feed('Ok[TOOL_CALLS]f{"a": "}"') == ("Ok", [])
    assert [d.name for d in mistral.feed("}")[1]] == ["f"]


def test_extract_does_not_disturb_a_stream_in_progress() -> None:
    parser = HermesToolParser()
    assert parser.feed('Hi <tool_call>{"name": "f", ') == ("Hi", [])
    assert parser.extract('<tool_call>{"name": "g", "arguments": {}}</tool_call>')[1][0].name == "g"
    content, deltas = parser.feed('"arguments": {}}</tool_call>')
    assert content == "" and [d.name for d in deltas] == ["f"]


def test_finish_is_final() -> None:
    parser = PythonicToolParser()
    parser.feed("[f()")
    assert [d.name for d in parser.finish()[1]] == []  # f() went out at its ")"
    assert parser.finish() == ("", [])
    with pytest.raises(RuntimeError):
        parser.feed("x")


def test_calls_are_numbered_across_groups_and_ids_are_unique() -> None:
    text = '[TOOL_CALLS][{"name": "a", "arguments": {}}] and [TOOL_CALLS]b{}[TOOL_CALLS]c[ARGS]{}'
    content, calls = check_streaming_matches_extract(MistralToolParser, text)
    assert content == "and"
    assert [c.name for c in calls] == ["a", "b", "c"]
    ids = [c.id for _ in range(20) for c in MistralToolParser().extract(text)[1]]
    assert len(set(ids)) == len(ids)


# ---------------------------------------------------------------------------------------------------------------
# A named tool_choice: the output is the arguments.


def test_named_tool_streams_every_delta_as_arguments() -> None:
    parser = NamedToolCallParser("get_weather")
    first = parser.feed('{"city": ')
    assert first[0] == "" and len(first[1]) == 1
    delta = first[1][0]
    assert (delta.index, delta.name, delta.arguments) == (0, "get_weather", '{"city": ')
    assert delta.id is not None and OPENAI_ID.fullmatch(delta.id)
    assert parser.feed("") == ("", [])
    assert parser.feed('"Zürich"}') == ("", [ToolCallDelta(0, None, None, '"Zürich"}')])
    assert parser.finish() == ("", [])


def test_named_tool_whole_output() -> None:
    text = '{"city": "Zürich", "q": "}{"}'
    content, calls = check_streaming_matches_extract(lambda: NamedToolCallParser("get_weather"), text)
    assert content is None
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", text)]
    assert NamedToolCallParser("f").extract('{"city": ') == ('{"city": ', [])
    assert NamedToolCallParser("f").extract("[1, 2]") == ("[1, 2]", [])
    assert NamedToolCallParser("f").extract("") == (None, [])


# ---------------------------------------------------------------------------------------------------------------
# Registry and schemas.


def test_registry() -> None:
    assert set(TOOL_PARSERS) == {"hermes", "llama3_json", "mistral", "pythonic"}
    for name, cls in TOOL_PARSERS.items():
        a, b = get_tool_parser(name), get_tool_parser(name)
        assert type(a) is cls and a is not b
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral, pythonic") as info:
        get_tool_parser("qwen3_xml")
    assert "qwen3_xml" in str(info.value)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
NOW = {"type": "function", "function": {"name": "now"}}


def test_required_schema_shape() -> None:
    assert required_tools_schema([WEATHER, NOW]) == {
        "type": "array",
        "minItems": 1,
        "items": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": ["get_weather"]},
                        "parameters": WEATHER["function"]["parameters"],
                    },
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {"name": {"type": "string", "enum": ["now"]}, "parameters": {"type": "object"}},
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                },
            ]
        },
    }
    with pytest.raises(ValueError):
        required_tools_schema([])


def test_named_schema() -> None:
    assert named_tool_schema(WEATHER) == WEATHER["function"]["parameters"]
    assert named_tool_schema(NOW) == {"type": "object"}


def test_required_schema_validates_outputs_the_parser_reads() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = required_tools_schema([WEATHER, NOW])
    jsonschema.Draft202012Validator.check_schema(schema)
    good = '[{"name": "get_weather", "parameters": {"city": "SF", "days": 2}}, {"name": "now", "parameters": {}}]'
    jsonschema.validate(json.loads(good), schema)
    content, calls = RequiredToolCallParser().extract(good)
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "SF", "days": 2}),
        ("now", {}),
    ]
    for bad in (
        [],  # what the parser answers with content "[]"
        [{"name": "get_time", "parameters": {}}],
        [{"name": "get_weather", "parameters": {"days": 2}}],
        [{"name": "get_weather"}],
        {"name": "now", "parameters": {}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_required_schema_lifts_definitions_so_references_resolve() -> None:
    jsonschema = pytest.importorskip("jsonschema")

    def tool(name: str, unit: dict) -> dict:
        parameters = {
            "type": "object",
            "properties": {"unit": {"$ref": "#/$defs/Unit"}},
            "required": ["unit"],
            "$defs": {"Unit": unit},
        }
        return {"type": "function", "function": {"name": name, "parameters": parameters}}

    celsius = {"type": "string", "enum": ["C", "F"]}
    schema = required_tools_schema([tool("a", celsius), tool("b", celsius)])
    assert schema["$defs"] == {"Unit": celsius}
    assert "$defs" not in schema["items"]["anyOf"][0]["properties"]["parameters"]
    jsonschema.validate([{"name": "b", "parameters": {"unit": "C"}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "b", "parameters": {"unit": "K"}}], schema)
    with pytest.raises(ValueError, match="Unit"):
        required_tools_schema([tool("a", celsius), tool("b", {"type": "integer"})])


@pytest.mark.parametrize(
    ("make", "text"),
    [
        (RequiredToolCallParser, "[]"),
        (RequiredToolCallParser, " [ ]\n"),
        (PythonicToolParser, "[]"),
        (MistralToolParser, "[TOOL_CALLS] []"),
    ],
)
def test_an_empty_array_is_content_not_calls(make: Factory, text: str) -> None:
    content, calls = check_streaming_matches_extract(make, text)
    assert calls == []
    assert content == text
