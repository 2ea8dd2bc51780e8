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
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from bench.accuracy import checks, report, seeds
from bench.accuracy.model import MAX_LENGTH, load_encoder, tokenize
from bench.accuracy.search import Evaluator
from bench.accuracy.tasks import Sizes, load_tasks
from bench.accuracy.train import TrainConfig, load_head, train_adapter
from bench.accuracy.variant import METHODS, PEFT_DARE_DENSITY, PEFT_DENSITY, run_variant

ROOT = Path(__file__).resolve().parents[2]
SPACES = ("full", "core", "knots")
#: Ranks of the six tasks in the heterogeneous-rank variant (tasks 3–4 reuse the r=8 adapters).
MIXED_RANKS = (4, 4, 8, 8, 16, 16)
EQUAL_RANK = 8

#: Sizes at which every fine-tuned adapter clearly beats the base encoder with its head.
FULL = {"sizes": Sizes(train=1000, val=60, test=240), "epochs": 2, "step": 0.2, "max_alpha": 5.0}
QUICK = {"sizes": Sizes(train=96, val=24, test=48), "epochs": 1, "step": 1.0, "max_alpha": 2.0}


def log(msg: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--seeds`` defaults by ``--quick``."""
    p = argparse.ArgumentParser(
        prog="python -m bench.accuracy.run",
        description=(
            "Accuracy of merged LoRA adapters: coremerge (every method in full, core and knots "
            "space) against PEFT's add_weighted_adapter, on six text tasks with "
            "all-MiniLM-L6-v2 (paper's protocol, small scale)."
        ),
    )
    _add_run_flags(p)
    _add_merge_flags(p)
    _add_protocol_flags(p)
    args = p.parse_args(argv)
    args.seeds = args.seeds or ("0" if args.quick else "0,1,2")
    return args


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """Where the run writes, on how many threads, over which seeds."""
    p.add_argument("--quick", action="store_true", help="tiny splits, 1 epoch: a smoke run")
    p.add_argument(
        "--out", type=Path, default=ROOT / "bench/out/accuracy", help="cache and scratch"
    )
    p.add_argument(
        "--results", type=Path, default=ROOT / "bench/results", help="where accuracy-latest.* go"
    )
    p.add_argument("--no-results", action="store_true", help="leave bench/results alone")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument(
        "--seeds",
        help="comma list of seeds, each its own splits, training and DARE masks; the tables "
        "give mean ± std over them (default 0,1,2; quick 0)",
    )


def _add_merge_flags(p: argparse.ArgumentParser) -> None:
    """Which merges run: methods, spaces, variants, the rank table, the peers and checks."""
    p.add_argument(
        "--knots-methods",
        default="tsv,iso_c,ties",
        help="methods also run in knots space (equal ranks; default tsv,iso_c,ties)",
    )
    p.add_argument(
        "--rank-methods",
        default="ta,tsv,iso_c,cart,ties:aligned,dare_ties:aligned",
        help="core-space methods of the rank table (METHOD or METHOD:aligned)",
    )
    p.add_argument(
        "--rank-limits",
        default="8,16,32",
        help="output.rank values of the rank table (default r, 2r, 4r for r = 8)",
    )
    p.add_argument(
        "--alpha-candidates",
        action="store_true",
        help="also score the other data-free alpha rules on validation (bench/accuracy/alpha_rules.py)",
    )
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


def _add_protocol_flags(p: argparse.ArgumentParser) -> None:
    """The alpha search, the training and the split sizes; or only a redraw of the report."""
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
        nargs="+",
        metavar="JSON",
        help="only redraw accuracy-latest.* from per-seed JSONs (no training, no merging)",
    )


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        per_seed = [json.loads(path.read_text()) for path in args.report_only]
        seeds.write(per_seed, args.results)
        return 0
    torch.set_num_threads(args.threads)
    per_seed = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        args.seed = seed
        per_seed.append(run_seed(args))
    if not args.no_results:
        seeds.write(per_seed, args.results)
    print(seeds.markdown(per_seed))
    return 0


class _Adapters:
    """Each task's adapter at a rank, trained once per seed and settings, then found in the
    cache; keeps the training records and the seconds spent training for the results."""

    def __init__(self, base, tokenizer, tasks: list, cache: Path, cfg: TrainConfig, seed: int):
        self.base, self.tokenizer, self.tasks = base, tokenizer, tasks
        self.cache, self.cfg, self.seed = cache, cfg, seed
        self.records: dict = {}
        self.seconds = 0.0

    def __call__(self, ranks: list[int]) -> list[Path]:
        """Train (or find in the cache) each task's adapter at its rank."""
        t0, dirs = time.perf_counter(), []
        for task, r in zip(self.tasks, ranks, strict=True):
            d = self.cache / f"{task.name}-r{r}"
            if not (d / "train.json").is_file():
                log(f"training {task.name} r={r} on {len(task.splits['train'])} examples")
            self.records[task.name, r] = train_adapter(
                self.base, self.tokenizer, task, r, d, self.cfg, seed=self.seed, log=log
            )
            dirs.append(d)
        self.seconds += time.perf_counter() - t0
        return dirs

    def training(self) -> list[dict]:
        """The training records so far, in (task, rank) order."""
        return [self.records[k] for k in sorted(self.records)]


def run_seed(args: argparse.Namespace) -> dict:
    """Train (or find) the adapters of ``args.seed``, merge them every way, evaluate; returns
    the seed's results, also written as ``accuracy-seed<N>.json`` (see :func:`write_results`)."""
    preset = QUICK if args.quick else FULL
    step = args.alpha_step or preset["step"]
    max_alpha = args.alpha_max or preset["max_alpha"]
    train_cfg = TrainConfig(epochs=args.epochs or preset["epochs"])
    sizes: Sizes = Sizes(*map(int, args.sizes.split(","))) if args.sizes else preset["sizes"]
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
    adapters_for = _Adapters(base, tokenizer, tasks, cache, train_cfg, args.seed)
    splits = {s: [tokenize(tokenizer, t.splits[s], 64) for t in tasks] for s in ("val", "test")}
    results = _results_head(args, settings, step, max_alpha, cache, tasks)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")

    def save(final: bool = False) -> None:
        results["complete"] = final
        results["train_seconds"] = round(adapters_for.seconds, 1)
        results["wall_seconds"] = round(time.perf_counter() - started, 1)
        try:
            write_results(results, args, stamp)
        except Exception as exc:  # a reporting bug must not lose the run: its JSON is written first
            log(f"writing the report failed: {exc!r}")

    for variant, ranks in variants.items():
        dirs = adapters_for(ranks)
        results["training"] = adapters_for.training()
        ev = Evaluator(base, [t.name for t in tasks], [load_head(d) for d in dirs], splits)
        if variant == "equal" and not args.no_checks:
            log("checks: PEFT-loaded merge vs ΔW added into the base, alpha linearity")
            results["checks"] = checks.run_checks(
                base, tokenizer, tasks, dirs, args.out / "checks", args.seed
            )
        spaces = (args.spaces if variant == "equal" else args.mixed_spaces).split(",")
        results["variants"][variant] = out = {}
        run_variant(variant, dirs, ranks, spaces, ev, base, args, step, max_alpha, out, save, log)
        out["evaluations"] = ev.evaluations
    save(final=True)
    log(f"seed {args.seed} done in {results['wall_seconds']:.0f} s")
    return results


def _results_head(
    args: argparse.Namespace, settings: dict, step: float, max_alpha: float, cache: Path, tasks
) -> dict:
    """The seed's results before any merge: when, where, with what, on which tasks."""
    return {
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
            "knots_methods": args.knots_methods,
            "rank_methods": args.rank_methods,
            "rank_limits": args.rank_limits,
            "alpha_candidates": args.alpha_candidates,
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


def write_results(results: dict, args: argparse.Namespace, stamp: str) -> None:
    """The seed's JSON under ``--out`` (and, unless ``--no-results``, as
    ``accuracy-seed<N>.json`` in ``--results``, which ``--report-only`` redraws from), with
    its single-seed tables beside it under ``--out``."""
    args.out.mkdir(parents=True, exist_ok=True)
    blob = json.dumps(results, indent=2) + "\n"
    (args.out / f"accuracy-seed{args.seed}-{stamp}.json").write_text(blob)
    (args.out / f"accuracy-seed{args.seed}-{stamp}.md").write_text(report.markdown(results))
    if not args.no_results:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"accuracy-seed{args.seed}.json").write_text(blob)


if __name__ == "__main__":
    raise SystemExit(main())
