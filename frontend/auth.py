"""The API key: from `--api-key` or `--api-key-file`, required on every route but the probes.

Unlike vLLM, whose key guards only `/v1`, every path needs it when one is set: `/v1/*`,
`/metrics` (request and tokenizer figures), `/docs`, `/redoc` and `/openapi.json`, and paths
that do not exist (a 401 before a 404). Only the probes stay open, since a load balancer or
Kubernetes probe carries no secret: `/health` and `/ready`, which say whether the pool is up;
and the chat page, `/` and its files under `/static/` (frontend/chat_page.py), which hold no
secret and whose API calls carry the key the user gives the page.
"""

from __future__ import annotations

import hmac
from typing import Any

from frontend.errors import error_response
from protocol import EngineConfig

OPEN_PATHS = frozenset({"/health", "/ready", "/", "/engine"})  # /engine: a page; its stream needs the key
OPEN_PREFIX = "/static/"  # the chat page's files, served only from frontend/static/


class ApiKeyError(ValueError):
    """The key cannot be read as configured: one line saying why."""


def read_api_key(config: EngineConfig) -> str | None:
    """The key clients must send: `api_key`, or the content of `api_key_file` (surrounding
    whitespace, the trailing newline first, stripped); None when neither is set."""
    if config.api_key and config.api_key_file:
        raise ApiKeyError("give --api-key or --api-key-file, not both")
    if not config.api_key_file:
        return config.api_key or None
    try:
        with open(config.api_key_file, encoding="utf-8") as f:
            key = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ApiKeyError(f"cannot read --api-key-file {config.api_key_file}: {e}") from None
    if not key:
        raise ApiKeyError(f"--api-key-file {config.api_key_file} is empty")
    return key


class RequireApiKey:
    """ASGI middleware: a request to any path but `OPEN_PATHS` and those under `OPEN_PREFIX` without
    `Authorization: Bearer <key>` gets 401 in OpenAI's error shape (the SDK raises AuthenticationError)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIX):
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            message, code = (
                "You didn't provide an API key. Send it in an Authorization header: 'Authorization: Bearer YOUR_KEY'.",
                None,
            )
        elif not hmac.compare_digest(token.strip().encode("latin-1"), self.expected):
            message, code = "Incorrect API key provided.", "invalid_api_key"
        else:
            await self.app(scope, receive, send)
            return
        response = error_response(401, message, code=code, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
