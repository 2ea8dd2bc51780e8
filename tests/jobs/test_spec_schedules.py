"""Per-layer and per-module values in the job spec: the three shapes, and every refusal
naming its field (the API turns these into a 422 with the same field names)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from jobs.schedules import MAX_PATTERNS, ModuleRule, at_layer, layer_index
from jobs.spec import MergeSpec


def _spec(adapters: list[dict], **rest: object) -> MergeSpec:
    return MergeSpec.model_validate({"adapters": adapters, "output": {"uri": "/o"}, **rest})


def _fields(exc: pytest.ExceptionInfo[ValidationError]) -> dict[str, str]:
    return {".".join(map(str, e["loc"])): e["msg"] for e in exc.value.errors()}


def test_the_three_shapes_round_trip() -> None:
    spec = _spec(
        [
            {"uri": "/a", "weight": 0.5},
            {"uri": "/b", "weight": [0, 0.5, 1]},
            {"uri": "/c", "weight": [{"modules": "mlp", "value": [1, 0]}, {"value": 2}]},
        ],
        method="ties",
        normalize=True,
        modules={"include": ["layers\\.[0-9]+\\."], "exclude": ["k_proj"]},
        layers=32,
    )
    assert spec.adapters[1].weight == [0.0, 0.5, 1.0]
    assert spec.adapters[2].weight == [
        ModuleRule(modules="mlp", value=[1.0, 0.0]),
        ModuleRule(value=2.0),
    ]
    again = MergeSpec.model_validate(spec.model_dump(mode="json"))
    assert again == spec


def test_defaults_keep_todays_meaning() -> None:
    spec = _spec([{"uri": "/a"}])
    assert spec.adapters[0].weight == 1.0
    assert (spec.adapters[0].density, spec.adapters[0].drop) == (None, None)
    assert spec.normalize is False and spec.layers is None
    assert spec.modules.include == [] and spec.modules.exclude == []


@pytest.mark.parametrize(
    ("adapter", "field", "fragment"),
    [
        ({"weight": [{"modules": "(mlp", "value": 1}]}, "adapters.0.weight.rules.0.modules",
         "not a valid regular expression"),
        ({"weight": [1, "x"]}, "adapters.0.weight.gradient.1", "valid number"),
        ({"weight": []}, "adapters.0.weight.gradient", "at least 1"),
        ({"weight": float("nan")}, "adapters.0.weight.number", "finite"),
        ({"weight": [{"modules": "mlp"}]}, "adapters.0.weight.rules.0.value", "required"),
        ({"weight": [{"modules": "mlp", "value": 1, "filter": "x"}]},
         "adapters.0.weight.rules.0.filter", "Extra inputs"),
        ({"density": 1.5}, "adapters.0.density", "outside the range of 'density'"),
        ({"density": [{"modules": "mlp", "value": [0.5, 0]}]}, "adapters.0.density",
         "0.0 is outside the range"),
        ({"drop": 0.2}, "adapters.0.drop", "method 'ties' has no parameter 'drop'"),
    ],
)  # fmt: skip
def test_refusals_name_the_field(adapter: dict, field: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as exc:
        _spec([{"uri": "/a", **adapter}], method="ties")
    fields = _fields(exc)
    assert field in fields, fields
    assert fragment in fields[field], fields


def test_per_adapter_params_follow_the_method() -> None:
    spec = _spec([{"uri": "/a", "drop": 0.5, "density": 0.2}, {"uri": "/b"}], method="dare_ties")
    assert (spec.adapters[0].drop, spec.adapters[0].density) == (0.5, 0.2)
    with pytest.raises(ValidationError) as exc:
        _spec([{"uri": "/a", "density": 0.2}], method="tsv")
    assert "method 'tsv' has no parameter 'density'" in _fields(exc)["adapters.0.density"]


def test_module_filter_and_layers_are_checked() -> None:
    with pytest.raises(ValidationError) as exc:
        _spec([{"uri": "/a"}], modules={"include": ["ok", "[bad"]})
    assert "pattern 1" in _fields(exc)["modules.include"]
    with pytest.raises(ValidationError) as exc:
        _spec([{"uri": "/a"}], modules={"exclude": [""]})
    assert "modules.exclude.0" in _fields(exc)
    with pytest.raises(ValidationError) as exc:
        _spec([{"uri": "/a"}], modules={"only": ["x"]})
    assert "modules.only" in _fields(exc)
    with pytest.raises(ValidationError) as exc:
        _spec([{"uri": "/a"}], layers=0)
    assert "layers" in _fields(exc)


def test_pattern_count_is_bounded_over_the_whole_job() -> None:
    """The same bound as an adapter's rank/alpha patterns, counted over every schedule and
    the filter together."""
    rules = [{"modules": f"m{i}", "value": 1} for i in range(MAX_PATTERNS // 2)]
    ok = _spec([{"uri": "/a", "weight": rules}, {"uri": "/b", "weight": rules}])
    assert len(ok.adapters) == 2
    with pytest.raises(ValidationError) as exc:
        _spec([{"uri": "/a", "weight": rules}, {"uri": "/b", "weight": rules}],
              modules={"exclude": ["x"]})  # fmt: skip
    assert f"over the limit of {MAX_PATTERNS}" in _fields(exc)["modules"]


def test_bounds_equal_the_adapters_patterns() -> None:
    import jobs.schedules as schedules
    import worker.adapters.config as adapter_config

    assert schedules.MAX_PATTERNS == adapter_config.MAX_PATTERNS
    assert schedules.PATTERN_TIMEOUT_S == adapter_config.PATTERN_TIMEOUT_S
    assert schedules.PATTERN_BUDGET_S == adapter_config.PATTERN_BUDGET_S


def _mergekit_evaluate(setting: list[float], t: float) -> float:
    """mergekit's ``evaluate_setting`` for a list of numbers (mergekit/config.py), restated."""
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]


@pytest.mark.parametrize("layers", [1, 2, 5, 32, 40])
@pytest.mark.parametrize("gradient", [[0.3], [0, 1], [1, 0.7, 0.1], [0, 0.3, 0.7, 1]])
def test_gradients_interpolate_as_mergekit(gradient: list[float], layers: int) -> None:
    for layer in range(layers):
        t = layer / (layers - 1) if layers > 1 else 0.0
        assert at_layer(gradient, layer, layers) == pytest.approx(_mergekit_evaluate(gradient, t))
    assert at_layer(gradient, None, layers) == gradient[0]  # outside layers: t = 0


def test_layer_index_is_the_first_numeric_segment() -> None:
    assert layer_index("model.layers.0.self_attn.q_proj") == 0
    assert layer_index("transformer.h.11.attn.c_attn") == 11
    assert layer_index("model.decoder.layers.3.fc1") == 3
    assert layer_index("lm_head") is None
    assert layer_index("model.layers2.q") is None
