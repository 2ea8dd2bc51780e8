"""The merge plan: which modules to merge, from which adapters, at which output rank, and
how much memory that will take.

Made from the adapters' configs and safetensors headers only (no tensor is read), so every
incompatibility is reported before any work starts, and the output's layout (one rank for
every module, docs/guarantees.md) is known before the first module is merged. Modules are
merged (and written) in the order safetensors stores them, by tensor name
(``worker.adapters.format.module_order``): every input is then read front to back, which
lets the worker read S3 inputs as the merge goes instead of copying them first. So are the
service's limits: the number of modules, and the job's peak working memory, estimated from
the shapes (``worker.merge.memory``), since a small adapter can declare shapes that need
gigabytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from jobs.errors import AdapterIncompatible, LimitExceeded
from jobs.servers import server_rank, server_rule
from jobs.spec import MergeSpec
from worker.adapters.format import module_order
from worker.adapters.source import AdapterSource
from worker.merge.memory import (
    DTYPE_BYTES,
    ModuleShape,
    WorkEstimate,
    check_work,
    estimate_work,
    format_bytes,
    merged_rank_bound,
)
from worker.merge.module_values import ModuleValues, model_layers

__all__ = ["MergePlan", "ModulePlan", "at_rank", "make_plan"]


@dataclass(frozen=True)
class ModulePlan:
    module: str
    in_features: int  # n
    out_features: int  # m
    sources: tuple[int, ...]  # indices of the adapters that take part (have it, weight ≠ 0)
    total_rank: int  # R = Σ r_t over the sources
    max_rank: int | None  # an upper bound of the merged rank, None when only the merge knows
    # Per source: the adapter's weight in this module (normalised when the spec asks).
    weights: tuple[float, ...] = ()
    # Per-task method parameters (density, drop) some adapter sets, one value per source.
    task_params: dict[str, tuple[float, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class MergePlan:
    modules: list[ModulePlan]
    output_rank: int | None  # None: decided after merging (full space without output.rank)
    target_modules: list[str] | str
    base_model_name_or_path: str | None
    task_type: str | None
    fan_in_fan_out: bool
    notes: list[str]
    work: WorkEstimate | None = None  # the estimated peak working memory (worker.merge.memory)
    work_limit: int | None = None  # the limit it was checked against (None: none)
    output_bytes: int = 0  # the weights file's size at most (exact when output_rank is known)
    # output.rank "auto": the rank its first pass merges at to read every module's spectrum
    # (the largest min(m, n), so that no module is cut), and the largest rank it can choose
    # (the server's cap, within COREMERGE_MAX_OUTPUT_RANK). None for any other job.
    spectrum_rank: int | None = None
    auto_cap: int | None = None


def _single(readers: Sequence[AdapterSource], field: str) -> object:
    """The one value of a config field shared by all adapters (None is unknown, not a conflict)."""
    values = {getattr(r.config, field) for r in readers} - {None}
    if len(values) > 1:
        detail = ", ".join(f"{r.name!r}: {getattr(r.config, field)!r}" for r in readers)
        raise AdapterIncompatible(f"adapters disagree on {field} ({detail})")
    return values.pop() if values else None


def _check_base_model(readers: Sequence[AdapterSource], spec: MergeSpec) -> None:
    """Each adapter's ``base_model_name_or_path`` must name the job's ``base_model`` (the
    same name, a revision or a trailing ``/`` aside); adapters that name none pass."""
    if spec.base_model is None:
        return
    want = spec.base_model.split("@", 1)[0].rstrip("/")
    for reader in readers:
        have = reader.config.base_model_name_or_path
        if have is not None and have.rstrip("/") != want:
            raise AdapterIncompatible(
                f"adapter {reader.name!r} is of base model {have!r}, not the job's base_model "
                f"{spec.base_model!r}"
            )


def _target_modules(
    readers: Sequence[AdapterSource], modules: list[str], every: bool = True
) -> list[str] | str:
    """The union of the inputs' target_modules; the exact module names when that is
    ambiguous, or when the job left some of the inputs' modules out (``every`` False)."""
    targets = [r.config.target_modules for r in readers]
    if (
        every
        and all(isinstance(t, list) for t in targets)
        and not any(r.config.layers_to_transform for r in readers)
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
    """The job's peak working memory, from the planned shapes (``worker.merge.memory``)."""
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
        rank=_engine_rank(spec, *_widest(modules)),
        output_rank_mode=spec.output.rank_mode,
        output_rank=output_rank,
        dtype_bytes=DTYPE_BYTES[spec.output.dtype],
        threads=threads,
        held_bytes=sum(r.held_bytes for r in {id(r): r for r in readers}.values()),
    )


