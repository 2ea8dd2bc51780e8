"""A corpus of bad adapters, each made at test time from a good PEFT adapter (nothing binary is
committed), with the error every path must end in: the CLI (``tests/hostile/test_local.py``)
and the service end to end (``tests/integration/test_hostile.py``).

Each :class:`Case` copies a good adapter (``tests/conftest.py``'s ``peft_adapters[0]``: r = 4
on q_proj, v_proj and down_proj of a 64-wide, 2-layer Llama) into a folder named after the
case and breaks it in one way. The folder's name is the adapter's name in every message, so a
test checks that the message names the adapter and the reason. Limits (bytes, modules,
adapters) depend on settings, so their builders (:func:`padded`, :func:`many_modules`) take
the size to reach.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.conftest import edit_config

__all__ = ["CASES", "WEIGHTS", "Case", "long_header", "many_modules", "many_tensors", "padded"]

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@dataclass(frozen=True)
class Case:
    """One bad adapter: how to break a good one, the job error code, a fragment of the message."""

    name: str
    breaks: Callable[[Path], None]
    code: str
    says: str

    def make(self, good: Path, parent: Path) -> Path:
        """A copy of ``good`` in ``parent/<name>``, broken."""
        folder = parent / self.name
        shutil.copytree(good, folder)
        self.breaks(folder)
        return folder


# -- tools


def _tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = folder / WEIGHTS
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _raw(folder: Path) -> tuple[dict, bytes]:
    """The safetensors header (parsed) and the data section of an adapter's weights."""
    blob = (folder / WEIGHTS).read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def _write_raw(folder: Path, header: dict, data: bytes, length: int | None = None) -> None:
    """Write a header and data as they are, with ``length`` as the prefix if given (a lie)."""
    text = json.dumps(header, separators=(",", ":")).encode()
    prefix = struct.pack("<Q", len(text) if length is None else length)
    (folder / WEIGHTS).write_bytes(prefix + text + data)


def _cut(keep: int) -> Callable[[Path], None]:
    def breaks(folder: Path) -> None:
        path = folder / WEIGHTS
        path.write_bytes(path.read_bytes()[:keep])

    return breaks


def _header_length(length: int) -> Callable[[Path], None]:
    def breaks(folder: Path) -> None:
        header, data = _raw(folder)
        _write_raw(folder, header, data, length)

    return breaks


def _offsets_lie(folder: Path) -> None:
    # The first tensor claims 4 more bytes than it has: it overlaps the next one.
    header, data = _raw(folder)
    first = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    start, end = header[first]["data_offsets"]
    header[first]["data_offsets"] = [start, end + 4]
    _write_raw(folder, header, data)


def _header_not_json(folder: Path) -> None:
    header, data = _raw(folder)
    text = json.dumps(header).encode()
    (folder / WEIGHTS).write_bytes(
        struct.pack("<Q", len(text)) + b"{" + b"?" * (len(text) - 1) + data
    )


def _set(key: str, index: tuple[int, int], value: float) -> Callable[[Path], None]:
    return lambda folder: _tensors(folder, lambda t: t[key].__setitem__(index, value))


def _rank_mismatch(folder: Path) -> None:
    key = f"{Q0}.lora_B.weight"
    _tensors(folder, lambda t: t.__setitem__(key, t[key][:, :3].contiguous()))


def _wider_inputs(folder: Path) -> None:
    # Same module names, twice the input width: a valid adapter of another model.
    def edit(t: dict[str, torch.Tensor]) -> None:
        for key in [k for k in t if ".lora_A." in k]:
            t[key] = torch.randn(t[key].shape[0], 2 * t[key].shape[1])

    _tensors(folder, edit)


def _pickle_only(folder: Path) -> None:
    # A real pickle (torch.save) of the same tensors; it must never be loaded.
    torch.save(load_file(folder / WEIGHTS), folder / "adapter_model.bin")
    (folder / WEIGHTS).unlink()


def _add(key: str, tensor: torch.Tensor) -> Callable[[Path], None]:
    return lambda folder: _tensors(folder, lambda t: t.__setitem__(key, tensor))


def _config(**changes: object) -> Callable[[Path], None]:
    return lambda folder: edit_config(folder, **changes)


