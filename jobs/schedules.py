"""Values that vary by layer and by module: an adapter's ``weight``, ``density`` or ``drop``
in the job spec (docs/job-spec.md, "Per-layer and per-module values").

A schedule is one of three shapes, the ones mergekit users already write:

- a number: every module;
- a list of numbers, a *gradient* over the layer index: with L layers, layer i sits at
  t = i / (L - 1) on the list and takes the value interpolated linearly between its two
  nearest points (mergekit's rule for list-valued parameters); a module outside any layer
  takes the first value, as mergekit's non-layer tensors do;
- a list of rules ``{"modules": PATTERN, "value": number or gradient}``: the first rule
  whose pattern is found in the module's name gives the value (a rule without ``modules``
  matches every module); when none matches, the adapter's default applies.

Patterns are regular expressions *searched* in the module name (``mlp`` matches
``model.layers.3.mlp.down_proj``), checked at submission (they must compile; at most
:data:`MAX_PATTERNS` in a job) and matched by the worker under the same bounds as an
adapter's rank/alpha patterns: a timeout per match and :data:`PATTERN_BUDGET_S` in all.

>>> at_layer([0.0, 1.0], layer=1, layers=3)
0.5
>>> layer_index("model.layers.12.self_attn.q_proj"), layer_index("lm_head")
(12, None)

This module imports neither torch nor anything of the worker: the API validates with it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import regex
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

__all__ = [
    "MAX_GRADIENT_POINTS",
    "MAX_PATTERNS",
    "MAX_PATTERN_CHARS",
    "NUMBER_SHAPE",
    "PATTERN_BUDGET_S",
    "PATTERN_TIMEOUT_S",
    "ModuleFilter",
    "ModuleMatcher",
    "ModuleRule",
    "PatternLimit",
    "Schedule",
    "at_layer",
    "evaluate",
    "layer_index",
    "schedule_numbers",
    "schedule_patterns",
]

#: Module patterns one job may hold, rules and include/exclude together: the bound of an
#: adapter's rank_pattern + alpha_pattern (``worker.adapters.config.MAX_PATTERNS``; a test
#: keeps the two equal).
MAX_PATTERNS = 1024
#: Seconds one pattern may take on one module name, and all of a job's matching together
#: (``worker.adapters.config``'s PATTERN_TIMEOUT_S and PATTERN_BUDGET_S).
PATTERN_TIMEOUT_S = 0.2
PATTERN_BUDGET_S = 2.0
#: The longest pattern: module names are a few dozen characters.
MAX_PATTERN_CHARS = 1000
#: Points of one gradient: more than any model has layers.
MAX_GRADIENT_POINTS = 1024

_FINITE = Annotated[float, Field(allow_inf_nan=False)]
Gradient = Annotated[list[_FINITE], Field(min_length=1, max_length=MAX_GRADIENT_POINTS)]
# The first all-digit segment of a module name is its layer (model.layers.12.mlp.up_proj,
# transformer.h.3.attn.c_attn, encoder.block.5.layer.0.SelfAttention.q).
_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def _check_pattern(pattern: str) -> str:
    """A pattern must compile (as the worker will compile it)."""
    try:
        regex.compile(pattern)
    except regex.error as exc:
        raise ValueError(f"not a valid regular expression ({exc})") from None
    return pattern


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModuleRule(_Strict):
    """One rule of a per-module schedule: the modules it covers and their value."""

    modules: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_PATTERN_CHARS,
        description="a regular expression searched in the module's name (e.g. mlp, "
        "self_attn, layers\\.(0|1)\\.); null matches every module",
    )
    value: _FINITE | Gradient = Field(description="a number, or a gradient over the layers")

    @field_validator("modules")
    @classmethod
    def _compile(cls, pattern: str | None) -> str | None:
        return None if pattern is None else _check_pattern(pattern)


Rules = Annotated[list[ModuleRule], Field(min_length=1, max_length=MAX_PATTERNS)]


#: The tag of a schedule written as one number (error locations end in it; the API names the
#: field itself).
NUMBER_SHAPE = "number"


def _shape(value: Any) -> str:
    """Which of the three shapes ``value`` is written in (so that an error names the one
    meant: ``weight.rules.0.modules``, not every shape it failed to be)."""
    if isinstance(value, list):
        items = [v.model_dump() if isinstance(v, ModuleRule) else v for v in value]
        return "rules" if any(isinstance(v, dict) for v in items) else "gradient"
    return NUMBER_SHAPE


#: A value that may vary by layer and by module (the module docstring).
Schedule = Annotated[
    Annotated[_FINITE, Tag(NUMBER_SHAPE)]
    | Annotated[Gradient, Tag("gradient")]
    | Annotated[Rules, Tag("rules")],
    Discriminator(_shape),
]

Pattern = Annotated[str, Field(min_length=1, max_length=MAX_PATTERN_CHARS)]


class ModuleFilter(_Strict):
    """Which modules the job merges: those matching some ``include`` pattern (every module
    when there is none) and no ``exclude`` pattern. The others are left out of the output."""

    include: list[Pattern] = Field(default_factory=list, max_length=MAX_PATTERNS)
    exclude: list[Pattern] = Field(default_factory=list, max_length=MAX_PATTERNS)

    @field_validator("include", "exclude")
    @classmethod
    def _compile(cls, patterns: list[str]) -> list[str]:
        for i, pattern in enumerate(patterns):
            try:
                _check_pattern(pattern)
            except ValueError as exc:
                raise ValueError(f"pattern {i} ({pattern[:80]!r}): {exc}") from None
        return patterns


def schedule_patterns(schedule: Any) -> Iterator[str]:
    """The patterns a schedule holds."""
    if isinstance(schedule, list):
        for item in schedule:
            if isinstance(item, ModuleRule) and item.modules is not None:
                yield item.modules


def schedule_numbers(schedule: Any) -> Iterator[float]:
    """Every number a schedule can give (for range checks)."""
    items = schedule if isinstance(schedule, list) else [schedule]
    for item in items:
        value = item.value if isinstance(item, ModuleRule) else item
        yield from value if isinstance(value, list) else [value]


def layer_index(module: str) -> int | None:
    """The layer a module belongs to: its name's first all-digit segment; None outside layers."""
    match = _LAYER.search(module)
    return int(match.group(1)) if match else None


