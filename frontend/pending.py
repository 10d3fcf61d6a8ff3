"""A request in flight in the frontend: where its outputs go, and how much of each sample its
client already has, so that after its tokenizer dies the stream goes on where it stopped.

A tokenizer that takes over a request rebuilds each sample's text from its first token;
`Pending.resumed` drops the characters, tokens and echo the client was already sent.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from protocol.messages import Logprobs, TextOutput, TokenizeRequest


@dataclass
class Sent:
    """How much of one sample its consumer has, and how much of that the owner has re-sent."""

    chars: int = 0
    tokens: int = 0
    echoed: bool = False
    finished: bool = False
    seen_chars: int = 0
    seen_tokens: int = 0


@dataclass
class Pending:
    owner: bytes | None  # None while it waits for a ready tokenizer (its own died)
    request: TokenizeRequest
    queue: asyncio.Queue[TextOutput | Exception] = field(default_factory=asyncio.Queue)
    sent: dict[int, Sent] = field(default_factory=dict)  # by sample index
    parked_at: float = 0.0  # when it started to wait for a tokenizer
    tokens: int = 0  # its prompt's length, estimated before tokenizing (admission)

    def resumed(self, out: TextOutput) -> TextOutput | None:
        """`out` less what the consumer already has: after a reroute the new tokenizer sends
        each sample's text and tokens again from the start. None if nothing is left."""
        sent = self.sent.setdefault(out.index, Sent())
        if sent.finished:
            return None
        skip_chars = max(0, sent.chars - sent.seen_chars)
        skip_tokens = max(0, sent.tokens - sent.seen_tokens)
        sent.seen_chars += len(out.text)
        sent.seen_tokens += len(out.token_ids)
        if skip_chars or skip_tokens:
            out.text = out.text[skip_chars:]
            out.token_ids = out.token_ids[skip_tokens:]
            if out.logprobs is not None:
                out.logprobs = _drop_logprobs(out.logprobs, skip_tokens)
        if sent.echoed:
            out.prompt_text = None
        sent.chars = max(sent.chars, sent.seen_chars)
        sent.tokens = max(sent.tokens, sent.seen_tokens)
        sent.echoed = sent.echoed or out.prompt_text is not None
        sent.finished = out.finish_reason is not None
        trimmed = skip_chars or skip_tokens
        if trimmed and not out.text and not out.token_ids and out.finish_reason is None and out.prompt_text is None:
            return None
        return out

    def rerouted(self) -> None:
        for sent in self.sent.values():
            sent.seen_chars = sent.seen_tokens = 0


def _drop_logprobs(logprobs: Logprobs, n: int) -> Logprobs:
    """`logprobs` without its first `n` tokens' entries."""
    return Logprobs(
        logprobs.token_logprobs[n:], logprobs.top_token_ids[n:], logprobs.top_logprobs[n:],
        logprobs.tokens[n:], logprobs.top_tokens[n:],
    )


def estimate_prompt_tokens(req: TokenizeRequest) -> int:
    """A prompt's length in tokens before tokenizing it: exact for token ids, a quarter of its
    UTF-8 bytes for text (about what BPE vocabularies give English; admission only)."""
    if req.prompt_token_ids is not None:
        return len(req.prompt_token_ids)
    text = req.prompt or "".join(m.content or "" for m in req.messages or [])
    return len(text.encode()) // 4 + 1
