"""The merged adapter's files, written into a staging folder: weights, config, report.

``adapter_model.safetensors`` has ONE rank for every module (a module whose merged rank is
smaller is zero-padded; docs/guarantees.md), so its layout is fixed by the plan and each
module is appended as soon as it is merged. When only the merge knows the rank (a dense
full-space merge without ``output.rank``), each module is first spilled at its own rank and
then copied into the final file padded to the largest. ``merge_report.json`` is built here
and written last by the runner: its presence marks a complete adapter.
"""

from __future__ import annotations

import json
import platform
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import safetensors
import safetensors.torch
import torch

from jobs.errors import OutputNotFinite
from jobs.spec import MergeSpec
from jobs.version import VERSION
from worker.adapters.format import (
    CONFIG_NAME,
    MODEL_CARD_NAME,
    REPORT_NAME,
    WEIGHTS_NAME,
    lora_keys,
)
from worker.adapters.source import AdapterSource
from worker.adapters.writer import (
    NonFiniteTensor,
    SafetensorsStreamWriter,
    TensorSlot,
    lora_config_json,
)
from worker.engine import MergedModule
from worker.engine.methods import rank_mode
from worker.merge.plan import MergePlan, ModulePlan
from worker.merge.serving import serving_section

__all__ = [
    "MAX_PROJECTION_RESIDUAL",
    "WrittenWeights",
    "build_report",
    "code_span",
    "write_config",
    "write_model_card",
    "write_report",
    "write_weights",
]

#: A core-space merge whose factors lie further than this off the reference bases is wrong.
MAX_PROJECTION_RESIDUAL = 1e-4


@dataclass(frozen=True)
class WrittenWeights:
    rank: int
    sha256: str
    nbytes: int