def at_layer(gradient: list[float], layer: int | None, layers: int) -> float:
    """The gradient's value at ``layer`` of ``layers`` (mergekit's interpolation)."""
    t = 0.0 if layer is None or layers <= 1 else min(layer / (layers - 1), 1.0)
    scaled = t * (len(gradient) - 1)
    i0 = int(scaled)
    i1 = min(len(gradient) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * gradient[i0] + frac * gradient[i1]


class PatternLimit(ValueError):
    """A module pattern took too long: one match over the timeout, or the job's budget."""


class ModuleMatcher:
    """Searches module patterns in module names within the job's time budget (one per job,
    shared by every schedule and the include/exclude filter), each pattern compiled once."""

    def __init__(
        self,
        budget_s: float = PATTERN_BUDGET_S,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.budget_s, self.spent, self._clock = budget_s, 0.0, clock
        self._compiled: dict[str, Any] = {}

    def found(self, pattern: str, module: str) -> bool:
        """Whether ``pattern`` occurs in ``module``; :class:`PatternLimit` past the bounds."""
        left = self.budget_s - self.spent
        if left <= 0:
            raise self._over_budget()
        timeout = min(PATTERN_TIMEOUT_S, left)
        started = self._clock()
        try:
            if pattern not in self._compiled:
                self._compiled[pattern] = regex.compile(pattern)
            return self._compiled[pattern].search(module, timeout=timeout) is not None
        except TimeoutError:
            if timeout < PATTERN_TIMEOUT_S:
                raise self._over_budget() from None
            raise PatternLimit(
                f"module pattern {pattern[:80]!r} takes over {PATTERN_TIMEOUT_S} s to match "
                f"module {module[:80]!r} (catastrophic backtracking)"
            ) from None
        finally:
            self.spent += self._clock() - started

    def _over_budget(self) -> PatternLimit:
        return PatternLimit(
            f"matching the job's module patterns took over {self.budget_s:g} s in total, the "
            "limit (too many patterns or modules, or patterns too slow to match)"
        )

    def any_found(self, patterns: list[str], module: str) -> bool:
        return any(self.found(p, module) for p in patterns)


def evaluate(schedule: Any, module: str, layers: int, matcher: ModuleMatcher) -> float | None:
    """The schedule's value for ``module`` (of a model with ``layers`` layers); None when it
    is a list of rules of which none covers the module."""
    if isinstance(schedule, int | float):
        return float(schedule)
    if schedule and not isinstance(schedule[0], ModuleRule):
        return at_layer(schedule, layer_index(module), layers)
    for rule in schedule:
        if rule.modules is None or matcher.found(rule.modules, module):
            value = rule.value
            if isinstance(value, list):
                return at_layer(value, layer_index(module), layers)
            return float(value)
    return None
