"""A safetensors header is bounded before it is read or parsed (``worker.adapters.header``):
its length by what the module limit can need, its entries counted in the raw bytes before
the JSON becomes objects, and what its parsed form keeps for the whole merge declared in the
source's ``held_bytes``."""

from __future__ import annotations

import gc
import json
import struct
import tracemalloc
from pathlib import Path

import pytest

from jobs.errors import LimitExceeded
from tests.adapters.test_sources import LocalRemote
from tests.worker.synthetic import lora_adapter, vera_adapter
from worker.adapters import header as header_module
from worker.adapters.format import WEIGHTS_NAME, header_length, max_header_bytes
from worker.adapters.header import (
    HEADER_BYTES_ALLOWED,
    PARSED_BYTES_PER_HEADER_BYTE,
    held_for_header,
)
from worker.adapters.opening import open_adapters
from worker.adapters.streamed import ReadAhead


def tiny_modules(folder: Path, modules: int) -> Path:
    """A valid LoRA adapter of ``modules`` modules of 1 × 1: a large header, no data."""
    return lora_adapter(folder, r=1, m=1, n=1, modules=modules, random=False)


def test_a_header_longer_than_the_module_limit_needs_is_refused_unread(tmp_path: Path) -> None:
    folder = tiny_modules(tmp_path / "many", 3000)  # a 600 KB header
    length = header_length((folder / WEIGHTS_NAME).read_bytes()[:8])
    assert length > max_header_bytes(128)
    with pytest.raises(LimitExceeded) as info:
        open_adapters([folder], ["many"], max_modules=128)
    assert info.value.message == (
        f"adapter 'many': {WEIGHTS_NAME} has a {length}-byte header, more than the "
        f"{max_header_bytes(128)} bytes that this service's limit of 128 modules can need "
        "(COREMERGE_MAX_MODULES)"
    )
    assert len(open_adapters([folder], ["many"])[0].modules) == 3000  # no limit: the CLI


def test_entries_are_counted_before_the_json_is_parsed(tmp_path: Path, monkeypatch) -> None:
    folder = tiny_modules(tmp_path / "many", 300)  # 600 tensors in a 60 KB header
    assert header_length((folder / WEIGHTS_NAME).read_bytes()[:8]) < max_header_bytes(128)
    monkeypatch.setattr(
        header_module, "parse_header", lambda *a: pytest.fail("parsed before it was counted")
    )
    with pytest.raises(LimitExceeded, match=r"lists 600 tensors, more than the 258 that .* 128"):
        open_adapters([folder], ["many"], max_modules=128)
    with (  # read as the merge goes
        pytest.raises(LimitExceeded, match="lists 600 tensors"),
        ReadAhead(1 << 20, 1 << 18, connections=1) as read_ahead,
    ):
        open_adapters([LocalRemote(folder)], ["many"], read_ahead=read_ahead, max_modules=128)


def test_a_streamed_header_beyond_the_first_read_is_bounded_before_it_is_fetched(
    tmp_path: Path,
) -> None:
    remote = LocalRemote(tiny_modules(tmp_path / "many", 3000), head_bytes=4096)
    with (
        pytest.raises(LimitExceeded, match="-byte header, more than the"),
        ReadAhead(1 << 20, 1 << 18, connections=1) as read_ahead,
    ):
        open_adapters([remote], ["many"], read_ahead=read_ahead, max_modules=128)
    assert remote.fetches == 0


def _retained(open_source) -> tuple[object, int]:
    """A source, and the bytes that opening it left allocated (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    source = open_source()
    gc.collect()
    kept = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return source, kept


@pytest.mark.parametrize("kind", ["lora", "vera", "streamed"])
def test_held_bytes_count_what_the_parsed_header_keeps(kind: str, tmp_path: Path) -> None:
    """Every reader keeps at most PARSED_BYTES_PER_HEADER_BYTE per header byte once open,
    and says so in ``held_bytes`` beyond the allowance the estimate's fixed part covers."""
    modules = 4000  # an 800 KB header of 1 × 1 modules: the most objects per header byte
    if kind == "vera":
        folder = vera_adapter(tmp_path / kind, r=1, m=1, modules=modules)
        lora = tiny_modules(tmp_path / "sizes", modules)  # gives the VeRA modules' inputs
        inputs, names = [lora, folder], ["sizes", kind]
    else:
        folder = tiny_modules(tmp_path / kind, modules)
        inputs = [LocalRemote(folder) if kind == "streamed" else folder]
        names = [kind]
    length = header_length((folder / WEIGHTS_NAME).read_bytes()[:8])
    with ReadAhead(1 << 20, 1 << 18, connections=1) as read_ahead:
        if kind == "vera":  # only the VeRA reader's own memory
            sizes = open_adapters(inputs[:1], names[:1])[0]
            known = {m: 1 for m in sizes.modules}
            from worker.adapters.config import read_adapter_config
            from worker.adapters.vera import VeraReader

            config = read_adapter_config(folder, kind)
            source, kept = _retained(lambda: VeraReader(folder, kind, config, known))
        else:
            source, kept = _retained(lambda: open_adapters(inputs, names, read_ahead=read_ahead)[0])
        assert kept <= PARSED_BYTES_PER_HEADER_BYTE * length + (256 << 10), (kept, length)
        assert source.held_bytes >= held_for_header(length) > 0
        source.close()


def test_a_small_header_rides_in_the_allowance(tmp_path: Path) -> None:
    folder = tiny_modules(tmp_path / "small", 10)
    assert header_length((folder / WEIGHTS_NAME).read_bytes()[:8]) < HEADER_BYTES_ALLOWED
    assert held_for_header(HEADER_BYTES_ALLOWED) == 0
    (source,) = open_adapters([folder], ["small"])
    assert source.held_bytes == source._mapped_bytes()


def test_a_header_of_the_limit_is_allowed(tmp_path: Path) -> None:
    """An adapter of exactly the module limit, with long module names, fits the bound."""
    folder = tmp_path / "long-names"
    lora_adapter(folder, r=1, m=1, n=1, modules=1)  # its config; the weights are rewritten
    name = "base_model.model." + "x" * 300 + ".layers.{}.q.lora_{}.weight"
    header = {"__metadata__": {"format": "pt"}}
    for i in range(128):
        for which, at in (("A", 0), ("B", 4)):
            start = 8 * i + at
            header[name.format(i, which)] = {
                "dtype": "F32", "shape": [1, 1], "data_offsets": [start, start + 4],
            }  # fmt: skip
    text = json.dumps(header, separators=(",", ":")).encode()
    (folder / WEIGHTS_NAME).write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 8 * 128)
    (source,) = open_adapters([folder], ["long-names"], max_modules=128)
    assert len(source.modules) == 128
