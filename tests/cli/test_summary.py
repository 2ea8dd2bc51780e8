"""The merge command's summary line and progress bar as a script or a log sees them (issue 25
§4): with ``--rank``, the module that kept the least energy is on the summary line; with
stderr not a terminal, no progress bar is drawn."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_summary_names_the_lowest_kept_energy_and_no_bar_goes_to_a_pipe(
    peft_adapters: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    run = subprocess.run(
        [sys.executable, "-m", "worker.cli", "merge", *map(str, peft_adapters), "-o", str(out),
         "--method", "ta", "--rank", "2", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "merge_report.json").read_text())
    energy, module = min((m["kept_energy"], m["module"]) for m in report["modules"])
    assert f"lowest kept energy {energy:.3f} ({module})" in run.stdout
    assert "module/s" not in run.stderr and "merging" not in run.stderr  # no tqdm bar


def test_a_full_space_merge_says_how_long_it_will_likely_take(
    peft_adapters: list[Path], tmp_path: Path
) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "worker.cli", "merge", *map(str, peft_adapters), "-o",
         str(tmp_path / "full"), "--method", "ta", "--space", "full", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "few hundred times slower than core space" in run.stderr
    assert "the merge will likely take about" in run.stderr
