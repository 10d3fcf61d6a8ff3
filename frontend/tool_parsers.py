"""Tool calls out of model text, in vLLM's formats, whole (`extract`) or while the text streams (`feed`/`finish`).

One parser object reads one output stream (one choice): `feed` each text delta as it comes, `finish` at the end,
and send what each returns. `extract` reads a whole text on a fresh copy, so it never disturbs a stream in progress.

Three rules shape every parser here:

- A call is sent whole, once it is known to be a well-formed call: its id, name and all its arguments in one
  `ToolCallDelta`. Sending arguments token by token would mean sending text that may turn out not to be a call
  (invalid JSON, a literal that is not one), and a sent delta cannot be taken back. The cost is latency of one call's
  arguments, never of the whole output: each call goes out as soon as it closes.
- A malformed call is content, verbatim (its marker included, when no call of its group came before it). Nothing
  raises on model output.
- Whitespace next to a tool call separates, it is not content (`"Sure.\\n<tool_call>..."` has content `"Sure."`); an
  output whose content is only whitespace has none (`extract` says None). Text that may still become a marker (a
  `<tool_c` at the end of a delta) is held back until it is known not to be one, as a stop string is.

`extract` runs the same state machine as streaming over the whole text, so the two cannot disagree: the content
streamed equals `extract`'s content, and the calls streamed are `extract`'s calls, for any split of the text
(tests/frontend/test_tool_parsers.py checks it over random splits). Each state of the machine is a method
`_mode(final) -> bool` that consumes what it can from the unread text and says whether it made progress.
"""

from __future__ import annotations

import ast
import json
import math
import re
import secrets
import string
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

__all__ = [
    "TOOL_PARSERS",
    "HermesToolParser",
    "Llama3JsonToolParser",
    "MistralToolParser",
    "NamedToolCallParser",
    "PythonicToolParser",
    "RequiredToolCallParser",
    "ToolCall",
    "ToolCallDelta",
    "ToolParser",
    "get_tool_parser",
    "named_tool_schema",
    "required_tools_schema",
]


@dataclass
class ToolCall:
    """One complete call; `arguments` is the JSON text of an object (it always parses)."""

    id: str
    name: str
    arguments: str


@dataclass
class ToolCallDelta:
    """A piece of call `index` for a stream: the first carries its id and name, later ones only argument text."""

    index: int
    id: str | None
    name: str | None
    arguments: str


def make_tool_call_id() -> str:
    """vLLM's id shape, `chatcmpl-tool-` and 32 hex digits."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


_ALPHANUMERIC = string.ascii_letters + string.digits


def make_mistral_tool_call_id() -> str:
    """9 alphanumeric characters: Mistral's chat templates reject any other id when the call is sent back."""
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))


