"""The built-in chat page: `GET /` and its assets under `/static/` (the files of frontend/static/).

Plain HTML, CSS and ES modules, served as they are (no build step, nothing from a CDN). The
page holds no secret, so `/` and `/static/*` are open even with `--api-key` (frontend/auth.py);
the API calls it makes carry the key the user typed in, as `Authorization: Bearer`.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"

# Only this origin's own files run and are fetched: even a bug in the page's Markdown renderer
# could not run a script the model wrote, nor send anything elsewhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Revalidated on every load (a 304 when unchanged), so a server upgrade never leaves a browser
# with an old page.
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


class _StaticFiles(StaticFiles):
    def file_response(self, full_path: os.PathLike | str, stat_result: os.stat_result, scope, status_code: int = 200
                      ) -> Response:  # fmt: skip
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(HEADERS)
        return response


def add_chat_page(app: FastAPI) -> None:
    """`GET /` (the page) and `/static/...` (its assets) on `app`."""

    @app.get("/", include_in_schema=False)
    async def chat_page() -> Response:
        headers = {**HEADERS, "Content-Security-Policy": CONTENT_SECURITY_POLICY}
        return FileResponse(STATIC_DIR / "index.html", headers=headers)

    app.mount("/static", _StaticFiles(directory=STATIC_DIR), name="static")