def _engine_rank(spec: MergeSpec, m: int, n: int) -> int | None:
    """The rank the engine is asked for on an m × n module: ``output.rank``, or for "auto"
    min(m, n), which cuts nothing and has the engine report the spectrum (the first pass)."""
    return min(m, n) if spec.output.rank == "auto" else spec.output.rank


def _widest(modules: Sequence[ModulePlan]) -> tuple[int, int]:
    """The (m, n) of the module with the largest min(m, n)."""
    widest = max(modules, key=lambda mp: min(mp.out_features, mp.in_features))
    return widest.out_features, widest.in_features


def _auto_cap(spec: MergeSpec, max_output_rank: int | None) -> int | None:
    """With ``output.rank: "auto"``: the largest rank it may choose, the target server's
    largest within the service's limit; refused when the server takes none within it."""
    if spec.output.rank != "auto":
        return None
    try:
        cap, _ = server_rank(server_rule(spec.output.target), 2**62, max_output_rank)
    except ValueError as exc:
        raise LimitExceeded(f"output.target {spec.output.target!r}: {exc}") from None
    return cap


def _module_plan(
    readers: Sequence[AdapterSource],
    spec: MergeSpec,
    name: str,
    notes: list[str],
    values: ModuleValues,
) -> ModulePlan | None:
    """One module: the adapters that take part (those that have it, at a weight other than
    0), their weights, its shape (the same in all that have it), its total rank. None when
    no adapter takes part."""
    having = tuple(i for i, r in enumerate(readers) if name in r.modules)
    infos = [readers[i].modules[name] for i in having]
    shapes = {(info.out_features, info.in_features) for info in infos}
    if len(shapes) > 1:
        detail = ", ".join(
            f"{readers[i].name!r}: {info.out_features}×{info.in_features}"
            for i, info in zip(having, infos, strict=True)
        )
        raise AdapterIncompatible(
            f"module {name!r} has different shapes across adapters ({detail})"
        )
    (m, n) = shapes.pop()
    taking = values.taking(name, having)
    if not taking.sources:
        return None
    total = sum(readers[i].modules[name].rank for i in taking.sources)
    if spec.space == "core" and total > min(m, n):
        notes.append(
            f"{name}: Σr = {total} exceeds min(m, n) = {min(m, n)}; core space is no smaller than full space"
        )
    return ModulePlan(
        name,
        n,
        m,
        taking.sources,
        total,
        merged_rank_bound(spec.space, spec.params, m, n, total, _engine_rank(spec, m, n)),
        taking.weights,
        taking.task_params,
    )


def _planned_modules(
    readers: Sequence[AdapterSource], spec: MergeSpec, notes: list[str]
) -> list[ModulePlan]:
    """The modules the job merges, in the inputs' data order: those ``spec.modules`` selects
    in which some adapter takes part; refused when that leaves none."""
    # The inputs' own data order (safetensors sorts tensors by name), so that an input read
    # as the merge goes (worker.adapters.streamed) is read front to back.
    names = sorted({m for r in readers for m in r.modules}, key=module_order)
    values = ModuleValues(spec, model_layers(spec, names))
    planned = [_module_plan(readers, spec, n, notes, values) for n in names if values.selected(n)]
    modules = [mp for mp in planned if mp is not None]
    if not modules:
        raise AdapterIncompatible(
            f"nothing to merge: of the inputs' {len(names)} modules, modules.include/exclude "
            "and the adapters' weights (0 leaves an adapter out of a module) leave none"
        )
    left_out = len(names) - len(modules)
    if left_out:
        notes.append(f"{left_out} of the inputs' {len(names)} modules left out by the job")
    return modules


def _rank_bound_reason(spec: MergeSpec, mp: ModulePlan) -> str:
    if mp.max_rank is None:
        return f"a dense {spec.space}-space update has any rank up to min(m, n)"
    return f"Σr = {mp.total_rank} of its {len(mp.sources)} adapters"


def _output_bytes(spec: MergeSpec, modules: list[ModulePlan], output_rank: int | None) -> int:
    """The weights file's size: every module at the output's one rank (the largest merged
    rank, at most min(m, n) of the widest module when only the merge will know it)."""
    rank = output_rank or max(min(mp.in_features, mp.out_features) for mp in modules)
    return (
        sum((mp.in_features + mp.out_features) * rank for mp in modules)
        * DTYPE_BYTES[spec.output.dtype]
    )


