"""Once-per-run checks that the benchmark's shortcuts compute what the product path does.

- A coremerge merge loaded with stock ``PeftModel.from_pretrained`` gives the same hidden
  states (and predictions) as adding its ΔW into the base encoder, as ``search`` does.
- alpha is a pure scale: ``run_merge`` with alpha = 0.5 equals 0.5 × the alpha = 1 merge
  (TSV, and DARE-TIES whose masks are seeded), and PEFT's ``add_weighted_adapter`` with
  weights 0.5 equals 0.5 × its weights-1 merge (TIES, DARE), so the alpha search may scale ΔW.
- Task arithmetic in core space equals task arithmetic in full space (the paper's theorem).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from bench.accuracy.merges import coremerge_merge, load_peft_model, peft_merge
from bench.accuracy.model import MAX_LENGTH, add_deltas
from bench.accuracy.tasks import Task
from bench.accuracy.train import lora_deltas

__all__ = ["run_checks"]


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest per-module ‖a − b‖ / ‖b‖."""
    assert a.keys() == b.keys(), "different module sets"
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-30)) for k in b)


def _scaled(d: dict[str, torch.Tensor], s: float) -> dict[str, torch.Tensor]:
    return {k: v * s for k, v in d.items()}


@torch.inference_mode()
def _peft_vs_deltas(base, tokenizer, texts: list[str], merged_dir: Path) -> dict:
    from peft import PeftModel

    enc = tokenizer(
        texts, truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt"
    )
    x = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), merged_dir).eval()
    h_peft = peft_model(**x).last_hidden_state
    with add_deltas(base, lora_deltas(merged_dir)):
        h_ours = base(**x).last_hidden_state
    h_base = base(**x).last_hidden_state
    return {
        "max_abs_diff_hidden": float((h_peft - h_ours).abs().max()),
        "max_abs_change_from_base": float((h_peft - h_base).abs().max()),
        "texts": len(texts),
    }


def run_checks(
    base, tokenizer, tasks: list[Task], dirs: list[Path], scratch: Path, seed: int
) -> dict:
    names = [t.name for t in tasks]
    texts = [text for t in tasks for text, _ in t.splits["test"][:8]]
    out: dict = {}
    tsv1 = coremerge_merge("tsv", "core", dirs, names, scratch / "tsv-1", seed=seed)
    out["peft_load_vs_added_delta"] = _peft_vs_deltas(base, tokenizer, texts, scratch / "tsv-1")
    tsv_half = coremerge_merge(
        "tsv", "core", dirs, names, scratch / "tsv-half", {"alpha": 0.5}, seed
    )
    dt1 = coremerge_merge("dare_ties", "core", dirs, names, scratch / "dt-1", seed=seed)
    dt_half = coremerge_merge(
        "dare_ties", "core", dirs, names, scratch / "dt-half", {"alpha": 0.5}, seed
    )
    ta_core = coremerge_merge("ta", "core", dirs, names, scratch / "ta-core", seed=seed)
    ta_full = coremerge_merge("ta", "full", dirs, names, scratch / "ta-full", seed=seed)
    out["coremerge_alpha_linearity_rel"] = {
        "tsv_core": _rel(tsv_half.deltas, _scaled(tsv1.deltas, 0.5)),
        "dare_ties_core": _rel(dt_half.deltas, _scaled(dt1.deltas, 0.5)),
    }
    out["ta_core_vs_full_rel"] = _rel(ta_core.deltas, ta_full.deltas)
    model = load_peft_model(base, dirs, names)
    peft_lin = {}
    for combo, density in (("ties", 0.1), ("dare_linear", 0.7)):
        one = peft_merge(model, names, combo, density=density, seed=seed)
        half = peft_merge(model, names, combo, weight=0.5, density=density, seed=seed)
        peft_lin[combo] = _rel(half.deltas, _scaled(one.deltas, 0.5))
    out["peft_weight_linearity_rel"] = peft_lin
    return out
