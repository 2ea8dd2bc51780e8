"""Configuration as an operator meets it (issue 25 §2): a bad ``COREMERGE_*`` value stops
``serve``, ``worker`` and the client commands with exit status 2 and one line naming the
variable; at start-up the effective configuration is logged (no password), and a variable
that is no setting is warned about with the closest setting's name."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from jobs.settings import ConfigError, load_settings, redacted_redis_url, unknown_variables
from tests.processes import CLI, ROOT, free_port, start, stop, wait_until


def _env(**values: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("COREMERGE_")}
    return {**base, **values}


@pytest.mark.parametrize("command", [["serve"], ["worker"], ["status", "0" * 32]])
def test_a_bad_value_exits_2_naming_the_variable(command: list[str]) -> None:
    run = subprocess.run([*CLI, *command], cwd=ROOT, env=_env(COREMERGE_JOB_TIMEOUT="10m"),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("coremerge: configuration error: COREMERGE_JOB_TIMEOUT='10m': ")
    assert "Traceback" not in run.stderr and "internal error" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_a_secret_value_is_never_echoed(monkeypatch) -> None:
    monkeypatch.setenv("COREMERGE_API_KEY", "")  # any string is a valid key…
    monkeypatch.setenv("COREMERGE_REDIS_PASSWORD", "s3cr3t")
    monkeypatch.setenv("COREMERGE_MAX_ACTIVE_JOBS", "0")
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert "COREMERGE_MAX_ACTIVE_JOBS='0'" in str(refused.value)
    assert "s3cr3t" not in str(refused.value)


def test_unknown_variables_are_named_with_the_closest_setting() -> None:
    warnings = unknown_variables(
        {"COREMERGE_JOB_TIMOUT": "5", "COREMERGE_REDIS_URL": "x", "COREMERGE_TEST_REDIS_URL": "y",
         "COREMERGE_ZZZ": "1", "PATH": "/bin"}
    )  # fmt: skip
    assert warnings == [
        "COREMERGE_JOB_TIMOUT is not a coremerge setting and is ignored; did you mean "
        "COREMERGE_JOB_TIMEOUT?",
        "COREMERGE_ZZZ is not a coremerge setting and is ignored",
    ]
    assert redacted_redis_url("redis://:pw@h:6379/2") == "redis://:***@h:6379/2"


def test_serve_logs_its_configuration_and_unknown_variables(redis_url: str, tmp_path: Path) -> None:
    name = f"cfg{uuid.uuid4().hex[:8]}"
    password_url = redis_url.replace("redis://", "redis://:not-the-password@")
    env = _env(COREMERGE_REDIS_URL=password_url, COREMERGE_QUEUE=name, COREMERGE_KEY_PREFIX=name,
               COREMERGE_JOB_TIMOUT="5", COREMERGE_LOG_FORMAT="text")  # fmt: skip
    port, log = free_port(), tmp_path / "api.log"
    proc = start([*CLI, "serve", "--port", str(port)], env, log)
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200,
                   "API", 30, proc)  # fmt: skip
    finally:
        stop(proc)
    text = log.read_text()
    assert f"api configuration: redis {redis_url.replace('redis://', 'redis://:***@')}" in text
    assert f"queue '{name}'" in text and "OPEN (no tenants file)" in text
    assert "did you mean COREMERGE_JOB_TIMEOUT?" in text
    assert "not-the-password" not in text
    assert sys.executable  # the same interpreter ran it
