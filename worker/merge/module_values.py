"""What the job spec gives each module: merged or left out, and each adapter's weight and
own method parameters there (``jobs.schedules``: numbers, gradients over the layers, rules
by module pattern).

Evaluated once, when the plan is made, from module names alone: the plan then knows which
adapters take part in each module (a weight of 0 takes an adapter out, so the module's
stack is smaller) before any tensor is read. Every pattern of the job is matched by one
:class:`jobs.schedules.ModuleMatcher`, so the job's matching stays within its time budget.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from jobs.errors import AdapterIncompatible, LimitExceeded
from jobs.schedules import ModuleMatcher, PatternLimit, evaluate, layer_index
from jobs.spec import PER_ADAPTER_PARAMS, MergeSpec

__all__ = ["NORMALIZE_EPS", "ModuleValues", "model_layers"]

#: A sum of weights smaller than this in magnitude is not divided by (mergekit's guard).
NORMALIZE_EPS = 1e-8


def model_layers(spec: MergeSpec, modules: Iterable[str]) -> int:
    """The number of layers gradients are spread over: the spec's ``layers``, else one more
    than the largest layer index among ``modules`` (the inputs' modules)."""
    indices = {(m, layer_index(m)) for m in modules}
    largest = max((i for _, i in indices if i is not None), default=0)
    if spec.layers is None:
        return largest + 1
    if largest >= spec.layers:
        module = next(m for m, i in indices if i == largest)
        raise AdapterIncompatible(
            f"module {module!r} is in layer {largest}, but the job's layers is {spec.layers}: "
            "give the model's number of layers, or leave layers unset"
        )
    return spec.layers


@dataclass(frozen=True)
class Taking:
    """The adapters that take part in one module, their weights there (normalised when the
    spec asks) and the per-task method parameters they set."""

    sources: tuple[int, ...]
    weights: tuple[float, ...]
    task_params: dict[str, tuple[float, ...]]


class ModuleValues:
    """The spec's per-module values for one job (one pattern budget for all of them)."""

    def __init__(self, spec: MergeSpec, layers: int, matcher: ModuleMatcher | None = None) -> None:
        self.spec, self.layers = spec, layers
        self.matcher = matcher or ModuleMatcher()

    def _limit(self, exc: PatternLimit) -> LimitExceeded:
        return LimitExceeded(str(exc))

    def selected(self, module: str) -> bool:
        """Whether ``modules.include`` / ``modules.exclude`` let the job merge ``module``."""
        include, exclude = self.spec.modules.include, self.spec.modules.exclude
        try:
            if include and not self.matcher.any_found(include, module):
                return False
            return not (exclude and self.matcher.any_found(exclude, module))
        except PatternLimit as exc:
            raise self._limit(exc) from None

    def _value(self, schedule: object, module: str, default: float) -> float:
        try:
            value = evaluate(schedule, module, self.layers, self.matcher)
        except PatternLimit as exc:
            raise self._limit(exc) from None
        return default if value is None else value

    def taking(self, module: str, having: Iterable[int]) -> Taking:
        """Of the adapters ``having`` the module, those whose weight there is not 0.

        With ``normalize``, the weights are divided by the sum of every adapter's weight at
        this module, those without the module included: mergekit merges models, in which an
        adapter that lacks a module is an update of 0 there whose weight still counts."""
        every = [self._value(ref.weight, module, 1.0) for ref in self.spec.adapters]
        sources = [i for i in having if every[i] != 0.0]
        weights = [every[i] for i in sources]
        if self.spec.normalize:
            total = sum(every)
            if abs(total) >= NORMALIZE_EPS:
                weights = [w / total for w in weights]
        task_params = {}
        for name in PER_ADAPTER_PARAMS:
            if any(getattr(self.spec.adapters[i], name) is not None for i in sources):
                default = float(self.spec.params[name])
                task_params[name] = tuple(
                    self._value(getattr(self.spec.adapters[i], name), module, default)
                    if getattr(self.spec.adapters[i], name) is not None
                    else default
                    for i in sources
                )
        return Taking(tuple(sources), tuple(weights), task_params)
