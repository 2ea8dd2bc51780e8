"""The merge job spec: one schema for the HTTP API and the CLI's ``--spec`` (docs/job-spec.md, docs/methods.md).

This module imports neither torch nor peft, so the API process stays small. Every merge
method's parameters are declared exactly once, in :data:`METHOD_PARAMS`; the pydantic
validation of ``params``, the CLI's ``--param`` help and the parameter table of docs/cli.md
are generated from that declaration.

>>> spec = MergeSpec.model_validate(
...     {"adapters": [{"uri": "/tmp/a"}], "method": "ties", "params": {"density": 0.2},
...      "output": {"uri": "/tmp/out"}})
>>> spec.params
{'alpha': 'auto', 'density': 0.2, 'isotropize': False, 'axes': 'reference'}
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from jobs.hub import HUB_SCHEME, parse_hub
from jobs.schedules import (
    MAX_PATTERNS,
    ModuleFilter,
    Schedule,
    schedule_numbers,
    schedule_patterns,
)
from jobs.servers import SERVER_NAMES
from jobs.uris import canonical_scheme

__all__ = [
    "DEFAULT_ENERGY",
    "DEFAULT_TARGET",
    "DTYPES",
    "MAX_ADAPTERS",
    "MAX_LAYERS",
    "METHODS",
    "METHOD_PARAMS",
    "PER_ADAPTER_PARAMS",
    "SPACES",
    "AdapterRef",
    "MergeSpec",
    "NotifySpec",
    "OutputSpec",
    "Param",
    "RankMode",
    "params_json_schemas",
    "params_table_markdown",
]

Space = Literal["core", "full", "knots"]
DType = Literal["float32", "bfloat16", "float16"]
Server = Literal[SERVER_NAMES]  # type: ignore[valid-type]
RankMode = Literal["auto", "truncate", "isotropic", "shared"]
SPACES: tuple[str, ...] = Space.__args__
DTYPES: tuple[str, ...] = DType.__args__

#: ``output.rank: "auto"``'s server and share of energy when the spec names none
#: (docs/serving.md says why these).
DEFAULT_TARGET = "vllm"
DEFAULT_ENERGY = 0.9
#: Default cap on the number of adapters in one job (docs/job-spec.md; the service makes it configurable).
MAX_ADAPTERS = 64
#: The largest ``layers`` a spec may give (no model is near it).
MAX_LAYERS = 100_000


@dataclass(frozen=True)
class Param:
    """One method hyperparameter: its name, type, default, allowed range and meaning.

    ``choices`` makes a ``str`` parameter an enumeration; ``words`` lets a number parameter
    also take those words instead of a value (alpha's ``"auto"``).
    """

    name: str
    type: type
    default: float | int | bool | str
    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] = ()
    words: tuple[str, ...] = ()

    def range_text(self) -> str:
        """The allowed range in words, e.g. ``0 < x <= 1``."""
        low = (
            f"{self.gt} < "
            if self.gt is not None
            else f"{self.ge} <= "
            if self.ge is not None
            else ""
        )
        high = (
            f" < {self.lt}"
            if self.lt is not None
            else f" <= {self.le}"
            if self.le is not None
            else ""
        )
        if self.type is bool:
            return "true / false"
        if self.choices:
            return " / ".join(f'`"{c}"`' for c in self.choices)
        number = f"{low}x{high}" if (low or high) else "any finite number"
        return " or ".join([number, *(f'`"{w}"`' for w in self.words)])

    def annotation(self) -> Any:
        """The pydantic type of the parameter's value, its range included."""
        if self.choices:
            return Literal[self.choices]  # type: ignore[valid-type]
        constraints: dict[str, Any] = {
            k: getattr(self, k) for k in ("ge", "gt", "le", "lt") if getattr(self, k) is not None
        }
        if self.type is float:
            constraints["allow_inf_nan"] = False
        number = Annotated[self.type, Field(**constraints)] if constraints else self.type
        if self.words:
            return number | Literal[self.words]  # type: ignore[valid-type]
        return number


_ALPHA = Param(
    "alpha",
    float,
    "auto",
    'global scaling coefficient: the merged update is alpha·X; "auto" (the default) sets it '
    "from the inputs alone (docs/methods.md); 1 is the paper's",
    words=("auto",),
)
_ISOTROPIZE = Param(
    "isotropize", bool, False, "replace all singular values of the merged X by their mean"
)
_DENSITY = Param(
    "density", float, 0.1, "fraction of entries kept per task (TIES trim)", gt=0.0, le=1.0
)
_DROP = Param("drop", float, 0.3, "probability of dropping each entry (DARE)", ge=0.0, lt=1.0)
_AXES = Param(
    "axes",
    str,
    "reference",
    "core space only: the axes whose entries are trimmed, dropped and sign-elected; "
    '"aligned" rotates the core matrices onto the tasks\' joint singular axes first',
    choices=("reference", "aligned"),
)

_RANK_OF = Param(
    "rank_of",
    str,
    "space",
    "K, from which the ranks kept per task are counted: the smaller dimension of the merged "
    'matrices ("space", the paper\'s; R in core space) or of the layer ("layer": core space '
    "then keeps exactly what full space keeps)",
    choices=("space", "layer"),
)

#: The parameters of every method, in the API's names (docs/methods.md). ``seed`` is a top-level
#: field of the spec, not a param.
METHOD_PARAMS: dict[str, tuple[Param, ...]] = {
    "ta": (_ALPHA, _ISOTROPIZE),
    "ties": (_ALPHA, _DENSITY, _ISOTROPIZE, _AXES),
    "dare": (_ALPHA, _DROP, _ISOTROPIZE, _AXES),
    "dare_ties": (_ALPHA, _DROP, _DENSITY, _ISOTROPIZE, _AXES),
    "tsv": (_ALPHA, _ISOTROPIZE, _RANK_OF),
    "cart": (
        _ALPHA,
        Param(
            "rank_fraction",
            float,
            0.04,
            "fraction of each task's singular directions kept, k = ⌈rank_fraction·K⌉",
            gt=0.0,
            le=1.0,
        ),
        Param("lam", float, 0.1, "weight of the low-rank task residuals added to the mean"),
        _ISOTROPIZE,
        _RANK_OF,
    ),
    "iso_c": (_ALPHA, _ISOTROPIZE),
}


def _params_model(method: str) -> type[BaseModel]:
    fields: dict[str, Any] = {}
    for p in METHOD_PARAMS[method]:
        fields[p.name] = (p.annotation(), Field(p.default, description=p.help))
    return create_model(  # type: ignore[call-overload]
        f"{method.title().replace('_', '')}Params",
        __config__=ConfigDict(extra="forbid", strict=True),
        **fields,
    )


#: The methods, in the order they are declared (``METHOD_PARAMS`` is the one list of them).
METHODS: tuple[str, ...] = tuple(METHOD_PARAMS)
Method = Literal[METHODS]  # type: ignore[valid-type]

_PARAMS_MODELS: dict[str, type[BaseModel]] = {m: _params_model(m) for m in METHODS}

#: Method parameters an adapter may set for itself (``adapters[].density``, ``.drop``): the
#: engine takes them per task.
PER_ADAPTER_PARAMS: tuple[str, ...] = ("density", "drop")


def validate_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """Check ``params`` against ``method``'s declaration; return them with defaults filled in.

    Raises ``ValueError`` whose message names the offending parameter.
    """
    try:
        return _PARAMS_MODELS[method].model_validate(params).model_dump()
    except ValidationError as exc:
        problems: list[str] = []
        declared = {p.name: p for p in METHOD_PARAMS[method]}
        for err in exc.errors():
            name = ".".join(str(x) for x in err["loc"])
            param = declared.get(str(err["loc"][0]))
            if param is not None and param.words and len(err["loc"]) > 1:  # a number or a word
                problem = f"parameter {param.name!r}: must be {param.range_text().replace('`', '')}"
                if problem not in problems:
                    problems.append(problem)
            elif err["type"] == "extra_forbidden":
                accepted = ", ".join(p.name for p in METHOD_PARAMS[method])
                problems.append(
                    f"unknown parameter {name!r} for method {method!r} (accepted: {accepted})"
                )
            else:
                problems.append(f"parameter {name!r}: {err['msg']}")
        raise ValueError("; ".join(problems)) from None


class _Strict(BaseModel):
    # An unknown field anywhere is an error, and no value is coerced ("0.5" is not a number,
    # "yes" not a boolean): a typo must never silently change a merge.
    model_config = ConfigDict(extra="forbid", strict=True)


class AdapterRef(_Strict):
    """One input adapter."""

    uri: str = Field(
        min_length=1,
        max_length=2048,
        description="s3://bucket/prefix/, file:///abs/dir, hf://org/name[@revision] (an input "
        "on the Hugging Face Hub), or a local path (CLI only)",
    )
    weight: Schedule = Field(
        1.0,
        description="multiplies this adapter's update before merging: a number, a gradient "
        "over the layers, or per-module rules (docs/job-spec.md); 0 leaves the adapter out of "
        "a module; negative subtracts a task",
    )
    density: Schedule | None = Field(
        None, description="this adapter's own TIES density (ties, dare_ties); null: params.density"
    )
    drop: Schedule | None = Field(
        None,
        description="this adapter's own DARE drop probability (dare, dare_ties); null: params.drop",
    )
    name: str | None = Field(
        None, max_length=200, description="defaults to the last path segment of the URI"
    )

    @field_validator("uri")
    @classmethod
    def _lower_scheme(cls, uri: str) -> str:
        """``S3://`` and ``s3://`` are one scheme: every reader of a spec sees the lower-case
        one (the API, the CLI and the worker alike). An ``hf://`` URI must name one model
        repository (``jobs.hub``)."""
        uri = canonical_scheme(uri)
        if uri.startswith(HUB_SCHEME):
            parse_hub(uri)  # its ValueError names what is wrong
        return uri

    @property
    def display_name(self) -> str:
        return self.name or self.uri.rstrip("/").rsplit("/", 1)[-1] or self.uri


class OutputSpec(_Strict):
    """Where and how the merged adapter is written."""

    uri: str = Field(min_length=1, max_length=2048)
    rank: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        None,
        description="null keeps the exact merged rank; an integer brings every module to at most "
        'that rank, as rank_mode says; "auto" picks the smallest rank output.target takes at '
        "which every module keeps output.energy of its energy (docs/serving.md)",
    )
    rank_mode: RankMode = Field(
        "auto",
        description='how a merge is brought to output.rank: "truncate" (its best rank-k '
        'approximation), "isotropic" (cut to rank k, then the k singular values made their '
        'mean), "shared" (the tasks compressed onto shared rank-k bases, then merged; core '
        'space); "auto" is "isotropic" for iso_c and isotropize, else "truncate" '
        "(docs/methods.md)",
    )
    target: Server | None = Field(
        None,
        description='with rank "auto": the server the rank is chosen for (its allowed ranks and '
        f'cap, docs/serving.md); default "{DEFAULT_TARGET}"; only with rank "auto"',
    )
    energy: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = Field(
        None,
        description='with rank "auto": the share of each module\'s energy (squared singular '
        f"values) the chosen rank keeps at least, 0 < energy <= 1; default {DEFAULT_ENERGY}; "
        'only with rank "auto"',
    )
    dtype: DType = "float32"

    @field_validator("rank", mode="wrap")
    @classmethod
    def _one_rank_error(cls, value: Any, handler: Any) -> Any:
        """One error for a bad rank, not one per member of the union."""
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(
                "rank", 'must be an integer >= 1, "auto" or null, not {value}',
                {"value": json.dumps(value) if isinstance(value, str | int | float) else
                 type(value).__name__},
            ) from None  # fmt: skip

    @model_validator(mode="after")
    def _rank_mode_needs_a_rank(self) -> OutputSpec:
        if self.rank_mode != "auto" and self.rank is None:
            raise ValueError(
                f"output.rank_mode {self.rank_mode!r} says how a merge is brought to "
                "output.rank, and output.rank is not set"
            )
        return self

    @model_validator(mode="after")
    def _auto_rank_defaults(self) -> OutputSpec:
        """``rank: "auto"`` names its server and its share of energy, the defaults filled in
        (so the job's record says what was asked); without it, neither may be given (checked
        by :meth:`MergeSpec._auto_rank_fields`, which names the field)."""
        if self.rank == "auto":
            if self.target is None:
                self.target = DEFAULT_TARGET
            if self.energy is None:
                self.energy = DEFAULT_ENERGY
        return self

    @field_validator("uri")
    @classmethod
    def _lower_scheme(cls, uri: str) -> str:
        """As :meth:`AdapterRef._lower_scheme`."""
        return canonical_scheme(uri)