def _check_output(
    spec: MergeSpec,
    modules: list[ModulePlan],
    output_bytes: int,
    max_output_rank: int | None,
    max_output_bytes: int | None,
) -> None:
    """The output's rank and size, bounded from the plan before any tensor is read: a merge
    whose rank is set by the layers, not by the inputs (full space, or knots with isotropize,
    without ``output.rank``), turns a few KB of adapters into hundreds of MB."""
    if max_output_rank is not None and spec.output.rank != "auto":  # "auto" stays within it
        if spec.output.rank is not None and spec.output.rank > max_output_rank:
            raise LimitExceeded(
                f"output.rank {spec.output.rank} is over this service's limit of "
                f"{max_output_rank} (COREMERGE_MAX_OUTPUT_RANK)"
            )
        bound = lambda mp: mp.max_rank or min(mp.in_features, mp.out_features)  # noqa: E731
        widest = max(modules, key=bound)
        if bound(widest) > max_output_rank:
            raise LimitExceeded(
                f"module {widest.module!r}: its merged rank can reach {bound(widest)} "
                f"({_rank_bound_reason(spec, widest)}), over this service's limit of "
                f"{max_output_rank} (COREMERGE_MAX_OUTPUT_RANK): set output.rank to at most "
                f"{max_output_rank} to truncate every module to its best approximation"
            )
    if max_output_bytes is not None and output_bytes > max_output_bytes:
        raise LimitExceeded(
            f"the merged adapter would be {format_bytes(output_bytes)} ({len(modules)} modules "
            f"in {spec.output.dtype}), over this service's limit of "
            f"{format_bytes(max_output_bytes)} (COREMERGE_MAX_OUTPUT_BYTES): set a smaller "
            "output.rank or dtype"
        )


def make_plan(
    readers: Sequence[AdapterSource],
    spec: MergeSpec,
    *,
    max_modules: int | None = None,
    max_work_bytes: int | None = None,
    max_output_rank: int | None = None,
    max_output_bytes: int | None = None,
    threads: int = 1,
) -> MergePlan:
    """Check the adapters against each other and lay out the merge (docs/architecture.md).

    Service limits (none by default), each raising ``LimitExceeded``: ``max_modules`` caps
    the number of merged modules; ``max_work_bytes`` the job's estimated peak working memory
    with ``threads`` modules merged side by side (``worker.merge.pipeline.merge_threads``);
    ``max_output_rank`` the output's rank (an explicit ``output.rank``, and the merged rank
    it can reach without one); ``max_output_bytes`` the size of the weights file.
    """
    if max_modules is not None:
        _check_module_count(readers, max_modules)
    base = _single(readers, "base_model_name_or_path")
    _check_base_model(readers, spec)
    fan_in_fan_out = bool(_single(readers, "fan_in_fan_out"))
    task_types = {r.config.task_type for r in readers}
    notes = []
    if len(task_types) > 1:
        notes.append(
            f"inputs have different task_type values {sorted(map(str, task_types))}; output has none"
        )
    modules = _planned_modules(readers, spec, notes)
    every = len(modules) == len({m for r in readers for m in r.modules})
    bounds = [mp.max_rank for mp in modules]
    output_rank = None if None in bounds else max(bounds)  # type: ignore[type-var]
    auto_cap = _auto_cap(spec, max_output_rank)
    written = output_rank if auto_cap is None else min(auto_cap, output_rank)  # type: ignore
    output_bytes = _output_bytes(spec, modules, written)
    _check_output(spec, modules, output_bytes, max_output_rank, max_output_bytes)
    work = _estimate_work(readers, spec, modules, written, threads)
    check_work(work, max_work_bytes, space=spec.space, method=spec.method)
    return MergePlan(
        modules=modules,
        output_rank=output_rank,
        target_modules=_target_modules(readers, [mp.module for mp in modules], every),
        base_model_name_or_path=base,  # type: ignore[arg-type]
        task_type=task_types.pop() if len(task_types) == 1 else None,
        fan_in_fan_out=fan_in_fan_out,
        notes=notes,
        work=work,
        work_limit=max_work_bytes,
        output_bytes=output_bytes,
        spectrum_rank=None if auto_cap is None else min(_widest(modules)),
        auto_cap=auto_cap,
    )


def at_rank(plan: MergePlan, spec: MergeSpec, k: int) -> MergePlan:
    """The plan of ``output.rank: "auto"``'s second pass, once it has chosen ``k``: every
    module brought to at most k, as an integer ``output.rank`` would."""
    modules = [
        replace(mp, max_rank=merged_rank_bound(
            spec.space, spec.params, mp.out_features, mp.in_features, mp.total_rank, k))
        for mp in plan.modules
    ]  # fmt: skip
    output_rank = max(mp.max_rank or k for mp in modules)
    return replace(
        plan, modules=modules, output_rank=output_rank,
        output_bytes=_output_bytes(spec, modules, output_rank),
    )  # fmt: skip
