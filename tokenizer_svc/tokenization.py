"""Tokenization: a request's prompt as token ids, checked before it goes to the scheduler.

A completion's prompt is text, encoded with the tokenizer's special tokens, or token ids; a
chat's messages are rendered by the chat template first. The checks answer as OpenAI does,
naming the parameter to fix: token ids outside the vocabulary, a prompt plus `max_tokens`
longer than the model's context.
"""

from __future__ import annotations

from typing import Any

from protocol import SamplingParams, TokenizeRequest
from protocol.messages import ChatMessage, TokenizeOnlyRequest
from tokenizer_svc.chat_template import ChatTemplateError, render_chat


class RequestRejected(Exception):
    """A request that cannot be served as sent, answered to the frontend as an `ErrorReply`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def tokenize_request(tokenizer: Any, req: TokenizeRequest, max_model_len: int) -> tuple[list[int], int]:
    """The prompt's token ids and the request's max_tokens, once every check has passed."""
    ids = tokenize(tokenizer, req)
    _check_token_ids(tokenizer, req.sampling)
    return ids, _check_length(req, ids, max_model_len)


def tokenize(tokenizer: Any, req: TokenizeRequest) -> list[int]:
    """The prompt's token ids: given, encoded from text, or from the chat template's text."""
    if req.prompt_token_ids is not None:
        ids = list(req.prompt_token_ids)
        vocab = len(tokenizer)
        if any(not 0 <= t < vocab for t in ids):
            raise RequestRejected(f"prompt token ids must be in [0, {vocab})", "prompt")
    elif req.messages is not None:
        ids = encode_chat(
            tokenizer, req.messages, req.add_generation_prompt, req.continue_final_message, tools=req.tools
        )
    elif req.prompt is not None:
        ids = tokenizer.encode(req.prompt)
    else:
        raise RequestRejected("either a prompt or messages is required", "prompt")
    if not ids:
        raise RequestRejected("the prompt is empty", "messages" if req.messages is not None else "prompt")
    return ids


def encode_chat(
    tokenizer: Any,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    continue_final_message: bool,
    add_special_tokens: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """A chat's token ids: the template's text, encoded without special tokens by default (the
    template already wrote the ones it wants)."""
    try:
        text = render_chat(tokenizer, messages, add_generation_prompt, continue_final_message, tools)
    except ChatTemplateError as e:
        raise RequestRejected(str(e), "messages") from None
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def tokenize_only(tokenizer: Any, req: TokenizeOnlyRequest) -> list[int]:
    """/tokenize: the ids a generation request with this prompt or chat would get (the same
    template and encoding). Nothing is checked against the context: like vLLM, a prompt longer
    than the model's context is tokenized too, and an empty one gives no tokens."""
    if req.messages is not None:
        return encode_chat(
            tokenizer, req.messages, req.add_generation_prompt, req.continue_final_message, req.add_special_tokens,
            req.tools,
        )
    return tokenizer.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)


def detokenize(tokenizer: Any, ids: list[int]) -> str:
    """/detokenize: the text of `ids`, special tokens included (vLLM's); ids outside the
    vocabulary are refused, naming `tokens`."""
    vocab = len(tokenizer)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise RequestRejected(f"token ids must be in [0, {vocab}), got {bad}", "tokens")
    return tokenizer.decode(ids)


def _check_token_ids(tokenizer: Any, sampling: SamplingParams) -> None:
    vocab = len(tokenizer)
    if any(t >= vocab for t in sampling.logit_bias):
        raise RequestRejected(f"logit_bias keys must be token ids in [0, {vocab})", "logit_bias")
    if any(t >= vocab for t in sampling.stop_token_ids):
        raise RequestRejected(f"stop_token_ids must be in [0, {vocab})", "stop_token_ids")


def _check_length(req: TokenizeRequest, ids: list[int], limit: int) -> int:
    """The request's max_tokens, after checking prompt + max_tokens against the context length."""
    param = "messages" if req.messages is not None else "prompt"
    max_tokens = req.sampling.max_tokens
    if len(ids) >= limit:
        raise RequestRejected(
            f"This model's maximum context length is {limit} tokens. However, your prompt has "
            f"{len(ids)} tokens. Please reduce the length of the {param}.",
            param,
        )
    if max_tokens is None:
        return limit - len(ids)
    if len(ids) + max_tokens > limit:
        raise RequestRejected(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{len(ids) + max_tokens} tokens ({len(ids)} in the {param}, {max_tokens} in the "
            f"completion). Please reduce the length of the {param} or of max_tokens.",
            "max_tokens",
        )
    return max_tokens
