"""vLLM's `/tokenize` and `/detokenize`: the requests, their answers, and the messages they become.

The frontend has no tokenizer: each call is one round trip to a ready tokenizer of the pool
(`EngineClient.call`), which tokenizes with the code generation requests use (the same chat
template and encoding), so `/tokenize` counts exactly what a completion or chat would send.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from pydantic import BaseModel, ConfigDict, field_validator
from pydantic_core import PydanticCustomError

from frontend.errors import APIError
from frontend.openai_protocol import MAX_TOOLS, TOKEN_ID_MAX, ChatMessageIn, ToolDefinition, at_most
from protocol.messages import DetokenizeRequest, TokenizeOnlyRequest


class TokenizeBody(BaseModel):
    """vLLM's TokenizeCompletionRequest (`prompt`) or TokenizeChatRequest (`messages`), in one model."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    # vLLM's defaults: true for a prompt, false for a chat (its template writes the special tokens).
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool | None = False
    tools: Annotated[list[ToolDefinition] | None, at_most(MAX_TOOLS, "tools")] = None  # for the template
    # vLLM's, which change the rendered text; refused rather than ignored, so no count is wrong.
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("chat_template", "chat_template_kwargs")
    @classmethod
    def _not_supported(cls, value: Any) -> Any:
        if value:
            raise PydanticCustomError("unsupported", "is not supported yet")
        return value

    def check(self) -> None:
        if self.prompt is None and self.messages is None:
            raise APIError(400, "Missing required parameter: 'prompt' (or 'messages' for a chat).", param="prompt")
        if self.prompt is not None and self.messages is not None:
            raise APIError(400, "Invalid 'messages': give either prompt or messages, not both.", param="messages")
        if self.messages is not None and self.continue_final_message and self.add_generation_prompt:
            raise APIError(
                400,
                "Invalid 'continue_final_message': it cannot be true together with add_generation_prompt; "
                "set add_generation_prompt to false.",
                param="continue_final_message",
            )

    def to_message(self, call_id: str) -> TokenizeOnlyRequest:
        chat = self.messages is not None
        add_special = (not chat) if self.add_special_tokens is None else self.add_special_tokens
        return TokenizeOnlyRequest(
            request_id=call_id,
            prompt=self.prompt,
            messages=[m.to_protocol() for m in self.messages] if self.messages is not None else None,
            add_generation_prompt=self.add_generation_prompt,
            continue_final_message=self.continue_final_message,
            add_special_tokens=add_special,
            return_token_strs=bool(self.return_token_strs),
            tools=[t.as_dict() for t in self.tools] if self.tools else None,
        )


def _token_ids(value: list[int]) -> list[int]:
    bad = next((t for t in value if not 0 <= t <= TOKEN_ID_MAX), None)
    if bad is not None:
        raise PydanticCustomError("out_of_range", f"token ids must be between 0 and {TOKEN_ID_MAX}, got {bad}")
    return value


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    # Checked against the vocabulary by the tokenizer (a 400 naming `tokens` too).
    tokens: list[int]

    @field_validator("tokens")
    @classmethod
    def _in_range(cls, value: list[int]) -> list[int]:
        return _token_ids(value)

    def to_message(self, call_id: str) -> DetokenizeRequest:
        return DetokenizeRequest(call_id, self.tokens)


class TokenizeResponse(msgspec.Struct, kw_only=True):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(msgspec.Struct, kw_only=True):
    prompt: str
