"""The engine's method table and the job spec's parameter declaration are one: the same
methods, and each method's function and cost take exactly its declared parameters, by name."""

from __future__ import annotations

import inspect

from jobs.spec import METHOD_PARAMS, METHODS
from worker.engine import METHODS as ENGINE_METHODS
from worker.engine.methods import COMMON_PARAMS


def _keywords(fn) -> set[str]:
    return {
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def test_every_declared_method_has_a_table_row_and_no_other() -> None:
    assert ENGINE_METHODS.keys() == METHOD_PARAMS.keys() == set(METHODS)


def test_each_method_takes_its_declared_parameters_by_name() -> None:
    """``ties(tasks, *, density)``: the keywords are the spec's names, the common ones (alpha,
    isotropize, axes) excepted, which the space applies around every method. Adding a
    parameter to the spec without its method taking it (or the other way round) fails here."""
    for method, declared in METHOD_PARAMS.items():
        own = {p.name for p in declared} - set(COMMON_PARAMS)
        row = ENGINE_METHODS[method]
        assert _keywords(row.merge) == own, (method, "merge")
        assert _keywords(row.cost) == own, (method, "cost")