def _backtracking_pattern(folder: Path) -> None:
    # A rank_pattern that backtracks exponentially on a module named with a long run of "a".
    edit_config(folder, rank_pattern={"(a|aa)+b": 4})
    module = "base_model.model.model." + "a" * 48

    def edit(t: dict[str, torch.Tensor]) -> None:
        t[f"{module}.lora_A.weight"] = torch.randn(4, 64)
        t[f"{module}.lora_B.weight"] = torch.randn(64, 4)

    _tensors(folder, edit)


def _int_factor(folder: Path) -> None:
    key = f"{Q0}.lora_A.weight"
    _tensors(folder, lambda t: t.__setitem__(key, t[key].to(torch.int32)))


CASES: list[Case] = [
    Case("truncated-tail", _cut(-100), "adapter_invalid", "not a valid safetensors file"),
    Case("truncated-header", _cut(40), "adapter_invalid", "does not fit in the file's 40 bytes"),
    Case("empty-weights", _cut(0), "adapter_invalid", "too short for a safetensors file"),
    Case("header-offsets-lie", _offsets_lie, "adapter_invalid", "offset"),
    Case(
        "header-length-2-40",
        _header_length(2**40),
        "adapter_invalid",
        "header length 1099511627776 is over the 100000000-byte limit",
    ),
    Case(
        "header-length-over-safetensors-limit",
        _header_length(100_000_001),
        "adapter_invalid",
        "header length 100000001 is over the 100000000-byte limit",
    ),
    Case("header-not-json", _header_not_json, "adapter_invalid", "invalid JSON in header"),
    Case(
        "nan-factor",
        _set(f"{Q0}.lora_A.weight", (0, 0), float("nan")),
        "adapter_invalid",
        "NaN or infinite",
    ),
    Case(
        "inf-factor",
        _set("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight", (0, 0), float("inf")),
        "adapter_invalid",
        "'model.layers.1.mlp.down_proj' has NaN or infinite values",
    ),
    Case("int-factor", _int_factor, "adapter_invalid", "has dtype I32, expected a float type"),
    Case(
        "rank-mismatch",
        _rank_mismatch,
        "adapter_invalid",
        "lora_A has rank 4 but lora_B has rank 3",
    ),
    Case(
        "wrong-shapes",
        _wider_inputs,
        "adapter_incompatible",
        "has different shapes across adapters",  # valid alone; wrong beside the good one
    ),
    Case("pickle-only", _pickle_only, "adapter_invalid", "adapter_model.bin"),
    Case(
        "dora-config", _config(use_dora=True), "adapter_invalid", "DoRA (use_dora) is not supported"
    ),
    Case(
        "dora-magnitude-tensor",
        _add(f"{Q0}.lora_magnitude_vector", torch.ones(64)),
        "adapter_invalid",
        "DoRA (lora_magnitude_vector) is not supported",
    ),
    Case(
        "missing-config",
        lambda f: (f / CONFIG).unlink(),
        "adapter_invalid",
        "no adapter_config.json",
    ),
    Case(
        "nan-alpha",
        _config(lora_alpha=float("nan")),
        "adapter_invalid",
        "lora_alpha must be a finite number",
    ),
    Case(
        "config-wrong-types",
        _config(target_modules=[{"q": 1}], base_model_name_or_path=["a", "b"]),
        "adapter_invalid",
        "base_model_name_or_path must be a string, got list; target_modules must be",
    ),
    Case(
        "unknown-peft-type",
        _config(peft_type="IA3"),
        "adapter_invalid",
        "peft_type 'IA3' is not supported",
    ),
    Case(
        "backtracking-rank-pattern",
        _backtracking_pattern,
        "adapter_invalid",
        "rank/alpha pattern '(a|aa)+b' takes over",
    ),
    Case(
        "counted-repeat-pattern",  # regex would unroll it into > 3 GiB when compiling
        _config(rank_pattern={"((a{1000}){1000}){10}": 4}),
        "limit_exceeded",
        "rank/alpha pattern '((a{1000}){1000}){10}' repeats 1000 times, over the limit of 100",
    ),
    Case(
        "nested-repeat-pattern",
        _config(alpha_pattern={r"(\w+\.)+q_proj": 16}),
        "adapter_invalid",
        "repeats a group that repeats itself",
    ),
    Case(
        "long-pattern",
        _config(rank_pattern={"q_proj|" + "x" * 600: 4}),
        "limit_exceeded",
        "characters long, over the limit of 512",
    ),
    Case(
        "huge-config",  # valid JSON, refused by its size (from the HEAD: never copied)
        _config(notes="x" * (1 << 20)),
        "adapter_invalid",
        "is larger than 1 MiB",
    ),
    Case(
        "lora-ga-init",  # like PiSSA, it rewrites the base weight
        _config(init_lora_weights="lora_ga"),
        "adapter_invalid",
        "init_lora_weights='lora_ga' changes the base weights and is not supported",
    ),
    Case(
        "alora",
        _config(alora_invocation_tokens=[32001, 32002]),
        "adapter_invalid",
        "aLoRA (alora_invocation_tokens) applies only after its invocation tokens and is not",
    ),
    Case(
        "qalora",
        _config(use_qalora=True, qalora_group_size=16),
        "adapter_invalid",
        "QALoRA (use_qalora) applies A to pooled inputs and is not supported",
    ),
    Case(
        "bdlora",
        _config(use_bdlora={"target_modules_bd_a": ["q_proj"], "nblocks": 2}),
        "adapter_invalid",
        "BD-LoRA (use_bdlora) splits its factors in blocks across devices and is not supported",
    ),
    Case(
        "arrow",
        _config(arrow_config={"top_k": 3, "router_temperature": 1.0}),
        "adapter_invalid",
        "Arrow (arrow_config) routes each token among several LoRA experts and is not supported",
    ),
    Case(
        "too-many-patterns",
        _config(rank_pattern={f"no_such_module_{i}": 4 for i in range(1025)}),
        "limit_exceeded",
        "1025 rank_pattern and alpha_pattern entries, over the limit of 1024 per adapter",
    ),
    Case(
        "stray-key",
        _add("foo.weight", torch.zeros(4, 4)),
        "adapter_invalid",
        "tensor 'foo.weight': a full weight",
    ),
    Case(
        "not-lora-a-or-b",
        _add(f"{Q0}.lora_C.weight", torch.zeros(4, 64)),
        "adapter_invalid",
        f"tensor '{Q0}.lora_C.weight': not a LoRA factor",
    ),
]


