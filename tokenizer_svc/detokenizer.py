"""Incremental detokenization that never emits half a character.

Decoding token by token breaks multi-byte characters (an emoji is often 2-4 byte tokens) and
loses the spacing some tokenizers infer from context. So each step decodes a short window
(`prefix_offset`..end) and emits only what it adds over the window's already-emitted part
(`prefix_offset`..`read_offset`), holding back while the text ends in U+FFFD, the mark of an
incomplete UTF-8 sequence.
"""

from __future__ import annotations

from typing import Any

# Prompt tokens kept as left context so the first output token decodes with its spacing.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.output_text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_token_ids: list[int], final: bool = False) -> str:
        """Append tokens; return the new text that is now complete (all of it when `final`)."""
        self.token_ids.extend(new_token_ids)
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        self.output_text += delta
        return delta
