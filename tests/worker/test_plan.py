"""The merge plan, from configs and headers only: modules, their sources and ranks, the
output's one rank, and every incompatibility between the adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from jobs.errors import AdapterIncompatible, LimitExceeded
from jobs.spec import MergeSpec
from tests.conftest import edit_config
from worker.adapters import open_adapters
from worker.demo import make_tiny_adapters
from worker.merge.plan import make_plan


def _plan(dirs: list[Path], **spec: object):
    full = {"adapters": [{"uri": str(d)} for d in dirs], "output": {"uri": "/tmp/o"}, **spec}
    return make_plan(open_adapters(dirs, [d.name for d in dirs]), MergeSpec.model_validate(full))


def test_modules_sources_and_the_output_rank(peft_adapters: list[Path]) -> None:
    plan = _plan(peft_adapters, method="tsv")
    q0 = next(mp for mp in plan.modules if mp.module == "model.layers.0.self_attn.q_proj")
    k0 = next(mp for mp in plan.modules if mp.module == "model.layers.0.self_attn.k_proj")
    # q_proj of layer 0 is in all three adapters: 4 + 8 + 2 = 14; k_proj only in one (6).
    assert (q0.sources, q0.total_rank) == ((0, 1, 2), 14)
    assert (k0.sources, k0.total_rank) == ((2,), 6)
    assert plan.output_rank == 14  # one rank for every module: the largest
    assert _plan(peft_adapters, output={"uri": "/tmp/o", "rank": 4}).output_rank == 4
    assert _plan(peft_adapters, space="full").output_rank is None  # only the merge knows


def test_incompatible_adapters(peft_adapters: list[Path], adapter_copy, tmp_path: Path) -> None:
    other_base = adapter_copy(1)
    edit_config(other_base, base_model_name_or_path="someone/else")
    with pytest.raises(AdapterIncompatible, match="adapters disagree on base_model_name_or_path"):
        _plan([peft_adapters[0], other_base])
    # Same name, different model: q_proj shapes differ from the 64-wide tiny model's.
    wide = make_tiny_adapters(tmp_path / "wide", [{"r": 4, "target_modules": ["q_proj"]}])[0]
    tensors = load_file(wide / "adapter_model.safetensors")
    save_file(
        {
            k: torch.randn(t.shape[0], 2 * t.shape[1]) if "lora_A" in k else t
            for k, t in tensors.items()
        },
        wide / "adapter_model.safetensors",
    )
    with pytest.raises(
        AdapterIncompatible,
        match=r"module 'model\.layers\.0\.self_attn\.q_proj' has different shapes",
    ):
        _plan([peft_adapters[0], wide])


def test_the_output_is_bounded_from_the_plan(peft_adapters: list[Path]) -> None:
    """COREMERGE_MAX_OUTPUT_RANK bounds an explicit output.rank and the merged rank a job can
    reach without one; COREMERGE_MAX_OUTPUT_BYTES the weights file, estimated exactly."""
    dirs = peft_adapters
    spec = MergeSpec.model_validate(
        {"adapters": [{"uri": str(d)} for d in dirs], "output": {"uri": "/tmp/o"}}
    )
    readers = open_adapters(dirs, [d.name for d in dirs])
    plan = make_plan(readers, spec)
    # Every module at the output's one rank (14), float32.
    assert plan.output_bytes == sum(
        (mp.in_features + mp.out_features) * 14 * 4 for mp in plan.modules
    )
    with pytest.raises(LimitExceeded, match=r"merged rank can reach 14 \(Σr = 14 of its 3"):
        make_plan(readers, spec, max_output_rank=13)
    make_plan(readers, spec, max_output_rank=14)
    with pytest.raises(LimitExceeded, match="COREMERGE_MAX_OUTPUT_BYTES"):
        make_plan(readers, spec, max_output_bytes=plan.output_bytes - 1)
    ranked = spec.model_copy(update={"output": spec.output.model_copy(update={"rank": 20})})
    with pytest.raises(LimitExceeded, match=r"output\.rank 20 is over this service.s limit of 16"):
        make_plan(readers, ranked, max_output_rank=16)
    full = spec.model_copy(update={"space": "full"})
    with pytest.raises(LimitExceeded, match="a dense full-space update has any rank up to"):
        make_plan(readers, full, max_output_rank=8)
