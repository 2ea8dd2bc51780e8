"""Which inference servers load a merged adapter, and with which setting (docs/serving.md).

The rules of every server are ONE table, ``jobs.servers.SERVERS``, as data: the ranks a server
accepts, the setting that admits a rank, the ranks it runs fastest at, the module kinds and
the file size it takes. :func:`serving_section` applies them to what was written (its rank,
its modules, its dtype and size) for the report's and the model card's ``serving`` section;
:func:`rank_for_server` picks the smallest rank a server takes that keeps a share of every
module's energy (the rule behind a rank chosen for a server, docs/serving.md says what it
costs a streamed merge). Pure Python: the service may import it (no torch here).

The facts were checked on 2026-12-07 against each server's documentation (``source``); a
server changes its limits by release, so each verdict names the rule it applied.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from jobs.servers import MB, SERVERS, ServerRule, server_rank

__all__ = [
    "module_kinds",
    "rank_for_energy",
    "rank_for_server",
    "serving_section",
    "verdict",
]


def module_kinds(modules: Iterable[str]) -> list[str]:
    """The module kinds (last name segment: ``q_proj``) of full module names, sorted."""
    return sorted({name.rsplit(".", 1)[-1] for name in modules})


def _smallest_setting(rule: ServerRule, rank: int) -> int | None:
    """The smallest value of the server's rank setting that admits ``rank``."""
    if rule.settings is None:
        return rank
    return next((s for s in rule.settings if s >= rank), None)


def _blockers(rule: ServerRule, rank: int, kinds: Sequence[str], nbytes: int) -> list[str]:
    """Why the server cannot load the adapter (empty when it can)."""
    out = []
    if rule.max_rank is not None and rank > rule.max_rank:
        out.append(f"rank {rank} is above its limit of {rule.max_rank}")
    if rule.min_rank is not None and rank < rule.min_rank:
        out.append(f"rank {rank} is below its minimum of {rule.min_rank}")
    if rule.settings is not None and _smallest_setting(rule, rank) is None:
        out.append(f"rank {rank} is above its largest {rule.setting} ({rule.settings[-1]})")
    if rule.modules is not None and (extra := [k for k in kinds if k not in rule.modules]):
        out.append(f"it does not take the module kinds {', '.join(extra)}")
    if rule.max_bytes is not None and nbytes >= rule.max_bytes:
        out.append(
            f"the file has {nbytes / MB:.1f} MB, its limit is under {rule.max_bytes // MB} MB"
        )
    return out


def verdict(rule: ServerRule, rank: int, kinds: Sequence[str], nbytes: int) -> dict[str, Any]:
    """One server's verdict: whether it loads the adapter, with which setting, and why not."""
    blockers = _blockers(rule, rank, kinds, nbytes)
    out: dict[str, Any] = {"server": rule.name, "loads": not blockers, "setting": None}
    if blockers:
        out["detail"] = f"{rule.title}: does not load it: " + "; ".join(blockers)
    elif rule.setting is not None:
        value = _smallest_setting(rule, rank)
        is_default = rule.default is not None and value is not None and value <= rule.default
        out["setting"] = f"{rule.setting} {rule.default if is_default else value}"
        note = " (its default)" if is_default else ""
        out["detail"] = f"{rule.title}: loads with `{out['setting']}`{note}"
    else:
        out["detail"] = f"{rule.title}: loads"
    if not blockers and rule.fast_ranks is not None and rank not in rule.fast_ranks:
        out["detail"] += (
            f", but rank {rank} is not one of its fast ranks "
            f"({', '.join(map(str, rule.fast_ranks))}): no CUDA graphs"
        )
    out["rule"] = rule.note
    out["source"] = rule.source
    return out


def serving_section(rank: int, modules: Iterable[str], dtype: str, nbytes: int) -> dict[str, Any]:
    """The report's ``serving`` section: the adapter's facts and every server's verdict."""
    kinds = module_kinds(modules)
    return {
        "checked": "2026-12-07",
        "rank": rank,
        "module_kinds": kinds,
        "dtype": dtype,
        "bytes": nbytes,
        "servers": [verdict(rule, rank, kinds, nbytes) for rule in SERVERS],
    }


def rank_for_energy(spectra: Iterable[Sequence[float]], keep: float) -> int:
    """The smallest k at which EVERY module keeps at least ``keep`` of its energy: with a
    module's singular values S (descending), Σ_{i<k} S_i² ≥ keep · Σ_i S_i². ``spectra``
    holds each module's S; a module with no energy needs nothing."""
    if not 0 < keep <= 1:
        raise ValueError(f"the share of energy to keep must be in (0, 1], not {keep}")
    need = 0
    for values in spectra:
        energies = [s * s for s in values]
        total, running = sum(energies), 0.0
        for k, e in enumerate(energies, start=1):
            running += e
            if running >= keep * total * (1 - 1e-12):
                need = max(need, k)
                break
    return max(need, 1)


def rank_for_server(
    rule: ServerRule, spectra: Iterable[Sequence[float]], keep: float
) -> dict[str, Any]:
    """The smallest rank ``rule``'s server takes (its setting values, fast ranks and bounds)
    at which every module keeps ``keep`` of its energy, or its largest rank when none does.

    Returns the rank, whether the energy target was met, and the rank the energy alone
    needed, so the report can say what was kept and what bound the choice.
    """
    needed = rank_for_energy(spectra, keep)
    rank, _ = server_rank(rule, needed)
    return {"server": rule.name, "rank": rank, "energy_rank": needed, "met": rank >= needed}
