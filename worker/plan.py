"""The merge plan: which modules to merge, from which adapters, at which output rank, and
how much memory that will take.

Made from the adapters' configs and safetensors headers only (no tensor is read), so every
incompatibility is reported before any work starts, and the output's layout (one rank for
every module, docs/guarantees.md) is known before the first module is merged. Modules are
merged (and written) in the order safetensors stores them, by tensor name
(``worker.adapters.format.module_order``): every input is then read front to back, which
lets the worker read S3 inputs as the merge goes instead of copying them first. So are the
service's limits: the number of modules, and the job's peak working memory, estimated from
the shapes (``worker.memory``), since a small adapter can declare shapes that need
gigabytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jobs.errors import AdapterIncompatible, LimitExceeded
from jobs.spec import MergeSpec
from worker.adapters.format import module_order
from worker.adapters.source import AdapterSource
from worker.memory import (
    DTYPE_BYTES,
    ModuleShape,
    WorkEstimate,
    check_work,
    estimate_work,
    merged_rank_bound,
)

__all__ = ["MergePlan", "ModulePlan", "make_plan"]


@dataclass(frozen=True)
class ModulePlan:
    module: str
    in_features: int  # n
    out_features: int  # m
    sources: tuple[int, ...]  # indices of the adapters that have this module
    total_rank: int  # R = Σ r_t over the sources
    max_rank: int | None  # an upper bound of the merged rank, None when only the merge knows


@dataclass(frozen=True)
class MergePlan:
    modules: list[ModulePlan]
    output_rank: int | None  # None: decided after merging (full space without output.rank)
    target_modules: list[str] | str
    base_model_name_or_path: str | None
    task_type: str | None
    fan_in_fan_out: bool
    notes: list[str]
    work: WorkEstimate | None = None  # the estimated peak working memory (worker.memory)
    work_limit: int | None = None  # the limit it was checked against (None: none)


def _single(readers: Sequence[AdapterSource], field: str) -> object:
    """The one value of a config field shared by all adapters (None is unknown, not a conflict)."""
    values = {getattr(r.config, field) for r in readers} - {None}
    if len(values) > 1:
        detail = ", ".join(f"{r.name!r}: {getattr(r.config, field)!r}" for r in readers)
        raise AdapterIncompatible(f"adapters disagree on {field} ({detail})")
    return values.pop() if values else None


def _target_modules(readers: Sequence[AdapterSource], modules: list[str]) -> list[str] | str:
    """The union of the inputs' target_modules; the exact module names when that is ambiguous."""
    targets = [r.config.target_modules for r in readers]
    if all(isinstance(t, list) for t in targets) and not any(
        r.config.layers_to_transform for r in readers
    ):
        return sorted({name for t in targets for name in t})
    # A regex or a layer restriction in some input: name every merged module exactly.
    return modules


def _check_module_count(readers: Sequence[AdapterSource], limit: int) -> None:
    """Refuse a merge over ``limit`` modules (the union over the adapters), from the headers."""
    largest = max(readers, key=lambda r: len(r.modules))
    if len(largest.modules) > limit:
        raise LimitExceeded(
            f"adapter {largest.name!r}: {len(largest.modules)} LoRA modules, over this "
            f"service's limit of {limit} (COREMERGE_MAX_MODULES)"
        )
    total = len({m for r in readers for m in r.modules})
    if total > limit:
        raise LimitExceeded(
            f"the adapters have {total} distinct LoRA modules together, over this service's "
            f"limit of {limit} (COREMERGE_MAX_MODULES)"
        )


def _estimate_work(
    readers: Sequence[AdapterSource],
    spec: MergeSpec,
    modules: list[ModulePlan],
    output_rank: int | None,
    threads: int,
) -> WorkEstimate:
    """The job's peak working memory, from the planned shapes (``worker.memory``)."""
    shapes = [
        ModuleShape(
            mp.module,
            mp.out_features,
            mp.in_features,
            tuple(readers[i].modules[mp.module].rank for i in mp.sources),
            max(readers[i].modules[mp.module].read_bytes for i in mp.sources),
        )
        for mp in modules
    ]
    return estimate_work(
        shapes,
        space=spec.space,
        method=spec.method,
        params=spec.params,
        rank=spec.output.rank,
        output_rank=output_rank,
        dtype_bytes=DTYPE_BYTES[spec.output.dtype],
        threads=threads,
        held_bytes=sum(r.held_bytes for r in {id(r): r for r in readers}.values()),
    )


def _module_plan(
    readers: Sequence[AdapterSource], spec: MergeSpec, name: str, notes: list[str]
) -> ModulePlan:
    """One module: the adapters that have it, its shape (the same in all), its total rank."""
    sources = tuple(i for i, r in enumerate(readers) if name in r.modules)
    infos = [readers[i].modules[name] for i in sources]
    shapes = {(info.out_features, info.in_features) for info in infos}
    if len(shapes) > 1:
        detail = ", ".join(
            f"{readers[i].name!r}: {info.out_features}×{info.in_features}"
            for i, info in zip(sources, infos, strict=True)
        )
        raise AdapterIncompatible(
            f"module {name!r} has different shapes across adapters ({detail})"
        )
    (m, n) = shapes.pop()
    total = sum(info.rank for info in infos)
    if spec.space == "core" and total > min(m, n):
        notes.append(
            f"{name}: Σr = {total} exceeds min(m, n) = {min(m, n)}; core space is no smaller than full space"
        )
    return ModulePlan(
        name,
        n,
        m,
        sources,
        total,
        merged_rank_bound(spec.space, spec.params, m, n, total, spec.output.rank),
    )


def make_plan(
    readers: Sequence[AdapterSource],
    spec: MergeSpec,
    *,
    max_modules: int | None = None,
    max_work_bytes: int | None = None,
    threads: int = 1,
) -> MergePlan:
    """Check the adapters against each other and lay out the merge (docs/architecture.md).

    Service limits (none by default), both raising ``LimitExceeded``: ``max_modules`` caps
    the number of merged modules; ``max_work_bytes`` the job's estimated peak working memory
    with ``threads`` modules merged side by side (``worker.pipeline.merge_threads``).
    """
    if max_modules is not None:
        _check_module_count(readers, max_modules)
    base = _single(readers, "base_model_name_or_path")
    fan_in_fan_out = bool(_single(readers, "fan_in_fan_out"))
    task_types = {r.config.task_type for r in readers}
    notes = []
    if len(task_types) > 1:
        notes.append(
            f"inputs have different task_type values {sorted(map(str, task_types))}; output has none"
        )
    # The inputs' own data order (safetensors sorts tensors by name), so that an input read
    # as the merge goes (worker.adapters.streamed) is read front to back.
    names = sorted({m for r in readers for m in r.modules}, key=module_order)
    modules = [_module_plan(readers, spec, name, notes) for name in names]
    bounds = [mp.max_rank for mp in modules]
    output_rank = None if None in bounds else max(bounds)  # type: ignore[type-var]
    work = _estimate_work(readers, spec, modules, output_rank, threads)
    check_work(work, max_work_bytes, space=spec.space, method=spec.method)
    return MergePlan(
        modules=modules,
        output_rank=output_rank,
        target_modules=_target_modules(readers, names),
        base_model_name_or_path=base,  # type: ignore[arg-type]
        task_type=task_types.pop() if len(task_types) == 1 else None,
        fan_in_fan_out=fan_in_fan_out,
        notes=notes,
        work=work,
        work_limit=max_work_bytes,
    )
