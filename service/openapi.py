"""The OpenAPI schema a client can be generated from, and the pages that show it offline.

FastAPI's generated schema is close; :func:`openapi_schema` finishes it in one place:

- one ``Problem`` component that every error response refers to (FastAPI inlined a copy in
  each), and no ``HTTPValidationError``: the API never sends FastAPI's 422 body. A 422 is
  declared where the API can send one (``POST /merges``, the query of ``GET /merges``) and
  nowhere else (reading or cancelling a job never answers 422: a malformed id is a 404);
- the shape of locations (``uri`` fields) and of job ids as patterns, so a client and a fuzzer
  know what the API would refuse anyway;
- in open mode (no tenants file) no operation requires ``Authorization``;
- ``params`` by method: one component per method (``TiesParams``, …) generated from the
  declaration that validates them (``jobs.spec.METHOD_PARAMS``), named per method by the
  ``x-schema-by-method`` extension of ``MergeSpec.params``. ``params`` itself stays an open
  map: tying it to ``method`` with ``if``/``then`` is exact JSON Schema, but schemathesis
  cannot generate from it, and a union of the components would let a generated client's
  model drop a key it matched to the wrong method.

``/docs`` (Swagger UI) and ``/redoc`` load their scripts and styles from this server
(:func:`install_docs`; the files ship in the ``fastapi-offline`` package), never from a CDN:
they work in an air-gapped cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from jobs.spec import params_json_schemas
from service.api.models import JOB_ID_PATTERN
from service.problems import PROBLEM_JSON, PROBLEM_SCHEMA_REF, ProblemDetails

__all__ = ["DOCS_ASSETS", "JOB_ID_PATTERN", "URI_PATTERN", "install_docs", "openapi_schema"]

#: Where /docs and /redoc find their scripts and styles (served by this app).
DOCS_ASSETS = "/docs-assets"
#: What ``jobs.uris.parse_uri`` can accept: ``s3://bucket[/prefix]`` or ``file:///abs/dir``
#: (scheme in any case), no whitespace, control characters, ``%``, ``\\``, ``?`` or ``#``. The
#: API refuses more (``..`` and empty segments, an IP address as a bucket): those are 422s.
URI_PATTERN = (
    r"^([sS]3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\x00-\x20\x7f%\\?#]*)?"
    r"|[fF][iI][lL][eE]://(localhost)?/[^\x00-\x20\x7f%\\?#/][^\x00-\x20\x7f%\\?#]*)$"
)
#: Operations that never answer 422 (FastAPI declares one for every operation with
#: parameters).
_NO_422 = {("/merges/{job_id}", "get"), ("/merges/{job_id}", "delete")}


def _static_dir() -> Path:
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def install_docs(app: FastAPI) -> None:
    """``/docs`` and ``/redoc`` with their assets served from the package (create the app
    with ``docs_url=None, redoc_url=None``)."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=_static_dir()), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title}: API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title}: API",
            redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )


def openapi_schema(app: FastAPI, *, open_mode: bool) -> dict[str, Any]:
    """The app's schema, finished as the module docstring says (built once, then cached)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, summary=app.summary,
        description=app.description, routes=app.routes,
    )  # fmt: skip
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    problem = ProblemDetails.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(problem.pop("$defs", {}))
    components["Problem"] = problem
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            _finish_operation(path, method, operation, open_mode=open_mode)
    for name in ("AdapterRef", "OutputSpec"):
        if name in components:
            components[name]["properties"]["uri"]["pattern"] = URI_PATTERN
    if "MergeSpec" in components:
        _params_by_method(components)
    app.openapi_schema = schema
    return schema


def _params_by_method(components: dict[str, Any]) -> None:
    """Each method's params component, named by ``x-schema-by-method`` on MergeSpec.params."""
    by_method = {}
    for method, params in params_json_schemas().items():
        components[params["title"]] = params
        by_method[method] = f"#/components/schemas/{params['title']}"
    components["MergeSpec"]["properties"]["params"]["x-schema-by-method"] = by_method


def _finish_operation(
    path: str, method: str, operation: dict[str, Any], *, open_mode: bool
) -> None:
    responses = operation.get("responses", {})
    validation = responses.get("422", {}).get("content", {}).get("application/json")
    if validation is not None:  # FastAPI's own 422: never sent as such
        if (path, method) in _NO_422:
            del responses["422"]
        else:
            responses["422"] = {
                "description": "Unprocessable Content",
                "content": {PROBLEM_JSON: {"schema": {"$ref": PROBLEM_SCHEMA_REF}}},
            }
    for parameter in operation.get("parameters", []):
        if parameter["in"] == "path" and parameter["name"] == "job_id":
            parameter["schema"]["pattern"] = JOB_ID_PATTERN
    if open_mode:
        operation.pop("security", None)
