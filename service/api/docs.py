"""``/openapi.json`` and the pages that render it.

:func:`install_schema` completes FastAPI's generated schema with the models that only the hand-written request
bodies and error answers reference (:data:`service.api.schemas.BODY_MODELS`). ``/docs`` (Swagger UI) and
``/redoc`` (ReDoc) render with no network: their scripts, style sheet and icon
are served from the ``fastapi-offline`` package's static folder (under :data:`ASSETS_URL`), never from a CDN.
Swagger UI's online validator badge (which would call validator.swagger.io) is switched off, and ReDoc is told
not to load web fonts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic.json_schema import models_json_schema

from service.api.schemas import BODY_MODELS
from service.api.v2_schemas import V2_BODY_MODELS

ASSETS_URL = "/docs/assets"
ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
"""``swagger-ui-bundle.js``, ``swagger-ui.css``, ``redoc.standalone.js``, ``favicon.png``."""


def _limit_images(schema: dict[str, Any], max_images: int, max_fit_images: int) -> None:
    """``maxItems`` of the image lists, from the settings (413 past them)."""
    for path, operations in schema["paths"].items():
        limit = max_fit_images if path.endswith("/fit") else max_images
        for operation in operations.values():
            form = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data", {})
            files = form.get("schema", {}).get("properties", {}).get("files")
            if files is not None:
                files["maxItems"] = limit
    components = schema["components"]["schemas"]
    components["InstancesBody"]["properties"]["instances"]["maxItems"] = max_images
    components["FitBody"]["properties"]["instances"]["maxItems"] = max_fit_images


def install_schema(app: FastAPI, max_images: int, max_fit_images: int) -> None:
    """Generate the schema once, on first request, with :data:`BODY_MODELS` in ``components.schemas`` and the
    image-count limits of the settings."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            _, extra = models_json_schema(
                [(model, "validation") for model in (*BODY_MODELS, *V2_BODY_MODELS)],
                ref_template="#/components/schemas/{model}",
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in extra.get("$defs", {}).items():
                components.setdefault(name, definition)
            _limit_images(schema, max_images, max_fit_images)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_docs(app: FastAPI, openapi_url: str) -> None:
    """Serve ``/docs``, ``/docs/oauth2-redirect``, ``/redoc`` and their assets (none of them in the schema)."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    title = app.title

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{title} - Swagger UI",
            oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )
