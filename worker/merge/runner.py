"""The layer-by-layer merge: open the inputs, plan, merge into a staging folder, finish.

    run_merge(spec, adapter_dirs, out_dir)
    ├── open_adapters          configs and headers only: every refusal before any tensor
    ├── make_plan              modules, shapes, sources, the output's one rank
    ├── _merge_into_staging    module by module: read → merge → append to the output file
    └── _finish                adapter_config.json, merge_report.json last, rename into place

Peak memory is bounded by the modules at hand: each module's factors are read
(``AdapterSource.read``), merged (``worker.engine``) and appended to the output file
(``worker.merge.output``) before later ones are touched, a few modules side by side
(``worker.merge.pipeline``). Everything is written into a staging directory beside ``out_dir`` and
renamed into place only when the merge has fully succeeded, with ``merge_report.json`` written
last (docs/guarantees.md): a failure or a cancel leaves nothing at ``out_dir``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from jobs.errors import AdapterInvalid, Canceled, InternalError, OutputNotFinite
from jobs.spec import MergeSpec
from worker.adapters.format import REPORT_NAME
from worker.adapters.opening import Input, open_adapters
from worker.adapters.source import AdapterSource
from worker.adapters.streamed import ReadAhead
from worker.engine import (
    FactorStack,
    MergedModule,
    NonFiniteError,
    merge_module,
    merge_stacks_in_core_space,
)
from worker.merge import rank_auto
from worker.merge.output import (
    MAX_PROJECTION_RESIDUAL,
    WrittenWeights,
    build_report,
    write_config,
    write_model_card,
    write_report,
    write_weights,
)
from worker.merge.pipeline import merge_threads, ordered_map
from worker.merge.plan import MergePlan, ModulePlan, at_rank, make_plan

__all__ = ["REPORT_NAME", "MergeOutcome", "Progress", "resolve_device", "run_merge"]

#: Core-space modules merged at a time on a GPU, those of one shape in one batched call: 8
#: Llama layers (56 modules, 4 shapes) give groups of 8-16, and device memory holds about
#: three times their factors.
GPU_WINDOW_MODULES = 56


@dataclass(frozen=True)
class Progress:
    stage: str  # "plan", "merge" or "write"
    modules_done: int
    modules_total: int


@dataclass(frozen=True)
class MergeOutcome:
    out_dir: Path
    rank: int
    modules: int
    bytes: int
    seconds: float
    report: dict[str, Any]


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def module_generator(seed: int, module: str) -> torch.Generator:
    """A CPU generator seeded from the job seed and the module's name, so DARE's masks of a
    module do not depend on which other modules exist or on the device."""
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@dataclass(frozen=True)
class _ModuleResult:
    plan: ModulePlan
    merged: MergedModule
    record: dict[str, Any]  # the module's entry in merge_report.json
    read_s: float
    merge_s: float


class _ModuleMerger:
    """Reads, scales and merges one planned module; safe to call from several threads."""

    def __init__(
        self,
        spec: MergeSpec,
        readers: Sequence[AdapterSource],
        device: torch.device,
        window: int | None = None,
    ) -> None:
        self.spec, self.readers, self.device = spec, readers, device
        # The rank the engine is asked for: output.rank, or for "auto" the first pass's
        # (which cuts nothing), then the rank it chose (worker.merge.rank_auto).
        self.rank: int | None = None if spec.output.rank == "auto" else spec.output.rank
        self.threads = merge_threads(device, spec.space)  # modules merged side by side
        if window is None:  # a GPU merges core-space modules a window at a time, batched
            window = GPU_WINDOW_MODULES if device.type == "cuda" and spec.space == "core" else 1
        self.window = window

    def params(self, mp: ModulePlan) -> dict[str, Any]:
        """The method's parameters for this module: the job's, with each per-task parameter
        that some adapter sets (density, drop) as one value per source, in source order, or
        as one number when they are all equal (the engine's interface for per-task params)."""
        params = dict(self.spec.params)
        for name, values in mp.task_params.items():
            params[name] = values[0] if len(set(values)) == 1 else values
        return params

    def _read(self, mp: ModulePlan) -> FactorStack:
        """The module's factors, ΔW_t = (w_t s_t B_t) A_t, copied straight into their stacks.

        Scaling and job weight are folded into B as it is copied (docs/methods.md), and the
        values are checked in one pass over each finished stack; only when that finds a NaN,
        an inf or an overflow are the adapters looked at one by one, for the message.
        """
        infos = [self.readers[i].modules[mp.module] for i in mp.sources]
        stack = FactorStack(
            torch.empty(mp.out_features, mp.total_rank, device=self.device),
            torch.empty(mp.total_rank, mp.in_features, device=self.device),
            [info.rank for info in infos],
        )
        scales = [info.scaling * weight for weight, info in zip(mp.weights, infos, strict=True)]
        # An input named by several entries is one source (opened once): read once, copied
        # into each entry's place with that entry's weight.
        places: dict[int, list[int]] = {}
        for j, i in enumerate(mp.sources):
            places.setdefault(id(self.readers[i]), []).append(j)
        for js in places.values():
            A, B = self.readers[mp.sources[js[0]]].read(mp.module, self.device, check=False)
            for j in js:
                stack.A[stack.slices[j]] = A
                torch.mul(B, scales[j], out=stack.B[:, stack.slices[j]])
        if not bool(torch.isfinite(stack.A.sum() + stack.B.sum())):
            self._explain_non_finite(mp, stack, scales)
        return stack

    def _explain_non_finite(self, mp: ModulePlan, stack: FactorStack, scales: list[float]) -> None:
        """Raise for the first adapter whose factors, or scaled factors, are not finite."""
        for i, factors, scale in zip(mp.sources, stack, scales, strict=True):
            reader = self.readers[i]
            reader.read(mp.module, self.device)  # raises on NaN or inf in the file itself
            if not bool(torch.isfinite(factors.B).all()):
                raise AdapterInvalid(
                    f"adapter {reader.name!r}: module {mp.module!r}: its factors times scaling "
                    f"and weight ({scale:.3g}) overflow float32"
                )
        # Every value is finite and only the check's sum overflowed: the merge decides.

    def __call__(self, mp: ModulePlan) -> _ModuleResult:
        t0 = time.perf_counter()
        factors = self._read(mp)
        t1 = time.perf_counter()
        try:
            merged = merge_module(
                factors,
                self.spec.method,
                self.params(mp),
                space=self.spec.space,
                rank=self.rank,
                output_rank_mode=self.spec.output.rank_mode,
                generator=module_generator(self.spec.seed, mp.module),
                consume=True,  # the stacks were read for this merge alone
            )
        except NonFiniteError as exc:  # the inputs were finite: the merge itself overflowed
            raise OutputNotFinite(
                f"module {mp.module!r}: the merge overflowed float32 ({exc}): the weights, "
                "alpha or scalings make the update too large; nothing was written"
            ) from None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self._result(mp, merged, t1 - t0, time.perf_counter() - t1)

    def merge_window(self, mps: Sequence[ModulePlan]) -> list[_ModuleResult]:
        """Merge several modules in core space, those of one shape in one batched call
        (``worker.engine.batched``): the same results as one by one, in fewer, larger
        kernels, which is what a GPU needs."""
        params = [self.params(mp) for mp in mps]
        if any(p != params[0] for p in params):  # one batched call takes one set of params
            return [self(mp) for mp in mps]
        t0 = time.perf_counter()
        stacks = [self._read(mp) for mp in mps]
        t1 = time.perf_counter()
        try:
            merged = merge_stacks_in_core_space(
                stacks, self.spec.method, params[0], rank=self.rank,
                output_rank_mode=self.spec.output.rank_mode,
                generators=[module_generator(self.spec.seed, mp.module) for mp in mps],
                consume=True,
            )  # fmt: skip
        except NonFiniteError:
            return [self(mp) for mp in mps]  # one by one, to name the module that overflowed
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        read_s, merge_s = (t1 - t0) / len(mps), (time.perf_counter() - t1) / len(mps)
        return [self._result(mp, m, read_s, merge_s) for mp, m in zip(mps, merged, strict=True)]

    def _result(
        self, mp: ModulePlan, merged: MergedModule, read_s: float, merge_s: float
    ) -> _ModuleResult:
        """The self-check, and the module's entry in the report."""
        if merged.residual is not None and merged.residual > MAX_PROJECTION_RESIDUAL:
            raise InternalError(
                f"self-check failed on module {mp.module!r}: the inputs lie {merged.residual:.2e} off "
                f"the reference bases (limit {MAX_PROJECTION_RESIDUAL:g}); nothing was published"
            )
        record = {
            "module": mp.module,
            "adapters": len(mp.sources),
            "sources": [self.readers[i].name for i in mp.sources],
            "weights": list(mp.weights),
            **{name: list(values) for name, values in mp.task_params.items()},
            "total_rank": mp.total_rank,
            "rank": merged.rank,
            "kept_energy": merged.kept_energy,
            "residual": merged.residual,
            "alpha": merged.alpha,
        }
        return _ModuleResult(mp, merged, record, read_s=read_s, merge_s=merge_s)


def _windowed(merger: _ModuleMerger, modules: Sequence[ModulePlan]) -> Iterator[_ModuleResult]:
    """The modules' results in plan order, merged ``merger.window`` at a time."""
    for i in range(0, len(modules), merger.window):
        yield from merger.merge_window(modules[i : i + merger.window])


class _Control:
    """The caller's progress callback and cancel flag, and the one place that checks it."""

    def __init__(
        self,
        on_progress: Callable[[Progress], None] | None,
        should_cancel: Callable[[], bool] | None,
    ) -> None:
        self._on_progress, self._should_cancel = on_progress, should_cancel
        # output.rank "auto" goes over the modules twice: its progress counts both passes.
        self.passes, self.before = 1, 0

    def progress(self, stage: str, done: int, total: int) -> None:
        if self._on_progress is not None:
            self._on_progress(Progress(stage, self.before + done, self.passes * total))

    def check_cancel(self, done: int, total: int) -> None:
        """Raise ``Canceled`` at a module boundary when the caller asks to stop."""
        if self._should_cancel is not None and self._should_cancel():
            raise Canceled(f"canceled after {done} of {total} modules; nothing was published")


@dataclass
class _MergeStats:
    """What the merge of the modules measured, for the report."""

    records: list[dict[str, Any]] = field(default_factory=list)
    read_s: float = 0.0
    merge_s: float = 0.0
    merge_wall_s: float = 0.0

    def add(self, result: _ModuleResult) -> None:
        self.records.append(result.record)
        self.read_s += result.read_s
        self.merge_s += result.merge_s


def run_merge(
    spec: MergeSpec,
    adapter_dirs: Sequence[Input],
    out_dir: Path,
    *,
    device: str = "auto",
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    max_modules: int | None = None,
    max_work_bytes: int | None = None,
    max_output_rank: int | None = None,
    max_output_bytes: int | None = None,
    batch_window: int | None = None,
    weights_sink: Callable[[], BinaryIO | None] | None = None,
    record_local_paths: bool = True,
    read_ahead: ReadAhead | None = None,
) -> MergeOutcome:
    """Merge the adapters in ``adapter_dirs`` (in ``spec.adapters`` order: local folders, or
    a ``RemoteAdapter`` each, whose weights are read as the merge goes within
    ``read_ahead``; ``worker.adapters.opening``) into ``out_dir``.

    Raises a ``jobs.errors.MergeError`` for every known failure (``Canceled`` when
    ``should_cancel()`` is true at a module boundary) and ``FileExistsError`` when ``out_dir``
    exists and is not empty. ``max_modules``, ``max_work_bytes`` (the estimated peak
    working memory, ``worker.merge.memory``), ``max_output_rank`` and ``max_output_bytes`` are
    service limits, checked from the headers before any tensor is read (``LimitExceeded``;
    the module limit as each input is opened). ``batch_window`` modules are merged at a time
    in one batched call per shape (core space only); by default that is done on CUDA only.
    ``weights_sink()``, when it gives a target, receives ``adapter_model.safetensors`` as it is
    written (an upload to the output's store, beside the merge) instead of ``out_dir``.
    ``record_local_paths`` False leaves local inputs' paths out of the report and the card.
    """
    started = time.perf_counter()
    out_dir = _checked_call(spec, adapter_dirs, out_dir)
    control = _Control(on_progress, should_cancel)
    torch_device = resolve_device(device)
    with _closing_all(open_adapters(
        adapter_dirs, [ref.display_name for ref in spec.adapters], read_ahead=read_ahead,
        max_modules=max_modules, should_cancel=should_cancel,
    )) as readers:  # fmt: skip
        merger = _ModuleMerger(spec, readers, torch_device, batch_window)
        plan = make_plan(
            readers, spec, max_modules=max_modules, max_work_bytes=max_work_bytes,
            max_output_rank=max_output_rank, max_output_bytes=max_output_bytes,
            threads=max(merger.threads, merger.window),
        )  # fmt: skip
        plan, choice = _rank_chosen(plan, merger, spec, control, max_output_rank)
        plan_s = time.perf_counter() - started
        with _staging_beside(out_dir) as staging, _hashing(readers) as input_hashes:
            weights, stats = _merge_into_staging(staging, plan, merger, spec, control, weights_sink)
            seconds = time.perf_counter() - started
            report = build_report(
                spec, readers, [h.result() for h in input_hashes], plan, stats.records,
                weights, torch_device, _timings(plan_s, seconds, stats, merger.threads),
                record_local_paths,
                rank_auto=None if choice is None else rank_auto.section(choice, stats.records),
            )  # fmt: skip
            _finish(staging, plan, weights, report, out_dir)
    return MergeOutcome(out_dir, weights.rank, len(plan.modules), weights.nbytes, seconds, report)


def _rank_chosen(
    plan: MergePlan,
    merger: _ModuleMerger,
    spec: MergeSpec,
    control: _Control,
    max_output_rank: int | None,
) -> tuple[MergePlan, rank_auto.RankChoice | None]:
    """The plan at its output rank, and what ``output.rank: "auto"`` chose (None otherwise):
    "auto" goes over the modules twice, a first pass to choose the rank, then the merge."""
    control.passes = 1 if plan.spectrum_rank is None else 2
    control.progress("plan", 0, len(plan.modules))
    if plan.spectrum_rank is None:
        return plan, None
    choice = _choose_rank(plan, merger, spec, control, max_output_rank)
    return at_rank(plan, spec, choice.rank), choice


def _results(merger: _ModuleMerger, modules: Sequence[ModulePlan]) -> Iterator[_ModuleResult]:
    """The modules' results in plan order: a window at a time in one batched call per shape
    (core space on a GPU), else a few modules side by side."""
    if merger.window > 1 and merger.spec.space == "core":
        return _windowed(merger, modules)
    return ordered_map(merger, modules, merger.threads)


def _choose_rank(
    plan: MergePlan,
    merger: _ModuleMerger,
    spec: MergeSpec,
    control: _Control,
    limit: int | None,
) -> rank_auto.RankChoice:
    """``output.rank: "auto"``'s first pass: every module merged at its full rank, and of it
    kept only the rank its share of energy needs (no factors: memory stays that of one
    module's merge); then the rank for the target server (``worker.merge.rank_auto``). The
    progress counts it as the first of two passes; the merger is left at the rank chosen."""
    merger.rank = plan.spectrum_rank
    needed: list[tuple[int, str]] = []
    total = len(plan.modules)
    with contextlib.closing(_results(merger, plan.modules)) as results:
        for done, result in enumerate(results, start=1):
            spectrum = result.merged.spectrum
            if spectrum is None:  # every space reports it when given a rank
                raise InternalError(f"module {result.plan.module!r}: the merge gave no spectrum")
            needed.append((rank_auto.needed_rank(spectrum.tolist(), spec.output.energy),
                           result.plan.module))  # fmt: skip
            control.progress("merge", done, total)
            control.check_cancel(done, total)
    choice = rank_auto.choose(needed, spec.output.target, spec.output.energy, limit)
    merger.rank, control.before = choice.rank, total
    return choice


def _checked_call(spec: MergeSpec, adapter_dirs: Sequence[Input], out_dir: Path) -> Path:
    """``out_dir`` as a path, refused when it holds anything; one input per adapter."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"output directory {out_dir} already exists and is not empty")
    if len(adapter_dirs) != len(spec.adapters):
        raise ValueError("one adapter directory per spec.adapters entry is required")
    return out_dir


@contextlib.contextmanager
def _closing_all(readers: list[AdapterSource]) -> Iterator[list[AdapterSource]]:
    """The opened inputs, every one closed when the run ends, however it ends."""
    try:
        yield readers
    finally:
        for reader in readers:
            reader.close()


def _timings(plan_s: float, seconds: float, stats: _MergeStats, threads: int) -> dict[str, float]:
    """The report's ``timings``: where the run's seconds went, and on how many threads."""
    return {
        "plan_s": plan_s,
        "read_s": stats.read_s,
        "merge_s": stats.merge_s,
        "merge_wall_s": stats.merge_wall_s,
        "total_s": seconds,
        "merge_threads": threads,
    }


@contextlib.contextmanager
def _staging_beside(out_dir: Path) -> Iterator[Path]:
    """A fresh folder beside ``out_dir``, removed with everything in it unless :func:`_finish`
    renamed it into place."""
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class _DigestWhenRead:
    """A streamed input's sha256, taken when the report asks for it: after the merge, when
    every byte has gone through its digest (``AdapterSource.sha256``)."""

    def __init__(self, reader: AdapterSource) -> None:
        self.reader = reader

    def result(self) -> str:
        return self.reader.sha256()


@contextlib.contextmanager
def _hashing(
    readers: Sequence[AdapterSource],
) -> Iterator[list[Future[str] | _DigestWhenRead]]:
    """The inputs' sha256 for the report: a local file is hashed beside the merge, on a
    thread of its own (hashlib releases the GIL); a streamed input hashes its bytes as they
    arrive, and gives its digest once the merge has read them."""
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
    digests: dict[int, Future[str] | _DigestWhenRead] = {}  # a shared source hashed once
    try:
        for r in readers:
            if id(r) not in digests:
                digests[id(r)] = _DigestWhenRead(r) if r.streamed else hasher.submit(r.sha256)
        yield [digests[id(r)] for r in readers]
    finally:
        hasher.shutdown(wait=True, cancel_futures=True)


def _merge_into_staging(
    staging: Path,
    plan: MergePlan,
    merger: _ModuleMerger,
    spec: MergeSpec,
    control: _Control,
    weights_sink: Callable[[], BinaryIO | None] | None = None,
) -> tuple[WrittenWeights, _MergeStats]:
    """Merge every planned module, a few side by side, and stream them into the weights file."""
    total = len(plan.modules)
    stats = _MergeStats()

    def merged_modules(
        results: Iterator[_ModuleResult],
    ) -> Iterator[tuple[ModulePlan, MergedModule]]:
        for done, result in enumerate(results, start=1):
            stats.add(result)
            yield result.plan, result.merged
            control.progress("merge", done, total)
            if done < total:
                control.check_cancel(done, total)

    control.check_cancel(0, total)
    t0 = time.perf_counter()
    # Closed on the way out, whatever happens: modules still queued are dropped and running
    # ones finish here, not in the background while the staging dir is removed.
    results = _results(merger, plan.modules)
    with contextlib.closing(results):
        weights = write_weights(
            staging, plan, merged_modules(results), spec.output.dtype, sink=weights_sink
        )
    stats.merge_wall_s = time.perf_counter() - t0
    control.progress("write", total, total)
    return weights, stats


def _finish(
    staging: Path, plan: MergePlan, weights: WrittenWeights, report: dict[str, Any], out_dir: Path
) -> None:
    """The config and the model card, then the report (its presence marks a complete
    adapter), then the rename."""
    write_config(staging, plan, weights.rank)
    write_model_card(staging, report)
    write_report(staging, report)
    os.rename(staging, out_dir)  # atomic; replaces an empty out_dir
