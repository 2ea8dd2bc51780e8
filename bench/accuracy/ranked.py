"""Merging at a serving rank k (issue 23): truncation against shared rank-k bases, per method.

For each module, the core matrices M_t of the six adapters (``worker.engine``'s reference
bases, the product's float32 path) are merged four ways, each written as a dense ΔW and
evaluated by adding it to the base encoder, as ``variant.py`` does:

- ``full``: the method on the M_t, no rank limit (the reference a rank limit is measured from);
- ``truncate``: the same merge cut to its best rank-k approximation (today's ``output.rank``);
- ``shared``: Tucker-2 bases P, Q fitted to all M_t (``worker.engine.shared_bases``), the
  method on the k × k coordinates C_t = Pᵀ M_t Q, lifted back as P C Qᵀ;
- ``shared-b0``: the same with every task rescaled to the mean norm before the fit (β = 0);
- ``truncate-rescaled``: truncation with the auto alpha taken after the cut, so the rank-k
  update, not the full one, has the tasks' mean energy.

``iso_c_k`` is Iso-C made rank-aware the other way round: task arithmetic, cut to rank k,
then isotropized over those k singular values (the Compress-then-Merge reference's order for
a low-rank Iso-C), its alpha taken from the result; ``tsv_iso_k`` the same from TSV's merge.

Iso-C on the coordinates is rank-aware (the mean runs over the k singular values the output
has). Every merge is scaled per module by the energy rule of ``alpha: "auto"`` (the tasks'
mean energy ‖M_t‖² over the merged update's), and, with ``--alpha-one``, also evaluated at the
paper's alpha 1. Extra TIES variants for the core-TIES question: ``ties_energy`` (trim each
task to the largest entries that hold ``ENERGY_SHARE`` of its energy) and ``ties_scaled`` (a
density scaled to the core's size, :func:`scaled_density`); and ``tsv_layer``, TSV counting
its per-task ranks from the layer (``rank_of: "layer"``), which on k × k coordinates lets each
task keep up to k directions instead of ⌊k/T⌋.

    .venv/bin/python -m bench.accuracy.ranked --seeds 0 --variants equal --ranks 8,16
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import safetensors.torch
import torch

from bench.accuracy.model import MAX_LENGTH, accuracy, add_deltas, load_encoder, tokenize
from bench.accuracy.run import EQUAL_RANK, FULL, MIXED_RANKS, ROOT, log, settings_key
from bench.accuracy.search import Evaluator
from bench.accuracy.tasks import load_tasks
from bench.accuracy.train import TrainConfig, load_head, lora_deltas, train_adapter

__all__ = ["ENERGY_SHARE", "merge_module_at_rank", "scaled_density"]

VARIANTS = {"equal": [EQUAL_RANK] * 6, "mixed": list(MIXED_RANKS), "large": [32] * 6}
MODES = ("full", "truncate", "truncate-rescaled", "shared", "shared-b0")
#: Methods isotropized after the cut to rank k: the merge they start from.
ISO_AFTER_CUT = {"iso_c_k": "ta", "tsv_iso_k": "tsv"}
#: ``ties_energy`` keeps, per task, the largest entries that together hold this share of the
#: task's energy (full-space TIES at density 0.1 keeps about this much of a LoRA update).
ENERGY_SHARE = 0.8


def adapter_dirs(args: argparse.Namespace, ranks: list[int], tasks, base, tokenizer) -> list[Path]:
    """The run's cached adapters (``run.py``'s cache key), trained when missing."""
    cfg = TrainConfig(epochs=FULL["epochs"])
    settings = {"sizes": asdict(FULL["sizes"]), "train": asdict(cfg), "seed": args.seed,
                "max_length": MAX_LENGTH}  # fmt: skip
    cache = args.out / "adapters" / f"full-{settings_key(settings)}"
    dirs = []
    for task, r in zip(tasks, ranks, strict=True):
        d = cache / f"{task.name}-r{r}"
        train_adapter(base, tokenizer, task, r, d, cfg, seed=args.seed, log=log)
        dirs.append(d)
    return dirs


def read_factors(d: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A, s·B)} of a PEFT LoRA folder (scaling folded into B, as the worker does)."""
    cfg = json.loads((d / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    tensors = safetensors.torch.load_file(d / "adapter_model.safetensors")
    out = {}
    for key, A in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out[module] = (A.float(), scale * tensors[key.replace(".lora_A.", ".lora_B.")].float())
    return out


def scaled_density(density: float, m: int, n: int, R: int, r: int) -> float:
    """TIES density for an R × R core that keeps as many entries per degree of freedom of a
    rank-r task as ``density`` keeps of an m × n update: ρ · m n (2R − r) / ((m + n − r) R²),
    at most 1."""
    return min(1.0, density * m * n * (2 * R - r) / ((m + n - r) * R * R))


def _trim_energy(x: torch.Tensor, share: float) -> torch.Tensor:
    """x with all but its largest entries zeroed: the fewest that hold ``share`` of ‖x‖²."""
    flat = x.reshape(-1)
    energy = flat.square().sort(descending=True)
    cumulative = energy.values.cumsum(0)
    count = int((cumulative < share * cumulative[-1]).sum()) + 1
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[energy.indices[:count]] = True
    return (flat * keep).reshape(x.shape)


def _ties_kept(kept: list[torch.Tensor]) -> torch.Tensor:
    """TIES' election and disjoint mean over already-trimmed tasks (density 1 trims nothing)."""
    from worker.engine import apply_method

    return apply_method("ties", kept, _at_alpha_one("ties", density=1.0))


def _at_alpha_one(method: str, **params) -> dict:
    """The method's validated params at alpha 1: the bench applies its own auto rule after."""
    from jobs.spec import validate_params

    return validate_params(method, {"alpha": 1.0, **params})


def merge_method(method: str, xs: list[torch.Tensor], shape: tuple[int, int, int]) -> torch.Tensor:
    """The method on the X_t (core matrices or coordinates), default params; ``shape`` is
    (m, n, R) of the module, for the TIES variants."""
    from worker.engine import Tasks, apply_method, merge_tasks
    from worker.engine.shared_bases import rank_aware_isotropize

    if method == "ties_energy":
        return _ties_kept([_trim_energy(x, ENERGY_SHARE) for x in xs])
    if method == "ties_scaled":
        m, n, R = shape
        size = xs[0].shape[-1]  # R in core space, k on shared bases
        rho = scaled_density(0.1, m, n, size, min(size, max(1, R // len(xs))))
        return apply_method("ties", xs, _at_alpha_one("ties", density=round(rho, 4)))
    if method == "iso_c":
        return rank_aware_isotropize(torch.stack(xs).sum(0))
    if method == "tsv_layer":  # each task keeps up to ⌊min(m, n)/T⌋ directions, not ⌊k/T⌋
        tasks = Tasks.of(xs, layer_k=min(shape[:2]))
        return merge_tasks("tsv", tasks, _at_alpha_one("tsv", rank_of="layer"))[0][0]
    generator = torch.Generator().manual_seed(0)
    return apply_method(method, xs, _at_alpha_one(method), generator)


def merge_module_at_rank(
    method: str, mode: str, A: list[torch.Tensor], B: list[torch.Tensor], k: int | None
) -> tuple[torch.Tensor, float, float]:
    """One module's merged ΔW (m × n) at rank ≤ k in ``mode`` (at alpha 1), its auto alpha,
    and the share of energy the rank limit kept (of the tasks on shared bases, of the merged
    update when truncating; 1 without a limit).

    The auto rule is the product's: √(mean_t ‖X_t‖²) / ‖X‖ over the method's own inputs, so on
    shared bases the tasks' energies are those of their coordinates C_t (what the rank-k
    update can carry), and a truncated merge keeps the alpha of the merge before the cut.
    """
    from worker.engine import LoraFactors, core_matrices, reference_bases
    from worker.engine.shared_bases import lift, rank_aware_isotropize, shared_bases

    factors = [LoraFactors(A=a, B=b) for a, b in zip(A, B, strict=True)]
    bases = reference_bases(factors)
    cores = core_matrices(factors, bases)
    shape = (B[0].shape[0], A[0].shape[1], sum(a.shape[0] for a in A))
    task_energy = sum(float(c.double().square().sum()) for c in cores) / len(cores)
    if mode.startswith("shared"):
        sb = shared_bases(torch.stack(cores), k, beta=0.0 if mode == "shared-b0" else 1.0)
        C = merge_method(
            "iso_c" if method in ISO_AFTER_CUT else method, list(sb.coordinates), shape
        )
        task_energy = float(sb.coordinates.double().square().sum()) / len(cores)
        left, right = lift(C, sb.P, sb.Q)
        M, norm, kept = left @ right, float(C.double().norm()), float(sb.captured)
    else:
        M = merge_method(ISO_AFTER_CUT.get(method, method), cores, shape)
        norm, kept = float(M.double().norm()), 1.0
        if mode.startswith("truncate"):
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
            M = (U[:, :k] * S[:k]) @ Vh[:k]
            kept = float(S[:k].double().square().sum() / S.double().square().sum())
        if method in ISO_AFTER_CUT:  # isotropize over the rank the output has, after the cut
            M = rank_aware_isotropize(M)
        if mode == "truncate-rescaled" or method in ISO_AFTER_CUT:
            norm = float(M.double().norm())
    alpha = math.sqrt(task_energy) / norm if norm > 1e-5 * math.sqrt(task_energy) else 1.0
    return bases.U @ M @ bases.V.mT, alpha, kept


def merged_deltas(
    method: str, mode: str, factors: list[dict], k: int | None
) -> tuple[dict[str, torch.Tensor], dict[str, float], float]:
    """Every module's merged ΔW (at alpha 1), its auto alpha, and the mean kept energy."""
    deltas, alphas, kept = {}, {}, []
    for module in factors[0]:
        A = [f[module][0] for f in factors]
        B = [f[module][1] for f in factors]
        deltas[module], alphas[module], share = merge_module_at_rank(method, mode, A, B, k)
        kept.append(share)
    return deltas, alphas, sum(kept) / len(kept)


def fit_curve(factors: list[dict], ks: list[int], sweeps: int = 8) -> dict:
    """Share of the tasks' energy the shared bases hold (mean over modules), per k, β and
    number of HOOI sweeps (0: the HOSVD), and truncation's share of the merged TA update at
    the same k: the data behind ``HOOI_ITERATIONS`` and behind the choice of β."""
    from worker.engine import LoraFactors, core_matrices, reference_bases
    from worker.engine.shared_bases import captured_energy, project, tucker2_bases

    stacks = []
    for module in factors[0]:
        fs = [LoraFactors(A=f[module][0], B=f[module][1]) for f in factors]
        stacks.append(torch.stack(core_matrices(fs, reference_bases(fs))))
    out: dict = {}
    for k in ks:
        for beta in (0.0, 1.0):
            curve = []
            for it in range(sweeps + 1):
                shares = [float(captured_energy(c, project(c, *tucker2_bases(c, k, beta, it))))
                          for c in stacks]  # fmt: skip
                curve.append(round(sum(shares) / len(shares), 5))
            out[f"k={k} beta={beta:g}"] = curve
        S = [torch.linalg.svdvals(c.sum(0).double()) for c in stacks]
        out[f"k={k} truncate ta"] = round(
            sum(float(s[:k].square().sum() / s.square().sum()) for s in S) / len(S), 5
        )
    return out


def _row(ev: Evaluator, method: str, mode: str, k: int | None, factors, alpha_one: bool) -> dict:
    t0 = time.perf_counter()
    deltas, alphas, kept = merged_deltas(method, mode, factors, k)
    merge_s = time.perf_counter() - t0
    scaled = {m: alphas[m] * d for m, d in deltas.items()}
    test = ev.normalised(ev.accuracies(scaled, 1.0, "test"), "test")
    row = {"method": method, "mode": mode, "rank": k, "alpha_median": _median(alphas), "kept_energy": round(kept, 4),
           "test_norm": [round(a, 5) for a in test], "avg_norm": round(sum(test) / len(test), 5),
           "merge_seconds": round(merge_s, 2)}  # fmt: skip
    if alpha_one:
        one = ev.normalised(ev.accuracies(deltas, 1.0, "test"), "test")
        row["alpha_one_avg_norm"] = round(sum(one) / len(one), 5)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _median(values: dict[str, float]) -> float:
    xs = sorted(values.values())
    return round(xs[len(xs) // 2], 4)


def plan(args: argparse.Namespace) -> list[tuple[str, str, int | None]]:
    """(method, mode, rank) of every row, in the order of ``--ranks`` (``full``: no limit)."""
    methods, modes = args.methods.split(","), args.modes.split(",")
    rows: list[tuple[str, str, int | None]] = []
    for item in args.ranks.split(","):
        if item == "full":
            rows += [(m, "full", None) for m in methods + args.full_extra.split(",") if m]
        else:
            rows += [(m, mode, int(item)) for m in methods for mode in modes]
    return rows


def _finetuned(ev: Evaluator, dirs: list[Path], known: dict | None) -> list[float]:
    """Each task's test accuracy with its own adapter (the normaliser), or the one a
    previous run of the same seed recorded."""
    if known and known.get("finetuned_test"):
        return known["finetuned_test"]
    out = []
    for t, d in enumerate(dirs):
        with add_deltas(ev.encoder, lora_deltas(d)):
            out.append(accuracy(ev.encoder, ev.heads[t], ev.splits["test"][t]))
    return out


def run_variant(args, name: str, tasks, base, tokenizer, splits, out: dict, save) -> None:
    """Train or find one adapter set, then every row of :func:`plan` on it that the seed's
    results do not have yet (a rerun resumes, in its own row order)."""
    dirs = adapter_dirs(args, VARIANTS[name], tasks, base, tokenizer)
    ev = Evaluator(base, [t.name for t in tasks], [load_head(d) for d in dirs], splits)
    ev.finetuned = {"test": _finetuned(ev, dirs, out.get(name))}
    factors = [read_factors(d) for d in dirs]
    out.setdefault(name, {"rows": []})
    out[name].update(ranks=VARIANTS[name], finetuned_test=ev.finetuned["test"])
    done = {(r["method"], r["mode"], r["rank"]) for r in out[name]["rows"]}
    for method, mode, k in plan(args):
        if (method, mode, k) in done:
            continue
        row = _row(ev, method, mode, k, factors, args.alpha_one and mode == "full")
        out[name]["rows"].append(row)
        log(f"[{name}] {method} {mode} k={k}: {100 * row['avg_norm']:.1f} ({row['seconds']} s)")
        save()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy.ranked", description=__doc__)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default="equal,mixed", help="equal, mixed, large (r = 32)")
    p.add_argument("--methods", default="ta,tsv,iso_c,ties,cart,dare_ties,dare")
    p.add_argument("--modes", default="truncate,shared,shared-b0", help=", ".join(MODES[1:]))
    p.add_argument("--ranks", default="full,8,16,32", help="in run order; full: no limit")
    p.add_argument(
        "--full-extra",
        default="ties_energy,ties_scaled",
        help="methods run at full rank only (the core-TIES variants)",
    )
    p.add_argument("--alpha-one", action="store_true", help="also evaluate full rows at alpha 1")
    p.add_argument("--threads", type=int, default=1, help="1 is fastest on a busy machine")
    p.add_argument("--tag", default="", help="results file suffix, for runs side by side")
    p.add_argument("--out", type=Path, default=ROOT / "bench/out/accuracy")
    p.add_argument("--results", type=Path, default=ROOT / "bench/results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer, base = load_encoder()
    for p in base.parameters():
        p.requires_grad_(False)
    for seed in [int(s) for s in args.seeds.split(",")]:
        args.seed = seed
        tasks = load_tasks(FULL["sizes"], seed=seed)
        splits = {"test": [tokenize(tokenizer, t.splits["test"], 64) for t in tasks]}
        tag = f"-{args.tag}" if args.tag else ""
        path = args.results / f"accuracy-rank-seed{seed}{tag}.json"
        result = json.loads(path.read_text()) if path.is_file() else {"variants": {}}
        settings = {k: str(v) for k, v in vars(args).items() if k not in ("out", "results")}
        result.update(seed=seed, settings=settings)

        def save(result=result, path=path) -> None:
            path.write_text(json.dumps(result, indent=1) + "\n")

        for name in args.variants.split(","):
            run_variant(args, name, tasks, base, tokenizer, splits, result["variants"], save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
