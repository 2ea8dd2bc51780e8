"""mergekit's merge configuration, read as a coremerge job spec (docs/mergekit.md).

``coremerge merge --config merge.yml`` and ``coremerge submit --config merge.yml`` take the
YAML mergekit users already write::

    models:
      - model: org/adapter-a
        parameters: {weight: 1.0, density: 0.5}
      - model: org/adapter-b
        parameters: {weight: 1.0, density: [1, 0.7, 0.1]}
    merge_method: ties
    base_model: meta-llama/Llama-3.1-8B
    parameters: {normalize: true, lambda: 1.0}
    dtype: bfloat16

:func:`spec_from_mergekit` maps it onto the job spec (the one contract: everything below is
checked again by ``jobs.spec.MergeSpec``) with mergekit's meaning: its defaults (``density``
1, ``normalize`` per method), ``lambda`` as ``alpha``, a DARE ``density`` (kept fraction) as
``drop`` = 1 − density, ``filter`` as a module pattern, list values as gradients over the
layers. Whatever coremerge cannot do exactly as mergekit would is refused with one line
naming the key (:class:`MergekitConfigError`); so are the configs mergekit itself rejects,
and keys mergekit would silently ignore (a typo never changes a merge). ``base_model`` is
checked against the adapters' ``base_model_name_or_path``, never loaded.

Model references stay as written (``org/name@rev``, a local folder, ``s3://…``); the CLI
and the client decide what each one is (``jobs.hub``). Imports neither torch nor the worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.mergekit_values import (
    MergekitConfigError,
    as_schedule,
    covers_every_module,
    map_numbers,
    map_values,
    mapping,
    nonzero_indicator,
    number,
    numbers,
    with_fallback,
)
from jobs.spec import METHOD_PARAMS

__all__ = [
    "MAX_CONFIG_BYTES",
    "MERGEKIT_METHODS",
    "MergekitConfigError",
    "read_mergekit_config",
    "spec_from_mergekit",
]

#: A merge configuration is a few kilobytes; a larger file is not one.
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class _Method:
    """What a mergekit method is in coremerge's terms."""

    ours: str  # the job spec's method
    globals: frozenset[str]  # the global parameters mergekit declares for it
    normalize: bool  # mergekit's default normalize
    rescale: bool | None = None  # mergekit's default rescale (None: not declared)
    needs_base: bool = True  # mergekit needs base_model (task vectors)
    consensus: bool = False  # TIES sign election
    dare: bool = False  # density is DARE's kept fraction


_GTA = frozenset({"int8_mask", "normalize", "rescale", "lambda"})
#: mergekit's methods that coremerge runs, and coremerge's own (their parameters are the job
#: spec's: docs/methods.md).
MERGEKIT_METHODS: dict[str, _Method] = {
    "linear": _Method("ta", frozenset({"normalize"}), normalize=True, needs_base=False),
    "task_arithmetic": _Method("ta", _GTA, normalize=False, rescale=False),
    "ties": _Method("ties", _GTA, normalize=True, rescale=False, consensus=True),
    "dare_ties": _Method("dare_ties", _GTA, normalize=False, rescale=True, consensus=True, dare=True),
    "dare_linear": _Method("dare", _GTA, normalize=False, rescale=True, dare=True),
    **{
        name: _Method(name, frozenset({"normalize", *(p.name for p in METHOD_PARAMS[name])}),
                      normalize=False, needs_base=False)
        for name in ("tsv", "cart", "iso_c")
    },
}  # fmt: skip
#: mergekit's other methods: no equivalent for LoRA adapters merged in core space.
_OTHER_MERGEKIT = [
    "slerp",
    "nuslerp",
    "multislerp",
    "karcher",
    "model_stock",
    "nearswap",
    "arcee_fusion",
    "passthrough",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "sce",
    "ram",
    "ramplus_tl",
]
_TOP_LEVEL = {"models", "merge_method", "base_model", "parameters", "dtype", "out_dtype",
              "tokenizer_source", "tokenizer", "chat_template", "slices", "modules", "coremerge"}  # fmt: skip