class ToolParser(ABC):
    """What the chat API calls: one instance per output stream."""

    @abstractmethod
    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Read the next text delta; return the content to send now and the call deltas to send now."""

    @abstractmethod
    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """The stream ended: return what was held back, resolved (a partial marker is content then)."""

    @abstractmethod
    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """Read a whole output: its content (None when there is none) and its calls."""


# ---------------------------------------------------------------------------------------------------------------
# Pieces the parsers share: what is malformed, turning parsed values into arguments, scanning brackets, whitespace.


class _Malformed(Exception):
    """The text being read is not a well-formed call (caught inside the parser: it becomes content)."""


def _reject_constant(name: str) -> NoReturn:
    # json.loads reads NaN and Infinity, which json.dumps would write back as text no strict JSON parser reads.
    raise _Malformed(f"{name} is not JSON")


def _loads(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise _Malformed(str(e)) from None


def _arguments_text(value: Any) -> str:
    """The arguments of a call as JSON text. Some models write them as a string holding the object; accept that."""
    if isinstance(value, str):
        value = _loads(value)
    if not isinstance(value, dict):
        raise _Malformed("arguments are not an object")
    return json.dumps(value, ensure_ascii=False)


def _json_call(text: str, argument_keys: tuple[str, ...]) -> tuple[str, str]:
    """(name, arguments) of `{"name": ..., <argument key>: {...}}`; no argument key means no arguments."""
    obj = _loads(text)
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        raise _Malformed("not a call object")
    arguments = next((obj[key] for key in argument_keys if key in obj), {})
    return obj["name"], _arguments_text(arguments)


def _python_literal(node: ast.expr) -> Any:
    """The JSON value of a Python literal: str, finite number, bool, None, and lists and str-keyed dicts of those."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, str | bool | int | float)):
        value = node.value
    elif (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub | ast.UAdd)
        and isinstance(node.operand, ast.Constant)
        and type(node.operand.value) in (int, float)  # not bool: -True is no literal a model means
    ):
        value = -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    elif isinstance(node, ast.List):
        return [_python_literal(item) for item in node.elts]
    elif isinstance(node, ast.Dict):
        if not all(isinstance(key, ast.Constant) and isinstance(key.value, str) for key in node.keys):
            raise _Malformed("dict keys must be strings")  # a None key is a ** unpacking
        return {key.value: _python_literal(value) for key, value in zip(node.keys, node.values)}  # type: ignore[union-attr]
    else:
        raise _Malformed(f"not a literal: {ast.dump(node)[:80]}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Malformed("not a finite number")
    return value


def _python_call(text: str) -> tuple[str, str]:
    """(name, arguments) of `name(key=literal, ...)`: keyword arguments only, as in vLLM's pythonic format."""
    try:
        node = ast.parse(text, mode="eval").body
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            raise _Malformed("not a call of a name with keyword arguments")
        arguments: dict[str, Any] = {}
        for keyword in node.keywords:
            if keyword.arg is None or keyword.arg in arguments:
                raise _Malformed("**kwargs or a repeated keyword")
            arguments[keyword.arg] = _python_literal(keyword.value)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:  # ValueError: a NUL byte in the source
        raise _Malformed(str(e)) from None
    return node.func.id, json.dumps(arguments, ensure_ascii=False)


_CLOSERS = {"(": ")", "[": "]", "{": "}"}


class _BracketScanner:
    """Finds where a bracketed value ends in text that arrives in pieces, skipping brackets inside strings.

    The text is scanned once however it is split: the position and the open brackets and string persist between
    calls, and the caller keeps the text from the value's start until it closes. JSON strings are `"`-quoted; Python
    ones also `'`-quoted and triple-quoted. A backslash escapes the next character in both (also in Python's raw
    strings, which cannot end in an odd backslash either).
    """

    def __init__(self, start: int, python: bool) -> None:
        self._pos = start
        self._quotes = "'\"" if python else '"'
        self._python = python
        self._expected: list[str] = []  # the closers of the open brackets, innermost last
        self._string = ""  # the delimiter of the open string, "" outside strings

    def scan(self, text: str) -> int | None:
        """The index just past the value's closing bracket, or None while it is still open.

        Raises _Malformed on a closer that does not match its opener.
        """
        i, n = self._pos, len(text)
        while i < n:
            c = text[i]
            if self._string:
                if c == "\\":
                    if i + 1 == n:
                        break  # the escaped character is still to come
                    i += 2
                    continue
                if c == self._string[0]:
                    if text.startswith(self._string, i):
                        i += len(self._string)
                        self._string = ""
                        continue
                    if self._string.startswith(text[i:]):
                        break  # a closing triple quote may be arriving
                i += 1
                continue
            if c in self._quotes:
                if self._python and (c * 3).startswith(text[i : i + 3]) and i + 3 > n:
                    break  # '' or ''' : not known yet
                self._string = c * 3 if self._python and text.startswith(c * 3, i) else c
                i += len(self._string)
                continue
            if c in _CLOSERS:
                self._expected.append(_CLOSERS[c])
            elif c in ")]}":
                if not self._expected or self._expected.pop() != c:
                    raise _Malformed(f"unbalanced {c!r}")
                if not self._expected:
                    return i + 1
            i += 1
        self._pos = i
        return None


class _ContentSink:
    """Content on its way out, minus the whitespace that only separates tool calls from the text around them.

    A run of whitespace is held until what follows it is known: more content sends it (unless a call came just
    before it), a call drops it, and the end of the stream sends it only after content (so that an output of calls
    and whitespace has no content, and plain text keeps its trailing newline).
    """

    def __init__(self) -> None:
        self._pending = ""
        self._after_call = False
        self._sent_any = False

    def text(self, text: str) -> str:
        core = text.rstrip()
        if not core:
            self._pending += text
            return ""
        out = self._pending + core
        if self._after_call:
            out = out.lstrip()
        self._pending, self._after_call, self._sent_any = text[len(core) :], False, True
        return out

    def call(self) -> None:
        self._pending, self._after_call = "", True

    def finish(self) -> str:
        out = self._pending if self._sent_any and not self._after_call else ""
        self._pending = ""
        return out


def _partial_marker_length(text: str, markers: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that a marker starts with (held back: it may become the marker)."""
    longest = min(len(text), max(len(marker) for marker in markers) - 1)
    for k in range(longest, 0, -1):
        if any(marker.startswith(text[-k:]) for marker in markers):
            return k
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The state machine.

_Mode = Callable[[bool], bool]


class _StreamParser(ToolParser):
    """Content with marked tool calls, read by one state machine for streaming and `extract` alike.

    Subclasses give the markers that start a call in content (`_markers`, read by `_after_marker`), or override
    `_start` for formats where the whole output is either calls or content. Calls may come in a group (a JSON array,
    `;`-separated objects): `_expect_element`, `_in_element` and `_after_element` read one with `_separator`,
    `_closer` and `_read_element`.

    While a group has no call yet, what was read of it (marker, opening bracket, whitespace) is held in `_held`: a
    malformed first call turns all of that into content. Once a call of the group went out, its separators are
    structure and a later malformed element is content from its own start.
    """

    _markers: tuple[str, ...] = ()
    _separator = ","
    _closer: str | None = "]"
    _argument_keys: tuple[str, ...] = ("arguments", "parameters")

    def __init__(self) -> None:
        self._buf = ""  # text read but not consumed yet
        self._held = ""  # text consumed for a group that has no call yet
        self._group_calls = 0
        self._scanner: _BracketScanner | None = None
        self._sink = _ContentSink()
        self._content: list[str] = []
        self._deltas: list[ToolCallDelta] = []
        self._num_calls = 0
        self._finished = False
        self._mode: _Mode = self._start

    # The public API.

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += text
        self._run(final=False)
        return self._take()

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        if not self._finished:
            self._finished = True
            self._run(final=True)
            self._content.append(self._sink.finish())
        return self._take()

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        reader = type(self)()
        content, deltas = reader.feed(text)
        rest, more = reader.finish()
        return (content + rest) or None, _assemble(deltas + more)

    def _new_id(self) -> str:
        return make_tool_call_id()

    # The machine's plumbing.

    def _run(self, final: bool) -> None:
        while self._mode(final):
            pass

    def _take(self) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = "".join(self._content), self._deltas
        self._content, self._deltas = [], []
        return content, deltas

    def _emit_content(self, text: str) -> None:
        if text:
            self._content.append(self._sink.text(text))

    def _emit_call(self, name: str, arguments: str) -> None:
        self._sink.call()
        self._deltas.append(ToolCallDelta(self._num_calls, self._new_id(), name, arguments))
        self._num_calls += 1
        self._held, self._group_calls = "", self._group_calls + 1

    def _keep(self, text: str) -> None:
        """Consume structure of a group: held while the group has no call (it is content if the call is malformed)."""
        if not self._group_calls:
            self._held += text

    def _fail(self) -> bool:
        """The call being read is malformed: what was held for it is content, and so is the unread text after it."""
        held, self._held, self._group_calls, self._scanner = self._held, "", 0, None
        self._emit_content(held)
        self._mode = self._text
        return True

    def _scan(self, start: int, opener: str, python: bool = False) -> int | None:
        """Where the value opening with `opener` at `_buf[start]` ends (None: still open); scanned incrementally."""
        if self._scanner is None:
            if self._buf[start] != opener:
                raise _Malformed(f"expected {opener!r}")
            self._scanner = _BracketScanner(start, python)
        return self._scanner.scan(self._buf)

    # Modes.

    def _start(self, final: bool) -> bool:
        self._mode = self._text
        return True

    def _text(self, final: bool) -> bool:
        """Content, up to the next marker; an end of the text that may be the start of a marker is held back."""
        buf = self._buf
        if not buf:
            return False
        hits = [(i, marker) for marker in self._markers if (i := buf.find(marker)) >= 0]
        if hits:
            i, marker = min(hits)
            self._emit_content(buf[:i])
            self._buf, self._held, self._group_calls = buf[i + len(marker) :], marker, 0
            self._mode = self._after_marker
            return True
        keep = 0 if final or not self._markers else _partial_marker_length(buf, self._markers)
        self._emit_content(buf[: len(buf) - keep])
        self._buf = buf[len(buf) - keep :]
        return False

    def _after_marker(self, final: bool) -> bool:
        raise NotImplementedError

    def _read_element(self) -> tuple[int, str, str] | None:
        """Read the call at the start of `_buf`: (its length, name, arguments), or None while it is incomplete."""
        raise NotImplementedError

    def _expect_element(self, final: bool) -> bool:
        body = self._buf.lstrip()
        if not body:
            return self._fail() if final else False
        self._keep(self._buf[: len(self._buf) - len(body)])
        self._buf = body
        if self._closer is not None and body.startswith(self._closer):
            # `[]` calls nothing and is content; `[f(), ]` is a trailing separator.
            return self._close_group() if self._group_calls else self._fail()
        self._mode = self._in_element
        return True

    def _in_element(self, final: bool) -> bool:
        return self._take_call(self._read_element, self._after_element, final)

    def _take_call(self, read_call: Callable[[], tuple[int, str, str] | None], then: _Mode, final: bool) -> bool:
        """Read one call with `read_call` and send it, then go on in mode `then`; a malformed
        call (or one cut off at the end) is content."""
        try:
            read = read_call()
        except _Malformed:
            return self._fail()
        if read is None:
            return self._fail() if final else False
        end, name, arguments = read
        self._buf, self._scanner = self._buf[end:], None
        self._emit_call(name, arguments)
        self._mode = then
        return True

    def _after_element(self, final: bool) -> bool:
        body = self._buf.lstrip()
        if not body:
            if final:
                self._mode = self._text  # an unclosed group: its calls stand, the whitespace goes
                return True
            return False
        self._buf = body
        if body.startswith(self._separator):
            self._buf = body[len(self._separator) :]
            self._mode = self._expect_element
            return True
        if self._closer is not None and body.startswith(self._closer):
            return self._close_group()
        return self._fail()

    def _close_group(self) -> bool:
        self._buf = self._buf[len(self._closer or "") :]
        self._group_calls = 0
        self._mode = self._text
        return True

    def _read_json_element(self) -> tuple[int, str, str] | None:
        end = self._scan(0, "{")
        if end is None:
            return None
        return (end, *_json_call(self._buf[:end], self._argument_keys))


def _assemble(deltas: list[ToolCallDelta]) -> list[ToolCall]:
    """Complete calls from a stream's deltas: id and name from each call's first delta, the arguments joined."""
    calls: dict[int, ToolCall] = {}
    for delta in deltas:
        if delta.index not in calls:
            calls[delta.index] = ToolCall(delta.id or "", delta.name or "", "")
        calls[delta.index].arguments += delta.arguments
    return [calls[index] for index in sorted(calls)]


# ---------------------------------------------------------------------------------------------------------------
# The formats.


class HermesToolParser(_StreamParser):
    """`<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, any number of them, content around them.

    A block is read up to its `</tool_call>` (or the end of the output, which Qwen and Hermes models sometimes reach
    first, and vLLM accepts too); a block whose body is not a call is content, tags included.
    """

    _markers = ("<tool_call>",)
    _end = "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self._search_from = 0  # where `</tool_call>` may start in `_buf`: a long block is searched once

    def _after_marker(self, final: bool) -> bool:
        end = self._buf.find(self._end, self._search_from)
        if end < 0 and not final:
            self._search_from = max(0, len(self._buf) - len(self._end) + 1)
            return False
        self._search_from = 0
        body = self._buf if end < 0 else self._buf[:end]
        try:
            name, arguments = _json_call(body.strip(), self._argument_keys)
        except _Malformed:
            return self._fail()
        self._buf = "" if end < 0 else self._buf[end + len(self._end) :]
        self._emit_call(name, arguments)
        self._mode = self._text
        return True


class Llama3JsonToolParser(_StreamParser):
    """Llama 3.1+'s JSON calls: the whole output is `{"name": "f", "parameters": {...}}` (or `"arguments"`), or
    several such objects separated by `;`, optionally after `<|python_tag|>`.

    An output that does not start (after whitespace) with the tag or `{` is content; text after the last call is
    content too.
    """

    _tag = "<|python_tag|>"
    _separator = ";"
    _closer = None
    _argument_keys = ("parameters", "arguments")

    def _start(self, final: bool) -> bool:
        body = self._buf.lstrip()
        if body.startswith(self._tag):
            body = body[len(self._tag) :].lstrip()
        elif self._tag.startswith(body) and not final:
            return False  # only whitespace, or the tag may be arriving
        if not body and not final:
            return False
        if body.startswith("{"):
            self._held, self._buf = self._buf[: len(self._buf) - len(body)], body
            self._mode = self._in_element
        else:
            self._mode = self._text
        return True

    def _read_element(self) -> tuple[int, str, str] | None:
        return self._read_json_element()


class MistralToolParser(_StreamParser):
    """Mistral's calls after `[TOOL_CALLS]`: a JSON array `[{"name": "f", "arguments": {...}}, ...]` (tokenizers
    before v11), or `name[ARGS]{...}` / `name{...}` (v11 and later: one marker per call). Content may precede.

    Ids are 9 alphanumeric characters, the only shape Mistral's templates accept back.
    """

    _markers = ("[TOOL_CALLS]",)
    _args_marker = "[ARGS]"
    _name = re.compile(r"[A-Za-z0-9_.\-]+")

    def _new_id(self) -> str:
        return make_mistral_tool_call_id()

    def _after_marker(self, final: bool) -> bool:
        body = self._buf.lstrip()
        if not body:
            return self._fail() if final else False
        self._held += self._buf[: len(self._buf) - len(body)]
        if body.startswith("["):
            self._held, self._buf = self._held + "[", body[1:]
            self._mode = self._expect_element
        else:
            self._buf = body
            self._mode = self._named_call
        return True

    def _read_element(self) -> tuple[int, str, str] | None:
        return self._read_json_element()

    def _named_call(self, final: bool) -> bool:
        # The next call, if any, comes with its own marker.
        return self._take_call(self._read_named_call, self._text, final)

    def _read_named_call(self) -> tuple[int, str, str] | None:
        match = self._name.match(self._buf)
        if match is None:
            raise _Malformed("no function name after [TOOL_CALLS]")
        rest = self._buf[match.end() :]
        if rest.startswith(self._args_marker):
            start = match.end() + len(self._args_marker)
        elif rest.startswith("{"):
            start = match.end()
        elif self._args_marker.startswith(rest):
            return None  # the name or [ARGS] is still arriving
        else:
            raise _Malformed("no arguments after the function name")
        if start == len(self._buf):
            return None
        end = self._scan(start, "{")
        if end is None:
            return None
        return end, match.group(), _arguments_text(_loads(self._buf[start:end]))


class _ListOutputParser(_StreamParser):
    """Formats whose whole output is a list of calls: an output not starting (after whitespace) with `[` is content,
    and so is text after the list's `]`."""

    def _start(self, final: bool) -> bool:
        body = self._buf.lstrip()
        if not body:
            if not final:
                return False
            self._mode = self._text
        elif body.startswith("["):
            self._held, self._buf = self._buf[: len(self._buf) - len(body) + 1], body[1:]
            self._mode = self._expect_element
        else:
            self._mode = self._text
        return True


class PythonicToolParser(_ListOutputParser):
    """The whole output is a Python list of calls, `[get_weather(city='SF', days=3), f()]` (Llama 3.2, Llama 4,
    ToolACE), read with `ast`: keyword arguments whose values are literals (str, numbers, bool, None, lists, dicts).
    Anything else (a positional argument, a variable, an expression) makes that call content."""

    _identifier = re.compile(r"[^\W\d]\w*")

    def _read_element(self) -> tuple[int, str, str] | None:
        match = self._identifier.match(self._buf)
        if match is None:
            raise _Malformed("not a call")
        if match.end() == len(self._buf):
            return None  # the name is still arriving
        end = self._scan(match.end(), "(", python=True)
        if end is None:
            return None
        return (end, *_python_call(self._buf[:end]))


class RequiredToolCallParser(_ListOutputParser):
    """tool_choice="required": the output, constrained by `required_tools_schema`, is a JSON array of
    `{"name": ..., "parameters": {...}}`; each call goes out as soon as its object closes.

    An empty array is not a call: it comes back as content `[]`, so the API can tell that the model called nothing.
    """

    _argument_keys = ("parameters",)

    def _read_element(self) -> tuple[int, str, str] | None:
        return self._read_json_element()


class NamedToolCallParser(ToolParser):
    """A named tool_choice: the output, constrained by `named_tool_schema`, is the arguments of that one call.

    Streaming passes every delta straight through as arguments of call 0, without waiting for the object to close
    (the schema makes it one). So a stream cut short (max_tokens) has sent arguments that do not parse, where
    `extract` says content: the one case where the two differ.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._started = False

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        if not text:
            return "", []
        if self._started:
            return "", [ToolCallDelta(0, None, None, text)]
        self._started = True
        return "", [ToolCallDelta(0, make_tool_call_id(), self._name, text)]

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        return "", []

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        try:
            _arguments_text(_loads(text))
        except _Malformed:
            return (text if text.strip() else None), []
        return None, [ToolCall(make_tool_call_id(), self._name, text)]


# ---------------------------------------------------------------------------------------------------------------
# The registry and the schemas that constrain tool_choice="required" and a named tool_choice.

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
    "pythonic": PythonicToolParser,
}


def get_tool_parser(name: str) -> ToolParser:
    """A new parser for one output stream, by its vLLM name (`--tool-call-parser`)."""
    try:
        parser = TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; known: {', '.join(sorted(TOOL_PARSERS))}") from None
    return parser()


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object"}


def named_tool_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """The schema of the output for a named tool_choice: the function's parameters (any object when it has none)."""
    return _parameters(tool)


def required_tools_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The schema of the output for tool_choice="required": a non-empty array of calls of the given tools.

    Each tool's parameters schema moves under `items.anyOf[i].properties.parameters`, where its local references
    (`#/$defs/X`, `#/definitions/X`) would no longer resolve: its `$defs` and `definitions` are lifted to the
    root, as vLLM does; two tools defining one name differently cannot share the root and raise ValueError.
    """
    if not tools:
        raise ValueError('tool_choice="required" needs at least one tool')
    lifted: dict[str, dict[str, Any]] = {}
    any_of = []
    for tool in tools:
        parameters = dict(_parameters(tool))
        for key in ("$defs", "definitions"):
            for def_name, definition in (parameters.pop(key, None) or {}).items():
                defs = lifted.setdefault(key, {})
                if defs.get(def_name, definition) != definition:
                    raise ValueError(f"tools define {key}/{def_name} differently; rename one of them")
                defs[def_name] = definition
        any_of.append(
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [tool["function"]["name"]]},
                    "parameters": parameters,
                },
                "required": ["name", "parameters"],
                # Nothing but the call: a model cannot wander into other keys (and past max_tokens).
                "additionalProperties": False,
            }
        )
    return {"type": "array", "minItems": 1, "items": {"anyOf": any_of}, **lifted}
