"""`mpm serve --ui`: a small web page at /ui for chatting with images and painting from prompts.

The page is static (mpm/serve/static/: one HTML file, one script, one style sheet; no CDN, no build step) and calls
the same process's OpenAI endpoints with `fetch`: /v1/models for the model pickers, /health to tell the chat model
from the paint model, /v1/chat/completions with `stream: true` (the answer streamed into the page) and
/v1/images/generations. Everything it loads comes from this server, so it works with no network.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
UI_PATH = "/ui"


def mount_ui(app: FastAPI) -> None:
    """GET /ui: the page; GET /ui/static/*: its script and style sheet."""
    if not (STATIC / "index.html").is_file():
        raise FileNotFoundError(f"the web page's files are missing from {STATIC}")

    @app.get(UI_PATH, include_in_schema=False)
    async def ui_page():
        return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    @app.get(UI_PATH + "/", include_in_schema=False)
    async def ui_slash():
        return RedirectResponse(UI_PATH)

    app.mount(UI_PATH + "/static", StaticFiles(directory=STATIC), name="ui-static")
