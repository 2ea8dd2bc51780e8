"""Opening a job's inputs: the one place that decides which reader reads an input.

    open_adapters(inputs, names)    the job's inputs, each distinct one opened once, LoRA first
    └── _open(input, name, config)  by where the input lies and its config's peft_type
        ├── LoraReader              a LoRA adapter in a local folder (worker.adapters.lora)
        ├── VeraReader              a VeRA adapter (worker.adapters.vera); a remote one is
        │                           copied beside its config first: small, and capped
        └── StreamedLoraReader      a remote LoRA adapter, read as the merge goes
                                    (worker.adapters.streamed, within the job's ReadAhead)

An input is a local folder (a ``Path``) or what the storage layer hands out for an adapter
elsewhere (a :class:`worker.adapters.source.RemoteAdapter`: a config and the weights'
bytes). Opening reads configs and headers only, and is bounded as it goes: every header by
what ``max_modules`` can need (``worker.adapters.header``), each adapter's modules and the
running union of them by ``max_modules`` itself, and ``should_cancel`` is asked between
inputs, so neither a hostile header nor a long list of inputs holds a worker after it has
been refused or canceled. Entries naming the same input (the same folder, or the same
``RemoteAdapter``, which storage hands out once per URI and ETag) share one source.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from jobs.errors import AdapterNotFound, Canceled, LimitExceeded

from .config import LoraAdapterConfig, read_adapter_config
from .format import WEIGHTS_NAME
from .lora import LoraReader
from .source import AdapterSource, InputSizes, RemoteAdapter
from .streamed import ReadAhead, StreamedLoraReader
from .vera import VeraReader, check_vera_size

__all__ = ["open_adapter", "open_adapters"]

#: A job's input: a local folder, or an adapter elsewhere as storage hands it out.
Input = Path | RemoteAdapter


def open_adapter(
    directory: Path, name: str, *, known_input_sizes: InputSizes | None = None
) -> AdapterSource:
    """The source for the adapter in the local folder ``directory``, LoRA or VeRA by its
    config. A VeRA adapter's input sizes come from ``known_input_sizes`` (e.g. the LoRA
    inputs of the same job), else from the base model's local config."""
    directory = Path(directory)
    config = _config(directory, name)
    return _open(directory, name, config, known_input_sizes or {}, None, None)


def open_adapters(
    inputs: Sequence[Input | str],
    names: Sequence[str],
    *,
    read_ahead: ReadAhead | None = None,
    max_modules: int | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> list[AdapterSource]:
    """One source per entry of ``inputs`` (in their order), each distinct input opened once.
    The LoRA ones are opened first: their modules' input sizes are what a VeRA input of the
    same job, opened next, needs. Remote LoRA inputs share ``read_ahead`` (required when
    there are any). Raises ``LimitExceeded`` as soon as one adapter, or all of them so far,
    have more than ``max_modules`` modules, and ``Canceled`` when ``should_cancel()`` says
    so between two inputs; the sources already open are closed then."""
    entries = [Path(i) if isinstance(i, str) else i for i in inputs]
    first: dict[object, int] = {}
    owner = [first.setdefault(_identity(where), i) for i, where in enumerate(entries)]
    configs = {i: _config(_folder(entries[i]), names[i]) for i in first.values()}
    order = sorted(first.values(), key=lambda i: configs[i].peft_type == "VERA")  # LoRA first
    share = _share(entries, configs, read_ahead)
    opened: dict[int, AdapterSource] = {}
    known: InputSizes = {}
    union: set[str] = set()
    try:
        for i in order:
            if should_cancel is not None and should_cancel():
                raise Canceled("canceled while opening the inputs; nothing was published")
            source = _open(entries[i], names[i], configs[i], known, share, max_modules)
            opened[i] = source
            _check_module_count(source, union, max_modules)
            known.update({m: info.in_features for m, info in source.modules.items()})
    except BaseException:
        for source in opened.values():
            source.close()
        raise
    return [opened[owner[i]] for i in range(len(entries))]


def _identity(where: Input) -> object:
    """What makes two entries the same input: a folder's resolved path, a remote adapter's
    object (storage hands out one per URI and ETag)."""
    return ("folder", Path(where).resolve()) if isinstance(where, Path) else ("remote", id(where))


def _folder(where: Input) -> Path:
    """The local folder holding the input's config."""
    return where if isinstance(where, Path) else where.directory


def _config(directory: Path, name: str) -> LoraAdapterConfig:
    if not directory.is_dir():
        raise AdapterNotFound(f"adapter {name!r}: no directory at {directory}")
    return read_adapter_config(directory, name)


#: (read_ahead, window bytes, span bytes) of each remote LoRA input.
_Share = tuple[ReadAhead, int, int]


def _share(
    entries: Sequence[Input], configs: dict[int, LoraAdapterConfig], read_ahead: ReadAhead | None
) -> _Share | None:
    """Each remote LoRA input's part of the job's look-ahead."""
    remote = [i for i in configs if not isinstance(entries[i], Path)]
    streamed = sum(configs[i].peft_type != "VERA" for i in remote)
    if not streamed:
        return None
    if read_ahead is None:
        raise ValueError("remote LoRA inputs are read within a ReadAhead: pass read_ahead")
    return (read_ahead, *read_ahead.share(streamed))


def _open(
    where: Input,
    name: str,
    config: LoraAdapterConfig,
    known: InputSizes,
    share: _Share | None,
    max_modules: int | None,
) -> AdapterSource:
    """The reader of one input (the module docstring's tree)."""
    if isinstance(where, Path):
        if config.peft_type == "VERA":
            return VeraReader(where, name, config, known, max_modules=max_modules)
        return LoraReader(where, name, config, max_modules=max_modules)
    if config.peft_type == "VERA":  # small by design: copied whole, once its size is checked
        check_vera_size(name, where.weights.size)
        where.weights.download(where.directory / WEIGHTS_NAME)
        return VeraReader(where.directory, name, config, known, max_modules=max_modules)
    assert share is not None  # _share counted this input
    read_ahead, window, span = share
    return StreamedLoraReader(
        name, config, where.weights, read_ahead=read_ahead, window_bytes=window,
        span_bytes=span, max_modules=max_modules,
    )  # fmt: skip


def _check_module_count(source: AdapterSource, union: set[str], limit: int | None) -> None:
    """Refuse an adapter over ``limit`` modules, then the inputs opened so far over it
    together (``union``, which this extends)."""
    if limit is None:
        return
    if len(source.modules) > limit:
        raise LimitExceeded(
            f"adapter {source.name!r}: {len(source.modules)} LoRA modules, over this "
            f"service's limit of {limit} (COREMERGE_MAX_MODULES)"
        )
    union.update(source.modules)
    if len(union) > limit:
        raise LimitExceeded(
            f"the adapters have {len(union)} distinct LoRA modules together, over this "
            f"service's limit of {limit} (COREMERGE_MAX_MODULES)"
        )