class NotifySpec(_Strict):
    """Where the service POSTs a signed notification when the job ends (``jobs.notify``)."""

    url: str = Field(
        min_length=10,
        max_length=2048,
        description="https:// URL (http:// where the operator allows it) under a notify prefix "
        "of the tenant's; no user:password, no #fragment",
        json_schema_extra={"format": "uri", "pattern": r"^https?://[^\s@#/?]+([/?][^\s#]*)?$"},
    )

    @field_validator("url")
    @classmethod
    def _well_formed(cls, url: str) -> str:
        """The URL's form; whether this tenant may be notified there is the service's check."""
        from jobs.notify_urls import parse_target

        parse_target(url)  # its ValueError says what is wrong
        return url


class MergeSpec(_Strict):
    """A merge job (docs/job-spec.md)."""

    adapters: list[AdapterRef] = Field(min_length=1, max_length=MAX_ADAPTERS)
    method: Method = "tsv"
    space: Space = "core"
    params: dict[str, float | int | bool | str] = Field(
        default_factory=dict,
        validate_default=True,
        description="the method's hyperparameters: the schema named for the method by "
        "x-schema-by-method (generated from the one declaration, METHOD_PARAMS), and the table "
        "in docs/cli.md",
    )
    seed: int = Field(0, ge=0, lt=2**63, description="makes random methods (DARE) reproducible")
    normalize: bool = Field(
        False,
        description="divide each module's weights by their sum (mergekit's normalize for "
        "linear and task_arithmetic); a sum under 1e-8 in magnitude is left as it is",
    )
    modules: ModuleFilter = Field(
        default_factory=ModuleFilter, description="which modules are merged; the rest are left out"
    )
    base_model: str | None = Field(
        None,
        min_length=1,
        max_length=1000,
        description="the base model the adapters belong to: each adapter's "
        "base_model_name_or_path must name it (unset ones are not checked); never loaded",
    )
    layers: int | None = Field(
        None,
        ge=1,
        le=MAX_LAYERS,
        description="the model's number of layers, for weight gradients; null: one more than "
        "the largest layer index among the inputs' modules",
    )
    output: OutputSpec
    notify: NotifySpec | None = Field(
        None,
        description="the service only (coremerge merge ignores it): a signed POST to notify.url "
        "when the job ends (docs/job-spec.md)",
    )

    @field_validator("params")
    @classmethod
    def _check_params(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        method = info.data.get("method")
        if method is None:  # the method itself failed validation; that error is reported
            return value
        params = validate_params(method, value)
        space = info.data.get("space", "core")
        if params.get("axes", "reference") != "reference" and space != "core":
            raise ValueError(
                f"parameter 'axes': {params['axes']!r} rotates core matrices and needs space "
                f"'core' (this job's space is {space!r})"
            )
        return params

    @model_validator(mode="after")
    def _shared_rank_mode(self) -> MergeSpec:
        """``output.rank_mode: "shared"`` fits bases to core matrices: core space only, and
        not with ``axes: "aligned"``, which chooses the axes another way."""
        if self.output.rank_mode != "shared":
            return self
        problem = None
        if self.space != "core":
            problem = (
                "fits shared bases to the core matrices and needs space 'core' (this job's "
                f"space is {self.space!r})"
            )
        elif self.params.get("axes") == "aligned":
            problem = 'and parameter axes "aligned" both choose the axes the method works on'
        if problem:
            raise ValidationError.from_exception_data(type(self).__name__, [_error(
                ("output", "rank_mode"), "shared", f'output.rank_mode "shared" {problem}'
            )])  # fmt: skip
        return self

    @model_validator(mode="after")
    def _auto_rank_fields(self) -> MergeSpec:
        """``output.target`` and ``output.energy`` choose a rank: only with ``rank: "auto"``.
        ``rank_mode: "shared"`` fits its bases at the rank before merging, which "auto"
        knows only after."""
        out, errors = self.output, []
        if out.rank != "auto":
            for name in ("target", "energy"):
                if getattr(out, name) is not None:
                    errors.append(_error(("output", name), getattr(out, name),
                        f'output.{name} is for output.rank "auto" (this job\'s output.rank is '
                        f"{json.dumps(out.rank)})"))  # fmt: skip
        elif out.rank_mode == "shared":
            errors.append(_error(("output", "rank_mode"), "shared",
                'output.rank_mode "shared" fits shared bases at the output rank before the '
                'merge; output.rank "auto" knows the rank only after it: use "truncate" or '
                '"isotropic", or an integer output.rank'))  # fmt: skip
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self

    @model_validator(mode="after")
    def _check_adapter_params(self) -> MergeSpec:
        """Per-adapter ``density``/``drop``: only for a method that has them, in its range;
        and at most :data:`MAX_PATTERNS` module patterns in the whole job. Each error names
        its field (``adapters.1.density``)."""
        declared = {p.name: p for p in METHOD_PARAMS[self.method]}
        errors: list[InitErrorDetails] = []
        for i, ref in enumerate(self.adapters):
            for name in PER_ADAPTER_PARAMS:
                schedule = getattr(ref, name)
                if schedule is None:
                    continue
                if name not in declared:
                    errors.append(_error(("adapters", i, name), schedule,
                        f"method {self.method!r} has no parameter {name!r}"))  # fmt: skip
                    continue
                problem = _out_of_range(declared[name], schedule)
                if problem:
                    errors.append(_error(("adapters", i, name), schedule, problem))
        count = (
            len(self.modules.include)
            + len(self.modules.exclude)
            + sum(
                len(list(schedule_patterns(getattr(ref, name))))
                for ref in self.adapters
                for name in ("weight", *PER_ADAPTER_PARAMS)
            )
        )
        if count > MAX_PATTERNS:
            errors.append(_error(("modules",), count,
                f"{count} module patterns in the job, over the limit of {MAX_PATTERNS}"))  # fmt: skip
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self


def _error(loc: tuple[str | int, ...], value: Any, message: str) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError("value_error", message), loc=loc, input=value)


