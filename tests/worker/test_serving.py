"""Which servers load a merged adapter (worker/merge/serving.py, docs/serving.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.servers import SERVERS
from jobs.spec import MergeSpec
from worker.merge.runner import run_merge
from worker.merge.serving import (
    module_kinds,
    rank_for_energy,
    rank_for_server,
    serving_section,
)

LLAMA = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
RULES = {rule.name: rule for rule in SERVERS}


def _details(rank: int, modules: list[str] = LLAMA, nbytes: int = 10**6) -> dict[str, str]:
    section = serving_section(rank, modules, "bfloat16", nbytes)
    return {v["server"]: v["detail"] for v in section["servers"]}


def test_every_server_of_the_issue_has_a_rule_with_its_source() -> None:
    assert set(RULES) == {"vllm", "sglang", "lorax", "tensorrt_llm", "fireworks", "cloudflare"}
    assert all(rule.source.startswith("https://") for rule in SERVERS)


@pytest.mark.parametrize(
    ("rank", "want"),
    [
        (8, "vLLM: loads with `--max-lora-rank 16` (its default)"),
        (16, "vLLM: loads with `--max-lora-rank 16` (its default)"),
        (17, "vLLM: loads with `--max-lora-rank 32`"),
        (300, "vLLM: loads with `--max-lora-rank 320`"),
        (513, "vLLM: does not load it: rank 513 is above its largest --max-lora-rank (512)"),
    ],
)
def test_vllm_needs_the_smallest_allowed_max_lora_rank(rank: int, want: str) -> None:
    assert _details(rank)["vllm"] == want


def test_lorax_loads_any_rank_but_graphs_only_its_fast_ones() -> None:
    assert _details(32)["lorax"] == "LoRAX: loads"
    slow = _details(128)["lorax"]
    assert slow.startswith("LoRAX: loads, but rank 128 is not one of its fast ranks")


def test_hosted_limits() -> None:
    """Fireworks: 4 ≤ r ≤ 64 on its module list; Cloudflare: r ≤ 8 and under 100 MB."""
    assert _details(64)["fireworks"] == "Fireworks: loads"
    assert "below its minimum of 4" in _details(2)["fireworks"]
    assert "above its limit of 64" in _details(65)["fireworks"]
    bert = ["encoder.layer.0.attention.self.query", "encoder.layer.0.output.dense"]
    assert "does not take the module kinds dense, query" in _details(8, bert)["fireworks"]
    assert _details(8)["cloudflare"] == "Cloudflare Workers AI: loads"
    assert "above its limit of 8" in _details(9)["cloudflare"]
    too_big = _details(8, nbytes=100_000_000)["cloudflare"]
    assert "the file has 100.0 MB, its limit is under 100 MB" in too_big


def test_start_up_settings() -> None:
    assert _details(48)["sglang"] == "SGLang: loads with `--max-lora-rank 48`"
    assert _details(48)["tensorrt_llm"] == (
        "TensorRT-LLM: loads with `max_lora_rank 64` (its default)"
    )
    assert _details(96)["tensorrt_llm"] == "TensorRT-LLM: loads with `max_lora_rank 96`"


def test_module_kinds_are_the_last_name_segment() -> None:
    assert module_kinds([*LLAMA, "model.layers.1.self_attn.q_proj"]) == ["down_proj", "q_proj"]


def test_rank_for_energy_is_the_smallest_that_every_module_needs() -> None:
    # module 1 keeps 90 % at k = 1 (9 of 10); module 2 needs k = 2 (16 + 9 of 26)
    spectra = [[3.0, 1.0], [4.0, 3.0, 1.0]]
    assert rank_for_energy(spectra, 0.9) == 2
    assert rank_for_energy(spectra, 1.0) == 3
    assert rank_for_energy([[0.0, 0.0]], 0.9) == 1  # no energy needs nothing
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        rank_for_energy(spectra, 0.0)


def test_rank_for_server_rounds_up_to_what_the_server_takes() -> None:
    spectra = [[1.0] * 40]  # a flat spectrum: 99 % needs 40 directions
    assert rank_for_server(RULES["vllm"], spectra, 0.99) == {
        "server": "vllm", "rank": 64, "energy_rank": 40, "met": True,
    }  # fmt: skip
    assert rank_for_server(RULES["lorax"], spectra, 0.5)["rank"] == 32
    capped = rank_for_server(RULES["cloudflare"], spectra, 0.99)
    assert capped["rank"] == 8 and not capped["met"]
    assert rank_for_server(RULES["fireworks"], [[1.0]], 0.9)["rank"] == 4
    assert rank_for_server(RULES["sglang"], spectra, 0.99)["rank"] == 40


def test_the_report_and_the_card_say_which_servers_load_it(
    peft_adapters: list[Path], tmp_path: Path
) -> None:
    """A real merge: the report's ``serving`` section is computed from what was written."""
    out = tmp_path / "merged"
    spec = MergeSpec.model_validate(
        {"adapters": [{"uri": str(d)} for d in peft_adapters],
         "output": {"uri": str(out), "rank": 12, "dtype": "bfloat16"}}
    )  # fmt: skip
    outcome = run_merge(spec, peft_adapters, out, device="cpu")
    serving = json.loads((out / "merge_report.json").read_text())["serving"]
    assert serving["rank"] == outcome.rank == 12 and serving["dtype"] == "bfloat16"
    assert serving["bytes"] == (out / "adapter_model.safetensors").stat().st_size
    assert "q_proj" in serving["module_kinds"]
    by_server = {v["server"]: v for v in serving["servers"]}
    assert by_server["vllm"]["loads"] and by_server["vllm"]["setting"] == "--max-lora-rank 16"
    assert not by_server["cloudflare"]["loads"]
    card = (out / "README.md").read_text()
    assert "## Serving" in card
    assert "- vLLM: loads with `--max-lora-rank 16` (its default)" in card
    assert "- Cloudflare Workers AI: does not load it: rank 12 is above its limit of 8" in card


def test_the_module_does_not_import_torch() -> None:
    """The service may use the rules: importing them must not pull torch in."""
    code = "import sys, worker.merge.serving; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_the_docs_table_has_every_rule_and_its_source() -> None:
    """docs/serving.md shows the same rules: each server's row links the source it applies."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    for rule in SERVERS:
        row = next((line for line in doc.splitlines() if line.startswith(f"| {rule.title} |")), "")
        assert rule.source in row, rule.name