_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32",
           "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # fmt: skip
_COREMERGE_KEYS = {"space", "seed", "layers", "modules", "output"}


def read_mergekit_config(path: str | Path) -> dict[str, Any]:
    """The YAML file at ``path`` as a mapping (``yaml.safe_load``: no Python objects)."""
    import yaml

    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise MergekitConfigError(f"{path}: larger than 1 MiB, not a merge configuration")
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise MergekitConfigError(f"{path}: cannot read it ({exc})") from None
    except yaml.YAMLError as exc:
        raise MergekitConfigError(
            f"{path}: not valid YAML ({' '.join(str(exc).split())})"
        ) from None
    if not isinstance(config, dict):
        raise MergekitConfigError(f"{path}: not a mapping of keys (models:, merge_method:, …)")
    return config


def spec_from_mergekit(config: Mapping[str, Any]) -> dict[str, Any]:
    """The job spec (a dict, for ``MergeSpec.model_validate``) of a mergekit configuration,
    without ``output.uri`` unless its ``coremerge:`` block gives one."""
    _check_top_level(config)
    name, method = _method(config.get("merge_method"))
    base = _base_model(config, method, name)
    models = _models(config, base, method)
    glob = mapping(config.get("parameters") or {}, "parameters")
    unknown = set(glob) - method.globals - {"weight", "density"}
    if unknown:
        key = sorted(unknown)[0]
        raise MergekitConfigError(f"parameters.{key}: not a parameter of {name}{_accepts(method)}")
    adapters = [_adapter(ref, params, glob, method, name, i) for i, (ref, params) in models]
    spec: dict[str, Any] = {"adapters": adapters, "method": method.ours}
    indices = [i for i, _ in models]
    spec["params"], spec["normalize"] = _params(glob, method, name, adapters, indices)
    if base is not None:
        spec["base_model"] = base
    dtype = _dtype(config)
    spec["output"] = {"dtype": dtype} if dtype else {}
    _coremerge_block(config.get("coremerge"), spec)
    return spec


def _check_top_level(config: Mapping[str, Any]) -> None:
    unknown = sorted(set(config) - _TOP_LEVEL)
    if unknown:
        raise MergekitConfigError(f"{unknown[0]}: not a key of a mergekit configuration")
    if config.get("slices") or config.get("modules"):
        key = "slices" if config.get("slices") else "modules"
        raise MergekitConfigError(
            f"{key}: layer slicing has no equivalent for adapters; write models: with a "
            "weight gradient, and leave layers out with coremerge.modules.exclude"
        )
    if not config.get("models"):
        raise MergekitConfigError("models: missing (the adapters to merge, one model: each)")
    _check_tokenizer(config)


def _check_tokenizer(config: Mapping[str, Any]) -> None:
    """An adapter keeps its base model's tokenizer: ``tokenizer_source: base`` (or
    ``tokenizer: {source: base}``) says so and is accepted; any other tokenizer setting, or
    a chat template, has no equivalent. Both tokenizer keys at once mergekit refuses."""
    if config.get("chat_template") is not None:
        raise MergekitConfigError("chat_template: an adapter merge writes no chat template")
    if config.get("tokenizer") is not None and config.get("tokenizer_source") is not None:
        raise MergekitConfigError("tokenizer: give tokenizer or tokenizer_source, not both")
    tokenizer = config.get("tokenizer")
    if tokenizer is not None and tokenizer != {"source": "base"}:
        raise MergekitConfigError(
            "tokenizer: adapters keep the base model's tokenizer; only {source: base} is accepted"
        )
    source = config.get("tokenizer_source")
    if source not in (None, "base"):
        raise MergekitConfigError(
            f"tokenizer_source: {source!r}: adapters keep the base model's tokenizer; only "
            "'base' (what an adapter merge always gives) is accepted"
        )


