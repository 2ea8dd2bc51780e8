"""The values of a mergekit configuration, as the job spec takes them (``jobs.mergekit``).

mergekit's parameter settings are a number, a list of numbers (a gradient over the layers),
or conditional values ``{filter, value}`` (one, or a list tried in order); this module
checks them and turns them into job-spec schedules (``jobs.schedules``): a ``filter``
becomes a module pattern that matches exactly where mergekit's substring test on the tensor
name matches. Errors are :class:`MergekitConfigError`, one line naming the key.
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = [
    "MergekitConfigError",
    "as_schedule",
    "covers_every_module",
    "filter_pattern",
    "map_numbers",
    "map_values",
    "mapping",
    "nonzero_indicator",
    "number",
    "numbers",
    "value_or_gradient",
    "with_fallback",
]


class MergekitConfigError(ValueError):
    """A configuration coremerge cannot run as mergekit would: the message names the key."""


def mapping(value: object, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MergekitConfigError(f"{key}: expected a mapping of names to values")
    return value


def number(value: object, key: str) -> float:
    """A finite number (mergekit, through pydantic, also takes numeric strings: ``1e-3``)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise MergekitConfigError(f"{key}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise MergekitConfigError(f"{key}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise MergekitConfigError(f"{key}: must be a finite number, got {value!r}")
    return number


def value_or_gradient(value: object, key: str) -> float | list[float]:
    """A number or a gradient (a list of numbers)."""
    if isinstance(value, list):
        if not value:
            raise MergekitConfigError(f"{key}: an empty list")
        return [number(v, f"{key}[{j}]") for j, v in enumerate(value)]
    return number(value, key)


def filter_pattern(text: str) -> str | None:
    """mergekit's ``filter`` as a module pattern: mergekit tests ``filter in tensor_name``,
    the tensor being ``<module>.weight``; a module pattern is searched in ``<module>``. So
    the filter matches when it lies in the module's name, lies in ``.weight``, or runs from
    the name's end into ``.weight``. ``*`` matches everything (None)."""
    if text == "*" or text in ".weight":
        return None
    tails = [
        re.escape(text[:k]) + "$" for k in range(1, len(text)) if ".weight".startswith(text[k:])
    ]
    return "|".join([re.escape(text), *tails])


def as_schedule(setting: object, key: str) -> Any:
    """A mergekit parameter setting (number, gradient, ``{filter, value}`` or a list of
    them) as a job-spec schedule (``jobs.schedules``)."""
    if isinstance(setting, dict) or (
        isinstance(setting, list) and any(isinstance(s, dict) for s in setting)
    ):
        rules = []
        for j, cond in enumerate(setting if isinstance(setting, list) else [setting]):
            where = f"{key}[{j}]" if isinstance(setting, list) else key
            cond = mapping(cond, where)
            extra = sorted(set(cond) - {"filter", "value"})
            if extra or "value" not in cond:
                raise MergekitConfigError(
                    f"{where}.{extra[0] if extra else 'value'}: a conditional value has "
                    "value: and, optionally, filter:"
                )
            flt = cond.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise MergekitConfigError(f"{where}.filter: expected a string")
            pattern = None if flt is None else filter_pattern(flt)
            rules.append(
                {"modules": pattern, "value": value_or_gradient(cond["value"], f"{where}.value")}
            )
        return rules
    return value_or_gradient(setting, key)


def with_fallback(own: Any, glob: Any) -> Any:
    """A model's setting, falling back to the global one where no filter of its own matches
    (mergekit's lookup order)."""
    if own is None:
        return glob
    if glob is None or not isinstance(own, list) or not own or not isinstance(own[0], dict):
        return own
    if any(rule["modules"] is None for rule in own):
        return own
    return own + (glob if isinstance(glob, list) and glob and isinstance(glob[0], dict)
                  else [{"modules": None, "value": glob}])  # fmt: skip


def covers_every_module(schedule: Any) -> bool:
    rules = isinstance(schedule, list) and schedule and isinstance(schedule[0], dict)
    return not rules or any(rule["modules"] is None for rule in schedule)


def map_numbers(schedule: Any, f: Any) -> Any:
    """``schedule`` with every number ``x`` replaced by ``f(x)``."""
    if isinstance(schedule, list):
        return [map_numbers(s, f) if not isinstance(s, dict)
                else {**s, "value": map_numbers(s["value"], f)} for s in schedule]  # fmt: skip
    return f(schedule)


def numbers(schedule: Any) -> list[float]:
    if isinstance(schedule, list):
        return [n for s in schedule for n in numbers(s["value"] if isinstance(s, dict) else s)]
    return [schedule]


def nonzero_indicator(value: float | list[float]) -> float | None:
    """1 where a value is never 0, 0 where it is always 0, None when it crosses 0."""
    points = value if isinstance(value, list) else [value]
    if all(p == 0 for p in points):
        return 0.0
    if all(p > 0 for p in points) or all(p < 0 for p in points):
        return 1.0
    return None


def map_values(schedule: Any, f: Any) -> Any:
    """``schedule`` with every value (number or gradient) ``v`` replaced by ``f(v)``; None
    when ``f`` gives None for one."""
    if isinstance(schedule, list) and schedule and isinstance(schedule[0], dict):
        values = [f(rule["value"]) for rule in schedule]
        if None in values:
            return None
        return [{**rule, "value": v} for rule, v in zip(schedule, values, strict=True)]
    return f(schedule)
