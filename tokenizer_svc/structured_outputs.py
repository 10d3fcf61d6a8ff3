"""Structured outputs compiled in the tokenizer pool, off the scheduler's and the worker's paths.

A request's constraint (`response_format`, vLLM's `structured_outputs` and `guided_*` fields,
a tool choice) arrives as a `StructuredOutputs`. Here it becomes an llguidance grammar, checked
against this model's vocabulary: a bad schema, regex or grammar is a 400 naming the field,
before the request reaches the scheduler. The grammar text travels in `SamplingParams.grammar`;
the worker builds a matcher from it and masks the logits of that request's rows each step
(gpu_worker/structured_outputs.py).

Why llguidance (not xgrammar): it computes each token mask on demand from the grammar and the
tokenizer's trie (tens of microseconds a mask, measured here on the embedded model's 49k
vocabulary), with no per-grammar precomputation over the vocabulary to make or to ship between
processes: the only thing that crosses a process boundary is the grammar's text. It has no
dependency of its own (one Rust wheel), takes JSON schemas, regular expressions and Lark
grammars (GBNF converted), and is a backend of both vLLM and SGLang.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from typing import Any

import msgspec

from protocol import SamplingParams
from protocol.messages import StructuredOutputs
from tokenizer_svc.tokenization import RequestRejected

logger = logging.getLogger("pagoda.tokenizer")

# Compiled grammars kept per tokenizer process (the key is the whole constraint).
CACHE_SIZE = 512


class UnusableTokenizer:
    """A tokenizer llguidance refused, remembered so each request is refused at once."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class GrammarCompiler:
    """`compile(sampling)`: the sampling parameters with their grammar set, or `RequestRejected`."""

    def __init__(self, tokenizer: Any, cache_size: int = CACHE_SIZE) -> None:
        self._tokenizer = tokenizer
        self._lltokenizer: Any = None
        self._cache: OrderedDict[bytes, str] = OrderedDict()
        self._cache_size = cache_size
        self.hits = self.misses = 0

    @property
    def lltokenizer(self) -> Any:
        """llguidance's view of the vocabulary (about 0.4 s for 49k tokens: built on first use)."""
        if self._lltokenizer is None:
            import llguidance.hf

            began = time.perf_counter()
            try:
                self._lltokenizer = llguidance.hf.from_tokenizer(self._tokenizer)
            except Exception as e:  # a tokenizer kind llguidance cannot read (e.g. WordPiece)
                self._lltokenizer = UnusableTokenizer(str(e))
            logger.info("structured outputs: llguidance read the vocabulary in %.2f s", time.perf_counter() - began)
        if isinstance(self._lltokenizer, UnusableTokenizer):
            raise RequestRejected(
                f"Structured outputs are not available for this model: its tokenizer cannot be read by "
                f"llguidance ({self._lltokenizer.reason}).",
                "structured_outputs",
            )
        return self._lltokenizer

    def compile(self, sampling: SamplingParams) -> SamplingParams:
        spec = sampling.structured_outputs
        if spec is None:
            return sampling if sampling.grammar is None else msgspec.structs.replace(sampling, grammar=None)
        key = msgspec.msgpack.encode(spec)
        grammar = self._cache.get(key)
        if grammar is not None:
            self.hits += 1
            self._cache.move_to_end(key)
        else:
            self.misses += 1
            grammar = self._compile(spec)
            self._cache[key] = grammar
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return msgspec.structs.replace(sampling, grammar=grammar)

    def _compile(self, spec: StructuredOutputs) -> str:
        from llguidance import LLMatcher

        kinds = spec.constraints()
        if len(kinds) != 1:
            raise RequestRejected(
                "structured outputs take exactly one of json, regex, choice, grammar and json_object; "
                f"got {', '.join(kinds) or 'none'}",
                "structured_outputs",
            )
        kind = kinds[0]
        param = "response_format" if kind in ("json", "json_object") else "structured_outputs"
        try:
            grammar = to_grammar(spec)
        except ValueError as e:  # llguidance reading the constraint, e.g. a schema nested past its limit
            raise RequestRejected(f"Invalid structured output ({kind}): {_one_line(str(e))}", param) from None
        error = LLMatcher.validate_grammar(grammar, self.lltokenizer)
        if error:
            raise RequestRejected(f"Invalid structured output ({kind}): {_one_line(error)}", param)
        return grammar


def to_grammar(spec: StructuredOutputs) -> str:
    """The llguidance grammar (its JSON text) of one constraint; not yet checked."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

    # Without free whitespace: the separators json.dumps writes (and models saw most in training).
    defaults: dict[str, Any] = {"whitespace_flexible": True}
    if spec.disable_any_whitespace:
        defaults = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    if spec.json is not None:
        try:
            json.loads(spec.json)
        except (ValueError, RecursionError) as e:  # RecursionError: nested past Python's limit
            message = f"Invalid structured output (json): the schema is not JSON: {e}"
            raise RequestRejected(message, "response_format") from None
        return LLMatcher.grammar_from_json_schema(spec.json, defaults=defaults)
    if spec.json_object:
        return LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=defaults)
    if spec.regex is not None:
        return LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        if not spec.choice:
            message = "Invalid structured output (choice): it needs at least one string"
            raise RequestRejected(message, "structured_outputs")
        # Lark string literals take JSON's escapes: any choice text is matched literally.
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
        return LLMatcher.grammar_from_lark(f"start: {alternatives}")
    assert spec.grammar is not None
    try:
        return LLMatcher.grammar_from_lark(any_to_lark(spec.grammar))
    except GbnfToLarkError as e:
        raise RequestRejected(f"Invalid structured output (grammar): {e}", "structured_outputs") from None


def _one_line(error: str, limit: int = 400) -> str:
    """llguidance's multi-line error (with a caret under the spot) as one line for the JSON reply."""
    parts = [line.strip() for line in error.splitlines() if line.strip().strip("^")]
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 3] + "..."
