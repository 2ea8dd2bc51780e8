"""The runnable examples in module docstrings stay true."""

from __future__ import annotations

import doctest

import pytest

import jobs.spec
import worker.engine


@pytest.mark.parametrize("module", [jobs.spec, worker.engine], ids=lambda m: m.__name__)
def test_docstring_examples(module) -> None:
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
