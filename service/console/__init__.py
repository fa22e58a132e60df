"""The web console served at ``/``: plain HTML, CSS and JavaScript in ``static/`` (no build step, no CDN), shipped
as package data. It only calls the public HTTP API (``/v1/models``, ``/score``, ``/segment``, ``/drift``) with
the API key the user typed (kept in the tab's ``sessionStorage``)."""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
"""``index.html``, ``app.js``, ``style.css``."""
