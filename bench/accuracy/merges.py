"""Merged updates ΔW from coremerge (``run_merge``, the product path) and from PEFT's own
``add_weighted_adapter`` (the peers), each as ``{module: ΔW}`` at scaling coefficient 1.

Both are linear in the global scale, so the alpha search multiplies ΔW instead of merging
again: coremerge's merged update is alpha·X by definition (docs/methods.md), and PEFT's with equal
weights w scales by w (each of its combinations is homogeneous of degree one in the inputs, and
its random DARE masks are drawn from a seed we fix). ``run.py --checks`` verifies both once.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.accuracy.train import lora_deltas

__all__ = [
    "PEFT_EQUAL_RANK",
    "PEFT_MIXED_RANK",
    "Merged",
    "coremerge_merge",
    "load_peft_model",
    "peft_merge",
]

#: PEFT combinations run on equal-rank adapters; the element-wise ones need equal ranks.
PEFT_EQUAL_RANK = (
    "cat", "svd", "ties_svd", "ties", "linear", "dare_linear", "dare_ties", "magnitude_prune",
)  # fmt: skip
#: And on mixed ranks (PEFT refuses linear, ties, dare_*, magnitude_prune there).
PEFT_MIXED_RANK = ("cat", "svd", "ties_svd", "dare_ties_svd")


@dataclass
class Merged:
    deltas: dict[str, torch.Tensor]
    seconds: float  # wall time of the merge call itself
    rank: int
    detail: dict


def coremerge_merge(
    method: str,
    space: str,
    adapter_dirs: list[Path],
    names: list[str],
    out_dir: Path,
    params: dict | None = None,
    seed: int = 0,
    rank: int | None = None,
) -> Merged:
    """One ``run_merge`` into ``out_dir`` (replaced), read back as ΔW; ``rank`` is the job's
    ``output.rank``."""
    from jobs.spec import MergeSpec
    from worker.merge.runner import run_merge

    if out_dir.exists():
        shutil.rmtree(out_dir)
    spec = MergeSpec.model_validate(
        {
            "adapters": [
                {"uri": str(d), "name": n} for d, n in zip(adapter_dirs, names, strict=True)
            ],
            "method": method,
            "space": space,
            "params": {"alpha": 1.0, **(params or {})},
            "seed": seed,
            "output": {"uri": str(out_dir), "rank": rank},
        }
    )
    t0 = time.perf_counter()
    outcome = run_merge(spec, adapter_dirs, out_dir, device="cpu")
    seconds = time.perf_counter() - t0
    detail = {
        "params": spec.params,
        "timings": outcome.report["timings"],
        "max_projection_residual": outcome.report["self_check"]["max_projection_residual"],
        "notes": outcome.report["notes"],
        "alpha": outcome.report["alpha"],
    }
    return Merged(lora_deltas(out_dir), seconds, outcome.rank, detail)


def load_peft_model(base: torch.nn.Module, adapter_dirs: list[Path], names: list[str]):
    """A PeftModel on a copy of ``base`` holding every adapter under its task's name."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dirs[0], adapter_name=names[0])
    for d, n in zip(adapter_dirs[1:], names[1:], strict=True):
        model.load_adapter(d, adapter_name=n)
    return model.eval()


def peft_merge(
    model,
    names: list[str],
    combination: str,
    *,
    weight: float = 1.0,
    density: float | None = None,
    seed: int = 0,
    svd_rank: int | None = None,
) -> Merged:
    """``add_weighted_adapter(names, [weight]*T, combination_type=combination)`` on ``model``
    (from ``load_peft_model``), read back as ΔW, then removed from the model again."""
    from peft.tuners.lora import LoraLayer

    merged_name = f"merged_{combination}"
    kwargs: dict = {} if density is None else {"density": density}
    if svd_rank is not None:
        kwargs["svd_rank"] = svd_rank
    torch.manual_seed(seed)  # DARE's masks come from the global generator
    t0 = time.perf_counter()
    model.add_weighted_adapter(
        names, [weight] * len(names), merged_name, combination_type=combination, **kwargs
    )
    seconds = time.perf_counter() - t0
    deltas = {}
    prefix = "base_model.model."
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and merged_name in module.lora_A:
                deltas[name.removeprefix(prefix)] = (
                    module.get_delta_weight(merged_name).detach().clone()
                )
    rank = model.peft_config[merged_name].r
    model.delete_adapter(merged_name)
    return Merged(deltas, seconds, rank, {"combination_type": combination, "density": density})
