"""The work-memory estimate holds for every method, space and parameter value that changes the
work: each merge runs in a fresh process, and the plan's estimate must be at least its
measured peak and at most 1.5 times it.

The grid is generated from the declarations, not written out: every method × space, at the
method's defaults and then with one parameter changed at a time (every boolean flipped,
every other choice, every number at the inclusive ends of its range, alpha "auto"), plus
``output.rank``, mixed ranks, 64 adapters and VeRA projections regenerated. A parameter or
option added to the spec without its cost in the engine shows up here as a failure, not as
a worker killed by the kernel.

Each merge runs in a process forked from a server that imported torch and the worker once
(``tests/worker/measure_merge.py``), so a cell costs its merge, not an interpreter start; two
run at a time. The default test run measures every method in every space at its defaults;
the rest of the grid (about 150 merges, minutes) is marked ``grid`` and run by CI
(``.ci/run``) or with ``pytest -m grid``.
Shapes are chosen so that the merge's own tensors (about 50–400 MB) dominate the process's
noise (threads, allocator arenas: a few MiB), while each merge stays within about a second
on one core.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import pytest

from jobs.spec import METHOD_PARAMS, SPACES, OutputSpec
from tests.worker.synthetic import lora_adapter, spec, vera_adapter

MiB = 1 << 20
#: The estimate may exceed the measured peak by this factor, no more.
MAX_RATIO = 1.5


@dataclass(frozen=True)
class Inputs:
    """A set of adapters: one module, ``ranks`` on an m × n layer (and VeRA ones)."""

    name: str
    m: int
    n: int
    ranks: tuple[int, ...]
    vera_ranks: tuple[int, ...] = ()


#: Per space, the inputs its cells merge (sized so the merge's tensors dominate the noise,
#: each task's matrix at least 1 MiB: glibc maps such blocks and returns them when freed).
SPACE_INPUTS = {
    "core": Inputs("core", 32768, 32768, (64, 64, 64, 64)),
    "full": Inputs("full", 512, 1024, (16,) * 32),
    "knots": Inputs("knots", 1024, 1024, (16,) * 32),
}
#: The same shapes with mixed ranks.
MIXED_INPUTS = {
    "core": Inputs("core-mixed", 32768, 32768, (16, 96, 32, 112)),
    "full": Inputs("full-mixed", 512, 1024, (4, 32, 8, 16, 24, 12, 20, 12) * 4),
    "knots": Inputs("knots-mixed", 1024, 1024, (4, 32, 8, 16, 24, 12, 20, 12) * 4),
}
#: 64 adapters: the core matrices (T R², R = 512) dominate in core space, the dense updates
#: in full space, the blocks in knots space.
MANY_INPUTS = {
    "core": Inputs("core-64", 8192, 8192, (8,) * 64),
    "full": Inputs("full-64", 512, 512, (4,) * 64),
    "knots": Inputs("knots-64", 512, 1024, (4,) * 64),
}
VERA_INPUTS = Inputs("vera", 8192, 8192, (8,), vera_ranks=(1024,))


@dataclass(frozen=True)
class Cell:
    space: str
    method: str
    change: str  # what differs from the defaults, for the test id
    inputs: Inputs
    params: dict = field(default_factory=dict)
    output: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.space}-{self.method}-{self.inputs.name}-{self.change}"


def _param_changes(method: str, space: str) -> Iterator[tuple[str, dict]]:
    """The method's defaults, then each parameter changed alone to every value that can
    change the work: the other choices, the other boolean, the inclusive ends of a number's
    range, and its words (alpha "auto")."""
    yield "defaults", {}
    for p in METHOD_PARAMS[method]:
        if p.name == "axes" and space != "core":
            continue  # refused outside core space
        if p.type is bool:
            values: list = [not p.default]
        elif p.choices:
            values = [c for c in p.choices if c != p.default]
        else:
            ends = [v for v in (p.ge, p.le) if v is not None and v != p.default]
            values = [*ends, *p.words]
        for value in values:
            yield f"{p.name}={value}", {p.name: value}


def _rank_modes(space: str) -> list[str]:
    """Every way to a rank limit the spec offers (``output.rank_mode``), "shared" in core
    space only."""
    modes = get_args(OutputSpec.model_fields["rank_mode"].annotation)
    return [m for m in modes if m != "auto" and (m != "shared" or space == "core")]


def _cells() -> list[Cell]:
    cells = []
    for space in SPACES:
        for method in METHOD_PARAMS:
            for change, params in _param_changes(method, space):
                cells.append(Cell(space, method, change, SPACE_INPUTS[space], params))
            for mode in _rank_modes(space):
                output = {"rank": 8, "rank_mode": mode}
                cells.append(
                    Cell(space, method, f"rank=8-{mode}", SPACE_INPUTS[space], output=output)
                )
            cells.append(Cell(space, method, "defaults", MIXED_INPUTS[space]))
            cells.append(Cell(space, method, "defaults", MANY_INPUTS[space]))
    cells.append(Cell("core", "ta", "alpha=auto", VERA_INPUTS, {"alpha": "auto"}))
    cells.append(Cell("core", "ties", "defaults", VERA_INPUTS))
    return cells


CELLS = _cells()
#: ``output.rank: "auto"`` in every space, truncating (tsv) and cutting isotropically (iso_c):
#: a first pass at the full merged rank for the spectra, then the merge at the rank chosen.
AUTO_CELLS = [
    Cell(space, method, "rank=auto", SPACE_INPUTS[space], output={"rank": "auto"})
    for space in SPACES
    for method in ("tsv", "iso_c")
]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Every input set, written once."""
    root = tmp_path_factory.mktemp("grid")
    sets = {c.inputs for c in CELLS}
    out = {}
    for inputs in sets:
        folder = root / inputs.name
        dirs = [
            lora_adapter(folder / f"lora-{t}", r=r, m=inputs.m, n=inputs.n, seed=t)
            for t, r in enumerate(inputs.ranks)
        ]
        dirs += [
            vera_adapter(folder / f"vera-{t}", r=r, m=inputs.m, seed=t)
            for t, r in enumerate(inputs.vera_ranks)
        ]
        out[inputs.name] = dirs
    return out


