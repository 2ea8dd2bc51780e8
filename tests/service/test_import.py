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
        "from jobs.settings import Settings\n"
        "import service.client, service.commands, jobs.queue, service.metrics\n"
        "create_app(Settings(tenants_file=None))"
    )
    assert "fastapi" in loaded
    assert not {"torch", "peft", "transformers", "safetensors"} & loaded


def test_the_cli_parser_does_not_import_service_dependencies() -> None:
    loaded = _modules_after("from worker.cli import build_parser\nbuild_parser()")
    assert not {"torch", "fastapi", "uvicorn", "rq", "boto3", "redis", "httpx"} & loaded


def test_the_engine_is_a_leaf_that_imports_only_torch() -> None:
    loaded = _modules_after("import worker.engine")
    assert "torch" in loaded
    project = {m.split(".")[0] for m in loaded} & {"jobs", "service", "pydantic"}
    assert not project, project
    assert not {
        m
        for m in loaded
        if m.startswith("worker.") and not m.startswith(("worker.engine", "worker.threads"))
    }


def test_the_shared_core_imports_neither_torch_nor_the_http_app() -> None:
    loaded = _modules_after(
        "import jobs.spec, jobs.errors, jobs.uris, jobs.settings, jobs.tenants, jobs.records, "
        "jobs.logs, jobs.queue"
    )
    assert not {"torch", "fastapi", "service", "worker"} & {m.split(".")[0] for m in loaded}
