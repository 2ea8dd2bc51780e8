"""``coremerge merge org/adapter-a org/adapter-b@v1``: adapters from the Hugging Face Hub,
through huggingface_hub's own cache in its offline mode (these machines have no network),
pinned to their commit in the report and the model card; and what a CLI argument is."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file

from tests.hub_cache import put_in_cache
from worker.cli import main


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, peft_adapters: list[Path]) -> dict:
    """An offline Hub cache with org/adapter-a (main) and org/adapter-b (main and tag v1)."""
    cache = tmp_path / "hf-cache"
    commits = {
        "org/adapter-a": put_in_cache(cache, "org/adapter-a", peft_adapters[0]),
        "org/adapter-b": put_in_cache(
            cache, "org/adapter-b", peft_adapters[1], refs=("main", "v1")
        ),
    }
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return {"cache": cache, "commits": commits}


def _run(*args: object) -> int:
    return main(["merge", "-q", *map(str, args)])


def test_hub_ids_are_resolved_pinned_and_recorded(
    hub: dict, peft_adapters: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    assert _run("org/adapter-a", "org/adapter-b@v1", "-o", out, "--method", "ta") == 0
    local = tmp_path / "local"
    assert _run(*peft_adapters[:2], "-o", local, "--method", "ta") == 0
    got, want = (load_file(d / "adapter_model.safetensors") for d in (out, local))
    assert all(torch.equal(got[k], want[k]) for k in want)  # the same adapters, merged alike

    a, b = hub["commits"]["org/adapter-a"], hub["commits"]["org/adapter-b"]
    report = json.loads((out / "merge_report.json").read_text())
    assert [i["uri"] for i in report["inputs"]] == [
        f"hf://org/adapter-a@{a}",
        f"hf://org/adapter-b@{b}",
    ]
    assert [i["name"] for i in report["inputs"]] == ["org/adapter-a", "org/adapter-b"]
    card = (out / "README.md").read_text()
    assert f"`hf://org/adapter-a@{a}`" in card and f"`hf://org/adapter-b@{b}`" in card
    assert str(hub["cache"]) not in card and str(hub["cache"]) not in json.dumps(report)


def test_a_config_names_hub_adapters(hub: dict, tmp_path: Path) -> None:
    config = tmp_path / "merge.yml"
    config.write_text(
        "models:\n"
        "  - model: coremerge/tiny-llama-demo+org/adapter-a\n    parameters: {weight: 1}\n"
        "  - model: hf://org/adapter-b@v1\n    parameters: {weight: 0.5}\n"
        "merge_method: task_arithmetic\nbase_model: coremerge/tiny-llama-demo\n"
    )
    assert main(["merge", "-q", "--config", str(config), str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert [i["weight"] for i in report["inputs"]] == [1.0, 0.5]
    assert all(i["uri"].startswith("hf://org/adapter-") for i in report["inputs"])


def test_an_existing_local_folder_wins_over_a_hub_id(
    hub: dict, peft_adapters: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As with mergekit and from_pretrained: ``org/adapter-a`` is the folder when one exists;
    ``hf://`` forces the Hub."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(peft_adapters[2], tmp_path / "org" / "adapter-a")
    assert _run("org/adapter-a", "hf://org/adapter-a", "-o", "out", "--method", "ta") == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["inputs"][0]["uri"] is None  # a local folder: its path is not recorded
    assert report["inputs"][0]["r"] == 2 and report["inputs"][1]["r"] == 4


def test_hub_refusals(
    hub: dict, peft_adapters: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(peft_adapters[0] / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not loaded")
    put_in_cache(hub["cache"], "org/pickled", pickled,
                 files=("adapter_config.json", "adapter_model.bin"))  # fmt: skip
    for args, fragment in [
        (["org/pickled"], "adapter_invalid: hf://org/pickled: has adapter_model.bin (pickle)"),
        (["org/absent"], "adapter_not_found: hf://org/absent: adapter_config.json and "
                         "adapter_model.safetensors not in the local Hugging Face cache"),
        (["org/adapter-b@v9"], "adapter_not_found: hf://org/adapter-b@v9"),
        (["hf://org/a/b"], "adapters.0.uri: 'hf://org/a/b': not a Hub model repository"),
    ]:  # fmt: skip
        assert _run(*args, "-o", tmp_path / "out") == 2
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1, err
        assert str(hub["cache"]) not in err
    assert _run("org/adapter-a", "-o", "hf://org/out") == 2
    assert "an hf:// location is an input only" in capsys.readouterr().err


def test_local_paths_are_left_out_unless_asked(peft_adapters: list[Path], tmp_path: Path) -> None:
    quiet = tmp_path / "quiet"
    assert _run(*peft_adapters, "-o", quiet, "--method", "ta") == 0
    report = json.loads((quiet / "merge_report.json").read_text())
    assert [i["uri"] for i in report["inputs"]] == [None, None, None]
    assert [i["name"] for i in report["inputs"]] == ["task-0", "task-1", "task-2"]
    card = (quiet / "README.md").read_text()
    assert "| `task-0` | local folder |" in card
    assert str(peft_adapters[0].parent) not in card + json.dumps(report)
    recorded = tmp_path / "recorded"
    assert _run(*peft_adapters, "-o", recorded, "--method", "ta", "--record-paths") == 0
    report = json.loads((recorded / "merge_report.json").read_text())
    assert [i["uri"] for i in report["inputs"]] == [str(p) for p in peft_adapters]


def test_huggingface_hubs_own_environment(peft_adapters: list[Path], tmp_path: Path) -> None:
    """The installed command, configured as huggingface_hub users configure it: HF_HUB_CACHE
    and HF_HUB_OFFLINE in the environment."""
    cache = tmp_path / "cache"
    commit = put_in_cache(cache, "org/adapter-a", peft_adapters[0])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "merge", "-q", "org/adapter-a", "-o", str(out)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "merge_report.json").read_text())
    assert report["inputs"][0]["uri"] == f"hf://org/adapter-a@{commit}"
