"""The chat template: the Jinja template that turns a chat's messages into the model's prompt text.

The model's tokenizer ships one (Hugging Face's `apply_chat_template` renders it); `--chat-template`
replaces it with a file or the template text. A chat sent to a model without one, or messages the
template refuses (its own checks: roles must alternate, ...), are the client's to fix.
"""

from __future__ import annotations

import os
from typing import Any

import jinja2

from protocol.messages import ChatMessage


class ChatTemplateError(Exception):
    """The messages cannot be rendered: no template, or the template rejected them."""


def read_chat_template(template: str) -> str:
    """`--chat-template`'s value as a template: the file it names, else the text itself."""
    if os.path.isfile(template):
        with open(template) as f:
            return f.read()
    return template


def render_chat(
    tokenizer: Any,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    continue_final_message: bool,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The prompt text of `messages` (and the `tools` the model may call, for templates that
    show them), with every special token the template wants written in."""
    if tokenizer.chat_template is None:
        raise ChatTemplateError("This model has no chat template; pass one with --chat-template.")
    try:
        return tokenizer.apply_chat_template(
            [m.for_template() for m in messages],
            tools=tools or None,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
    except (jinja2.TemplateError, ValueError) as e:
        # The template's own checks (roles must alternate, ...) are the client's to fix.
        raise ChatTemplateError(f"The chat template rejected the messages: {e}") from None