@functools.cache
def _value_type(param: Param) -> TypeAdapter[Any]:
    return TypeAdapter(param.annotation())


def _out_of_range(param: Param, schedule: Any) -> str | None:
    """What is wrong with a per-adapter value of ``param`` (every number a schedule can
    give), or None."""
    for number in schedule_numbers(schedule):
        try:
            _value_type(param).validate_python(number)
        except ValidationError:
            return f"{number!r} is outside the range of {param.name!r} ({param.range_text()})"
    return None


def params_json_schemas() -> dict[str, dict[str, Any]]:
    """Each method's parameters as a JSON schema (``TiesParams``, …), from :data:`METHOD_PARAMS`
    through the same models that validate them: the OpenAPI schema of ``params`` is these."""
    return {m: model.model_json_schema() for m, model in _PARAMS_MODELS.items()}


def params_table_markdown() -> str:
    """The methods table of docs/cli.md, generated from :data:`METHOD_PARAMS`."""
    rows = ["| method | param | default | range | meaning |", "|---|---|---|---|---|"]
    for method, params in METHOD_PARAMS.items():
        for p in params:
            default = (
                str(p.default).lower()
                if p.type is bool
                else f'`"{p.default}"`'
                if isinstance(p.default, str)
                else repr(p.default)
            )
            rows.append(f"| `{method}` | `{p.name}` | {default} | {p.range_text()} | {p.help} |")
    return "\n".join(rows)
