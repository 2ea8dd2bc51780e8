"""The bad-adapter corpus through ``coremerge merge`` (one line on stderr naming the adapter and
the reason, exit status 2, nothing at OUT_DIR), and the service limits that the runner and
the storage layer enforce before reading (module count from the headers, sizes before
downloading). The service end to end: ``tests/integration/test_hostile.py``."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest

from jobs.errors import LimitExceeded
from jobs.spec import MAX_ADAPTERS, MergeSpec
from tests.hostile.corpus import (
    CASES,
    WEIGHTS,
    Case,
    long_header,
    many_modules,
    many_tensors,
    padded,
)
from tests.storage_helpers import fetch_adapters
from worker.adapters import format as safetensors_header
from worker.adapters.format import max_header_bytes
from worker.cli import main
from worker.merge.runner import run_merge
from worker.storage import Storage


def _merge_fails(capsys, adapters: list[Path | str], out: Path) -> str:
    code = main(["merge", "--quiet", "--device", "cpu", *map(str, adapters), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err  # one clear line, never a traceback
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))
    return err.strip()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_adapter_is_refused_by_the_cli(
    case: Case, peft_adapters: list[Path], tmp_path: Path, capsys
) -> None:
    good = peft_adapters[0]
    bad = case.make(good, tmp_path)
    err = _merge_fails(capsys, [good, bad], tmp_path / "out")
    assert err.startswith(f"coremerge: error: {case.code}: "), err
    assert case.says in err, err
    assert f"'{case.name}'" in err, err  # names the adapter


def test_more_adapters_than_the_spec_allows(peft_adapters: list[Path], tmp_path: Path, capsys):
    err = _merge_fails(capsys, [peft_adapters[0]] * (MAX_ADAPTERS + 1), tmp_path / "out")
    assert f"adapters: List should have at most {MAX_ADAPTERS} items" in err, err


def test_header_check_docstring_example() -> None:
    result = doctest.testmod(safetensors_header)
    assert result.attempted > 0 and result.failed == 0


def _spec(dirs: list[Path], out: Path) -> MergeSpec:
    return MergeSpec.model_validate(
        {"adapters": [{"uri": str(d)} for d in dirs], "method": "ta", "output": {"uri": str(out)}}
    )


def test_module_limit_is_checked_from_the_headers(peft_adapters: list[Path], tmp_path: Path):
    good = peft_adapters[0]  # 6 modules
    wide = many_modules(good, tmp_path / "wide", 12)
    out = tmp_path / "out"
    with pytest.raises(LimitExceeded, match=r"'wide': 12 LoRA modules, over .* limit of 11"):
        run_merge(_spec([good, wide], out), [good, wide], out, device="cpu", max_modules=11)
    # Two adapters within the limit alone, over it together (q, v, down + q, k, down + k's).
    with pytest.raises(LimitExceeded, match="8 distinct LoRA modules together"):
        run_merge(_spec(peft_adapters, out), peft_adapters, out, device="cpu", max_modules=7)
    assert not out.exists()
    done = run_merge(_spec([good, wide], out), [good, wide], out, device="cpu", max_modules=12)
    assert done.modules == 12


def test_header_limits_are_checked_before_the_header_is_parsed(
    peft_adapters: list[Path], tmp_path: Path
) -> None:
    good, out = peft_adapters[0], tmp_path / "out"
    long = long_header(good, tmp_path / "long", max_header_bytes(16))
    many = many_tensors(good, tmp_path / "many", 16)
    for bad, says in (
        (long, r"'long': adapter_model.safetensors has a \d+-byte header, more than the 82944"),
        (many, r"'many': adapter_model.safetensors lists 72 tensors, more than the 34"),
    ):
        with pytest.raises(LimitExceeded, match=says):
            run_merge(_spec([good, bad], out), [good, bad], out, device="cpu", max_modules=16)
    assert not out.exists()


def test_size_limits_are_checked_before_reading(peft_adapters: list[Path], tmp_path: Path):
    good = peft_adapters[0]
    size = sum((good / n).stat().st_size for n in ("adapter_config.json", WEIGHTS))
    big = padded(good, tmp_path / "big", 2 * size + 1)
    uris = [f"file://{good}", f"file://{big}"]
    with pytest.raises(
        LimitExceeded, match=r"big/: \d+ bytes, over .*\(COREMERGE_MAX_ADAPTER_BYTES\)"
    ):
        fetch_adapters(Storage(None, max_adapter_bytes=2 * size), uris, tmp_path / "in")
    with pytest.raises(LimitExceeded, match="COREMERGE_MAX_JOB_BYTES"):
        fetch_adapters(
            Storage(None, max_adapter_bytes=3 * size, max_job_bytes=3 * size), uris, tmp_path / "in"
        )
    assert fetch_adapters(
        Storage(None, max_adapter_bytes=3 * size, max_job_bytes=4 * size), uris, tmp_path / "in"
    ) == [good, big]


def test_a_weight_that_overflows_float32_is_refused(
    peft_adapters: list[Path], tmp_path: Path, capsys
) -> None:
    good = peft_adapters[0]
    err = _merge_fails(capsys, [good, good, "--weights", "1,1e39"], tmp_path / "out")
    assert "adapter_invalid: adapter 'task-0': module " in err and "overflow float32" in err, err
