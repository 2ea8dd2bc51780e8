"""The benchmark: coremerge's CLI against the I/O floor and its peers (PEFT, the paper's code).

    .venv/bin/python -m bench.speed.run                      # speed profile (issue 5), ~10-20 min
    .venv/bin/python -m bench.speed.run --quick              # a small debug run (a few minutes)
    .venv/bin/python -m bench.speed.run --profile engine     # issue 3's targets, PASS/FAIL
    .venv/bin/python -m bench.speed.run --profile engine --layers 4   # a quick engine run
    .venv/bin/python -m bench.speed.run --profile scale      # issue 16: 70B and T = 64, sampled
    .venv/bin/python -m bench.speed.run --device cuda

Profiles: ``speed`` (profile_speed.py: every method in core, knots and full space, PEFT's
combinations, the floor, a breakdown and scaling curves; Markdown + PNG), ``engine``
(profile_engine.py: core ta/ties/tsv, full ta and the paper's reference code on Llama-3-8B
shapes against issue 3's targets; exit status 1 when one fails) and ``scale``
(profile_scale.py: Llama-3-70B with 16 adapters of rank 64 and Llama-3-8B with 64 of rank
16, on sampled layers scaled to the model, against issue 16's targets). Options whose default
depends on the profile say so. See bench/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `bench` importable
    sys.path.insert(0, str(ROOT))

from bench.speed.harness import BENCH, DEFAULT_REFERENCE  # noqa: E402
from bench.speed.profile_engine import EngineProfile  # noqa: E402
from bench.speed.profile_scale import WORKLOADS, ScaleProfile  # noqa: E402
from bench.speed.profile_speed import METHODS, PEFT_CHEAP, PEFT_DENSE, SpeedProfile  # noqa: E402

PROFILES = {"speed": SpeedProfile, "engine": EngineProfile, "scale": ScaleProfile}
#: options whose default depends on the profile
DEFAULTS = {
    "speed": {
        "width": 1024,
        "layers": 16,
        "methods": ",".join(METHODS),
        "peft": ",".join(PEFT_CHEAP + PEFT_DENSE),
        "ref_layers": 0,
        "repeat": 3,
        "extra_attempts": 0,
        "quiet_wait": 3.0,
        "timeout": 1800.0,
        "sample_layers": 1,
        "input_dtype": "float32",
    },
    "engine": {
        "width": 4096,
        "layers": 32,
        "methods": "ta,ties,tsv",
        "peft": "",
        "ref_layers": 1,
        "repeat": 1,
        "extra_attempts": 3,
        "quiet_wait": 120.0,
        "timeout": 3600.0,
        "sample_layers": 1,
        "input_dtype": "float32",
    },
    # fixed workloads (profile_scale.WORKLOADS): --width, --layers, --adapters, --rank unused
    "scale": {
        "width": None,
        "layers": None,
        "methods": "ta,ties,tsv",
        "peft": "",
        "ref_layers": 0,
        "repeat": 1,
        "extra_attempts": 0,
        "quiet_wait": 15.0,
        "timeout": 900.0,
        "sample_layers": 3,
        "input_dtype": "bfloat16",
    },
}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except None: those options say their default per profile."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def _by_profile(key: str) -> str:
    return (
        " (default: "
        + ", ".join(
            f"{p} {DEFAULTS[p][key]!r}" if DEFAULTS[p][key] is not None else f"{p} unused"
            for p in DEFAULTS
        )
        + ")"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=_Formatter,
    )
    ap.add_argument("--profile", choices=sorted(PROFILES), default="speed")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, one repeat, no results/ (engine: one layer, no full space)",
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda (GPU memory is then recorded)")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="OMP/MKL threads of every child (0: torch's default, one per core). On a shared "
        "machine use 1: torch's threads spin-wait for busy cores and a 2-thread merge can run "
        "8x slower than a 1-thread one",
    )
    _workload_options(ap)
    _repeat_options(ap)
    _peer_options(ap)
    _curve_options(ap)
    _file_options(ap)
    args = ap.parse_args(argv)
    for key, value in DEFAULTS[args.profile].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.quick:
        _quick(args)
    return args


def _quick(args: argparse.Namespace) -> None:
    """``--quick``: the profile's small sizes, one repeat, results/ left alone."""
    if args.profile == "speed":
        args.width, args.layers, args.adapters, args.rank = 512, 2, 4, 8
        args.curve_adapters, args.curve_ranks, args.curve_widths = "2,4,8", "4,8", "512,1024"
        args.curve_base = "4,8,512"
    elif args.profile == "engine":
        args.layers, args.sample_layers, args.quiet_wait = 1, 0, 3.0
    else:  # scale: one sampled layer
        args.sample_layers, args.quiet_wait = 1, 3.0
    args.repeat = args.curve_repeat = 1
    args.no_results = True


