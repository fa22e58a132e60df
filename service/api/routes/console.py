"""The web console: ``GET /`` is its page, ``GET /console/{file}`` its script and style sheet
(:mod:`service.console`). Not in the schema. The files hold no data, so they are served without a key even when
reads need one; the page asks for the key and sends it with every API call."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from service.console import STATIC_DIR

router = APIRouter(include_in_schema=False)
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
)
"""Everything from this origin only: the browser itself refuses any CDN or other host."""
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "Content-Security-Policy": CSP}


def _file(name: str) -> FileResponse:
    media_type = FILES.get(name)
    if media_type is None:
        raise HTTPException(404, f"no console file {name!r}")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=HEADERS)


@router.get("/")
async def console_page() -> FileResponse:
    return _file("index.html")


@router.get("/console/{name}")
async def console_file(name: str) -> FileResponse:
    return _file(name)
