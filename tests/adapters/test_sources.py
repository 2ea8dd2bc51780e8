"""One way an input becomes a source (``worker.adapters.opening``): the interface module is a
leaf, every source keeps the one ``close()`` contract, an input named by several entries is
opened and read once, and opening stops as soon as a module limit is crossed or a cancel
comes, before the next input is parsed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs.errors import AdapterInvalid, Canceled, InternalError, LimitExceeded
from jobs.spec import MergeSpec
from tests.hostile.corpus import many_modules
from tests.worker.synthetic import lora_adapter, spec, vera_adapter
from worker.adapters.lora import LoraReader
from worker.adapters.opening import open_adapters
from worker.adapters.streamed import ReadAhead, StreamedLoraReader
from worker.adapters.vera import MAX_VERA_BYTES, VeraReader
from worker.merge.runner import run_merge

ROOT = Path(__file__).resolve().parents[2]


class LocalRemote:
    """A ``RemoteAdapter`` over a local folder: the weights handed out as bytes, as the
    storage layer hands out an S3 object (size, first bytes, ranged fetch, download)."""

    def __init__(self, folder: Path, head_bytes: int = 256 << 10) -> None:
        self.directory = folder
        self.weights = self
        self._data = (folder / "adapter_model.safetensors").read_bytes()
        self.size, self.head = len(self._data), self._data[:head_bytes]
        self.fetches = 0

    def fetch(self, start: int, end: int) -> bytes:
        self.fetches += 1
        return self._data[start:end]

    def download(self, dest: Path) -> None:
        dest.write_bytes(self._data)


def test_the_interface_module_imports_nothing_of_the_project() -> None:
    probe = (
        "import sys, worker.adapters.source; print(' '.join(sorted(m for m in sys.modules "
        "if m.startswith('worker.adapters.') or m.split('.')[0] in ('torch', 'jobs'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.split() == ["worker.adapters.source"], out.stderr


def _sources(tmp_path: Path, read_ahead: ReadAhead) -> list:
    lora = lora_adapter(tmp_path / "lora", r=4, m=32, n=16, modules=3)
    vera = vera_adapter(tmp_path / "vera", r=4, m=32, modules=3)
    remote = LocalRemote(lora_adapter(tmp_path / "remote", r=4, m=32, n=16, modules=3))
    readers = open_adapters([lora, vera, remote], ["lora", "vera", "remote"], read_ahead=read_ahead)
    assert [type(r) for r in readers] == [LoraReader, VeraReader, StreamedLoraReader]
    return readers


def test_every_source_keeps_the_close_contract(tmp_path: Path) -> None:
    """``close()`` releases, may be repeated, and is final: a read after it is refused, by
    the local readers as by the streamed one."""
    with ReadAhead(1 << 20, 1 << 18, connections=1) as read_ahead:
        for reader in _sources(tmp_path, read_ahead):
            module = next(iter(reader.modules))
            A, B = reader.read(module)
            assert A.dtype == B.dtype == torch.float32
            reader.close()
            reader.close()
            with pytest.raises(InternalError, match="read after the input was closed"):
                reader.read(module)


def test_an_input_named_twice_is_opened_and_read_once(tmp_path: Path, monkeypatch) -> None:
    a = lora_adapter(tmp_path / "a", r=4, m=32, n=16, modules=4, seed=1)
    b = lora_adapter(tmp_path / "b", r=2, m=32, n=16, modules=4, seed=2)
    readers = open_adapters([a, b, tmp_path / "a" / ".." / "a"], ["a", "b", "a"])
    assert readers[0] is readers[2] and readers[0] is not readers[1]

    reads: list[str] = []
    real_read = LoraReader.read
    monkeypatch.setattr(
        LoraReader,
        "read",
        lambda self, m, *a, **k: reads.append(self.name) or real_read(self, m, *a, **k),
    )
    job = spec([a, b, a], tmp_path / "twice", method="ta", space="full", params={"alpha": 1.0})
    job["adapters"][2]["weight"] = 0.5
    twice = run_merge(MergeSpec.model_validate(job), [a, b, a], tmp_path / "twice", device="cpu")
    assert sorted(reads) == ["a"] * 4 + ["b"] * 4  # once per module and input, not per entry
    assert [i["sha256"] for i in twice.report["inputs"]][0::2] == [
        twice.report["inputs"][0]["sha256"]
    ] * 2

    # The same update as the one adapter given the sum of the two weights.
    once_spec = spec([a, b], tmp_path / "once", method="ta", space="full", params={"alpha": 1.0})
    once_spec["adapters"][0]["weight"] = 1.5
    once = run_merge(MergeSpec.model_validate(once_spec), [a, b], tmp_path / "once", device="cpu")
    expected = _delta(once.out_dir)
    for module, dw in _delta(twice.out_dir).items():
        torch.testing.assert_close(dw, expected[module], rtol=1e-4, atol=1e-4)


def _delta(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(folder / "adapter_model.safetensors")
    return {
        k.removesuffix(".lora_A.weight"): tensors[k.replace("lora_A", "lora_B")] @ tensors[k]
        for k in tensors
        if k.endswith("lora_A.weight")
    }


def test_the_module_limit_stops_opening_before_the_next_input(
    peft_adapters: list[Path], tmp_path: Path
) -> None:
    good = peft_adapters[0]  # 6 modules
    wide = many_modules(good, tmp_path / "wide", 12)
    broken = tmp_path / "broken"
    lora_adapter(broken, r=4, m=32, n=16)
    (broken / "adapter_model.safetensors").write_bytes(b"\0" * 64)  # never parsed
    with pytest.raises(LimitExceeded, match=r"'wide': 12 LoRA modules, over .* limit of 11"):
        open_adapters([good, wide, broken], ["good", "wide", "broken"], max_modules=11)
    # Within the limit alone, over it together: refused as the union crosses it.
    with pytest.raises(LimitExceeded, match="8 distinct LoRA modules together"):
        open_adapters([*peft_adapters, broken], ["a", "b", "c", "broken"], max_modules=7)
    with pytest.raises(AdapterInvalid, match="'broken'"):  # what the limits spared it
        open_adapters([*peft_adapters, broken], ["a", "b", "c", "broken"], max_modules=8)


def test_a_cancel_between_inputs_stops_opening_and_closes_what_was_open(
    peft_adapters: list[Path], monkeypatch
) -> None:
    opened: list[LoraReader] = []
    real_init = LoraReader.__init__

    def tracked(self, *args, **kwargs) -> None:
        real_init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(LoraReader, "__init__", tracked)
    asked = []
    with pytest.raises(Canceled, match="canceled while opening the inputs"):
        open_adapters(
            peft_adapters, ["a", "b", "c"], should_cancel=lambda: asked.append(1) or len(asked) > 1
        )
    assert len(opened) == 1 and opened[0]._closed


def test_a_remote_vera_adapter_is_sized_before_it_is_copied(tmp_path: Path) -> None:
    lora = lora_adapter(tmp_path / "lora", r=4, m=32, n=16)
    vera = LocalRemote(vera_adapter(tmp_path / "vera", r=4, m=32))
    vera.size = MAX_VERA_BYTES + 1  # what the HEAD said
    vera.download = lambda dest: pytest.fail("downloaded before its size was checked")
    with pytest.raises(LimitExceeded, match=f"over the limit of {MAX_VERA_BYTES}"):
        open_adapters([lora, vera], ["lora", "big-vera"])