def _method(name: object) -> tuple[str, _Method]:
    if not isinstance(name, str):
        raise MergekitConfigError("merge_method: missing (e.g. ties, task_arithmetic, linear)")
    accepted = ", ".join(MERGEKIT_METHODS)
    if name in _OTHER_MERGEKIT:
        raise MergekitConfigError(
            f"merge_method: mergekit's {name!r} has no equivalent in coremerge (accepted: {accepted})"
        )
    if name not in MERGEKIT_METHODS:
        raise MergekitConfigError(f"merge_method: unknown method {name!r} (accepted: {accepted})")
    return name, MERGEKIT_METHODS[name]


def _accepts(method: _Method) -> str:
    return f" (accepted: {', '.join(sorted(method.globals | {'weight', 'density'}))})"


def _split_reference(ref: object, key: str) -> tuple[str, str | None]:
    """``base+lora`` → (lora, base); ``path`` → (path, None). mergekit's own parsing: at
    most one ``+`` and one ``@`` per path."""
    if not isinstance(ref, str) or not ref.strip():
        raise MergekitConfigError(f"{key}: expected a model reference such as org/name")
    parts = ref.split("+")
    if len(parts) > 2 or any(p.count("@") > 1 or not p for p in parts):
        raise MergekitConfigError(
            f"{key}: cannot parse {ref!r} (mergekit's form: path[@rev][+lora[@rev]])"
        )
    return (parts[1], parts[0]) if len(parts) == 2 else (parts[0], None)


def _base_name(ref: str) -> str:
    """A base model's name without its revision, as ``base_model_name_or_path`` has it."""
    return ref.split("@", 1)[0].rstrip("/")


def _base_model(config: Mapping[str, Any], method: _Method, name: str) -> str | None:
    """``base_model`` (and the base of every ``base+lora`` model), which must agree."""
    bases = set()
    if config.get("base_model") is not None:
        lora, base = _split_reference(config["base_model"], "base_model")
        if base is not None:
            raise MergekitConfigError("base_model: a base model, not base+lora")
        bases.add(_base_name(lora))
    for i, entry in enumerate(config["models"] if isinstance(config["models"], list) else []):
        if isinstance(entry, dict) and isinstance(entry.get("model"), str):
            _, base = _split_reference(entry["model"], f"models[{i}].model")
            if base is not None:
                if bases and _base_name(base) not in bases:
                    raise MergekitConfigError(
                        f"models[{i}].model: base {base!r} differs from the others' ({sorted(bases)[0]!r})"
                    )
                bases.add(_base_name(base))
    if method.needs_base and not config.get("base_model"):
        raise MergekitConfigError(
            f"base_model: required by mergekit's {name} (coremerge checks it against the "
            "adapters' base_model_name_or_path and never loads it)"
        )
    return bases.pop() if bases else None


def _models(
    config: Mapping[str, Any], base: str | None, method: _Method
) -> list[tuple[int, tuple[str, dict[str, Any]]]]:
    """``(index, (adapter reference, its parameters))`` of every model that is an adapter:
    the base model listed among them is skipped, as mergekit skips it for task vectors."""
    models = config["models"]
    if not isinstance(models, list):
        raise MergekitConfigError("models: expected a list of {model: ..., parameters: ...}")
    out = []
    for i, entry in enumerate(models):
        key = f"models[{i}]"
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergekitConfigError(f"{key}: expected a mapping with model: (and parameters:)")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise MergekitConfigError(f"{key}.{extra[0]}: not a key of a model entry")
        ref, lora_base = _split_reference(entry["model"], f"{key}.model")
        params = mapping(entry.get("parameters") or {}, f"{key}.parameters")
        if lora_base is None and base is not None and _base_name(ref) == base:
            if not method.needs_base:  # linear would average the base's own weights in
                raise MergekitConfigError(
                    f"{key}.model: the base model; {method.ours!r} cannot average a full model "
                    "with adapters (remove it from models:)"
                )
            continue
        out.append((i, (ref, params)))
    if not out:
        raise MergekitConfigError("models: no adapter to merge (only the base model)")
    return out


def _tensor_params(method: _Method) -> set[str]:
    """The per-model parameters mergekit declares for the method."""
    return {"weight", "density"} if method.globals == _GTA else {"weight"}


