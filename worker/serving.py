"""Which inference servers load a merged adapter, and with which setting (docs/serving.md).

The rules of every server are ONE table, :data:`SERVERS`, as data: the ranks a server
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
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SERVERS",
    "ServerRule",
    "module_kinds",
    "rank_for_energy",
    "rank_for_server",
    "serving_section",
    "verdict",
]

MB = 1_000_000


@dataclass(frozen=True)
class ServerRule:
    """What one server needs of a LoRA adapter (None: no such limit).

    ``settings``: the values its rank setting takes (vLLM's ``max_lora_rank`` is a choice
    among these); ``setting``: the flag that sets it; ``default``: its value when not set;
    ``min_rank``/``max_rank``: hard bounds; ``fast_ranks``: ranks with its fast path (LoRAX's
    CUDA graphs); ``modules``: the module kinds it accepts; ``max_bytes``: the largest
    ``adapter_model.safetensors``.
    """

    name: str
    title: str
    source: str
    setting: str | None = None
    settings: tuple[int, ...] | None = None
    default: int | None = None
    min_rank: int | None = None
    max_rank: int | None = None
    fast_ranks: tuple[int, ...] | None = None
    modules: frozenset[str] | None = None
    max_bytes: int | None = None
    note: str = ""


#: The rules, one row per server (docs/serving.md shows the same table with its sources).
SERVERS: tuple[ServerRule, ...] = (
    ServerRule(
        "vllm", "vLLM", "https://docs.vllm.ai/en/v0.14.0/api/vllm/config/lora/",
        setting="--max-lora-rank", settings=(1, 8, 16, 32, 64, 128, 256, 320, 512), default=16,
        note="refuses an adapter above --max-lora-rank at load; casts it to the base "
        "model's dtype (--lora-dtype auto)",
    ),
    ServerRule(
        "sglang", "SGLang", "https://docs.sglang.io/docs/advanced_features/lora",
        setting="--max-lora-rank",
        note="the largest rank is fixed at start-up (inferred from the adapters given at "
        "start-up when not set): an adapter loaded later must fit it",
    ),
    ServerRule(
        "lorax", "LoRAX", "https://github.com/predibase/lorax/pull/154",
        fast_ranks=(8, 16, 32, 64),
        note="captures CUDA graphs for ranks 8, 16, 32 and 64 only; other ranks load and run "
        "without them (slower); ignores rank_pattern (coremerge writes none)",
    ),
    ServerRule(
        "tensorrt_llm", "TensorRT-LLM",
        "https://nvidia.github.io/TensorRT-LLM/llm-api/reference/LoraConfig.html",
        setting="max_lora_rank", default=64,
        note="max_lora_rank is fixed when the engine is built (LoraConfig; 64 by default)",
    ),
    ServerRule(
        "fireworks", "Fireworks", "https://fireworks.ai/docs/fine-tuning/fine-tuned-import",
        min_rank=4, max_rank=64,
        modules=frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj",
                           "gate_proj", "w1", "w2", "w3", "gate"}),
        note="only some base models take LoRA add-ons",
    ),
    ServerRule(
        "cloudflare", "Cloudflare Workers AI",
        "https://developers.cloudflare.com/workers-ai/fine-tunes/loras/",
        max_rank=8, max_bytes=100 * MB,
        note="only a few base models (Llama-2-7B chat, Mistral-7B v0.2, Gemma 2B/7B)",
    ),
)  # fmt: skip


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
    allowed = rule.settings or rule.fast_ranks
    low, high = rule.min_rank or 1, rule.max_rank
    if allowed is not None:
        candidates = [r for r in allowed if r >= low and (high is None or r <= high)]
        rank = next((r for r in candidates if r >= needed), candidates[-1])
    else:
        rank = max(needed, low) if high is None else min(max(needed, low), high)
    return {"server": rule.name, "rank": rank, "energy_rank": needed, "met": rank >= needed}
