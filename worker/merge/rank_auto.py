"""``output.rank: "auto"``: the rank chosen for a server from the merged modules' spectra, and
what the report says about it (docs/serving.md).

The runner merges every module once at its full merged rank to read its singular values
(``MergedModule.spectrum``), keeps of each only the rank its share of energy needs
(:func:`worker.merge.serving.rank_for_energy`, one integer per module: the first pass holds no
factors), then :func:`choose` rounds the largest up to a rank the target server takes
(``jobs.servers.server_rank``), within its cap and the service's limit. The second pass is
the merge of an integer ``output.rank`` at that rank; :func:`section` then reports what each
module kept. Pure Python, like ``worker.merge.serving``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jobs.servers import server_rank, server_rule
from worker.merge.serving import rank_for_energy

__all__ = ["RankChoice", "choose", "needed_rank", "section"]


@dataclass(frozen=True)
class RankChoice:
    """The rank chosen for ``target``: ``rank``; ``energy_rank``, what the energy alone
    needed, and ``module``, the module that needed it; ``bound_by``, what held the rank
    under ``energy_rank`` (None, ``"server"`` or ``"limit"``)."""

    target: str
    energy: float
    rank: int
    energy_rank: int
    module: str
    bound_by: str | None


def needed_rank(spectrum: Sequence[float], energy: float) -> int:
    """The smallest rank at which a module of singular values ``spectrum`` keeps ``energy``."""
    return rank_for_energy([spectrum], energy)


def choose(
    needed: Sequence[tuple[int, str]], target: str, energy: float, limit: int | None
) -> RankChoice:
    """The rank for ``target`` given each module's (needed rank, name): the smallest the
    server takes that is at least every module's need, else the largest it takes within
    ``limit`` (COREMERGE_MAX_OUTPUT_RANK)."""
    energy_rank, module = max(needed, key=lambda item: item[0])
    rank, bound_by = server_rank(server_rule(target), energy_rank, limit)
    return RankChoice(target, energy, rank, energy_rank, module, bound_by)


def _warning(choice: RankChoice, lowest: float, module: str) -> str | None:
    """What the report says when the cap kept a module under the energy asked."""
    if choice.bound_by is None:
        return None
    title = server_rule(choice.target).title
    cap = (
        f"{title}'s largest rank, {choice.rank}"
        if choice.bound_by == "server"
        else f"this service's limit (COREMERGE_MAX_OUTPUT_RANK), rank {choice.rank}"
    )
    return (
        f"output.energy {choice.energy:g} needs rank {choice.energy_rank} "
        f"(module {choice.module!r}); {cap}, keeps {lowest:.4f} of module {module!r}: "
        f"the adapter has rank {choice.rank} and keeps less than asked"
    )


def section(choice: RankChoice, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The report's ``output.rank_auto``: the target and energy asked, the rank chosen and
    what bound it, and the module that kept the least at that rank (from the second pass's
    module records)."""
    kept = [(r["kept_energy"], r["module"]) for r in records if r["kept_energy"] is not None]
    lowest, module = min(kept) if kept else (1.0, None)
    return {
        "target": choice.target,
        "energy": choice.energy,
        "rank": choice.rank,
        "energy_rank": choice.energy_rank,
        "energy_rank_module": choice.module,
        "bound_by": choice.bound_by,
        "met": choice.bound_by is None,
        "lowest_kept_energy": lowest,
        "lowest_kept_module": module,
        "warning": _warning(choice, lowest, str(module)),
    }