def _adapter(
    ref: str, params: dict[str, Any], glob: dict[str, Any], method: _Method, name: str, i: int
) -> dict[str, Any]:
    """One ``adapters[]`` entry: the reference, its weight and its own density or drop."""
    key = f"models[{i}].parameters"
    unknown = sorted(set(params) - _tensor_params(method))
    if unknown:
        raise MergekitConfigError(
            f"{key}.{unknown[0]}: not a per-model parameter of {name} "
            f"(accepted: {', '.join(sorted(_tensor_params(method)))})"
        )
    adapter: dict[str, Any] = {"uri": ref}
    weight = _setting(params, glob, "weight", key)
    mergekits_own = method.ours not in ("tsv", "cart", "iso_c")
    if mergekits_own and (weight is None or not covers_every_module(weight)):
        raise MergekitConfigError(
            f"{key}.weight: required by mergekit's {name} for every module ("
            + ("give it here or in the global parameters)" if weight is None else
               "add a last entry with value: and no filter, as mergekit stops where none matches)")
        )  # fmt: skip
    if weight is not None:
        adapter["weight"] = weight
    density = _setting(params, glob, "density", key)
    if density is not None and method.ours != "ta":  # task_arithmetic ignores it, as mergekit
        for number in numbers(density):
            if number <= 0:
                raise MergekitConfigError(f"{key}.density: must be above 0, got {number:g}")
        kept = map_numbers(density, lambda d: min(d, 1.0))  # mergekit keeps all from 1 on
        if method.dare:
            adapter["drop"] = map_numbers(kept, lambda d: 1.0 - d)
        else:
            adapter["density"] = kept
    return adapter


def _setting(params: dict[str, Any], glob: dict[str, Any], name: str, key: str) -> Any:
    """The model's own setting of ``name``, falling back to the global one."""
    own = as_schedule(params[name], f"{key}.{name}") if name in params else None
    fallback = as_schedule(glob[name], f"parameters.{name}") if name in glob else None
    return with_fallback(own, fallback)


def _params(
    glob: dict[str, Any],
    method: _Method,
    name: str,
    adapters: list[dict[str, Any]],
    indices: list[int],
) -> tuple[dict[str, Any], bool]:
    """The spec's ``params`` and ``normalize``, with mergekit's defaults and meanings."""
    normalize = glob.get("normalize", method.normalize)
    if not isinstance(normalize, bool):
        raise MergekitConfigError(
            f"parameters.normalize: expected true or false, got {normalize!r}"
        )
    if method.ours in ("tsv", "cart", "iso_c"):
        own = {k: v for k, v in glob.items() if k not in ("normalize", "weight", "density")}
        return own, normalize
    _check_rescale(glob, method, name)
    # mergekit scales the merged task vector by lambda, 1.0 unless given (never coremerge's
    # data-free "auto", which is this spec's default)
    params: dict[str, Any] = {"alpha": 1.0}
    if "lambda" in glob:
        params["alpha"] = number(glob["lambda"], "parameters.lambda")
    if method.ours in ("ties", "dare_ties"):
        params["density"] = 1.0  # mergekit's default density keeps every entry
    if method.dare:
        params["drop"] = 0.0
    if method.consensus:
        _consensus_weights(adapters, indices, normalize, name)
        return params, False
    if name == "linear" and not normalize:
        _weights_sum_to_one(adapters)
    return params, normalize


def _check_rescale(glob: dict[str, Any], method: _Method, name: str) -> None:
    if method.rescale is None:  # not a parameter of the method (refused as unknown)
        return
    rescale = glob.get("rescale", method.rescale)
    if not isinstance(rescale, bool):
        raise MergekitConfigError(f"parameters.rescale: expected true or false, got {rescale!r}")
    if method.dare and not rescale:
        raise MergekitConfigError(
            f"parameters.rescale: false: coremerge's DARE always rescales the kept entries by "
            f"1/density (DARE's rule); {name} without it has no equivalent"
        )
    if method.ours == "ties" and rescale:
        raise MergekitConfigError(
            "parameters.rescale: true: rescaling trimmed task vectors to their L1 norm has "
            "no equivalent in coremerge's ties"
        )


