"""The service never imports torch; the CLI does not import the service's heavy dependencies."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


def test_the_service_does_not_import_torch() -> None:
    loaded = _modules_after(
        "from service.app import create_app\n"
        "from service.config import Settings\n"
        "import service.client, service.commands, service.queue, service.metrics\n"
        "create_app(Settings(tenants_file=None))"
    )
    assert "fastapi" in loaded
    assert not {"torch", "peft", "transformers", "safetensors"} & loaded


def test_the_cli_parser_does_not_import_service_dependencies() -> None:
    loaded = _modules_after("from worker.cli import build_parser\nbuild_parser()")
    assert not {"torch", "fastapi", "uvicorn", "rq", "boto3", "redis", "httpx"} & loaded
