"""Issue 14: open mode stays on loopback (``coremerge serve``, the Dockerfile, compose), and
RQ is pinned to the major release the queue code was written against."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def served(monkeypatch) -> list[dict[str, Any]]:
    """``uvicorn.run`` replaced by a recorder: what ``serve`` would have started."""
    import uvicorn

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    # and the root logger left as pytest set it up
    monkeypatch.setattr("service.commands._configure_logging", lambda settings: None)
    for name in ("COREMERGE_TENANTS_FILE", "COREMERGE_LOG_FORMAT"):
        monkeypatch.delenv(name, raising=False)
    return calls


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "api.example.com"])
def test_open_mode_refuses_a_non_loopback_address(host, served, capsys) -> None:
    from worker.cli import main

    assert main(["serve", "--host", host]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--allow-open-non-loopback" in err, err
    assert "COREMERGE_TENANTS_FILE" in err
    assert served == []


def test_serve_binds_loopback_or_any_address_with_tenants_or_the_flag(
    served, monkeypatch, tenants_file
) -> None:
    from worker.cli import main

    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):  # loopback: open is fine
        assert main(["serve", "--host", host, "--port", "8123"]) == 0
    assert main(["serve", "--host", "0.0.0.0", "--allow-open-non-loopback"]) == 0
    monkeypatch.setenv("COREMERGE_TENANTS_FILE", str(tenants_file))
    assert main(["serve", "--host", "0.0.0.0"]) == 0  # keys required: any address
    hosts = ["127.0.0.1", "127.0.0.2", "localhost", "::1", "0.0.0.0", "0.0.0.0"]
    assert [c["host"] for c in served] == hosts


def test_a_real_serve_process_exits_2_in_open_mode_on_0_0_0_0() -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "serve", "--host", "0.0.0.0", "--port", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "refusing to serve" in proc.stderr


def _command(argv: list[str]) -> tuple[str, list[str]]:
    return argv[argv.index("--host") + 1], argv


def test_the_images_and_compose_do_not_open_an_unauthenticated_api() -> None:
    """The Dockerfile's API binds 0.0.0.0 without the flag (it starts only with a tenants
    file, as deploy/ mounts one); compose runs open, so it passes the flag explicitly and
    publishes the port on the host's loopback only."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    api_stage = dockerfile.split("FROM base AS api", 1)[1].split("FROM base AS worker", 1)[0]
    cmd = re.search(r"^CMD (\[.*\])$", api_stage, re.M)
    assert cmd is not None
    host, argv = _command(yaml.safe_load(cmd.group(1)))
    assert host == "0.0.0.0" and "--allow-open-non-loopback" not in argv

    api = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["api"]
    host, argv = _command(api["command"])
    open_mode = "COREMERGE_TENANTS_FILE" not in api["environment"]
    if open_mode and host not in ("127.0.0.1", "localhost"):
        assert "--allow-open-non-loopback" in argv
        assert all(port.startswith("127.0.0.1:") for port in api["ports"]), api["ports"]


def test_rq_is_pinned_to_its_major_release() -> None:
    import rq

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (pin,) = [Requirement(d) for d in project["dependencies"] if d.startswith("rq")]
    assert str(pin.specifier) in ("<4,>=3", ">=3,<4")
    assert Version(rq.__version__) in pin.specifier
    dockerfile = (ROOT / "Dockerfile").read_text()  # both images install from pyproject.toml
    assert "RUN pip install . " in dockerfile and 'RUN pip install ".[worker]"' in dockerfile