def _workload_options(ap: argparse.ArgumentParser) -> None:
    w = ap.add_argument_group(
        "workload (Llama-3 ratios; width 4096 is Llama-3-8B; the scale profile's are fixed, "
        "see --workloads)"
    )
    w.add_argument("--width", type=int, help="hidden size" + _by_profile("width"))
    w.add_argument("--layers", type=int, help="decoder layers" + _by_profile("layers"))
    w.add_argument("--adapters", type=int, default=8)
    w.add_argument("--rank", type=int, default=16)
    w.add_argument(
        "--input-dtype",
        choices=["float32", "bfloat16"],
        help="dtype of the generated adapters" + _by_profile("input_dtype"),
    )
    w.add_argument("--seed", type=int, default=0, help="seed of the random factors")
    w.add_argument("--methods", help="coremerge methods" + _by_profile("methods"))
    w.add_argument(
        "--sample-layers",
        type=int,
        help="layers on which full space and PEFT's dense combinations run, scaled to --layers "
        "(0: skip them); scale profile: the layers every row runs on, scaled to the model"
        + _by_profile("sample_layers"),
    )
    w.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help="scale profile: which workloads ("
        + "; ".join(f"{k}: {v.title}, {v.layers} layers" for k, v in WORKLOADS.items())
        + ")",
    )


def _repeat_options(ap: argparse.ArgumentParser) -> None:
    r = ap.add_argument_group("repeats on a shared machine")
    r.add_argument(
        "--repeat", type=int, help="clean runs per step, fastest kept" + _by_profile("repeat")
    )
    r.add_argument(
        "--max-contention",
        type=float,
        default=0.10,
        help="a run during which other processes used more than this share of the CPUs is "
        "contended: the fastest clean run is kept, a contended one only when none is clean",
    )
    r.add_argument(
        "--extra-attempts",
        type=int,
        help="runs allowed per step beyond --repeat while it has too few clean runs"
        + _by_profile("extra_attempts"),
    )
    r.add_argument(
        "--quiet-wait",
        type=float,
        help="before each step, wait up to this many seconds for other processes to leave "
        "the CPUs" + _by_profile("quiet_wait"),
    )
    r.add_argument("--timeout", type=float, help="per subprocess, seconds" + _by_profile("timeout"))


def _peer_options(ap: argparse.ArgumentParser) -> None:
    peers = ap.add_argument_group("peers")
    peers.add_argument(
        "--peft", help="PEFT combinations ('' to skip; speed profile)" + _by_profile("peft")
    )
    peers.add_argument(
        "--ref-layers",
        type=int,
        help="layers timed with the paper's reference code (0: skip; engine profile)"
        + _by_profile("ref_layers"),
    )
    peers.add_argument(
        "--reference-repo",
        type=Path,
        default=DEFAULT_REFERENCE,
        help="git directory of github.com/apanariello4/core-space-merging (rows skipped without)",
    )


def _curve_options(ap: argparse.ArgumentParser) -> None:
    curves = ap.add_argument_group("scaling curves (speed profile; one layer)")
    curves.add_argument("--curve-method", default="ties")
    curves.add_argument("--curve-adapters", default="2,4,8,16,32,64")
    curves.add_argument("--curve-ranks", default="4,8,16,32,64")
    curves.add_argument("--curve-widths", default="1024,2048,4096")
    curves.add_argument("--curve-base", default="8,16,1024", help="T,rank,width of the sweeps")
    curves.add_argument("--curve-repeat", type=int, default=2)
    curves.add_argument(
        "--curve-full-max-width", type=int, default=2048, help="full space only up to this width"
    )
    curves.add_argument(
        "--curve-full-max-gib",
        type=float,
        default=2.0,
        help="full space only when T × m × n × 4 bytes of the largest module is below this",
    )
    curves.add_argument("--no-curves", action="store_true")


def _file_options(ap: argparse.ArgumentParser) -> None:
    o = ap.add_argument_group("files")
    o.add_argument("--coremerge", type=Path, default=ROOT / ".venv" / "bin" / "coremerge")
    o.add_argument(
        "--wait-cli", type=float, default=0.0, help="seconds to wait for a working coremerge"
    )
    o.add_argument("--out-dir", type=Path, default=BENCH / "out")
    o.add_argument("--results-dir", type=Path, default=BENCH / "results")
    o.add_argument(
        "--no-results",
        action="store_true",
        help="leave bench/results/ alone ({speed,engine,scale}-latest.*)",
    )
    o.add_argument("--keep-outputs", action="store_true", help="keep the merged adapters")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return PROFILES[args.profile](args).run()


if __name__ == "__main__":
    sys.exit(main())
