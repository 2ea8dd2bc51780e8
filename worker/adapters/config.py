"""``adapter_config.json`` of a PEFT LoRA or VeRA adapter: parsing, refusal of unsupported
features, and the per-module scaling s = lora_alpha / r (or / √r with rslora; rank_pattern and
alpha_pattern per module, matched exactly as PEFT's ``get_pattern_key`` does). A VeRA
adapter's scaling is 1: its update is diag(λ_b) B diag(λ_d) A.
"""

from __future__ import annotations

import json
import math
import re
import re._constants as sre
import re._parser as sre_parse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex

from jobs.errors import AdapterInvalid, LimitExceeded

from .format import CONFIG_NAME, MAX_CONFIG_BYTES

__all__ = [
    "CONFIG_NAME",
    "MAX_PATTERNS",
    "MAX_PATTERN_CHARS",
    "MAX_PATTERN_REPEAT",
    "PATTERN_BUDGET_S",
    "LoraAdapterConfig",
    "PatternBudget",
    "PatternBudgetExceeded",
    "PatternTimeout",
    "read_adapter_config",
]

#: Seconds one rank/alpha pattern may take to match one module name (microseconds normally).
PATTERN_TIMEOUT_S = 0.2
#: rank_pattern plus alpha_pattern entries one adapter may have. Every pattern is matched
#: against every module name, so the count multiplies the work; PEFT writes one per module
#: at most, and no real model is near a thousand distinct patterns.
MAX_PATTERNS = 1024
#: The longest rank/alpha pattern: PEFT writes a module name (or its suffix) there, a few
#: hundred characters at most.
MAX_PATTERN_CHARS = 512
#: The largest count of a counted repeat (``{n}``, ``{n,m}``) in a pattern. The ``regex``
#: module unrolls counted repeats when it compiles, so ``((a{1000}){1000}){10}`` would need
#: gigabytes before any timeout could apply; a module name is shorter than this anyway.
MAX_PATTERN_REPEAT = 100
#: Seconds all of one adapter's pattern matching may take together. Each match is capped at
#: PATTERN_TIMEOUT_S, but 0.2 s times thousands of modules and patterns would still hold a
#: worker for hours; a normal adapter spends milliseconds here.
PATTERN_BUDGET_S = 2.0

# Initialisations that rewrite the base weights: the adapter alone does not describe ΔW
# (LoRA-GA, like PiSSA, subtracts its initial factors from the base weight).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
#: Variants whose update is not ΔW = s·B·A on every input: merged as plain LoRA, they would
#: be merged silently wrong. (field, why)
_OTHER_COMPUTATIONS = (
    ("alora_invocation_tokens", "aLoRA (alora_invocation_tokens) applies only after its "
     "invocation tokens"),
    ("use_qalora", "QALoRA (use_qalora) applies A to pooled inputs"),
    ("use_bdlora", "BD-LoRA (use_bdlora) splits its factors in blocks across devices"),
    ("arrow_config", "Arrow (arrow_config) routes each token among several LoRA experts"),
)  # fmt: skip


@dataclass(frozen=True)
class LoraAdapterConfig:
    """The fields of a PEFT LoRA config that decide ΔW and the merged adapter's config."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    target_modules: list[str] | str | None = None
    layers_to_transform: Any = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    peft_type: str = "LORA"  # or "VERA"
    # VeRA only: how PEFT draws the shared projections, and whether they were saved.
    projection_prng_key: int = 0
    save_projection: bool = True
    base_model_class: str | None = None  # from PEFT's auto_mapping, e.g. LlamaForCausalLM

    def scaling(self, module: str, budget: PatternBudget | None = None) -> float:
        """s_t for ``module`` (its name in the base model, e.g. ``model.layers.0.self_attn.q_proj``).

        ``budget`` counts the time spent matching patterns (one per adapter, see
        :class:`PatternBudget`); without one, only each match's own timeout applies.
        """
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, module, budget), self.r)
        alpha = self.alpha_pattern.get(
            _pattern_key(self.alpha_pattern, module, budget), self.lora_alpha
        )
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def expected_rank(self, module: str, budget: PatternBudget | None = None) -> int:
        return self.rank_pattern.get(_pattern_key(self.rank_pattern, module, budget), self.r)


#: The clock that pattern matching is timed with (a test replaces it).
_clock = time.perf_counter


def _compile(key: str) -> Any:
    """A pattern's matcher: PEFT's rule, the pattern matches a dotted suffix of the name."""
    return regex.compile(rf"(.*\.)?({key})$")


class PatternTimeout(ValueError):
    """A rank/alpha pattern took too long to match a module name (catastrophic backtracking)."""


class PatternBudgetExceeded(ValueError):
    """One adapter's pattern matching took over :data:`PATTERN_BUDGET_S` in total."""


class PatternBudget:
    """The time one adapter's rank/alpha pattern matching may still take, summed over every
    match (a reader makes one and passes it to each ``scaling`` / ``expected_rank`` call)."""

    def __init__(self, seconds: float | None = None) -> None:
        self.seconds = PATTERN_BUDGET_S if seconds is None else seconds
        self.spent = 0.0
        # Each pattern compiled once per adapter: every module name is matched against every
        # pattern, and regex's own cache (a few hundred entries) would thrash on more.
        self.compiled: dict[str, Any] = {}

    def matcher(self, key: str) -> Any:
        if key not in self.compiled:
            self.compiled[key] = _compile(key)
        return self.compiled[key]

    def timeout(self) -> float:
        """The timeout for the next match: the per-match cap, or what is left if less."""
        left = self.seconds - self.spent
        if left <= 0:
            raise self.exceeded()
        return min(PATTERN_TIMEOUT_S, left)

    def charge(self, seconds: float) -> None:
        self.spent += seconds

    def exceeded(self) -> PatternBudgetExceeded:
        return PatternBudgetExceeded(
            f"rank/alpha pattern matching took over {self.seconds:g} s in total, the limit "
            "per adapter (too many patterns or modules, or patterns too slow to match)"
        )


def _pattern_key(patterns: dict[str, Any], module: str, budget: PatternBudget | None = None) -> str:
    # Same rule as peft.utils.other.get_pattern_key: a pattern matches a dotted suffix. The
    # patterns come from the adapter, so a hostile one such as "(a|aa)+b" could backtrack for
    # hours on a long module name: the ``regex`` module (re-compatible) stops it. Compiling
    # is timed with the match (it cannot be interrupted: read_adapter_config bounds it).
    for key in patterns:
        timeout = PATTERN_TIMEOUT_S if budget is None else budget.timeout()
        started = _clock()
        try:
            matcher = _compile(key) if budget is None else budget.matcher(key)
            matched = matcher.match(module, timeout=timeout) is not None
        except TimeoutError:
            if timeout < PATTERN_TIMEOUT_S:  # the adapter's total ran out, not this match's
                raise budget.exceeded() from None  # type: ignore[union-attr]
            raise PatternTimeout(
                f"rank/alpha pattern {key!r} takes over {PATTERN_TIMEOUT_S} s to match "
                f"module {module[:80]!r} (catastrophic backtracking)"
            ) from None
        finally:
            if budget is not None:
                budget.charge(_clock() - started)
        if budget is not None and budget.spent > budget.seconds:  # compiling counts too
            raise budget.exceeded()
        if matched:
            return key
    return module


def _refusals(raw: dict[str, Any]) -> list[str]:
    """Every feature of this config that coremerge cannot merge, in words (docs/methods.md)."""
    out = []
    if raw.get("use_dora"):
        out.append("DoRA (use_dora) is not supported")
    if raw.get("lora_bias"):
        out.append("lora_bias is not supported")
    if raw.get("bias", "none") not in ("none", None):
        out.append(f"bias={raw['bias']!r} is not supported (only 'none')")
    if raw.get("modules_to_save"):
        out.append(f"modules_to_save {raw['modules_to_save']} is not supported (LoRA factors only)")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        out.append(f"init_lora_weights={init!r} changes the base weights and is not supported")
    if raw.get("target_parameters"):
        out.append("target_parameters is not supported")
    if raw.get("layer_replication"):
        out.append("layer_replication is not supported")
    if raw.get("trainable_token_indices"):
        out.append("trainable_token_indices is not supported")
    for name, why in _OTHER_COMPUTATIONS:
        if raw.get(name) not in (None, False, [], {}):
            out.append(f"{why} and is not supported")
    return out


