"""OpenMP defaults are set before torch loads, from the CPUs the process may really use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.threads import cgroup_cpu_limit, tune_openmp, usable_cpus


def _cpu_max(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cpu.max"
    path.write_text(text)
    return path


def test_cgroup_quota_is_read_and_max_means_unlimited(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(_cpu_max(tmp_path, "150000 100000\n")) == 1.5
    assert cgroup_cpu_limit(_cpu_max(tmp_path, "max 100000\n")) is None
    assert cgroup_cpu_limit(tmp_path / "absent") is None
    assert cgroup_cpu_limit(_cpu_max(tmp_path, "garbage\n")) is None


def test_a_quota_below_the_machine_caps_the_threads(tmp_path: Path) -> None:
    env: dict[str, str] = {}
    tune_openmp(env, _cpu_max(tmp_path, "100000 100000\n"))  # one CPU
    assert env == {"GOMP_SPINCOUNT": "3000", "OMP_NUM_THREADS": "1"}
    assert usable_cpus(_cpu_max(tmp_path, "50000 100000\n")) == 1  # never 0


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs to have fewer")
def test_user_settings_win(tmp_path: Path) -> None:
    env = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "7"}
    tune_openmp(env, _cpu_max(tmp_path, "100000 100000\n"))
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "7"}
    env = {"GOMP_SPINCOUNT": "0"}
    tune_openmp(env, _cpu_max(tmp_path, "max 100000\n"))
    assert env["GOMP_SPINCOUNT"] == "0"


def test_importing_worker_sets_them_before_torch() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    code = "import worker, os, torch; print(os.environ['GOMP_SPINCOUNT'], torch.get_num_threads())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == "3000"
    assert int(out[1]) == min(usable_cpus(), int(out[1]))
