"""The Redis of a test session: a ``redis-server`` of its own, never someone else's database.

RQ's keys (``rq:*``) are not prefixed, and the tests create, list and delete keys freely, so
they must not run in a database that holds anybody else's data: a shared Redis on 6379 may be
a developer's or a CI neighbour's. By default a session therefore starts its own
``redis-server`` on a free loopback port (no persistence; it dies with the session) and
never connects to 6379 at all (``tests/test_redis_isolation.py`` checks it).

``COREMERGE_TEST_REDIS_URL`` names a Redis database to use instead (for a machine without
``redis-server``, or a Redis in another container). That database is handed over to the tests:
it must be empty when the session starts (the session refuses to run otherwise, so it cannot
delete data it did not write), and it is emptied again at the end.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from tests.processes import RedisServer

__all__ = ["TEST_REDIS_URL_ENV", "session_redis"]

#: The variable that names a Redis database for the tests instead of a private server.
TEST_REDIS_URL_ENV = "COREMERGE_TEST_REDIS_URL"


@contextmanager
def session_redis(workdir: Path) -> Iterator[str]:
    """Yield the URL of the session's Redis: the database :data:`TEST_REDIS_URL_ENV` names
    (empty, or the session fails), or a private ``redis-server`` in ``workdir``."""
    given = os.environ.get(TEST_REDIS_URL_ENV)
    if given:
        with _given_database(given) as url:
            yield url
        return
    if shutil.which("redis-server") is None:
        pytest.fail(
            f"these tests start a redis-server of their own: install redis-server, or set "
            f"{TEST_REDIS_URL_ENV} to an empty Redis database they may use"
        )
    server = RedisServer(workdir, persist=False)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@contextmanager
def _given_database(url: str) -> Iterator[str]:
    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        pytest.fail(f"{TEST_REDIS_URL_ENV}: the Redis it names does not answer ({exc})")
    held = client.dbsize()
    if held:
        pytest.fail(
            f"{TEST_REDIS_URL_ENV} names a database that is not empty ({held} keys): the "
            "tests use (and empty) the database they are given, so give them an empty one"
        )
    try:
        yield url
    finally:
        client.flushdb()
        client.close()
