"""``output.rank: "auto"`` (issue 23 §2): the smallest rank a server takes that keeps a share
of every module's energy, checked against a float64 reference on adapters of a known
spectrum; the spec's refusals; the server's rounding and cap; the CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from jobs.errors import LimitExceeded
from jobs.servers import server_rank, server_rule
from jobs.spec import MergeSpec
from tests.worker.synthetic import PREFIX, spec
from worker.merge.runner import run_merge

ROOT = Path(__file__).resolve().parents[2]
VLLM = (1, 8, 16, 32, 64, 128, 256, 320, 512)
M, N, R = 96, 80, 16


def _known_spectrum_adapter(folder: Path, spectra: list[list[float]], seed: int) -> Path:
    """A LoRA adapter whose module i is U diag(spectra[i]) Vᵀ (orthonormal U, V): its
    singular values are known."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, values in enumerate(spectra):
        U = torch.linalg.qr(torch.randn(M, R, generator=gen, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(N, R, generator=gen, dtype=torch.float64))[0]
        S = torch.tensor(values, dtype=torch.float64)
        tensors[f"{PREFIX}layers.{i}.q.lora_A.weight"] = V.T.float().contiguous()
        tensors[f"{PREFIX}layers.{i}.q.lora_B.weight"] = (U * S).float().contiguous()
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": R, "lora_alpha": R, "target_modules": ["q"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two adapters of rank 16 on two modules, of geometric spectra that decay at different
    rates (module 1 needs more directions than module 0)."""
    root = tmp_path_factory.mktemp("known")
    spectra = [[0.7**i for i in range(R)], [0.9**i for i in range(R)]]
    return [_known_spectrum_adapter(root / f"a{t}", spectra, seed=t) for t in range(2)]


def _reference_rank(dirs: list[Path], energy: float) -> int:
    """The smallest k at which every module of the float64 sum ΔW = Σ_t B_t A_t keeps
    ``energy`` of Σ S²: what task arithmetic at alpha 1 merges."""
    need = 0
    files = [load_file(d / "adapter_model.safetensors") for d in dirs]
    for i in range(2):
        key = f"{PREFIX}layers.{i}.q"
        dW = sum(f[f"{key}.lora_B.weight"].double() @ f[f"{key}.lora_A.weight"].double()
                 for f in files)  # fmt: skip
        shares = torch.cumsum(torch.linalg.svdvals(dW) ** 2, 0)
        shares /= shares[-1].clone()
        need = max(need, int((shares < energy - 1e-9).sum()) + 1)
    return need


def _merge(dirs: list[Path], out: Path, **output: object) -> dict:
    job = MergeSpec.model_validate(
        spec(dirs, out, method="ta", params={"alpha": 1.0}, output=output)
    )
    run_merge(job, dirs, out, device="cpu")
    return json.loads((out / "merge_report.json").read_text())


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_the_chosen_rank_is_the_reference_rank_rounded_up_for_vllm(
    adapters: list[Path], tmp_path: Path, energy: float
) -> None:
    want = _reference_rank(adapters, energy)
    report = _merge(adapters, tmp_path / "out", rank="auto", energy=energy)
    auto = report["output"]["rank_auto"]
    assert auto["energy_rank"] == want and auto["energy_rank_module"] == "layers.1.q"
    assert auto["rank"] == min(r for r in VLLM if r >= want)
    assert auto["met"] and auto["bound_by"] is None and auto["warning"] is None
    assert report["output"]["rank"] == min(auto["rank"], 2 * R)  # at most the merged rank
    assert auto["lowest_kept_energy"] >= energy - 1e-6


def test_sglang_takes_the_energy_rank_itself_and_the_merge_is_the_integer_ranks(
    adapters: list[Path], tmp_path: Path
) -> None:
    """With no list of ranks, the rank is what the energy needs; the adapter is the one an
    integer ``output.rank`` of that value gives, byte for byte."""
    want = _reference_rank(adapters, 0.9)
    auto = _merge(adapters, tmp_path / "auto", rank="auto", target="sglang")
    assert auto["output"]["rank_auto"]["rank"] == auto["output"]["rank"] == want
    fixed = _merge(adapters, tmp_path / "fixed", rank=want)
    assert auto["output"]["sha256"] == fixed["output"]["sha256"]
    assert [m["kept_energy"] for m in auto["modules"]] == [
        m["kept_energy"] for m in fixed["modules"]
    ]


def test_a_server_cap_below_the_energy_rank_is_used_and_said(
    adapters: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    report = _merge(adapters, out, rank="auto", target="cloudflare", energy=0.99)
    auto = report["output"]["rank_auto"]
    assert auto["energy_rank"] > 8 and auto["rank"] == report["output"]["rank"] == 8
    assert not auto["met"] and auto["bound_by"] == "server"
    assert auto["lowest_kept_energy"] < 0.99 and auto["lowest_kept_module"] == "layers.1.q"
    assert "Cloudflare Workers AI's largest rank, 8" in auto["warning"]
    assert f"keeps {auto['lowest_kept_energy']:.4f} of module 'layers.1.q'" in auto["warning"]
    assert "**warning**" in (out / "README.md").read_text()


def test_the_service_limit_caps_the_choice(adapters: list[Path], tmp_path: Path) -> None:
    job = MergeSpec.model_validate(spec(adapters, tmp_path / "o", output={"rank": "auto"}))
    out = run_merge(job, adapters, tmp_path / "o", device="cpu", max_output_rank=10)
    auto = out.report["output"]["rank_auto"]
    assert auto["rank"] == out.rank == 8 and auto["bound_by"] == "limit"
    fireworks = MergeSpec.model_validate(
        spec(adapters, tmp_path / "f", output={"rank": "auto", "target": "fireworks"})
    )
    with pytest.raises(LimitExceeded, match=r"Fireworks takes no rank within .* limit of 3"):
        run_merge(fireworks, adapters, tmp_path / "f", device="cpu", max_output_rank=3)


@pytest.mark.parametrize(
    ("needed", "limit", "want"),
    [
        (1, None, (1, None)),
        (2, None, (8, None)),
        (9, None, (16, None)),
        (33, None, (64, None)),
        (257, None, (320, None)),
        (321, None, (512, None)),
        (600, None, (512, "server")),
        (70, 100, (64, "limit")),
    ],
)
def test_vllm_rounds_up_to_its_allowed_max_lora_rank(
    needed: int, limit: int | None, want: tuple
) -> None:
    assert server_rank(server_rule("vllm"), needed, limit) == want


def _errors(output: dict) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as caught:
        MergeSpec.model_validate({"adapters": [{"uri": "/a"}], "output": {"uri": "/o", **output}})
    return [(".".join(map(str, e["loc"])), e["msg"]) for e in caught.value.errors()]


def test_the_spec_fills_in_the_defaults_and_refuses_what_auto_cannot_do() -> None:
    good = MergeSpec.model_validate(
        {"adapters": [{"uri": "/a"}], "output": {"uri": "/o", "rank": "auto"}}
    )
    assert (good.output.target, good.output.energy) == ("vllm", 0.9)
    [(field, msg)] = _errors({"rank": 8, "target": "vllm"})
    assert field == "output.target" and 'is for output.rank "auto"' in msg
    [(field, msg)] = _errors({"energy": 0.5})
    assert field == "output.energy" and "output.rank is null" in msg
    assert _errors({"rank": "auto", "energy": 0})[0][0] == "output.energy"
    assert _errors({"rank": "auto", "energy": 1.01})[0][0] == "output.energy"
    assert _errors({"rank": "auto", "target": "tgi"})[0][0] == "output.target"
    assert _errors({"rank": "Auto"}) == [
        ("output.rank", 'must be an integer >= 1, "auto" or null, not "Auto"')
    ]
    [(field, msg)] = _errors({"rank": "auto", "rank_mode": "shared"})
    assert field == "output.rank_mode" and "knows the rank only after" in msg


def test_the_cli_merges_at_the_rank_it_chose(adapters: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    run = subprocess.run(
        [sys.executable, "-m", "worker.cli", "merge", *map(str, adapters), "-o", str(out),
         "--method", "ta", "--rank", "auto", "--target", "vllm", "--energy", "0.9",
         "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    auto = json.loads((out / "merge_report.json").read_text())["output"]["rank_auto"]
    assert f"rank {auto['rank']} chosen for vllm to keep 0.9" in run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "worker.cli", "merge", *map(str, adapters), "-o",
         str(tmp_path / "bad"), "--rank", "8", "--target", "vllm"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "output.target" in bad.stderr
