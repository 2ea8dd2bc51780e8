"""The ``coremerge`` command line: merge and inspect adapters on local files, no server needed.

    coremerge merge ADAPTER_DIR... -o OUT_DIR [--method tsv] [--space core] [--weights 1,0.5]
                    [--param NAME=VALUE]... [--rank K|auto [--target vllm] [--energy 0.9]]
                    [--dtype bfloat16] [--device auto]
                    [--seed 0] [--normalize] [--include RE]... [--exclude RE]...
                    [--spec job.json]
    coremerge merge --config merge.yml OUT_DIR      (mergekit's configuration, docs/mergekit.md)
    coremerge inspect ADAPTER_DIR [--json]
    coremerge demo [--workdir DIR]

Bad arguments and bad adapters print one line on stderr and exit with status 2; nothing is
left at OUT_DIR on failure. Heavy imports (torch) happen inside the commands, so ``--help``
and the service commands start fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn, get_args

from jobs.hub import reference_uri
from jobs.servers import SERVER_NAMES
from jobs.spec import (
    DEFAULT_ENERGY,
    DEFAULT_TARGET,
    DTYPES,
    METHOD_PARAMS,
    METHODS,
    SPACES,
    MergeSpec,
    RankMode,
)
from jobs.version import VERSION

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_INTERNAL = 1
#: What ``pip install "coremerge[worker]"`` adds to the base install (the client and service).
WORKER_EXTRA = frozenset(
    {"torch", "safetensors", "peft", "transformers", "tqdm", "huggingface_hub"}
)


class UsageError(Exception):
    """A bad argument: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        self.exit(EXIT_USAGE, f"coremerge: error: {message} (see --help)\n")


