"""The plan's per-module view of the spec: who takes part in each module, at which weight,
which modules are merged, and the bounds on matching module patterns."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.errors import AdapterIncompatible, LimitExceeded
from jobs.schedules import ModuleMatcher, PatternLimit
from jobs.spec import MergeSpec
from worker.adapters import open_adapters
from worker.merge.module_values import ModuleValues
from worker.merge.plan import make_plan

Q0, Q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
D0, D1 = "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"


def _spec(dirs: list[Path], weights: list | None = None, **rest: object) -> MergeSpec:
    adapters = [{"uri": str(d)} for d in dirs]
    for a, w in zip(adapters, weights or [], strict=False):
        a.update(w if isinstance(w, dict) else {"weight": w})
    return MergeSpec.model_validate({"adapters": adapters, "output": {"uri": "/tmp/o"}, **rest})


def _plan(dirs: list[Path], weights: list | None = None, **rest: object):
    spec = _spec(dirs, weights, **rest)
    return {
        mp.module: mp for mp in make_plan(open_adapters(dirs, [d.name for d in dirs]), spec).modules
    }


def test_weight_zero_takes_the_adapter_out_of_the_module(peft_adapters: list[Path]) -> None:
    # Adapter 0 (r 4) fades in over the two layers: weight 0 in layer 0, 1 in layer 1.
    plan = _plan(peft_adapters, [[0, 1], 0.5, 1], method="ta")
    assert (plan[Q0].sources, plan[Q0].total_rank, plan[Q0].weights) == ((1, 2), 10, (0.5, 1.0))
    assert (plan[Q1].sources, plan[Q1].total_rank, plan[Q1].weights) == (
        (0, 1, 2),
        14,
        (1.0, 0.5, 1.0),
    )


def test_rules_by_module_pattern_first_match_wins(peft_adapters: list[Path]) -> None:
    rules = [{"modules": "mlp", "value": 3}, {"modules": "q_proj", "value": [2, 4]}]
    plan = _plan(peft_adapters, [rules, 1, 1], method="ta")
    assert plan[D0].weights[0] == 3.0 and plan[D1].weights[0] == 3.0
    assert plan[Q0].weights[0] == 2.0 and plan[Q1].weights[0] == 4.0
    # No rule covers v_proj: the adapter's default weight, 1.
    assert plan["model.layers.0.self_attn.v_proj"].weights[0] == 1.0


def test_layers_spread_a_gradient_over_the_model(peft_adapters: list[Path]) -> None:
    """Adapters of the 2-layer model inside a 3-layer one: layer 1 is halfway."""
    plan = _plan(peft_adapters, [[0, 1], 1, 1], method="ta", layers=3)
    assert plan[Q1].weights[0] == pytest.approx(0.5)
    with pytest.raises(AdapterIncompatible, match="is in layer 1, but the job's layers is 1"):
        _plan(peft_adapters, method="ta", layers=1)


def test_normalize_divides_each_modules_weights_by_their_sum(peft_adapters: list[Path]) -> None:
    plan = _plan(peft_adapters, [[0, 1], 1, 3], method="ta", normalize=True)
    assert plan[Q0].weights == (0.25, 0.75)  # adapter 0 is out of layer 0
    assert plan[Q1].weights == pytest.approx((0.2, 0.2, 0.6))
    # Adapter 1 has no down_proj; its weight still counts, as a model's does in mergekit.
    assert plan[D0].sources == (2,) and plan[D0].weights == (0.75,)
    # A sum of zero is left as it is (mergekit's guard), not divided by.
    cancel = _plan(peft_adapters, [1, -1, 0], method="ta", normalize=True)
    assert cancel[Q0].weights == (1.0, -1.0)


def test_include_and_exclude(peft_adapters: list[Path]) -> None:
    plan = _plan(peft_adapters, method="ta", modules={"include": ["self_attn"], "exclude": ["k_"]})
    assert set(plan) == {
        Q0,
        Q1,
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.v_proj",
    }
    full = make_plan(
        open_adapters(peft_adapters, ["a", "b", "c"]),
        _spec(peft_adapters, method="ta", modules={"exclude": ["mlp"]}),
    )
    # The output names exactly the modules it has, so no loader wraps a left-out one.
    assert full.target_modules == [mp.module for mp in full.modules]
    assert not any("mlp" in m for m in full.target_modules)
    assert any("left out by the job" in n for n in full.notes)
    with pytest.raises(AdapterIncompatible, match="nothing to merge"):
        _plan(peft_adapters, method="ta", modules={"include": ["nothing-is-called-this"]})
    with pytest.raises(AdapterIncompatible, match="nothing to merge"):
        _plan(peft_adapters, [0, 0, 0], method="ta")


def test_per_adapter_density_per_source(peft_adapters: list[Path]) -> None:
    plan = _plan(
        peft_adapters,
        [{"density": 0.5}, {"density": [{"modules": "q_proj", "value": [0.2, 0.4]}]}, {}],
        method="ties",
        params={"density": 0.3},
    )
    assert plan[Q0].task_params == {"density": (0.5, 0.2, 0.3)}
    assert plan[Q1].task_params == {"density": (0.5, 0.4, 0.3)}
    assert plan[D0].task_params == {"density": (0.5, 0.3)}  # adapter 1 has no down_proj
    assert _plan(peft_adapters, method="ties")[Q0].task_params == {}


def test_pattern_matching_is_bounded(peft_adapters: list[Path]) -> None:
    # One catastrophic pattern on a long name: stopped by the per-match timeout.
    with pytest.raises(PatternLimit, match="catastrophic backtracking"):
        ModuleMatcher().found("(a|aa)+$", "a" * 60 + "b")
    # The job's budget, spent by a clock that jumps a second per match.
    ticks = iter(range(100))
    matcher = ModuleMatcher(budget_s=2.0, clock=lambda: float(next(ticks)))
    assert matcher.found("q", "q_proj") and not matcher.found("k", "q_proj")
    with pytest.raises(PatternLimit, match="over 2 s in total"):
        matcher.found("q", "q_proj")
    # Through the plan it is a limit: the job ends limit_exceeded.
    spec = _spec(peft_adapters, [[{"modules": "mlp", "value": 1}]], method="ta")
    values = ModuleValues(spec, 2, ModuleMatcher(budget_s=0.0))
    with pytest.raises(LimitExceeded, match="module patterns took over 0 s"):
        values.taking(D0, [0])


def test_batched_windows_fold_each_modules_own_weights(
    peft_adapters: list[Path], tmp_path: Path
) -> None:
    """Modules merged a window at a time in one batched call (the GPU's path) take each
    module's own weights and sources, as one by one."""
    from safetensors.torch import load_file

    from worker.merge.runner import run_merge

    spec = _spec(
        peft_adapters,
        [[0, 1], [{"modules": "v_proj", "value": 0}, {"value": [2, 1]}], 1],
        method="ties",
        params={"density": 0.5},
    )
    files = []
    for window in (1, 8):
        out = tmp_path / f"w{window}"
        run_merge(spec, peft_adapters, out, device="cpu", batch_window=window)
        files.append(load_file(out / "adapter_model.safetensors"))
    assert files[0].keys() == files[1].keys()
    assert all((files[0][k] - files[1][k]).abs().max() < 1e-5 for k in files[0])