def _pad(merged: MergedModule, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad (B, A) to ``rank`` (one rank for every module)."""
    k = merged.rank
    if k == rank:
        return merged.B, merged.A
    A = merged.A.new_zeros(rank, merged.A.shape[1])
    B = merged.B.new_zeros(merged.B.shape[0], rank)
    A[:k], B[:, :k] = merged.A, merged.B
    return B, A


def _slots(plan: MergePlan, rank: int) -> list[TensorSlot]:
    slots = []
    for mp in plan.modules:
        key_a, key_b = lora_keys(mp.module)
        slots.append(TensorSlot(key_a, (rank, mp.in_features)))
        slots.append(TensorSlot(key_b, (mp.out_features, rank)))
    return slots


def _write_module(
    writer: SafetensorsStreamWriter, module: str, B: torch.Tensor, A: torch.Tensor
) -> None:
    """Append one module's factors; the writer checks each is finite in the output dtype."""
    key_a, key_b = lora_keys(module)
    for key, factor, which in ((key_a, A, "lora_A"), (key_b, B, "lora_B")):
        try:
            writer.write(key, factor)
        except NonFiniteTensor as exc:
            finite_max = torch.finfo(writer.torch_dtype).max
            raise OutputNotFinite(
                f"module {module!r}: the merged {which} has NaN or infinite values once cast to "
                f"{exc.dtype} (largest finite value {finite_max:.4g}): the weights, alpha or "
                "scalings make the update too large for it; nothing was written"
            ) from None


def write_weights(
    staging: Path,
    plan: MergePlan,
    merged: Iterable[tuple[ModulePlan, MergedModule]],
    dtype: str,
    sink: Callable[[], BinaryIO] | None = None,
) -> WrittenWeights:
    """Stream the merged modules, in plan order, into the staging folder's weights file, or
    into ``sink()`` (an upload straight to the output's store) when the layout is known from
    the plan; a layout only the merge knows is spilled locally first."""
    path = staging / WEIGHTS_NAME
    rank = plan.output_rank
    if rank is None:
        return _write_weights_spilled(staging, plan, merged, dtype)
    out = sink() if sink is not None else None
    writer = SafetensorsStreamWriter(path, _slots(plan, rank), dtype, sink=out)
    try:
        for mp, module in merged:
            _write_module(writer, mp.module, *_pad(module, rank))
    except BaseException:
        writer.abort()
        raise
    return WrittenWeights(rank, writer.close(), writer.nbytes)


def _write_weights_spilled(
    staging: Path,
    plan: MergePlan,
    merged: Iterable[tuple[ModulePlan, MergedModule]],
    dtype: str,
) -> WrittenWeights:
    """The output rank is the largest merged rank: spill each module at its own rank first."""
    spill = staging / ".spill"
    spill.mkdir()
    ranks = []
    for i, (_, module) in enumerate(merged):
        safetensors.torch.save_file(
            {"A": module.A.cpu().contiguous(), "B": module.B.cpu().contiguous()},
            spill / f"{i}.safetensors",
        )
        ranks.append(module.rank)
    rank = max(max(ranks), 1)
    writer = SafetensorsStreamWriter(staging / WEIGHTS_NAME, _slots(plan, rank), dtype)
    try:
        for i, mp in enumerate(plan.modules):
            tensors = safetensors.torch.load_file(spill / f"{i}.safetensors")
            merged_module = MergedModule(B=tensors["B"], A=tensors["A"])
            _write_module(writer, mp.module, *_pad(merged_module, rank))
            (spill / f"{i}.safetensors").unlink()
    except BaseException:
        writer.abort()
        raise
    spill.rmdir()
    return WrittenWeights(rank, writer.close(), writer.nbytes)


def write_config(staging: Path, plan: MergePlan, rank: int) -> None:
    """The merged adapter's ``adapter_config.json``."""
    config = lora_config_json(
        rank=rank,
        target_modules=plan.target_modules,
        base_model_name_or_path=plan.base_model_name_or_path,
        task_type=plan.task_type,
        fan_in_fan_out=plan.fan_in_fan_out,
    )
    (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def write_model_card(staging: Path, report: dict[str, Any]) -> None:
    """``README.md``: what the adapter is, for people and for model hubs (YAML front matter
    with the base model and the tags, then the inputs with their weights and sha256, the
    method, its parameters, the rank), all taken from the report."""
    out = report["output"]
    base = out["base_model_name_or_path"]
    front = ["---", "library_name: peft"]
    if base:
        front.append(f"base_model: {json.dumps(base)}")
    front += ["tags:", *(f"- {tag}" for tag in ("peft", "lora", "merge", "coremerge")), "---"]
    rows = [
        f"| {code_span(i['name'], cell=True)} | {_uri_text(i['uri'])} | "
        f"{_weight_text(i['weight'])} | {i['r']} | `{i['sha256']}` |"
        for i in report["inputs"]
    ]
    params = ", ".join(code_span(f"{k}={v}") for k, v in report["params"].items()) or "none"
    body = [
        "# Merged LoRA adapter",
        "",
        f"{len(report['inputs'])} LoRA adapters of "
        f"{code_span(base) if base else 'an unnamed base model'} merged "
        f"into one by coremerge {report['software']['coremerge']} with `{report['method']}` in "
        f"{report['space']} space (Core Space merging, [Panariello et al., NeurIPS 2025]"
        "(https://arxiv.org/abs/2509.17786)). Load it like any PEFT LoRA adapter.",
        "",
        "| input | uri | weight | r | sha256 of adapter_model.safetensors |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"- method: `{report['method']}`, space: `{report['space']}`, parameters: {params}, "
        f"seed: {report['seed']}",
        *_alpha_line(report.get("alpha", {})),
        f"- rank: {out['rank']} for every module ({out['modules']} modules)"
        + (f", brought to it by `{out['rank_mode']}`" if out.get("rank_mode") else "")
        + f", dtype: {out['dtype']}, `lora_alpha` = r (every scaling is in the factors)",
        *_rank_auto_lines(out.get("rank_auto")),
        f"- `{REPORT_NAME}` beside this card has the per-module details and the self-check.",
        *_serving_lines(report.get("serving")),
    ]
    (staging / MODEL_CARD_NAME).write_text("\n".join([*front, "", *body]) + "\n")


def _uri_text(uri: str | None) -> str:
    """An input's location in the card: its URI, or "local folder" when it is not recorded."""
    return "local folder" if uri is None else code_span(uri, cell=True)


def _weight_text(weight: Any) -> str:
    """An input's weight in the card: the number, or its schedule (per-module weights are
    in the report's module records)."""
    if isinstance(weight, int | float):
        return f"{weight:g}"
    return code_span(json.dumps(weight, separators=(",", ":")), cell=True)


def code_span(text: object, *, cell: bool = False) -> str:
    r"""``text`` (untrusted: an adapter's name, a URI, a base model name) as one Markdown
    code span, inert wherever it stands in the card: characters that are not printable
    (newlines, tabs, bidirectional overrides) shown as escapes, so it stays on its line; the
    span fenced by more backticks than any run inside it, so it cannot end early; and, in a
    table ``cell``, ``|`` escaped, so it cannot add cells. Inside a code span Markdown shows
    HTML (``<img …>``, ``<!--``) as text.

    >>> code_span("x`|1|<!--", cell=True)
    '``x`\\|1\\|<!--``'
    """
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    if cell:
        shown = shown.replace("|", "\\|")
    runs = [len(run) for run in re.findall("`+", shown)]
    fence = "`" * (max(runs, default=0) + 1)
    pad = " " if shown[:1] == "`" or shown[-1:] == "`" or not shown.strip() else ""
    return f"{fence}{pad}{shown}{pad}{fence}"


def _alpha_line(alpha: dict[str, Any]) -> list[str]:
    """The card's line on what ``alpha: "auto"`` resolved to (nothing for a given alpha)."""
    if not alpha.get("auto") or alpha.get("median") is None:
        return []
    return [
        f"- alpha `auto` resolved per module to {alpha['median']:.4g} (median; "
        f"{alpha['min']:.4g} to {alpha['max']:.4g}): the merged update has the inputs' "
        "mean energy"
    ]


def _rank_auto_lines(auto: dict[str, Any] | None) -> list[str]:
    """The card's line on the rank ``output.rank: "auto"`` chose, and its warning."""
    if not auto:
        return []
    line = (
        f'- rank chosen by `output.rank: "auto"` for `{auto["target"]}` to keep '
        f"{auto['energy']:g} of every module's energy: {auto['rank']} (the energy alone "
        f"needed {auto['energy_rank']}); lowest kept {auto['lowest_kept_energy']:.4f} "
        f"({code_span(auto['lowest_kept_module'])})"
    )
    return [line] + ([f"- **warning**: {auto['warning']}"] if auto["warning"] else [])


def _serving_lines(serving: dict[str, Any] | None) -> list[str]:
    """The card's ``Serving`` section: each server's verdict (docs/serving.md)."""
    if not serving:
        return []
    return [
        "",
        "## Serving",
        "",
        f"Which servers load this adapter (rank {serving['rank']}, module kinds "
        f"{', '.join(serving['module_kinds'])}, {serving['dtype']}), by their documented limits "
        f"as checked on {serving['checked']}:",
        "",
        *(f"- {v['detail']}" for v in serving["servers"]),
    ]


def write_report(staging: Path, report: dict[str, Any]) -> None:
    """``merge_report.json``; written last, it marks a complete adapter."""
    (staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")


def _inputs(
    spec: MergeSpec, readers: Sequence[AdapterSource], hashes: list[str], record_local_paths: bool
) -> list[dict]:
    return [
        {
            "name": ref.display_name,  # entries naming one adapter share its reader
            "uri": ref.uri if record_local_paths or _remote(ref.uri) else None,
            "peft_type": reader.config.peft_type,
            "weight": ref.model_dump(mode="json")["weight"],
            **_own_params(ref),
            "sha256": sha,
            "bytes": reader.nbytes,
            "r": reader.config.r,
            "lora_alpha": reader.config.lora_alpha,
            "use_rslora": reader.config.use_rslora,
            "modules": len(reader.modules),
        }
        for reader, ref, sha in zip(readers, spec.adapters, hashes, strict=True)
    ]


def _remote(uri: str) -> bool:
    """An input named by a store's URI (S3, the Hub) rather than a place on this machine."""
    return uri.startswith(("s3://", "hf://"))


def _own_params(ref: Any) -> dict[str, Any]:
    """The method parameters an input set for itself (density, drop), as given."""
    given = ref.model_dump(mode="json", include={"density", "drop"})
    return {k: v for k, v in given.items() if v is not None}


def alpha_summary(spec: MergeSpec, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The scale the merge applied: the number given, or what ``"auto"`` resolved to per
    module (each module's value is in its record; here the spread of them)."""
    if spec.params.get("alpha") != "auto":
        return {"auto": False, "value": spec.params.get("alpha", 1.0)}
    values = sorted(r["alpha"] for r in records)
    return {
        "auto": True,
        "rule": "per module, sqrt(mean_t ||dW_t||_F^2) / ||X||_F (docs/methods.md)",
        "min": values[0] if values else None,
        "median": values[len(values) // 2] if values else None,
        "max": values[-1] if values else None,
    }


def build_report(
    spec: MergeSpec,
    readers: Sequence[AdapterSource],
    input_hashes: list[str],
    plan: MergePlan,
    records: list[dict[str, Any]],
    weights: WrittenWeights,
    device: torch.device,
    timings: dict[str, float],
    record_local_paths: bool = True,
    rank_auto: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``merge_report.json``: inputs with their sha256, the job, per-module records, the
    self-check, timings and software versions (docs/guarantees.md). Without
    ``record_local_paths`` a local input's location is left out (``uri`` null): its name
    stands for it, and no machine's layout is published with the adapter. ``rank_auto``:
    what ``output.rank: "auto"`` chose (``worker.merge.rank_auto.section``)."""
    residuals = [r["residual"] for r in records if r["residual"] is not None]
    return {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "method": spec.method,
        "space": spec.space,
        "params": spec.params,
        "seed": spec.seed,
        "normalize": spec.normalize,
        "module_filter": spec.modules.model_dump(),
        "device": str(device),
        "inputs": _inputs(spec, readers, input_hashes, record_local_paths),
        "output": _output_section(spec, plan, weights, rank_auto),
        "self_check": {
            "max_projection_residual": max(residuals) if residuals else None,
            "limit": MAX_PROJECTION_RESIDUAL,
            "passed": True,
        },
        "memory": _memory_section(plan),
        "alpha": alpha_summary(spec, records),
        "serving": serving_section(
            weights.rank, (mp.module for mp in plan.modules), spec.output.dtype, weights.nbytes
        ),
        "notes": plan.notes,
        "modules": records,
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "software": _software(),
    }


def _output_section(
    spec: MergeSpec, plan: MergePlan, weights: WrittenWeights, rank_auto: dict[str, Any] | None
) -> dict[str, Any]:
    """The report's ``output``: what was written, the rank asked for beside the one got, and
    what ``output.rank: "auto"`` chose (``rank_auto``)."""
    return {
        "rank": weights.rank,
        "dtype": spec.output.dtype,
        "requested_rank": spec.output.rank,
        **({} if rank_auto is None else {"rank_auto": rank_auto}),
        "rank_mode": (
            None
            if spec.output.rank is None
            else rank_mode(spec.method, spec.params, spec.output.rank_mode)
        ),
        "modules": len(plan.modules),
        "bytes": weights.nbytes,
        "sha256": weights.sha256,
        "base_model_name_or_path": plan.base_model_name_or_path,
    }


def _memory_section(plan: MergePlan) -> dict[str, Any]:
    """The report's ``memory``: the estimate the plan was admitted on, and its limit."""
    return {
        "estimated_peak_bytes": plan.work.peak_bytes if plan.work else None,
        "largest_module": plan.work.module if plan.work else None,
        "limit_bytes": plan.work_limit,
    }


def _software() -> dict[str, str]:
    """The report's ``software``: the versions that produced the merge, for reproducing it."""
    return {
        "coremerge": VERSION,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }
