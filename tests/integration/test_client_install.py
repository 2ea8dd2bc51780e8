"""The client installs and works without torch, transformers or peft (issue 25 §4).

Two checks against the real stack (API under uvicorn, an RQ worker, moto's S3):

- the base install (``pip install coremerge``, no extra) goes into a fresh virtual environment
  with its dependencies from the package index; ``import torch`` fails there, the metadata
  names none of the worker extra, and that environment's ``coremerge`` submits, waits,
  lists and fetches a job, and its ``service.client`` reads it. Skipped, saying why, when the
  install fails because no package index answers (an offline machine);
- this environment (which has torch) runs the same client paths with a meta-path finder that
  refuses torch, peft, transformers and safetensors: any import of them on those paths fails.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.integration.conftest import KEY_A, ROOT, Stack

HEAVY = ("torch", "peft", "transformers", "safetensors")
#: What a source distribution of the project holds (the rest of the repository is not shipped).
SOURCES = ("pyproject.toml", "README.md", "jobs", "service", "worker")

BLOCKER = f"""
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            raise ImportError(f"the client imported {{name}}")
sys.meta_path.insert(0, Refuse())
"""


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the project's base install (a copy of its sources,
    so that building it leaves nothing in the checkout). About 20 s, most of it pip."""
    work = tmp_path_factory.mktemp("client-venv")
    source = work / "src"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, source / name)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "install", "-q", "--retries", "1",
         "--timeout", "20", str(source)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if install.returncode != 0:
        if not _pypi_reachable():
            pytest.skip("offline: the base install needs its dependencies from a package index")
        pytest.fail(f"pip install of the base failed:\n{install.stderr[-3000:]}")
    return venv


def _env(stack: Stack) -> dict[str, str]:
    """The stack's settings and S3 credentials; no PYTHONPATH, so the checkout stays out."""
    env = {k: v for k, v in stack.env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "COREMERGE_API_KEY": KEY_A}


def _spec(tiny: list[str], tmp_path: Path) -> tuple[Path, str]:
    output = f"s3://merged/team-a/client-{uuid.uuid4().hex[:8]}/"
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"adapters": [{"uri": u} for u in tiny], "output": {"uri": output}}))
    return spec, output


def _run(argv: list, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=180)


def test_the_base_install_has_no_torch_and_its_metadata_names_none(client_venv: Path) -> None:
    python = str(client_venv / "bin" / "python")
    probe = _run([python, "-c", "import torch"], {}, client_venv)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    requires = _run(
        [python, "-c", "import importlib.metadata as m, json; "
         "print(json.dumps(m.requires('coremerge')))"], {}, client_venv,
    )  # fmt: skip
    base = [r for r in json.loads(requires.stdout) if "extra ==" not in r]
    assert base and not [r for r in base if r.split(">")[0].split("[")[0] in HEAVY], base
    assert any(
        r.startswith("torch") and 'extra == "worker"' in r for r in json.loads(requires.stdout)
    )
    merge = _run([str(client_venv / "bin" / "coremerge"), "merge", "a", "-o", "b"], {}, client_venv)
    assert merge.returncode == 2
    assert 'needs torch, which the base install leaves out: pip install "coremerge[worker]"' in (
        merge.stderr
    )


def test_the_base_install_submits_waits_lists_and_fetches(
    stack: Stack, tiny: list[str], client_venv: Path, tmp_path: Path
) -> None:
    env, cli = _env(stack), str(client_venv / "bin" / "coremerge")
    spec, output = _spec(tiny, tmp_path)
    submitted = _run([cli, "submit", str(spec), "--wait", "--timeout", "120"], env, tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    assert job["status"] == "succeeded" and job["result"]["uri"] == output

    listed = _run([cli, "list", "--limit", "50"], env, tmp_path)
    assert listed.returncode == 0 and job["id"] in listed.stdout, listed.stderr
    fetched = _run([cli, "fetch", job["id"], str(tmp_path / "merged")], env, tmp_path)
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "merged" / "adapter_model.safetensors").stat().st_size > 0

    read = (
        "import json, sys\nfrom service.client import CoremergeClient\n"
        f"with CoremergeClient({stack.api_url!r}, {KEY_A!r}) as c:\n"
        f"    job = c.get({job['id']!r})\n"
        f"print(json.dumps([job['status'], sorted(set(sys.modules) & set({HEAVY!r}))]))\n"
    )
    got = _run([str(client_venv / "bin" / "python"), "-c", read], env, tmp_path)
    assert json.loads(got.stdout) == ["succeeded", []], got.stderr


def test_the_client_paths_import_nothing_heavy(
    stack: Stack, tiny: list[str], tmp_path: Path
) -> None:
    """In this environment (torch installed), with torch and friends refused on import."""
    env = {
        **_env(stack),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    run = BLOCKER + "from worker.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    spec, _ = _spec(tiny, tmp_path)
    submitted = _run([sys.executable, "-c", run, "submit", str(spec), "--wait"], env, tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["id"]
    for argv in (["status", job_id], ["list"], ["fetch", job_id, str(tmp_path / "out")]):
        done = _run([sys.executable, "-c", run, *argv], env, tmp_path)
        assert done.returncode == 0, (argv, done.stderr)
    refused = _run([sys.executable, "-c", run, "merge", "a", "-o", "b"], env, tmp_path)
    assert "the client imported torch" in refused.stderr  # the blocker does refuse
