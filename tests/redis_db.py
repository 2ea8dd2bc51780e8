"""A Redis database of its own for a test session (shared by tests/service and
tests/integration): RQ's keys (``rq:*``) are not prefixed, so tests that enqueue need a
database nobody else is using. A database is claimed with a key set NX and emptied on release.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis

HOST, PORT = "127.0.0.1", 6379
CLAIM_KEY = "coremerge-tests:claimed-by"


@contextmanager
def claimed_redis_db() -> Iterator[int]:
    """Claim a free database (15 down to 1), empty it, yield its number, empty it again."""
    try:
        redis.Redis(host=HOST, port=PORT, socket_connect_timeout=2).ping()
    except redis.exceptions.ConnectionError:
        pytest.fail(f"these tests need a Redis on {HOST}:{PORT} (.ci/run starts one)")
    for db in range(15, 0, -1):
        client = redis.Redis(host=HOST, port=PORT, db=db)
        if client.set(CLAIM_KEY, str(os.getpid()), nx=True, ex=3600):
            break
    else:
        pytest.fail("no free Redis database (1-15) to claim")
    for key in client.scan_iter(count=1000):
        if key != CLAIM_KEY.encode():
            client.delete(key)
    try:
        yield db
    finally:
        client.flushdb()
        client.close()
