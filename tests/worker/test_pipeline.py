"""Merging modules side by side: order, errors, early stops, thread counts, same results."""

from __future__ import annotations

import random
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from jobs.errors import AdapterInvalid, Canceled
from jobs.spec import MergeSpec
from worker.merge import runner
from worker.merge.pipeline import MAX_MERGE_THREADS, merge_threads, ordered_map
from worker.merge.runner import run_merge


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _jittered(x: int) -> int:
    time.sleep(random.Random(x).uniform(0, 0.01))
    return x * x


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_results_come_in_order(threads):
    assert list(ordered_map(_jittered, range(40), threads)) == [x * x for x in range(40)]


def test_every_call_runs_on_one_intra_op_thread_and_the_count_is_put_back():
    torch.set_num_threads(2)
    seen = list(ordered_map(lambda _: torch.get_num_threads(), range(8), 2))
    assert seen == [1] * 8
    assert torch.get_num_threads() == 2


def test_an_error_reaches_the_consumer_at_its_turn():
    def fn(x: int) -> int:
        if x == 5:
            raise ValueError("five")
        return x

    got = []
    with pytest.raises(ValueError, match="five"):
        for x in ordered_map(fn, range(20), 3):
            got.append(x)
    assert got == [0, 1, 2, 3, 4]


def test_a_consumer_that_stops_early_starts_no_more_work_and_waits_for_the_running():
    started, finished = [], []
    lock = threading.Lock()

    def fn(x: int) -> int:
        with lock:
            started.append(x)
        time.sleep(0.02)
        with lock:
            finished.append(x)
        return x

    threads = 2
    results = ordered_map(fn, range(100), threads)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    results.close()  # what an exception in the consumer (a cancel) does
    assert sorted(started) == sorted(finished)  # nothing still running
    assert len(started) <= 3 + threads + 1  # taken ahead: at most threads + 1
    time.sleep(0.05)
    assert len(started) == len(finished) <= 3 + threads + 1  # and nothing started later


def test_merge_threads_follow_torch_capped_and_one_on_a_gpu_or_in_full_space():
    cpu = torch.device("cpu")
    torch.set_num_threads(2)
    assert merge_threads(cpu, "core") == merge_threads(cpu, "knots") == 2
    torch.set_num_threads(MAX_MERGE_THREADS + 3)
    assert merge_threads(cpu, "core") == MAX_MERGE_THREADS
    assert merge_threads(cpu, "full") == 1
    assert merge_threads(torch.device("cuda"), "core") == 1


def test_one_thread_is_plain_map_with_torch_threads_untouched():
    torch.set_num_threads(2)
    assert list(ordered_map(lambda _: torch.get_num_threads(), range(3), 1)) == [2, 2, 2]


def _spec(dirs: list[Path], method: str, tmp_path: Path) -> MergeSpec:
    return MergeSpec.model_validate(
        {
            "adapters": [{"uri": f"file://{d}"} for d in dirs],
            "method": method,
            "output": {"uri": f"file://{tmp_path}/out"},
        }
    )


@pytest.mark.parametrize("method", ["ta", "tsv"])
def test_a_merge_is_the_same_bit_for_bit_on_any_number_of_threads(
    peft_adapters: list[Path], tmp_path: Path, monkeypatch, method
):
    spec = _spec(peft_adapters, method, tmp_path)
    outputs = []
    for threads in (1, 3):
        monkeypatch.setattr(runner, "merge_threads", lambda device, space, n=threads: n)
        torch.set_num_threads(threads if threads == 1 else 2)  # one CPU: torch runs one thread
        out = tmp_path / f"threads-{threads}"
        outcome = run_merge(spec, peft_adapters, out, device="cpu")
        assert outcome.report["timings"]["merge_threads"] == threads
        outputs.append(load_file(out / "adapter_model.safetensors"))
    one, three = outputs
    assert one.keys() == three.keys()
    for name in one:
        assert torch.equal(one[name], three[name]), name


def _merge_threads_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("merge")]


def test_a_failed_merge_stops_its_threads_before_it_raises(
    peft_adapters: list[Path], tmp_path: Path, monkeypatch
):
    """A NaN in the last module fails the job; no merge thread outlives run_merge."""
    bad = tmp_path / "bad"
    shutil.copytree(peft_adapters[0], bad)
    weights = load_file(bad / "adapter_model.safetensors")
    last = sorted(weights)[-1]
    weights[last] = torch.full_like(weights[last], float("nan"))
    save_file(weights, bad / "adapter_model.safetensors")
    monkeypatch.setattr(runner, "merge_threads", lambda device, space: 2)
    spec = _spec([bad, *peft_adapters[1:]], "ta", tmp_path)
    with pytest.raises(AdapterInvalid, match="NaN or infinite"):
        run_merge(spec, [bad, *peft_adapters[1:]], tmp_path / "out", device="cpu")
    assert _merge_threads_alive() == []
    assert not (tmp_path / "out").exists() and list(tmp_path.glob(".out.partial-*")) == []


def test_a_cancel_stops_taking_modules(peft_adapters: list[Path], tmp_path: Path, monkeypatch):
    calls: list[str] = []
    original = runner._ModuleMerger.__call__

    def counting(self, mp):
        calls.append(mp.module)
        return original(self, mp)

    monkeypatch.setattr(runner._ModuleMerger, "__call__", counting)
    monkeypatch.setattr(runner, "merge_threads", lambda device, space: 2)
    spec = _spec(peft_adapters, "ta", tmp_path)
    done: list[int] = []
    with pytest.raises(Canceled, match="canceled after 2 of"):
        run_merge(
            spec, peft_adapters, tmp_path / "out", device="cpu",
            on_progress=lambda p: done.append(p.modules_done) if p.stage == "merge" else None,
            should_cancel=lambda: len(done) >= 2,
        )  # fmt: skip
    assert _merge_threads_alive() == []
    assert len(calls) <= 2 + 2 + 1  # the two consumed, and at most threads + 1 taken ahead
    assert not (tmp_path / "out").exists()