def padded(good: Path, folder: Path, nbytes: int) -> Path:
    """A copy of ``good`` whose weights file is a *valid* safetensors file of at least
    ``nbytes`` (padded with header metadata): too big by size alone."""
    shutil.copytree(good, folder)
    path = folder / WEIGHTS
    tensors = load_file(path)
    pad = max(0, nbytes - path.stat().st_size)
    save_file(tensors, path, metadata={"format": "pt", "padding": "x" * pad})
    return folder


def many_modules(good: Path, folder: Path, count: int) -> Path:
    """A copy of ``good`` with its layer-0 factors repeated over enough layers to make at
    least ``count`` LoRA modules: a valid adapter, too big by its module count alone."""
    shutil.copytree(good, folder)
    path = folder / WEIGHTS
    tensors = load_file(path)
    layer0 = {k: v for k, v in tensors.items() if ".layers.0." in k}
    per_layer = len(layer0) // 2
    for layer in range(1, -(-count // per_layer)):
        for key, value in layer0.items():
            tensors[key.replace(".layers.0.", f".layers.{layer}.")] = value.clone()
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


def _tiny_tensors(good: Path, folder: Path, modules: int) -> Path:
    """A copy of ``good`` whose weights are ``modules`` LoRA modules of 1 × 1: a valid file
    whose header is almost all it holds."""
    shutil.copytree(good, folder)
    tensors = {}
    for i in range(modules):
        tensors[f"base_model.model.model.layers.{i}.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 1)
        tensors[f"base_model.model.model.layers.{i}.mlp.up_proj.lora_B.weight"] = torch.zeros(1, 4)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    return folder


def many_tensors(good: Path, folder: Path, max_modules: int) -> Path:
    """Over twice ``max_modules`` tensors in a header short enough for that many modules:
    refused when its entries are counted, before the JSON is parsed."""
    return _tiny_tensors(good, folder, max_modules + 20)


def long_header(good: Path, folder: Path, nbytes: int) -> Path:
    """A valid adapter whose header is longer than ``nbytes`` (many tiny modules): refused
    from its length alone, before the header is read."""
    return _tiny_tensors(good, folder, nbytes // 200 + 1)
