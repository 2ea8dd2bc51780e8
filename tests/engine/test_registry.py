"""The engine's methods and the job spec's parameter declaration name the same methods, and
every declared parameter reaches its method."""

from __future__ import annotations

import inspect

from jobs.spec import METHOD_PARAMS, METHODS
from worker.engine import METHOD_FUNCTIONS, batched, merge_in_core_space


def test_every_declared_method_has_an_engine_function_and_no_other() -> None:
    assert METHOD_FUNCTIONS.keys() == METHOD_PARAMS.keys() == set(METHODS)


def test_every_method_specific_parameter_is_read_by_its_method() -> None:
    shared = {"alpha", "isotropize"}  # applied by apply_method after every method
    by_space = {"axes"}  # core space rotates the core matrices before the method
    for name in by_space:
        assert f'params.get("{name}"' in inspect.getsource(merge_in_core_space), name
        assert f'params.get("{name}")' in inspect.getsource(batched._merge), name
    shared |= by_space
    for method, params in METHOD_PARAMS.items():
        source = inspect.getsource(METHOD_FUNCTIONS[method])
        for p in params:
            if p.name not in shared:
                assert f'p["{p.name}"]' in source, (method, p.name)
