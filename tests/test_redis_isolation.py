"""The test suite never touches a Redis database that holds data it did not write.

A developer's (or a CI neighbour's) Redis on 127.0.0.1:6379 gets a sentinel key in each of its
16 databases; tests that use Redis (the job store's, and one that starts ``coremerge serve``)
then run in a pytest process of their own, with no ``COREMERGE_TEST_REDIS_URL`` (so they start
their own ``redis-server``, ``tests/redis_db.py``). Every sentinel must still be there, with
its value, afterwards. (The suite used to claim a database on 6379 and empty it.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
import redis

from tests.processes import ROOT, RedisServer
from tests.redis_db import TEST_REDIS_URL_ENV

#: Test files that create, list and delete keys in the session's Redis, in-process and through
#: a ``coremerge serve`` process.
REDIS_TESTS = ["tests/jobs/test_records.py", "tests/service/test_logging.py"]
DATABASES = range(16)


def _machine_redis(db: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=6379, db=db, socket_connect_timeout=2)


def test_a_test_run_leaves_every_database_of_the_machine_redis_alone(tmp_path) -> None:
    try:
        _machine_redis(0).ping()
    except redis.exceptions.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379 to hold the sentinels (.ci/run starts one)")
    sentinel = f"someone-elses-data:{uuid.uuid4().hex}"
    for db in DATABASES:  # expiring, in case this test is killed before it cleans up
        _machine_redis(db).set(sentinel, f"db {db}", ex=900)
    env = {k: v for k, v in os.environ.items() if k != TEST_REDIS_URL_ENV}
    try:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
             "--basetemp", str(tmp_path / "run"), *REDIS_TESTS],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        survived = {db: _machine_redis(db).get(sentinel) for db in DATABASES}
        assert survived == {db: f"db {db}".encode() for db in DATABASES}
    finally:
        for db in DATABASES:
            _machine_redis(db).delete(sentinel)


def _run_with_given_database(url: str, tmp_path) -> subprocess.CompletedProcess:
    tmp_path.mkdir()
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         "--basetemp", str(tmp_path / "run"), REDIS_TESTS[0]],
        cwd=ROOT, env={**os.environ, TEST_REDIS_URL_ENV: url}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def test_a_given_database_is_used_only_when_empty(tmp_path) -> None:
    """COREMERGE_TEST_REDIS_URL: an empty database is used and emptied again; one that holds
    keys is refused before any test runs, and its keys stay as they were."""
    server = RedisServer(tmp_path / "redis", persist=False)
    server.start()
    try:
        given = redis.Redis.from_url(server.url)
        run = _run_with_given_database(server.url, tmp_path / "empty")
        assert run.returncode == 0, run.stdout[-3000:]
        assert given.dbsize() == 0

        given.set("someone-elses-data", "keep me")
        run = _run_with_given_database(server.url, tmp_path / "held")
        assert run.returncode != 0
        assert f"{TEST_REDIS_URL_ENV} names a database that is not empty (1 keys)" in run.stdout
        assert given.keys() == [b"someone-elses-data"]
        assert given.get("someone-elses-data") == b"keep me"
    finally:
        server.stop()
