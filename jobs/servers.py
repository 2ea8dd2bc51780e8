"""The inference servers coremerge knows the LoRA limits of: ONE table, as data
(docs/serving.md shows it with its sources).

Here, in ``jobs``, because the job spec names a server (``output.target``, checked against
:data:`SERVER_NAMES`) and the API checks that it takes a rank within the service's limit
(:func:`server_rank`), both torch-free; ``worker.merge.serving`` applies the rules to what a
merge wrote and picks a rank for a server. Checked on 2026-12-07 against each server's
documentation (``source``); a server changes its limits by release, so each verdict names
the rule it applied.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MB", "SERVERS", "SERVER_NAMES", "ServerRule", "server_rank", "server_rule"]

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


#: The servers' names, as ``output.target`` takes them.
SERVER_NAMES: tuple[str, ...] = tuple(rule.name for rule in SERVERS)


def server_rule(name: str) -> ServerRule:
    """The rule of the server called ``name`` (one of :data:`SERVER_NAMES`)."""
    return next(rule for rule in SERVERS if rule.name == name)


def server_rank(rule: ServerRule, needed: int, limit: int | None = None) -> tuple[int, str | None]:
    """The smallest rank ``rule``'s server takes (its setting values or fast ranks, within its
    bounds and the service's ``limit``, COREMERGE_MAX_OUTPUT_RANK) that is at least
    ``needed``, or the largest one when none is; and what stopped it short of ``needed``:
    None, ``"server"`` (its own cap) or ``"limit"`` (the service's). ``ValueError`` when the
    server takes no rank within ``limit``."""
    allowed = rule.settings or rule.fast_ranks
    low = rule.min_rank or 1
    high = rule.max_rank if limit is None else min(limit, rule.max_rank or limit)
    if allowed is not None:
        candidates = [r for r in allowed if r >= low and (high is None or r <= high)]
    else:
        candidates = [low] if high is None or low <= high else []
    if not candidates:
        raise ValueError(
            f"{rule.title} takes no rank within this service's limit of {limit} "
            "(COREMERGE_MAX_OUTPUT_RANK)"
        )
    if allowed is not None:
        rank = next((r for r in candidates if r >= needed), candidates[-1])
    else:
        rank = max(needed, low) if high is None else min(max(needed, low), high)
    if rank >= needed:
        return rank, None
    unlimited = limit is not None and server_rank(rule, needed)[0] >= needed
    return rank, "limit" if unlimited else "server"
