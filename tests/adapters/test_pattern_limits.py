"""Rank/alpha patterns are bounded per adapter: at most MAX_PATTERNS of them, checked when the
config is read, and PATTERN_BUDGET_S of matching in total; beyond either, limit_exceeded
naming the adapter (a single catastrophic pattern stays adapter_invalid)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from jobs.errors import LimitExceeded
from tests.conftest import edit_config
from worker.adapters import config as config_module
from worker.adapters import open_adapters
from worker.adapters.config import (
    MAX_PATTERNS,
    PATTERN_BUDGET_S,
    PatternBudget,
    PatternBudgetExceeded,
    PatternTimeout,
    _pattern_key,
    read_adapter_config,
)
from worker.cli import main

Q0 = "model.layers.0.self_attn.q_proj"


def _patterns(count: int) -> tuple[dict[str, int], dict[str, float]]:
    """``count`` patterns that match none of the tiny model's modules, split over both kinds."""
    ranks = {f"no_such_module_{i}": 4 for i in range(count // 2)}
    alphas = {f"nor_this_one_{i}": 8.0 for i in range(count - count // 2)}
    return ranks, alphas


def test_over_max_patterns_is_refused_from_the_config_alone(adapter_copy) -> None:
    adapter = adapter_copy(0)
    ranks, alphas = _patterns(MAX_PATTERNS + 1)
    edit_config(adapter, rank_pattern=ranks, alpha_pattern=alphas)
    (adapter / "adapter_model.safetensors").write_bytes(b"not read")  # the header comes later
    with pytest.raises(LimitExceeded) as info:
        open_adapters([adapter], ["many-patterns"])
    assert info.value.code == "limit_exceeded"
    assert info.value.message == (
        f"adapter 'many-patterns': {MAX_PATTERNS + 1} rank_pattern and alpha_pattern entries, "
        f"over the limit of {MAX_PATTERNS} per adapter"
    )


def test_max_patterns_is_allowed(adapter_copy, tmp_path: Path, capsys) -> None:
    adapter = adapter_copy(0)
    ranks, alphas = _patterns(MAX_PATTERNS)
    edit_config(adapter, rank_pattern=ranks, alpha_pattern=alphas)
    assert len(read_adapter_config(adapter, "ok").rank_pattern) == MAX_PATTERNS // 2
    out = tmp_path / "out"
    assert main(["merge", "-q", "--device", "cpu", str(adapter), "-o", str(out)]) == 0, (
        capsys.readouterr().err
    )


class _SlowClock:
    """A clock that advances ``step`` seconds each time it is read: every match looks slow."""

    def __init__(self, step: float) -> None:
        self.ticks = itertools.count()
        self.step = step

    def __call__(self) -> float:
        return next(self.ticks) * self.step


def test_total_matching_time_is_bounded_per_adapter(
    adapter_copy, tmp_path: Path, monkeypatch, capsys
) -> None:
    # 100 patterns × 6 modules × 2 lookups, each "taking" 5 ms: 6 s, over the 2 s budget,
    # while no single match comes near its own 0.2 s timeout.
    adapter = adapter_copy(0)
    ranks, alphas = _patterns(100)
    edit_config(adapter, rank_pattern=ranks, alpha_pattern=alphas)
    monkeypatch.setattr(config_module, "_clock", _SlowClock(0.0025))
    out = tmp_path / "out"
    assert main(["merge", "-q", "--device", "cpu", str(adapter), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "coremerge: error: limit_exceeded: adapter 'copy-0': rank/alpha pattern matching took "
        f"over {PATTERN_BUDGET_S:g} s in total, the limit per adapter (too many patterns or "
        "modules, or patterns too slow to match)"
    )
    assert not out.exists()


def test_a_match_cut_short_by_the_budget_is_the_budget_not_the_pattern() -> None:
    hostile = {"(a|aa)+b": 4}  # exponential backtracking on a run of "a"
    name = "model." + "a" * 48
    with pytest.raises(PatternTimeout):  # alone: the pattern's own 0.2 s timeout
        _pattern_key(hostile, name, PatternBudget())
    with pytest.raises(PatternBudgetExceeded):  # 0.05 s left: the adapter's budget ran out
        _pattern_key(hostile, name, PatternBudget(seconds=0.05))
    spent = PatternBudget(seconds=1.0)
    spent.charge(1.0)
    with pytest.raises(PatternBudgetExceeded):  # nothing left: refused before matching
        _pattern_key({"q_proj": 4}, Q0, spent)


def test_patterns_still_apply_as_peft_matches_them(peft_adapters: list[Path]) -> None:
    (reader,) = open_adapters([peft_adapters[2]], ["patterns"])
    assert reader.modules["model.layers.0.self_attn.k_proj"].rank == 6
    assert reader.modules["model.layers.1.self_attn.q_proj"].scaling == pytest.approx(16 / 2)
