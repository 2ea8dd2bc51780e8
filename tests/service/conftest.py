"""The real app (``create_app``) on a real Redis, through FastAPI's TestClient."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from jobs.settings import Settings
from service.app import create_app
from tests.tenants import two_tenants

KEY_A, KEY_B = "key-team-a", "key-team-b"
TENANTS = two_tenants(KEY_A, KEY_B)
AUTH_A = {"Authorization": f"Bearer {KEY_A}"}
AUTH_B = {"Authorization": f"Bearer {KEY_B}"}


def spec(n: int = 2, **changes: object) -> dict:
    """A valid job spec for team-a."""
    body = {
        "adapters": [{"uri": f"s3://adapters-a/task-{i}/"} for i in range(n)],
        "method": "ties",
        "params": {"density": 0.2},
        "output": {"uri": "s3://merged/team-a/run-1/"},
    }
    body.update(changes)
    return body


@pytest.fixture(scope="session")
def tenants_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tenants") / "tenants.json"
    path.write_text(json.dumps(TENANTS))
    return path


@pytest.fixture
def make_settings(redis_url: str, tenants_file: Path) -> Callable[..., Settings]:
    """Settings of an isolated deployment: its own key prefix and queue in the session's
    Redis."""

    def make(**overrides: object) -> Settings:
        name = f"t{uuid.uuid4().hex[:10]}"
        values = {
            "redis_url": redis_url,
            "key_prefix": name,
            "queue": name,
            "tenants_file": tenants_file,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def redis(settings: Settings) -> Iterator[Redis]:
    client = Redis.from_url(settings.redis_url)
    yield client
    client.close()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client
