"""Per-layer and per-module weights, per-adapter params and module filters over HTTP: a
well-formed job is accepted and echoed, a bad one is a 422 naming the exact field."""

from __future__ import annotations

import pytest

from tests.service.conftest import AUTH_A, spec

PROBLEM = "application/problem+json"


def _submit(client, body: dict):
    return client.post("/merges", json=body, headers=AUTH_A)


def test_schedules_are_accepted_and_echoed(client) -> None:
    body = spec(
        adapters=[
            {"uri": "s3://adapters-a/task-0/", "weight": [0, 0.5, 1], "density": 0.3},
            {"uri": "s3://adapters-a/task-1/",
             "weight": [{"modules": "mlp", "value": [1, 0]}, {"value": 0.5}]},
        ],
        normalize=True,
        modules={"exclude": ["k_proj"]},
        layers=32,
    )  # fmt: skip
    r = _submit(client, body)
    assert r.status_code == 202, r.json()
    request = r.json()["request"]
    assert request["adapters"][0]["weight"] == [0.0, 0.5, 1.0]
    assert request["adapters"][0]["density"] == 0.3
    assert request["adapters"][1]["weight"][0] == {"modules": "mlp", "value": [1.0, 0.0]}
    assert request["normalize"] is True and request["layers"] == 32
    assert request["modules"] == {"include": [], "exclude": ["k_proj"]}


@pytest.mark.parametrize(
    ("adapter", "extra", "field"),
    [
        ({"weight": [{"modules": "(mlp", "value": 1}]}, {}, "adapters.0.weight.rules.0.modules"),
        ({"weight": [1, "x"]}, {}, "adapters.0.weight.gradient.1"),
        ({"density": 2}, {}, "adapters.0.density"),
        ({"drop": 0.1}, {}, "adapters.0.drop"),  # ties has no drop
        ({}, {"modules": {"include": ["[x"]}}, "modules.include"),
        ({}, {"layers": 0}, "layers"),
        ({}, {"normalize": "sometimes"}, "normalize"),
    ],
)
def test_bad_values_are_422_naming_the_field(client, adapter, extra, field) -> None:
    body = spec(adapters=[{"uri": "s3://adapters-a/task-0/", **adapter}], **extra)
    r = _submit(client, body)
    assert r.status_code == 422, r.json()
    assert r.headers["content-type"] == PROBLEM
    assert field in [e["field"] for e in r.json()["errors"]], r.json()