def _wrong_types(raw: dict[str, Any]) -> list[str]:
    """Fields whose type is not PEFT's (they would otherwise fail deep inside the plan)."""
    out = []
    for name in ("base_model_name_or_path", "task_type"):
        if not isinstance(raw.get(name), str | None):
            out.append(f"{name} must be a string, got {type(raw[name]).__name__}")
    targets = raw.get("target_modules")
    if not (
        targets is None
        or isinstance(targets, str)
        or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        out.append("target_modules must be a string or a list of strings")
    for name in ("rank_pattern", "alpha_pattern", "auto_mapping"):
        if not isinstance(raw.get(name), dict | None):
            out.append(f"{name} must be an object, got {type(raw[name]).__name__}")
    model_class = (raw.get("auto_mapping") or {}).get("base_model_class")
    if not isinstance(model_class, str | None):
        out.append(
            f"auto_mapping.base_model_class must be a string, got {type(model_class).__name__}"
        )
    return out


_REPEATS = {sre.MAX_REPEAT, sre.MIN_REPEAT, getattr(sre, "POSSESSIVE_REPEAT", sre.MAX_REPEAT)}


def _parts(op: Any, av: Any) -> list[Any]:
    """The sub-patterns of one node of a parsed pattern (``re``'s own parser)."""
    if op in _REPEATS:
        return [av[2]]
    if op is sre.SUBPATTERN:
        return [av[3]]
    if op is sre.BRANCH:
        return list(av[1])
    if op in (sre.ASSERT, sre.ASSERT_NOT):
        return [av[1]]
    if op is getattr(sre, "ATOMIC_GROUP", None):
        return [av]
    if op is sre.GROUPREF_EXISTS:
        return [p for p in av[1:] if p is not None]
    return []


def _repeat_refusal(items: Any, inside_repeat: bool) -> tuple[type[Exception], str] | None:
    """Why a parsed pattern is refused before it is compiled: a counted repeat over
    :data:`MAX_PATTERN_REPEAT`, or a repeat inside a repeat (``?`` counts as none)."""
    for op, av in items:
        repeats = False
        if op in _REPEATS:
            counts = [c for c in av[:2] if c is not sre.MAXREPEAT]
            if max(counts, default=0) > MAX_PATTERN_REPEAT:
                return LimitExceeded, (
                    f"repeats {max(counts)} times, over the limit of {MAX_PATTERN_REPEAT} per "
                    "counted repeat"
                )
            repeats = av[1] is sre.MAXREPEAT or av[1] > 1
            if repeats and inside_repeat:
                return AdapterInvalid, (
                    "repeats a group that repeats itself, which a module name pattern never "
                    "needs (nested repeats can take exponential time)"
                )
        for part in _parts(op, av):
            refused = _repeat_refusal(part, inside_repeat or repeats)
            if refused is not None:
                return refused
    return None


def _check_pattern_shapes(raw: dict[str, Any], adapter: str) -> None:
    """Refuse a rank/alpha pattern that is too long, not a regular expression, or whose
    repeats could make compiling or matching it costly, before any is compiled (the parse
    is ``re``'s own, which builds a tree and expands nothing)."""
    for pattern in [*(raw.get("rank_pattern") or {}), *(raw.get("alpha_pattern") or {})]:
        shown = pattern if len(pattern) <= 80 else pattern[:77] + "..."
        if len(pattern) > MAX_PATTERN_CHARS:
            raise LimitExceeded(
                f"adapter {adapter!r}: rank/alpha pattern {shown!r} is {len(pattern)} "
                f"characters long, over the limit of {MAX_PATTERN_CHARS}"
            )
        try:
            refused = _repeat_refusal(sre_parse.parse(pattern), False)
        except (re.error, RecursionError, OverflowError) as exc:
            raise AdapterInvalid(
                f"adapter {adapter!r}: bad rank/alpha pattern {shown!r}: {exc}"
            ) from None
        if refused is not None:
            kind, why = refused
            raise kind(f"adapter {adapter!r}: rank/alpha pattern {shown!r} {why}")


def _check_pattern_count(raw: dict[str, Any], adapter: str) -> None:
    """Refuse more than :data:`MAX_PATTERNS` rank/alpha patterns, before any is compiled."""
    count = len(raw.get("rank_pattern") or {}) + len(raw.get("alpha_pattern") or {})
    if count > MAX_PATTERNS:
        raise LimitExceeded(
            f"adapter {adapter!r}: {count} rank_pattern and alpha_pattern entries, over the "
            f"limit of {MAX_PATTERNS} per adapter"
        )


def read_adapter_config(directory: Path, adapter: str) -> LoraAdapterConfig:
    """Parse and check ``directory/adapter_config.json``; ``adapter`` names it in errors."""
    raw = _load_json(directory, adapter)
    peft_type = raw.get("peft_type")
    if peft_type not in ("LORA", "VERA"):
        raise AdapterInvalid(
            f"adapter {adapter!r}: peft_type {peft_type!r} is not supported (LoRA and VeRA only)"
        )
    wrong_types = _wrong_types(raw)
    if wrong_types:
        raise AdapterInvalid(f"adapter {adapter!r}: {CONFIG_NAME}: " + "; ".join(wrong_types))
    _check_pattern_count(raw, adapter)
    _check_pattern_shapes(raw, adapter)
    refused = _refusals(raw)
    if refused:
        raise AdapterInvalid(f"adapter {adapter!r}: " + "; ".join(refused))
    try:
        config = LoraAdapterConfig(
            r=int(raw["r"]),
            # VeRA has no alpha: alpha = r makes its scaling 1.
            lora_alpha=float(raw["r"] if peft_type == "VERA" else raw.get("lora_alpha", 8)),
            use_rslora=bool(raw.get("use_rslora", False)),
            rank_pattern={str(k): int(v) for k, v in (raw.get("rank_pattern") or {}).items()},
            alpha_pattern={str(k): float(v) for k, v in (raw.get("alpha_pattern") or {}).items()},
            fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
            target_modules=raw.get("target_modules"),
            layers_to_transform=raw.get("layers_to_transform"),
            base_model_name_or_path=raw.get("base_model_name_or_path"),
            task_type=raw.get("task_type"),
            peft_type=peft_type,
            projection_prng_key=int(raw.get("projection_prng_key", 0)),
            save_projection=bool(raw.get("save_projection", True)),
            base_model_class=(raw.get("auto_mapping") or {}).get("base_model_class"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterInvalid(f"adapter {adapter!r}: bad value in {CONFIG_NAME}: {exc!r}") from None
    _check_values(config, adapter)
    return config


def _load_json(directory: Path, adapter: str) -> dict[str, Any]:
    """The config file as a JSON object: present, at most 1 MiB, valid JSON."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterInvalid(f"adapter {adapter!r}: no {CONFIG_NAME} in {directory}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterInvalid(f"adapter {adapter!r}: {CONFIG_NAME} is larger than 1 MiB")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterInvalid(
            f"adapter {adapter!r}: {CONFIG_NAME} is not valid JSON ({exc})"
        ) from None
    if not isinstance(raw, dict):
        raise AdapterInvalid(f"adapter {adapter!r}: {CONFIG_NAME} is not a JSON object")
    return raw


def _check_values(config: LoraAdapterConfig, adapter: str) -> None:
    """Ranks ≥ 1, finite alphas, patterns that compile."""
    ranks = [config.r, *config.rank_pattern.values()]
    if min(ranks) < 1:
        raise AdapterInvalid(f"adapter {adapter!r}: LoRA rank must be ≥ 1, got {min(ranks)}")
    alphas = [config.lora_alpha, *config.alpha_pattern.values()]
    if not all(math.isfinite(a) for a in alphas):  # JSON as Python reads it allows NaN
        raise AdapterInvalid(
            f"adapter {adapter!r}: lora_alpha must be a finite number, got {alphas}"
        )
    for pattern in [*config.rank_pattern, *config.alpha_pattern]:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise AdapterInvalid(
                f"adapter {adapter!r}: bad rank/alpha pattern {pattern!r}: {exc}"
            ) from None