def _parse_param(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` with VALUE a number, true/false, or a word (``alpha=auto``,
    ``axes=aligned``) that the spec's validation accepts or names as wrong."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise UsageError(f"--param {text!r}: expected NAME=VALUE")
    low = raw.strip().lower()
    if low in ("true", "false"):
        return name, low == "true"
    for kind in (int, float):
        try:
            return name, kind(raw)
        except ValueError:
            pass
    if not low:
        raise UsageError(f"--param {text!r}: VALUE is empty")
    return name, low


def _parse_weights(text: str, count: int) -> list[float]:
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise UsageError(f"--weights {text!r}: expected comma-separated numbers") from None
    if len(weights) != count:
        raise UsageError(f"--weights has {len(weights)} values for {count} adapters")
    return weights


def local_path(uri: str) -> Path:
    """A CLI adapter or output location: a local path or ``file:///abs/dir``."""
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if "://" in uri:
        raise UsageError(
            f"{uri!r}: the CLI reads local paths or file:// URIs; use the service for s3://"
        )
    return Path(uri)


def _validation_message(exc: Exception) -> str:
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "invalid job spec: " + "; ".join(parts)


def _document(args: argparse.Namespace) -> dict[str, Any]:
    """The spec as ``--spec`` (JSON) or ``--config`` (mergekit's YAML) gives it, with the
    positional adapters; with ``--config`` one positional may be the output folder instead,
    as ``mergekit-yaml merge.yml OUT_DIR`` has it."""
    if args.spec and args.config:
        raise UsageError("give --spec or --config, not both")
    raw: dict[str, Any] = {}
    if args.spec:
        try:
            raw = json.loads(Path(args.spec).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"--spec {args.spec}: {exc}") from None
        if not isinstance(raw, dict):
            raise UsageError(f"--spec {args.spec}: not a JSON object")
    if args.config:
        raw = config_spec(args.config)
        for adapter in raw["adapters"]:
            adapter["uri"] = reference_uri(adapter["uri"])
        if len(args.adapters) == 1 and args.output is None:
            args.output, args.adapters = args.adapters[0], []
        elif args.adapters:
            raise UsageError("--config names the adapters (models:); give no ADAPTER_DIR")
    if args.adapters:
        raw["adapters"] = [{"uri": reference_uri(a)} for a in args.adapters]
    return raw


def config_spec(path: str) -> dict[str, Any]:
    """The job spec of the mergekit configuration at ``path`` (``jobs.mergekit``)."""
    from jobs.mergekit import MergekitConfigError, read_mergekit_config, spec_from_mergekit

    try:
        return spec_from_mergekit(read_mergekit_config(path))
    except MergekitConfigError as exc:
        raise UsageError(f"--config {path}: {exc}") from None


def _rank_arg(text: str) -> int | str:
    """``--rank``: a positive integer or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an integer nor auto") from None


def build_spec(args: argparse.Namespace) -> MergeSpec:
    """The job spec from ``--spec`` or ``--config`` (if given) overridden by the explicit
    flags."""
    raw = _document(args)
    if not raw.get("adapters"):
        raise UsageError("no adapters given")
    if args.weights is not None:
        for ref, w in zip(
            raw["adapters"], _parse_weights(args.weights, len(raw["adapters"])), strict=True
        ):
            ref["weight"] = w
    for key in ("method", "space", "seed"):
        if getattr(args, key) is not None:
            raw[key] = getattr(args, key)
    raw.setdefault("method", "tsv")
    _module_flags(raw, args)
    if args.param:
        raw["params"] = {**raw.get("params", {}), **dict(_parse_param(p) for p in args.param)}
    output = raw.setdefault("output", {})
    if not isinstance(output, dict):
        raise UsageError("spec field 'output' must be an object")
    if args.output is not None:
        output["uri"] = args.output
    if "uri" not in output:
        raise UsageError("no output directory: give -o OUT_DIR")
    if args.rank is not None:
        output["rank"] = args.rank
    for key in ("rank_mode", "target", "energy"):
        if getattr(args, key) is not None:
            output[key] = getattr(args, key)
    if args.dtype is not None:
        output["dtype"] = args.dtype
    try:
        spec = MergeSpec.model_validate(raw)
    except ValueError as exc:
        raise UsageError(_validation_message(exc)) from None
    _check_output_apart(spec)
    return spec


def _module_flags(raw: dict[str, Any], args: argparse.Namespace) -> None:
    """``--include`` / ``--exclude`` (added to the spec's) and ``--normalize``."""
    if args.include or args.exclude:
        modules = raw.setdefault("modules", {})
        if not isinstance(modules, dict):
            raise UsageError("spec field 'modules' must be an object")
        for key in ("include", "exclude"):
            given = getattr(args, key) or []
            if given:
                modules[key] = [*modules.get(key, []), *given]
    if args.normalize:
        raw["normalize"] = True


def _check_output_apart(spec: MergeSpec) -> None:
    """The output folder must not equal, contain or lie inside an input folder: compared as
    absolute paths with symlinks resolved, ``file://`` URIs and local paths alike (the one
    comparison the service makes too, ``jobs.uris.output_overlap``)."""
    from jobs.hub import HUB_SCHEME
    from jobs.uris import local_location, output_overlap

    if spec.output.uri.startswith(HUB_SCHEME):
        raise UsageError(f"output {spec.output.uri!r}: an hf:// location is an input only")
    output = local_location(local_path(spec.output.uri))
    local = [a for a in spec.adapters if not a.uri.startswith(HUB_SCHEME)]
    inputs = [local_location(local_path(a.uri)) for a in local]
    clash = output_overlap(output, inputs)
    if clash is not None:
        raise UsageError(
            f"output {output.path} overlaps input {inputs[clash].path}: the output must not "
            "equal, contain or lie inside an input folder"
        )


def cmd_merge(args: argparse.Namespace) -> int:
    spec = build_spec(args)
    from worker.merge.runner import run_merge
    from worker.storage.hub import resolve_cli_inputs

    spec, dirs = resolve_cli_inputs(spec, local_path)
    out_dir = local_path(spec.output.uri)
    bar = _progress_bar(args.quiet or not sys.stderr.isatty())  # no bar in logs and pipes
    if spec.space == "full":
        bar.estimate = _FullSpaceEstimate()
    from worker.limits import default_max_work_bytes

    outcome = run_merge(
        spec, dirs, out_dir, device=args.device, on_progress=bar.update,
        max_work_bytes=args.max_memory or default_max_work_bytes(),
        record_local_paths=args.record_paths,
    )  # fmt: skip
    bar.close()
    report = outcome.report
    residual = report["self_check"]["max_projection_residual"]
    print(
        f"merged {len(spec.adapters)} adapters with {spec.method} in {spec.space} space → {out_dir}\n"
        f"  rank {outcome.rank}, {outcome.modules} modules, {outcome.bytes / 2**20:.1f} MiB "
        f"{spec.output.dtype}, {outcome.seconds:.2f} s on {report['device']}; "
        + (f"self-check residual {residual:.1e}" if residual is not None else "nothing projected")
        + _lowest_kept_energy(report)
        + _rank_auto_text(report)
    )
    return 0


def _lowest_kept_energy(report: dict[str, Any]) -> str:
    """With ``--rank``: the module that kept the least of its update's energy, so that a rank
    too small for some module shows on the summary line, not only in the report."""
    kept = [(m["kept_energy"], m["module"]) for m in report.get("modules", [])
            if m.get("kept_energy") is not None]  # fmt: skip
    if not kept:
        return ""
    energy, module = min(kept)
    return f"; lowest kept energy {energy:.3f} ({module})"


def _rank_auto_text(report: dict[str, Any]) -> str:
    """With ``--rank auto``: the rank chosen, for which server, and the warning when its cap
    kept a module under the energy asked."""
    auto = report["output"].get("rank_auto")
    if not auto:
        return ""
    text = (
        f"\n  rank {auto['rank']} chosen for {auto['target']} to keep {auto['energy']:g} of "
        f"every module's energy (the energy alone needed {auto['energy_rank']})"
    )
    return text + (f"\n  warning: {auto['warning']}" if auto["warning"] else "")


class _FullSpaceEstimate:
    """Full space merges a dense m × n matrix per module, a few hundred times slower than core
    space: said once at plan time, then, once the first modules are done (or 5 s have
    passed), how long the whole merge will likely take at that rate (on stderr)."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.said = False

    def update(self, progress: Any) -> None:
        import time

        if progress.stage == "plan" and self.started is None:
            self.started = time.monotonic()
            print("coremerge: full space merges a dense m × n matrix per module, typically a "
                  "few hundred times slower than core space (--space core)", file=sys.stderr)  # fmt: skip
            return
        done, total = progress.modules_done, progress.modules_total
        if self.said or self.started is None or progress.stage != "merge" or not 0 < done < total:
            return
        elapsed = time.monotonic() - self.started
        if done >= min(3, total - 1) or elapsed >= 5.0:
            self.said = True
            print(f"coremerge: full space: {done} of {total} modules in {elapsed:.1f} s; the "
                  f"merge will likely take about {elapsed / done * total:.0f} s", file=sys.stderr)  # fmt: skip


class _progress_bar:  # noqa: N801 (used like a function)
    """A tqdm bar on stderr fed by the runner's ``Progress`` reports."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None

    estimate: _FullSpaceEstimate | None = None

    def update(self, progress: Any) -> None:
        if self.estimate is not None:
            self.estimate.update(progress)
        if self.quiet or progress.stage == "plan":
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=progress.modules_total,
                unit="module",
                desc="merging",
                file=sys.stderr,
                leave=False,
            )
        self.bar.n = progress.modules_done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_inspect(args: argparse.Namespace) -> int:
    from worker.adapters import open_adapter

    path = local_path(args.adapter)
    reader = open_adapter(path, path.name)
    cfg = reader.config
    modules = [
        {
            "module": m.module,
            "rank": m.rank,
            # A VeRA adapter does not record its layers' input sizes (None: unknown).
            "shape": [m.out_features, m.in_features or None],
            "scaling": m.scaling,
        }
        for m in reader.modules.values()
    ]
    summary = {
        "adapter": str(path),
        "type": cfg.peft_type,
        "base_model_name_or_path": cfg.base_model_name_or_path,
        "task_type": cfg.task_type,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "use_rslora": cfg.use_rslora,
        "rank_pattern": cfg.rank_pattern,
        "alpha_pattern": cfg.alpha_pattern,
        "target_modules": cfg.target_modules,
        "modules": len(modules),
        "bytes": reader.nbytes,
    }
    if args.json:
        print(json.dumps({**summary, "module_list": modules}, indent=2))
        return 0
    for key, value in summary.items():
        print(f"{key:>24}: {value}")
    print(f"{'module':<60} {'rank':>5} {'shape (out×in)':>16} {'scaling':>9}")
    for m in modules:
        print(
            f"{m['module']:<60} {m['rank']:>5} {'×'.join(str(d or '?') for d in m['shape']):>16} {m['scaling']:>9.4g}"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.demo import run_demo

    return run_demo(Path(args.workdir) if args.workdir else None)


def _method_help() -> str:
    lines = []
    for method, params in METHOD_PARAMS.items():
        lines.append(f"  {method:<10} " + ", ".join(f"{p.name}={p.default}" for p in params))
    return "method parameters (--param NAME=VALUE):\n" + "\n".join(lines)


def _byte_size(text: str) -> int:
    """``8GiB``, ``512MiB``, ``1.5G`` or a plain number of bytes."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    number = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = number[-1:] if number[-1:] in units else ""
    try:
        value = float(number[: len(number) - len(unit)] if unit else number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 8GiB") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be positive")
    return int(value)


def _add_module_flags(merge: argparse.ArgumentParser) -> None:
    """``--normalize``, ``--include`` and ``--exclude`` (docs/job-spec.md)."""
    merge.add_argument(
        "--normalize",
        action="store_true",
        help="divide each module's weights by their sum (mergekit's normalize)",
    )
    for flag, what in (("--include", "merge only"), ("--exclude", "leave out")):
        merge.add_argument(
            flag,
            action="append",
            metavar="PATTERN",
            help=f"{what} modules whose name contains this regular expression; repeatable",
        )


def _add_merge_parser(sub: Any) -> None:
    merge = sub.add_parser(
        "merge",
        help="merge local PEFT LoRA adapters into one",
        epilog=_method_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument(
        "adapters",
        nargs="*",
        metavar="ADAPTER",
        help="PEFT adapter folders, or Hub ids org/name[@revision] (hf://org/name forces the "
        "Hub, ./org/name a local folder)",
    )
    merge.add_argument(
        "-o", "--output", metavar="OUT_DIR", help="where the merged adapter is written"
    )
    merge.add_argument("--method", choices=METHODS, help="merge method (default tsv)")
    merge.add_argument("--space", choices=SPACES, help="where to merge (default core)")
    merge.add_argument("--weights", help="per-adapter weights, comma-separated")
    merge.add_argument(
        "--param", action="append", metavar="NAME=VALUE", help="method parameter; repeatable"
    )
    _add_module_flags(merge)
    _add_output_flags(merge)
    _add_run_flags(merge)
    merge.set_defaults(func=cmd_merge)


def _add_output_flags(merge: argparse.ArgumentParser) -> None:
    """``merge``'s flags for the written adapter: its rank, how it is reached, its dtype."""
    merge.add_argument(
        "--rank",
        type=_rank_arg,
        help='bring every module to at most this rank; "auto": the smallest rank --target '
        "takes at which every module keeps --energy of its energy",
    )
    merge.add_argument(
        "--target",
        choices=SERVER_NAMES,
        help=f"with --rank auto: the server the rank is chosen for (default {DEFAULT_TARGET})",
    )
    merge.add_argument(
        "--energy",
        type=float,
        help="with --rank auto: the share of each module's energy (squared singular values) "
        f"to keep, 0 < energy <= 1 (default {DEFAULT_ENERGY})",
    )
    merge.add_argument(
        "--rank-mode",
        choices=get_args(RankMode),
        help="how --rank is reached: truncate, isotropic (cut, then one singular value), shared "
        "(compress onto shared bases, then merge; core space); default auto: isotropic for "
        "iso_c and isotropize, else truncate",
    )
    merge.add_argument(
        "--dtype", choices=DTYPES, help="storage dtype of the output (default float32)"
    )


def _add_run_flags(merge: argparse.ArgumentParser) -> None:
    """``merge``'s flags for the run: device, seed, spec files, output and memory limit."""
    merge.add_argument(
        "--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1…"
    )
    merge.add_argument("--seed", type=int, help="seed for random methods (default 0)")
    merge.add_argument(
        "--spec", metavar="JOB_JSON", help="a job spec file (docs/job-spec.md); flags override it"
    )
    merge.add_argument(
        "--config",
        metavar="MERGE_YML",
        help="a mergekit-style merge configuration (docs/mergekit.md); flags override it",
    )
    merge.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    merge.add_argument(
        "--record-paths",
        action="store_true",
        help="record local inputs' paths in the report and the model card (default: their "
        "names only, so a published adapter does not show this machine's layout)",
    )
    merge.add_argument(
        "--max-memory",
        type=_byte_size,
        metavar="SIZE",
        help="refuse a merge whose estimated peak working memory is larger (e.g. 8GiB; "
        "default: 80%% of this machine's memory limit)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="coremerge", description="Merge LoRA adapters in Core Space.")
    parser.add_argument("--version", action="version", version=f"coremerge {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    _add_merge_parser(sub)

    inspect = sub.add_parser("inspect", help="show an adapter's modules, ranks and scalings")
    inspect.add_argument("adapter", metavar="ADAPTER_DIR")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(func=cmd_inspect)

    demo = sub.add_parser(
        "demo", help="make three small real LoRA adapters with peft and merge them"
    )
    demo.add_argument(
        "--workdir", help="keep the adapters and the merge here (default: a temp dir)"
    )
    demo.set_defaults(func=cmd_demo)

    from worker.commands import register as register_worker

    register_worker(sub)
    try:
        from service.commands import register
    except ImportError:  # the service side is optional for the embedded CLI
        pass
    else:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad argument already reported in one line
        return int(exc.code or 0)
    from jobs.errors import MergeError

    try:
        return args.func(args)
    except (UsageError, FileExistsError) as exc:
        print(f"coremerge: error: {exc}", file=sys.stderr)
    except MergeError as exc:
        print(f"coremerge: error: {exc.code}: {exc.message}", file=sys.stderr)
    except KeyboardInterrupt:
        print("coremerge: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:
        return _unexpected(exc, args.command)
    return EXIT_USAGE


def _unexpected(exc: Exception, command: str) -> int:
    """One line for an exception no command handled: a module of the ``worker`` extra missing
    from a base install (the client and service) says what to install (exit 2); anything
    else is a bug, with a distinct exit status."""
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in WORKER_EXTRA:
        print(f"coremerge: error: `coremerge {command}` needs {exc.name}, which the base "
              'install leaves out: pip install "coremerge[worker]"', file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    print(f"coremerge: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