def _consensus_weights(
    adapters: list[dict[str, Any]], indices: list[int], normalize: bool, name: str
) -> None:
    """mergekit's TIES with ``normalize`` divides each entry by the sum of the weights of
    the models that agree on its sign; coremerge's by their number (the TIES paper's mean).
    The two agree when the weights are equal in each module, where mergekit's weights cancel
    out: they become 1 (0 stays 0). Other configurations are refused."""
    if not normalize:
        raise MergekitConfigError(
            f"parameters.normalize: false: mergekit's {name} then sums the entries that agree "
            "in sign, coremerge's averages them (mergekit's normalize: true); set normalize: "
            "true with equal weights, or use task_arithmetic"
        )
    weights = [a.get("weight", 1.0) for a in adapters]
    plain = all(isinstance(w, float) for w in weights)
    if plain and len({w for w in weights if w != 0}) <= 1:
        for adapter, w in zip(adapters, weights, strict=True):
            adapter["weight"] = 1.0 if w != 0 else 0.0
        return
    if not plain and all(w == weights[0] for w in weights):
        indicator = map_values(weights[0], nonzero_indicator)
        if indicator is not None:
            for adapter in adapters:
                adapter["weight"] = indicator
            return
    first = next((i for i, w in zip(indices, weights, strict=True) if w != weights[0]), indices[0])
    raise MergekitConfigError(
        f"models[{first}].parameters.weight: with normalize: true, mergekit's {name} takes a mean "
        "weighted by the models' weights and coremerge's ties an unweighted one: the two "
        "agree only when every model has the same weight in each module (give them equal "
        "weights, scale the result with lambda)"
    )


def _weights_sum_to_one(adapters: list[dict[str, Any]]) -> None:
    """mergekit's linear without normalize sums the models' full weights: the base counts
    Σw times, which is a task-vector merge only when the weights sum to 1."""
    weights = [a.get("weight") for a in adapters]
    if all(isinstance(w, float) for w in weights) and abs(sum(weights) - 1.0) < 1e-6:  # type: ignore[arg-type]
        return
    raise MergekitConfigError(
        "parameters.normalize: false: mergekit's linear then adds Σ weight times the base "
        "model's own weights, which an adapter cannot express unless the weights are numbers "
        "summing to 1; use task_arithmetic for a weighted sum of the adapters"
    )


def _dtype(config: Mapping[str, Any]) -> str | None:
    """The output dtype: ``out_dtype``, else ``dtype`` (mergekit's names, ``torch.`` prefix
    allowed; ``bf16``, ``fp16`` and ``fp32`` too). The maths always runs in float32."""
    key = "out_dtype" if config.get("out_dtype") is not None else "dtype"
    value = config.get(key)
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise MergekitConfigError(
            f"{key}: {value!r} is not an output dtype (bfloat16, float16, float32; bf16, fp16, fp32)"
        )
    return _DTYPES[name]


def _coremerge_block(block: object, spec: dict[str, Any]) -> None:
    """coremerge's own settings, which mergekit has no key for: ``space``, ``seed``,
    ``layers``, ``modules`` (include / exclude) and ``output`` (``uri``, ``rank``)."""
    if block is None:
        return
    block = mapping(block, "coremerge")
    unknown = sorted(set(block) - _COREMERGE_KEYS)
    if unknown:
        raise MergekitConfigError(
            f"coremerge.{unknown[0]}: not a coremerge setting (accepted: {', '.join(sorted(_COREMERGE_KEYS))})"
        )
    for key in ("space", "seed", "layers", "modules"):
        if key in block:
            spec[key] = block[key]
    if "output" in block:
        output = mapping(block["output"], "coremerge.output")
        extra = sorted(set(output) - {"uri", "rank"})
        if extra:
            raise MergekitConfigError(
                f"coremerge.output.{extra[0]}: not an output setting (uri, rank; the dtype is dtype:)"
            )
        spec["output"].update(output)
