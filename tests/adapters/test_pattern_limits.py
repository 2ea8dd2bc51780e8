"""Rank/alpha patterns are bounded per adapter: at most MAX_PATTERNS of them, checked when the
config is read, and PATTERN_BUDGET_S of matching in total; beyond either, limit_exceeded
naming the adapter (a single catastrophic pattern stays adapter_invalid)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from jobs.errors import AdapterInvalid, LimitExceeded
from tests.conftest import edit_config
from worker.adapters import config as config_module
from worker.adapters import open_adapters
from worker.adapters.config import (
    MAX_PATTERN_CHARS,
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


# -- issue 22 §2: nothing is compiled before it is bounded


@pytest.mark.parametrize(
    ("pattern", "code", "says"),
    [
        # regex unrolls counted repeats when compiling: > 3 GiB, and ~1e11 bytes
        (r"((a{1000}){1000}){10}", "limit_exceeded", "repeats 1000 times, over the limit of 100"),
        (r"(a{20000}){20000}", "limit_exceeded", "repeats 20000 times, over the limit of 100"),
        (r"(a+)+b", "adapter_invalid", "repeats a group that repeats itself"),
        (r"(x{2}\.){3}q_proj", "adapter_invalid", "repeats a group that repeats itself"),
        ("q_proj|" + "x" * MAX_PATTERN_CHARS, "limit_exceeded", "characters long, over the limit"),
    ],
    ids=["nested-counted", "large-counted", "nested-plus", "nested-small-counts", "too-long"],
)
def test_a_costly_pattern_is_refused_before_it_is_compiled(
    adapter_copy, monkeypatch, pattern: str, code: str, says: str
) -> None:
    adapter = adapter_copy(0)
    edit_config(adapter, rank_pattern={pattern: 4})
    compiled = []
    monkeypatch.setattr(config_module.regex, "compile", lambda *a, **k: compiled.append(a))
    with pytest.raises((LimitExceeded, AdapterInvalid)) as info:
        read_adapter_config(adapter, "costly")
    assert info.value.code == code
    assert info.value.message.startswith("adapter 'costly': rank/alpha pattern ")
    assert says in info.value.message, info.value.message
    assert compiled == []


def test_the_117_byte_config_of_the_issue_is_refused_at_once(tmp_path: Path) -> None:
    import json
    import resource
    import time

    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 1, "rank_pattern": {"((a{1000}){1000}){10}": 1}})
    )
    assert (tmp_path / "adapter_config.json").stat().st_size < 120
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(LimitExceeded):
        read_adapter_config(tmp_path, "tiny")
    assert time.perf_counter() - started < 0.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 64 << 10  # KiB: < 64 MiB


@pytest.mark.parametrize(
    "pattern",
    [r"(.*\.)?q_proj", r"layers\.(\d+)\.self_attn\.(q|k)_proj", r"model\.layers\.1[0-9]\.mlp\..*",
     r"(ab){2}c{3}", r"[a-z]{100}"],
)  # fmt: skip
def test_the_patterns_peft_users_write_are_allowed(adapter_copy, pattern: str) -> None:
    adapter = adapter_copy(0)
    edit_config(adapter, rank_pattern={pattern: 4})
    assert pattern in read_adapter_config(adapter, "fine").rank_pattern


def test_compiling_a_pattern_counts_in_the_adapters_budget(monkeypatch) -> None:
    """The budget times compile and match together: three patterns that each take 0.9 s to
    compile (a fake clock) exhaust the 2 s before a third match."""
    clock = [0.0]

    def slow_compile(key: str):
        clock[0] += 0.9
        return compile_pattern(key)

    compile_pattern = config_module._compile
    monkeypatch.setattr(config_module, "_clock", lambda: clock[0])
    monkeypatch.setattr(config_module, "_compile", slow_compile)
    budget = PatternBudget()
    patterns = {f"no_such_module_{i}": 4 for i in range(3)}
    _pattern_key(dict(list(patterns.items())[:2]), Q0, budget)
    assert budget.spent == pytest.approx(1.8)
    with pytest.raises(PatternBudgetExceeded):
        _pattern_key(patterns, "model.layers.1.self_attn.q_proj", budget)
