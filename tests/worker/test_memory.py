"""The work-memory limit: a job whose estimated peak working memory is over
``max_work_bytes`` is refused from its headers, before any tensor is read (limit_exceeded,
naming the module, the estimate, the limit and COREMERGE_MAX_WORK_BYTES); and the default
limit, 80 % of the process's memory limit. How close the estimate is to real peaks:
``tests/worker/test_memory_grid.py``."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from jobs.errors import LimitExceeded
from jobs.spec import MergeSpec
from tests.worker.synthetic import lora_adapter, spec, vera_adapter
from worker.adapters import open_adapters
from worker.adapters.lora import LoraReader
from worker.adapters.vera import VeraReader
from worker.limits import default_max_work_bytes, memory_limit
from worker.merge.memory import (
    ALLOCATOR_SLACK,
    FIXED_OVERHEAD,
    ModuleShape,
    estimate_work,
    format_bytes,
)
from worker.merge.plan import make_plan
from worker.merge.runner import run_merge

GiB = 1 << 30
PHYSICAL = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.fixture
def no_reads(monkeypatch) -> None:
    """Reading any tensor fails the test: the limit must be checked from headers alone."""

    def read(self, module, *args, **kwargs):
        raise AssertionError(f"{self.name}: {module} was read")

    monkeypatch.setattr(LoraReader, "read", read)
    monkeypatch.setattr(VeraReader, "read", read)


def _limit_message(message: str, module: str, limit: int) -> None:
    assert message.startswith(f"module {module!r}: merging it with "), message
    assert re.search(r"the job's estimated peak is \d+\.\d [KMGTP]iB", message), message
    assert message.endswith(
        f"over this worker's limit of {format_bytes(limit)} "
        "(COREMERGE_MAX_WORK_BYTES, or the CLI's --max-memory)"
    ), message


def test_a_tiny_vera_adapter_with_a_huge_rank_is_refused_before_reading(
    tmp_path: Path, no_reads: None
) -> None:
    # r = 65 536 on 4096-wide layers: λ_d and λ_b are a 272 KB file, and the projections it
    # declares are 2 GiB, its stacked factors 2 GiB, its R × R core and Gram matrices 16 GiB.
    lora = lora_adapter(tmp_path / "lora", r=8, m=4096, n=4096)
    vera = vera_adapter(tmp_path / "vera", r=65536, m=4096)
    assert (vera / "adapter_model.safetensors").stat().st_size < 320_000
    out = tmp_path / "out"
    job = MergeSpec.model_validate(spec([lora, vera], out, method="ta"))
    with pytest.raises(LimitExceeded) as info:
        run_merge(job, [lora, vera], out, device="cpu", max_work_bytes=8 * GiB)
    assert info.value.code == "limit_exceeded"
    _limit_message(info.value.message, "layers.0.q", 8 * GiB)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_a_small_lora_adapter_in_full_space_is_refused(tmp_path: Path, no_reads: None) -> None:
    # 200 KB of bfloat16 factors of rank 1 on a 50 000 × 50 000 layer: each dense ΔW is 10 GB.
    wide = lora_adapter(
        tmp_path / "wide", r=1, m=50_000, n=50_000, dtype=torch.bfloat16, random=False
    )
    assert (wide / "adapter_model.safetensors").stat().st_size < 210_000
    readers = open_adapters([wide], ["wide"])
    full = MergeSpec.model_validate(spec([wide], tmp_path / "o", method="ta", space="full"))
    with pytest.raises(LimitExceeded) as info:
        make_plan(readers, full, max_work_bytes=8 * GiB)
    _limit_message(info.value.message, "layers.0.q", 8 * GiB)
    assert "with ta in full space needs about" in info.value.message
    # The same adapter in core space never forms the dense matrix: 2 MiB of factors.
    core = MergeSpec.model_validate(spec([wide], tmp_path / "o", method="ta"))
    plan = make_plan(readers, core, max_work_bytes=1 * GiB)
    assert plan.work is not None and plan.work.peak_bytes < 64 << 20
    assert plan.work_limit == 1 * GiB


def test_no_limit_refuses_nothing_and_the_report_records_the_estimate(
    peft_adapters: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    job = MergeSpec.model_validate(spec(peft_adapters, out, method="tsv"))
    report = run_merge(job, peft_adapters, out, device="cpu").report
    memory = report["memory"]
    assert memory["limit_bytes"] is None
    # tiny modules: the fixed overhead dominates
    assert FIXED_OVERHEAD <= memory["estimated_peak_bytes"] < 2 * FIXED_OVERHEAD
    assert memory["largest_module"].startswith("model.layers.")
    with pytest.raises(LimitExceeded):  # and the same job under a limit below its estimate
        run_merge(job, peft_adapters, tmp_path / "o2", device="cpu", max_work_bytes=1 << 20)


def test_modules_side_by_side_and_inputs_held_add_up() -> None:
    shapes = [ModuleShape(f"layers.{i}.q", 4096, 4096, (16, 16), 0) for i in range(8)]
    kwargs = dict(space="core", method="ta", params={}, rank=None, output_rank=32, dtype_bytes=4)
    one = estimate_work(shapes, threads=1, held_bytes=0, **kwargs)
    four = estimate_work(shapes, threads=4, held_bytes=0, **kwargs)
    held = estimate_work(shapes, threads=1, held_bytes=GiB, **kwargs)
    slack = 1 + ALLOCATOR_SLACK  # every tensor byte is counted with the allocator's slack
    assert four.peak_bytes - one.peak_bytes == pytest.approx(slack * 3 * one.module_bytes, abs=2)
    assert held.peak_bytes - one.peak_bytes == pytest.approx(slack * GiB, abs=2)


def test_a_vera_reader_declares_its_regenerated_projections(tmp_path: Path) -> None:
    # Regenerated once, held for the whole merge: r × (max n + max m) float32 values.
    lora = lora_adapter(tmp_path / "lora", r=8, m=256, n=512)
    vera = vera_adapter(tmp_path / "vera", r=1024, m=256)
    _, reader = open_adapters([lora, vera], ["lora", "vera"])
    assert reader.held_bytes == 4 * 1024 * (512 + 256)


# -- the default limit


def _cgroup(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    root.mkdir(exist_ok=True)
    (tmp_path / "proc-cgroup").write_text(proc)
    return root, tmp_path / "proc-cgroup"


@pytest.mark.parametrize(
    ("proc", "files", "limit"),
    [
        # cgroup v2: the job's own limit, or a tighter one of an ancestor
        ("0::/jobs/w1\n", {"jobs/w1/memory.max": "2147483648\n"}, 2 * GiB),
        ("0::/jobs/w1\n", {"jobs/w1/memory.max": "max\n", "jobs/memory.max": "1073741824\n"}, GiB),
        # inside a container's cgroup namespace the files sit at the root
        ("0::/\n", {"memory.max": "1073741824\n"}, GiB),
        ("0::/\n", {"memory.max": "max\n"}, PHYSICAL),
        # cgroup v1, where "unlimited" is 2**63 − 4096
        (
            "4:memory:/docker/abc\n",
            {"memory/docker/abc/memory.limit_in_bytes": "536870912"},
            GiB // 2,
        ),
        ("4:memory:/docker/abc\n", {"memory/memory.limit_in_bytes": "536870912"}, GiB // 2),
        ("4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712"}, PHYSICAL),
        # no cgroup files at all, and a limit above the machine's memory
        ("", {}, PHYSICAL),
        ("0::/\n", {"memory.max": str(4 * PHYSICAL)}, PHYSICAL),
    ],
)
def test_default_limit_is_80_percent_of_the_memory_limit(
    tmp_path: Path, proc: str, files: dict[str, str], limit: int
) -> None:
    root, proc_cgroup = _cgroup(tmp_path, proc, files)
    assert memory_limit(root, proc_cgroup) == limit
    assert default_max_work_bytes(root, proc_cgroup) == int(0.8 * limit)


def test_default_limit_on_this_machine() -> None:
    assert 0 < default_max_work_bytes() <= 0.8 * PHYSICAL


def test_format_bytes() -> None:
    assert [format_bytes(n) for n in (512, 1536, 3 * GiB + GiB // 10, 5 << 50)] == [
        "512 B", "1.5 KiB", "3.1 GiB", "5.0 PiB",
    ]  # fmt: skip
