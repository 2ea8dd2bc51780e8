"""Accuracy benchmark (issue 5): six real text tasks, one LoRA per task, merged every way.

    .venv/bin/python -m bench.accuracy.run            # the full protocol (~30 min on 2 idle cores)
    .venv/bin/python -m bench.accuracy.run --quick    # a smoke run on tiny splits (a few minutes)

Set-up once: ``bash bench/accuracy/setup.sh`` (Debian text packages + the ``bench`` extra).
Trained adapters are cached under ``bench/out/accuracy/adapters/`` so reruns skip training.
Writes ``bench/results/accuracy-latest.{json,md,png}`` (``--no-results`` leaves them alone).
See bench/accuracy/README.md for the protocol and the findings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from bench.accuracy import checks, report
from bench.accuracy.merges import (
    PEFT_EQUAL_RANK,
    PEFT_MIXED_RANK,
    coremerge_merge,
    load_peft_model,
    peft_merge,
)
from bench.accuracy.model import MAX_LENGTH, accuracy, add_deltas, load_encoder, tokenize
from bench.accuracy.search import Evaluator, linear_search
from bench.accuracy.tasks import TASK_NAMES, Sizes, load_tasks
from bench.accuracy.train import TrainConfig, load_head, lora_deltas, train_adapter

ROOT = Path(__file__).resolve().parents[2]
#: In the order they run: the paper's headline methods first, so a run cut short has them.
METHODS = ("ta", "tsv", "iso_c", "ties", "cart", "dare_ties", "dare")
SPACES = ("full", "core", "knots")
#: Ranks of the six tasks in the heterogeneous-rank variant (tasks 3–4 reuse the r=8 adapters).
MIXED_RANKS = (4, 4, 8, 8, 16, 16)
EQUAL_RANK = 8
#: PEFT's TIES/magnitude trim keeps this share of entries, coremerge's ties default (0.1);
#: its DARE keeps 1 − coremerge's default drop (0.3).
PEFT_DENSITY = {"ties": 0.1, "ties_svd": 0.1, "magnitude_prune": 0.1}
PEFT_DARE_DENSITY = 0.7

#: Sizes chosen so that a solo run on 2 idle cores takes about 30 minutes.
FULL = {"sizes": Sizes(train=480, val=48, test=144), "epochs": 1, "step": 0.2, "max_alpha": 5.0}
QUICK = {"sizes": Sizes(train=96, val=24, test=48), "epochs": 1, "step": 1.0, "max_alpha": 2.0}
#: ΔWs closer than this (relative, per module) to one already evaluated share its evaluation
#: (TA is the same update in every space, and PEFT's ``cat`` is TA too).
SAME_DELTA_REL = 1e-5


def log(msg: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.accuracy.run",
        description=(
            "Accuracy of merged LoRA adapters: coremerge (every method in full, core and knots "
            "space) against PEFT's add_weighted_adapter, on six text tasks with "
            "all-MiniLM-L6-v2 (paper's protocol, small scale)."
        ),
    )
    p.add_argument("--quick", action="store_true", help="tiny splits, 1 epoch: a smoke run")
    p.add_argument(
        "--out", type=Path, default=ROOT / "bench/out/accuracy", help="cache and scratch"
    )
    p.add_argument(
        "--results", type=Path, default=ROOT / "bench/results", help="where accuracy-latest.* go"
    )
    p.add_argument("--no-results", action="store_true", help="leave bench/results alone")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0, help="splits, training and DARE masks")
    p.add_argument("--methods", default=",".join(METHODS), help="coremerge methods (comma list)")
    p.add_argument("--spaces", default=",".join(SPACES), help="coremerge spaces (comma list)")
    p.add_argument(
        "--mixed-spaces",
        default="full,core",
        help="coremerge spaces for the mixed-rank variant (default full,core, for time)",
    )
    p.add_argument(
        "--variants", default="equal,mixed", help="equal (r=8 for all) and/or mixed (ranks 4/8/16)"
    )
    p.add_argument("--no-peft", action="store_true", help="skip PEFT's add_weighted_adapter peers")
    p.add_argument("--no-checks", action="store_true", help="skip the once-per-run checks")
    p.add_argument(
        "--no-early-stop",
        action="store_true",
        help="evaluate the whole alpha grid instead of the paper's early stopping",
    )
    p.add_argument("--alpha-step", type=float, help="linear-search step (default 0.2; quick 1.0)")
    p.add_argument("--alpha-max", type=float, help="largest alpha tried (default 5.0; quick 2.0)")
    p.add_argument("--epochs", type=int, help="training epochs (default 1)")
    p.add_argument(
        "--sizes",
        help="examples per task as TRAIN,VAL,TEST (default 480,48,144; quick 96,24,48); "
        "each class gets size // n_classes of each split",
    )
    p.add_argument(
        "--report-only",
        type=Path,
        metavar="JSON",
        help="only redraw accuracy-latest.{md,png} from a results JSON (no training, no merging)",
    )
    return p.parse_args(argv)


def settings_key(settings: dict) -> str:
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def machine() -> dict:
    import platform

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = next(
        (
            int(line.split()[1]) // 1024
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        None,
    )
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "mem_mib": mem,
        "python": platform.python_version(),
    }


def versions() -> dict:
    import peft
    import safetensors
    import transformers

    return {
        "coremerge": metadata.version("coremerge"),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


def finetuned_accuracies(ev: Evaluator, adapter_dirs: list[Path]) -> dict[str, list[float]]:
    """Each task's accuracy with its own adapter and head (the normaliser)."""
    out: dict[str, list[float]] = {"val": [], "test": []}
    for t, d in enumerate(adapter_dirs):
        with add_deltas(ev.encoder, lora_deltas(d)):
            for split in out:
                out[split].append(accuracy(ev.encoder, ev.heads[t], ev.splits[split][t]))
    return out


def _same_delta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(float((a[k] - b[k]).norm()) <= SAME_DELTA_REL * float(b[k].norm()) for k in b)


def run_variant(
    variant: str,
    adapter_dirs: list[Path],
    ranks: list[int],
    spaces: list[str],
    ev: Evaluator,
    base,
    args: argparse.Namespace,
    step: float,
    max_alpha: float,
    out: dict,
    save,
) -> None:
    """Merge every way, search alpha, evaluate; fills ``out`` and calls ``save()`` after each
    merge, so a run cut short still leaves its results so far."""
    names = list(TASK_NAMES)
    ev.finetuned = finetuned_accuracies(ev, adapter_dirs)
    log(
        f"[{variant}] fine-tuned test accuracy: "
        + ", ".join(f"{a:.3f}" for a in ev.finetuned["test"])
    )
    base_test = ev.accuracies(None, 0.0, "test")
    out.update(
        {
            "ranks": ranks,
            "finetuned": {k: [round(a, 5) for a in v] for k, v in ev.finetuned.items()},
            "base_heads_test_acc": [round(a, 5) for a in base_test],
            "base_heads_test_norm": [round(a, 5) for a in ev.normalised(base_test, "test")],
            "rows": [],
        }
    )
    seen: list[tuple[dict[str, torch.Tensor], dict]] = []

    def record(source: str, method: str, space: str, merged) -> None:
        t0 = time.perf_counter()
        twin = next((row for d, row in seen if _same_delta(merged.deltas, d)), None)
        if twin is not None:
            found = {
                k: twin[k]
                for k in ("alpha", "val_curve", "test_acc", "test_norm", "avg_acc", "avg_norm")
            }
            found["same_delta_as"] = f"{twin['source']} {twin['method']} {twin['space']}"
        else:
            res = linear_search(
                ev, merged.deltas, step, max_alpha, None if args.no_early_stop else 2
            )
            found = {
                "alpha": res.alpha,
                "val_curve": res.val_curve,
                "test_acc": [round(a, 5) for a in res.test_acc],
                "test_norm": [round(a, 5) for a in res.test_norm],
                "avg_acc": round(res.avg_acc, 5),
                "avg_norm": round(res.avg_norm, 5),
            }
        row = {
            "source": source,
            "method": method,
            "space": space,
            **found,
            "merge_seconds": round(merged.seconds, 3),
            "rank": merged.rank,
            "detail": merged.detail,
            "search_seconds": round(time.perf_counter() - t0, 1),
        }
        out["rows"].append(row)
        if twin is None:
            seen.append((merged.deltas, row))
        log(
            f"[{variant}] {source} {method} {space}: alpha {row['alpha']:g}, norm {row['avg_norm']:.3f}, "
            f"acc {row['avg_acc']:.3f}, merge {merged.seconds:.2f}s, search {row['search_seconds']:.0f}s"
            + (f" (same ΔW as {found['same_delta_as']})" if twin is not None else "")
        )
        save()

    scratch = args.out / "merged" / f"{variant}-{os.getpid()}"  # concurrent runs may share --out
    methods = args.methods.split(",")
    combos = (
        [] if args.no_peft else list(PEFT_EQUAL_RANK if len(set(ranks)) == 1 else PEFT_MIXED_RANK)
    )
    model = load_peft_model(base, adapter_dirs, names) if combos else None
    # Ordered so that a run cut short already answers the questions: full and core for the
    # headline methods, PEFT's main combinations, the other methods, the rest of PEFT, knots.
    knots = [sp for sp in spaces if sp not in ("full", "core")]
    first = [sp for sp in spaces if sp in ("full", "core")]
    schedule = [("coremerge", m, sp) for m in methods[:3] for sp in first]
    schedule += [("peft", c, "-") for c in combos[:5]]
    schedule += [("coremerge", m, sp) for m in methods[3:] for sp in first]
    schedule += [("peft", c, "-") for c in combos[5:]]
    schedule += [("coremerge", m, sp) for sp in knots for m in methods]
    for source, name, space in schedule:
        if source == "coremerge":
            merged = coremerge_merge(
                name, space, adapter_dirs, names, scratch / f"{name}-{space}", seed=args.seed
            )
        else:
            density = PEFT_DARE_DENSITY if name.startswith("dare") else PEFT_DENSITY.get(name)
            merged = peft_merge(model, names, name, density=density, seed=args.seed)
        record(source, name, space, merged)
    del model
    shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        results = json.loads(args.report_only.read_text())
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "accuracy-latest.md").write_text(report.markdown(results))
        report.plot(results, args.results / "accuracy-latest.png")
        return 0
    preset = QUICK if args.quick else FULL
    step = args.alpha_step or preset["step"]
    max_alpha = args.alpha_max or preset["max_alpha"]
    train_cfg = TrainConfig(epochs=args.epochs or preset["epochs"])
    sizes: Sizes = Sizes(*map(int, args.sizes.split(","))) if args.sizes else preset["sizes"]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    log("building tasks")
    tasks = load_tasks(sizes, seed=args.seed)
    tokenizer, base = load_encoder()
    for p in base.parameters():
        p.requires_grad_(False)
    settings = {
        "sizes": asdict(sizes),
        "train": asdict(train_cfg),
        "seed": args.seed,
        "max_length": MAX_LENGTH,
    }
    cache = args.out / "adapters" / f"{'quick' if args.quick else 'full'}-{settings_key(settings)}"

    wanted = {"equal": [EQUAL_RANK] * len(tasks), "mixed": list(MIXED_RANKS)}
    variants = {v: wanted[v] for v in args.variants.split(",")}
    train_records: dict = {}
    train_seconds = 0.0

    def adapters_for(ranks: list[int]) -> list[Path]:
        """Train (or find in the cache) each task's adapter at its rank."""
        nonlocal train_seconds
        t0, dirs = time.perf_counter(), []
        for task, r in zip(tasks, ranks, strict=True):
            d = cache / f"{task.name}-r{r}"
            if not (d / "train.json").is_file():
                log(f"training {task.name} r={r} on {len(task.splits['train'])} examples")
            train_records[task.name, r] = train_adapter(
                base, tokenizer, task, r, d, train_cfg, seed=args.seed, log=log
            )
            dirs.append(d)
        train_seconds += time.perf_counter() - t0
        results["training"] = [train_records[k] for k in sorted(train_records)]
        return dirs

    splits = {s: [tokenize(tokenizer, t.splits[s], 64) for t in tasks] for s in ("val", "test")}
    results: dict = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "machine": machine(),
        "versions": versions(),
        "settings": {
            **settings,
            "equal_rank": EQUAL_RANK,
            "mixed_ranks": list(MIXED_RANKS),
            "alpha_search": {
                "step": step,
                "max": max_alpha,
                "early_stopping_steps": None if args.no_early_stop else 2,
            },
            "threads": args.threads,
            "peft_density": PEFT_DENSITY,
            "peft_dare_density": PEFT_DARE_DENSITY,
            "target_modules": "query, key, value, dense (36 linear layers)",
            "adapter_cache": str(cache.relative_to(ROOT))
            if cache.is_relative_to(ROOT)
            else str(cache),
        },
        "tasks": [
            {
                "name": t.name,
                "description": t.description,
                "classes": list(t.classes),
                "counts": t.counts(),
            }
            for t in tasks
        ],
        "training": [],
        "variants": {},
    }
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")

    def save(final: bool = False) -> None:
        results["complete"] = final
        results["train_seconds"] = round(train_seconds, 1)
        results["wall_seconds"] = round(time.perf_counter() - started, 1)
        try:
            write_results(results, args, stamp)
        except Exception as exc:  # a reporting bug must not lose the run: its JSON is written first
            log(f"writing the report failed: {exc!r}")

    for variant, ranks in variants.items():
        dirs = adapters_for(ranks)
        ev = Evaluator(base, [t.name for t in tasks], [load_head(d) for d in dirs], splits)
        if variant == "equal" and not args.no_checks:
            log("checks: PEFT-loaded merge vs ΔW added into the base, alpha linearity")
            results["checks"] = checks.run_checks(
                base, tokenizer, tasks, dirs, args.out / "checks", args.seed
            )
        spaces = (args.spaces if variant == "equal" else args.mixed_spaces).split(",")
        results["variants"][variant] = out = {}
        run_variant(variant, dirs, ranks, spaces, ev, base, args, step, max_alpha, out, save)
        out["evaluations"] = ev.evaluations
    save(final=True)
    log(f"done in {results['wall_seconds']:.0f} s")
    print(report.markdown(results))
    return 0


def write_results(results: dict, args: argparse.Namespace, stamp: str) -> None:
    """The run's JSON under ``--out``; and, unless ``--no-results``, accuracy-latest.*."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"accuracy-{stamp}.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.no_results:
        return
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "accuracy-latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.results / "accuracy-latest.md").write_text(report.markdown(results))
    report.plot(results, args.results / "accuracy-latest.png")


if __name__ == "__main__":
    raise SystemExit(main())