def _is_default(cell: Cell) -> bool:
    return cell.change == "defaults" and cell.inputs is SPACE_INPUTS[cell.space]


@pytest.fixture(scope="module")
def forks() -> Iterator[multiprocessing.context.BaseContext]:
    """A forkserver that imported the measuring module (torch, the worker) once."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.worker.measure_merge"])
    yield ctx


def _measure_all(
    cells: list[Cell], adapters: dict[str, list[Path]], forks, tmp_path: Path
) -> list[tuple[Cell, float, float]]:
    """Each cell merged in a process of its own, two at a time; (cell, estimate, measured)."""
    from tests.worker.measure_merge import measure

    jobs = []
    for i, cell in enumerate(cells):
        dirs, out = adapters[cell.inputs.name], tmp_path / f"out-{i}"
        fields = {"method": cell.method, "space": cell.space, "params": cell.params}
        jobs.append({
            "spec": spec(dirs, out, output=dict(cell.output), **fields),
            "dirs": [str(d) for d in dirs],
            "out": str(out),
            "vera": bool(cell.inputs.vera_ranks),
            "threads": 1,
        })  # fmt: skip
    out = []
    with forks.Pool(2, maxtasksperchild=1) as pool:
        for cell, r in zip(cells, pool.imap(measure, jobs, chunksize=1), strict=True):
            estimate, measured = r["estimate"], r["measured"]
            print(f"{cell.id:48s} {estimate / MiB:7.0f} {measured / MiB:7.0f} "
                  f"{estimate / measured:6.2f}", flush=True)  # fmt: skip
            out.append((cell, estimate, measured))
    return out


def _check(results: list[tuple[Cell, float, float]]) -> None:
    """Hold every cell to 1 ≤ estimate / measured ≤ MAX_RATIO (the rows are printed as they
    are measured: cell, estimate and measured peak in MiB, their ratio)."""
    ratios = [e / m for _, e, m in results]
    print(
        f"estimate / measured over {len(results)} cells: min {min(ratios):.2f}, max {max(ratios):.2f}"
    )
    small = [c.id for c, _, m in results if m < 48 * MiB]
    assert not small, f"cells too small for their work to dominate the noise: {small}"
    wrong = [(c.id, round(e / m, 2)) for c, e, m in results if not 1.0 <= e / m <= MAX_RATIO]
    assert not wrong, f"estimate / measured outside [1, {MAX_RATIO}]: {wrong}"


def test_estimate_bounds_the_peak_of_every_method_and_space(
    adapters: dict[str, list[Path]], forks, tmp_path: Path
) -> None:
    """Every method in every space, at its defaults (the default test run)."""
    _check(_measure_all([c for c in CELLS if _is_default(c)], adapters, forks, tmp_path))


@pytest.mark.grid
@pytest.mark.timeout(3600)
def test_estimate_bounds_the_peak_of_every_work_changing_option(
    adapters: dict[str, list[Path]], forks, tmp_path: Path
) -> None:
    """The rest of the grid: every parameter value, output.rank, mixed ranks, 64 adapters,
    VeRA (minutes: run with -m grid; CI runs it)."""
    _check(_measure_all([c for c in CELLS if not _is_default(c)], adapters, forks, tmp_path))


@pytest.mark.grid
@pytest.mark.timeout(1200)
def test_estimate_bounds_the_peak_of_rank_auto(
    adapters: dict[str, list[Path]], forks, tmp_path: Path
) -> None:
    """``output.rank: "auto"``, whose two passes the estimate bounds by the first, a merge
    at every module's full rank (run with ``-m grid -k rank_auto``)."""
    _check(_measure_all(AUTO_CELLS, adapters, forks, tmp_path))
