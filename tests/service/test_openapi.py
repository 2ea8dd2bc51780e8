"""An API a client can be generated from (issue 25 §3): the OpenAPI schema names its
operations, shares one problem schema, declares what the server really sends (and nothing it
never sends), and the pages that show it work offline. The generated client's end-to-end run
is ``tests/integration/test_generated_client.py``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from jobs.spec import METHOD_PARAMS
from jobs.uris import InvalidUri, parse_uri
from service.app import create_app
from service.openapi import URI_PATTERN
from service.problems import PROBLEM_SCHEMA_REF, PROBLEM_TYPES, problem_types_markdown
from tests.service.conftest import AUTH_A, spec

ROOT = Path(__file__).resolve().parents[2]
PROBLEM = "application/problem+json"


@pytest.fixture
def schema(client) -> dict:
    return client.get("/openapi.json").json()


def _operations(schema: dict):
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            yield path, method, operation


def test_operations_have_names_a_generator_can_use(schema) -> None:
    ids = {(path, method): op["operationId"] for path, method, op in _operations(schema)}
    assert ids == {
        ("/merges", "post"): "submitMerge",
        ("/merges", "get"): "listMerges",
        ("/merges/{job_id}", "get"): "getMerge",
        ("/merges/{job_id}", "delete"): "cancelMerge",
        ("/healthz", "get"): "healthz",
        ("/readyz", "get"): "readyz",
        ("/metrics", "get"): "metrics",
    }


def test_every_error_refers_to_the_one_problem_schema(schema) -> None:
    text = str(schema)
    assert "HTTPValidationError" not in text and "ValidationError'" not in text
    for _, _, operation in _operations(schema):
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                assert response["content"] == {PROBLEM: {"schema": {"$ref": PROBLEM_SCHEMA_REF}}}
    problem = schema["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"title", "status", "detail"}
    assert problem["properties"]["errors"]["anyOf"][0]["items"] == {
        "$ref": "#/components/schemas/FieldError"
    }


def test_only_what_the_server_sends_is_declared(schema) -> None:
    paths = schema["paths"]
    for method in ("get", "delete"):  # a malformed id is a 404, never a 422
        operation = paths["/merges/{job_id}"][method]
        assert "422" not in operation["responses"]
        (param,) = operation["parameters"]
        assert param["schema"]["pattern"] == "^[0-9a-f]{32}$"
    assert set(paths["/merges"]["get"]["responses"]) >= {"200", "401", "422", "503"}
    post = paths["/merges"]["post"]["responses"]
    assert set(post) == {"200", "202", "401", "403", "409", "413", "415", "422", "429", "503"}
    for status in ("429", "503"):
        assert post[status]["headers"]["Retry-After"]["schema"]["type"] == "integer"
    assert post["401"]["headers"]["WWW-Authenticate"]
    assert post["202"]["links"]["GetMerge"] == {
        "operationId": "getMerge", "parameters": {"job_id": "$response.body#/id"},
        "description": "read the job",
    }  # fmt: skip
    assert post["202"]["links"]["CancelMerge"]["operationId"] == "cancelMerge"


def test_models_carry_their_types(schema) -> None:
    models = schema["components"]["schemas"]
    jobs = models["JobList"]["properties"]["jobs"]
    assert jobs["items"] == {"$ref": "#/components/schemas/JobSummary"}
    for name in ("Job", "JobSummary"):
        created = models[name]["properties"]["created_at"]
        assert created["format"] == "date-time"
        assert models[name]["properties"]["id"]["pattern"] == "^[0-9a-f]{32}$"
    for name in ("AdapterRef", "OutputSpec"):
        assert models[name]["properties"]["uri"]["pattern"] == URI_PATTERN


@pytest.mark.parametrize(
    "uri",
    ["s3://adapters-a/x/", "S3://merged/team-a/run", "s3://bucket", "file:///srv/a/",
     "FILE:///a", "file://localhost/d/a/", "s3://b.c-d/a/b/c.d/"],
)  # fmt: skip
def test_the_uri_pattern_admits_every_location_the_api_accepts(uri: str) -> None:
    parse_uri(uri)
    assert re.search(URI_PATTERN, uri)


@pytest.mark.parametrize(
    "uri",
    ["http://a/b/", "s3://a/b c/", "s3://a/%2e%2e/", "/local/path", "s3://b/x?y", "ftp://x/y/",
     "s3://Bucket/x/", "s3:///x/", "file://localhost/", "file:///"],
)  # fmt: skip
def test_the_uri_pattern_refuses_what_the_api_refuses(uri: str) -> None:
    with pytest.raises(InvalidUri):
        parse_uri(uri)
    assert not re.search(URI_PATTERN, uri)


def test_open_mode_requires_no_authorization(make_settings) -> None:
    with TestClient(create_app(make_settings(tenants_file=None))) as client:
        open_schema = client.get("/openapi.json").json()
    assert all("security" not in op for _, _, op in _operations(open_schema))
    with TestClient(create_app(make_settings())) as client:
        keyed = client.get("/openapi.json").json()
    assert keyed["paths"]["/merges"]["post"]["security"] == [{"HTTPBearer": []}]


def test_every_problem_type_is_documented() -> None:
    """Every slug a Problem is raised with is in PROBLEM_TYPES, whose table docs/service.md
    shows."""
    used = set()
    for path in (ROOT / "service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.keyword)
                and node.arg == "slug"
                and isinstance(node.value, ast.Constant)
                and node.value.value is not None
            ):
                used.add(node.value.value)
    assert used and used <= set(PROBLEM_TYPES), used - set(PROBLEM_TYPES)
    docs = (ROOT / "docs" / "service.md").read_text()
    table = re.search(
        r"<!-- problem-types:start -->\n(.*?)\n<!-- problem-types:end -->", docs, re.S
    )
    assert table is not None and table.group(1) == problem_types_markdown()


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_not_sent_as_json_is_415(client, content_type) -> None:
    headers = {**AUTH_A, **({"Content-Type": content_type} if content_type else {})}
    r = client.post("/merges", content=b'{"adapters": []}', headers=headers)
    assert r.status_code == 415 and r.headers["content-type"] == PROBLEM
    assert r.json()["type"] == "urn:coremerge:problem:unsupported-media-type"
    assert "Content-Type" in r.json()["detail"]
    ok = client.post(
        "/merges",
        json=spec(),
        headers={**AUTH_A, "Content-Type": "application/json; charset=utf-8"},
    )
    assert ok.status_code == 202


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"adapters": [{"uri": "s3://adapters-a/t/", "weight": "0.5"}]}, "adapters.0.weight"),
        ({"adapters": [{"uri": "s3://adapters-a/t/", "weight": True}]}, "adapters.0.weight"),
        ({"params": {"density": 0.2, "isotropize": "yes"}}, "params"),
        ({"params": {"density": "0.2"}}, "params"),
        ({"seed": "3"}, "seed"),
        ({"output": {"uri": "s3://merged/team-a/x/", "rank": "8"}}, "output.rank"),
    ],
)
def test_numbers_and_booleans_are_not_coerced(client, changes, field) -> None:
    r = client.post("/merges", json=spec(**changes), headers=AUTH_A)
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == field


def test_a_malformed_job_id_is_404_not_422(client) -> None:
    for method in ("GET", "DELETE"):
        r = client.request(method, "/merges/not-an-id", headers=AUTH_A)
        assert r.status_code == 404 and r.headers["content-type"] == PROBLEM


def test_the_docs_pages_load_nothing_from_elsewhere(client) -> None:
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        sources = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert sources and all(s.startswith("/") for s in sources), sources
        assert "cdn" not in html.lower() and "fonts.googleapis" not in html
        for source in sources:
            r = client.get(source)
            assert r.status_code == 200 and len(r.content) > 100, source


@pytest.mark.parametrize(
    ("method", "params", "valid"),
    [
        ("ties", {"density": 0.2, "axes": "aligned"}, True),
        ("ties", {"rank_fraction": 0.1}, False),  # CART's, not TIES's
        ("ties", {"density": 0}, False),  # out of its range
        ("cart", {"rank_fraction": 0.1, "lam": 0.5}, True),
        ("ta", {"alpha": "auto"}, True),
        ("ta", {"alpha": "big"}, False),
        (None, {"rank_of": "layer"}, True),  # no method: the default, tsv
        (None, {"density": 0.2}, False),
    ],
)
def test_params_follow_the_method_in_the_schema(client, schema, method, params, valid) -> None:
    """The schema of ``params`` is the method's own, generated from the declaration that
    validates it, so the schema and the API agree on every case (issue 21 §1)."""
    import jsonschema

    body = spec(params=params)
    if method is None:
        body.pop("method", None)
    else:
        body["method"] = method
    merge_spec = schema["components"]["schemas"]["MergeSpec"]
    by_method = merge_spec["properties"]["params"]["x-schema-by-method"]
    assert set(by_method) == set(METHOD_PARAMS)
    name = by_method[method or merge_spec["properties"]["method"]["default"]].split("/")[-1]
    method_schema = schema["components"]["schemas"][name]
    assert list(method_schema["properties"]) == [p.name for p in METHOD_PARAMS[method or "tsv"]]
    errors = list(jsonschema.Draft202012Validator(method_schema).iter_errors(params))
    assert (not errors) == valid, [e.message for e in errors]
    assert client.post("/merges", json=body, headers=AUTH_A).status_code == (202 if valid else 422)
