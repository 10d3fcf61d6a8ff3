"""Tokenization: a request's prompt as token ids, checked before it goes to the scheduler.

A completion's prompt is text, encoded with the tokenizer's special tokens, or token ids; a
chat's messages are rendered by the chat template first. The checks answer as OpenAI does,
naming the parameter to fix: token ids outside the vocabulary, a prompt plus `max_tokens`
longer than the model's context.
"""

from __future__ import annotations

from typing import Any

from protocol import SamplingParams, TokenizeRequest
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
        try:
            text = render_chat(tokenizer, req.messages, req.add_generation_prompt, req.continue_final_message)
        except ChatTemplateError as e:
            raise RequestRejected(str(e), "messages") from None
        # The template already wrote the special tokens it wants.
        ids = tokenizer.encode(text, add_special_tokens=False)
    elif req.prompt is not None:
        ids = tokenizer.encode(req.prompt)
    else:
        raise RequestRejected("either a prompt or messages is required", "prompt")
    if not ids:
        raise RequestRejected("the prompt is empty", "messages" if req.messages is not None else "prompt")
    return ids


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
