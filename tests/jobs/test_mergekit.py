"""mergekit configurations read as job specs: what maps, with mergekit's meaning, and what is
refused with one line naming the key. The configs are written as mergekit's README and
examples write them (their shapes, their defaults), not shaped to pass."""

from __future__ import annotations

import textwrap

import pytest
import regex
import yaml
from hypothesis import given
from hypothesis import strategies as st

from jobs.mergekit import MergekitConfigError, spec_from_mergekit
from jobs.mergekit_values import filter_pattern
from jobs.spec import MergeSpec


def _spec(text: str) -> dict:
    return spec_from_mergekit(yaml.safe_load(textwrap.dedent(text)))


def _refused(text: str, fragment: str) -> str:
    with pytest.raises(MergekitConfigError) as exc:
        _spec(text)
    message = str(exc.value)
    assert fragment in message, message
    assert "\n" not in message
    return message


def _valid(spec: dict) -> MergeSpec:
    """The mapped spec is a valid job spec once given an output."""
    return MergeSpec.model_validate({**spec, "output": {**spec["output"], "uri": "/tmp/out"}})


LINEAR = textwrap.dedent("""
    models:
      - model: org/orca-lora
        parameters:
          weight: 1.0
      - model: org/wizard-lora
        parameters:
          weight: 0.3
      - model: org/platypus-lora
        parameters:
          weight: 0.5
    merge_method: linear
    dtype: float16
""")


def test_linear_is_a_normalised_weighted_sum() -> None:
    spec = _spec(LINEAR)
    assert spec["method"] == "ta" and spec["normalize"] is True
    assert [a["weight"] for a in spec["adapters"]] == [1.0, 0.3, 0.5]
    assert [a["uri"] for a in spec["adapters"]] == [
        "org/orca-lora",
        "org/wizard-lora",
        "org/platypus-lora",
    ]
    assert spec["output"] == {"dtype": "float16"}
    assert "base_model" not in spec
    _valid(spec)


def test_linear_without_normalize_needs_weights_summing_to_one() -> None:
    _refused(LINEAR + "parameters:\n  normalize: false\n", "parameters.normalize: false")
    spec = _spec(LINEAR.replace("1.0", "0.2") + "parameters:\n  normalize: false\n")
    assert spec["normalize"] is False


TASK_ARITHMETIC = textwrap.dedent("""
    models:
      - model: org/math-lora
        parameters:
          weight: [0, 0.5, 1]
      - model: org/code-lora
        parameters:
          weight:
            - filter: self_attn
              value: 0.8
            - filter: mlp
              value: [1, 0]
            - value: 0.2
      - model: meta-llama/Llama-2-7b-hf
    merge_method: task_arithmetic
    base_model: meta-llama/Llama-2-7b-hf
    parameters:
      lambda: 0.7
    dtype: bfloat16
""")


def test_task_arithmetic_gradients_filters_lambda_and_the_base_listed() -> None:
    spec = _spec(TASK_ARITHMETIC)
    assert spec["method"] == "ta" and spec["normalize"] is False  # mergekit's default
    assert spec["params"] == {"alpha": 0.7}
    assert spec["base_model"] == "meta-llama/Llama-2-7b-hf"
    # The base model listed among the models is not an adapter (mergekit skips it too).
    assert [a["uri"] for a in spec["adapters"]] == ["org/math-lora", "org/code-lora"]
    assert spec["adapters"][0]["weight"] == [0.0, 0.5, 1.0]
    rules = spec["adapters"][1]["weight"]
    assert [r["value"] for r in rules] == [0.8, [1.0, 0.0], 0.2] and rules[2]["modules"] is None
    assert regex.search(rules[0]["modules"], "model.layers.3.self_attn.q_proj")
    assert not regex.search(rules[0]["modules"], "model.layers.3.mlp.up_proj")
    _valid(spec)


def test_weight_is_required_as_mergekit_requires_it() -> None:
    no_weight = (
        "models:\n  - model: a/x\n  - model: a/y\nmerge_method: task_arithmetic\nbase_model: b/m\n"
    )
    _refused(no_weight, "models[0].parameters.weight: required by mergekit's task_arithmetic")
    spec = _spec(no_weight + "parameters:\n  weight: 0.5\n")  # a global weight serves all
    assert [a["weight"] for a in spec["adapters"]] == [0.5, 0.5]
    uncovered = """
        models:
          - model: a/x
            parameters:
              weight: [{filter: mlp, value: 1}]
        merge_method: task_arithmetic
        base_model: b/m
    """
    _refused(uncovered, "add a last entry with value: and no filter")
    # A global weight is the fallback where no filter of the model's own matches.
    spec = _spec(textwrap.dedent(uncovered) + "parameters: {weight: 0.25}\n")
    assert spec["adapters"][0]["weight"][-1] == {"modules": None, "value": 0.25}


def test_base_model_is_required_where_mergekit_needs_it() -> None:
    ties = "models:\n  - model: a/x\n    parameters: {weight: 1}\nmerge_method: ties\n"
    _refused(ties, "base_model: required by mergekit's ties")
    assert _spec(ties + "base_model: org/base\n")["base_model"] == "org/base"


def test_base_plus_lora_references() -> None:
    text = """
        models:
          - model: meta-llama/Llama-2-7b-hf+org/lora-a
            parameters: {weight: 1}
          - model: meta-llama/Llama-2-7b-hf@main+org/lora-b@v2
            parameters: {weight: 1}
        merge_method: task_arithmetic
        base_model: meta-llama/Llama-2-7b-hf
    """
    spec = _spec(text)
    assert [a["uri"] for a in spec["adapters"]] == ["org/lora-a", "org/lora-b@v2"]
    assert spec["base_model"] == "meta-llama/Llama-2-7b-hf"
    _refused(text.replace("@main+", "-chat+"), "models[1].model: base")
    _refused(text.replace("org/lora-a", "org/lora-a+x/y"), "models[0].model: cannot parse")


TIES_EQUAL = textwrap.dedent("""
    models:
      - model: org/nli-lora
        parameters:
          density: 0.5
          weight: 0.5
      - model: org/qa-lora
        parameters:
          density: [1, 0.7, 0.1]
          weight: 0.5
    merge_method: ties
    base_model: mistralai/Mistral-7B-v0.1
    parameters:
      normalize: true
      int8_mask: true
    dtype: float16
""")


def test_ties_with_equal_weights_is_coremerges_ties() -> None:
    """mergekit's normalize cancels equal weights: each entry is the mean of the agreeing
    tasks, which is coremerge's TIES with weights 1."""
    spec = _spec(TIES_EQUAL)
    assert spec["method"] == "ties" and spec["normalize"] is False
    assert [a["weight"] for a in spec["adapters"]] == [1.0, 1.0]
    assert [a["density"] for a in spec["adapters"]] == [0.5, [1.0, 0.7, 0.1]]
    assert spec["params"] == {
        "alpha": 1.0,
        "density": 1.0,
    }  # mergekit's default density keeps every entry
    _valid(spec)
    # Equal gradients cancel as well; a weight of 0 stays 0 (the model is left out there).
    same = TIES_EQUAL.replace("weight: 0.5", "weight: [0.2, 1]")
    assert [a["weight"] for a in _spec(same)["adapters"]] == [1.0, 1.0]
    zeros = TIES_EQUAL.replace("weight: 0.5\n  - model", "weight: 0\n  - model", 1)
    assert [a["weight"] for a in _spec(zeros)["adapters"]] == [0.0, 1.0]


def test_ties_refusals() -> None:
    _refused(
        TIES_EQUAL.replace("normalize: true", "normalize: false"), "parameters.normalize: false"
    )
    unequal = TIES_EQUAL.replace("weight: 0.5\nmerge", "weight: 0.3\nmerge")
    _refused(unequal, "models[1].parameters.weight: with normalize: true")
    _refused(TIES_EQUAL.replace("int8_mask: true", "rescale: true"), "parameters.rescale: true")
    _refused(TIES_EQUAL.replace("density: 0.5", "density: 0"), "models[0].parameters.density")
    # Above 1 mergekit keeps every entry: the same as 1.
    assert (
        _spec(TIES_EQUAL.replace("density: 0.5", "density: 1.5"))["adapters"][0]["density"] == 1.0
    )


def test_dare_density_is_the_kept_fraction() -> None:
    text = TIES_EQUAL.replace("merge_method: ties", "merge_method: dare_ties")
    spec = _spec(text)
    assert spec["method"] == "dare_ties"
    assert spec["params"] == {"alpha": 1.0, "density": 1.0, "drop": 0.0}
    assert spec["adapters"][0]["drop"] == 0.5
    assert spec["adapters"][1]["drop"] == pytest.approx([0.0, 0.3, 0.9])
    assert "density" not in spec["adapters"][0]
    _valid(spec)
    # mergekit's dare_ties defaults to normalize: false, a sum: refused unless asked.
    _refused(text.replace("  normalize: true\n", ""), "parameters.normalize: false")
    _refused(text.replace("int8_mask: true", "rescale: false"), "parameters.rescale: false")
    linear = _spec(text.replace("dare_ties", "dare_linear"))
    assert linear["method"] == "dare" and linear["normalize"] is True
    assert [a["weight"] for a in linear["adapters"]] == [0.5, 0.5]


def test_density_on_task_arithmetic_does_what_mergekit_does() -> None:
    """mergekit declares density for task_arithmetic and never uses it."""
    spec = _spec(TASK_ARITHMETIC.replace("weight: [0, 0.5, 1]", "weight: 1\n      density: 0.3"))
    assert "density" not in spec["adapters"][0] and "drop" not in spec["adapters"][0]


@pytest.mark.parametrize(
    ("dtype", "want"),
    [("bfloat16", "bfloat16"), ("torch.float16", "float16"), ("float32", "float32"),
     ("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")],
)  # fmt: skip
def test_dtypes(dtype: str, want: str) -> None:
    assert _spec(LINEAR.replace("float16", dtype))["output"]["dtype"] == want
    out = _spec(LINEAR + "out_dtype: float32\n")
    assert out["output"]["dtype"] == "float32"


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (("dtype: float16", "dtype: int64"), "dtype: 'int64' is not an output dtype"),
        (("merge_method: linear", "merge_method: slerp"), "mergekit's 'slerp' has no equivalent"),
        (("merge_method: linear", "merge_method: passthrough"), "'passthrough' has no equivalent"),
        (("merge_method: linear", "merge_method: tiess"), "unknown method 'tiess'"),
        (("merge_method: linear", "merge_methd: linear"), "merge_methd: not a key"),
        (("weight: 0.3", "wieght: 0.3"), "models[1].parameters.wieght: not a per-model parameter"),
        (("weight: 0.3", "density: 0.3"), "models[1].parameters.density: not a per-model"),
        (("weight: 0.3", "weight: abc"), "models[1].parameters.weight: expected a number"),
        (("weight: 0.3", "weight: .nan"), "must be a finite number"),
        (("weight: 0.3", "weight: []"), "models[1].parameters.weight: an empty list"),
        (("weight: 0.3", "weight: [{filter: mlp}]"), "models[1].parameters.weight[0].value"),
        (("weight: 0.3", "weight: {fliter: mlp, value: 1}"), "weight.fliter"),
        (("dtype: float16", "tokenizer_source: union"), "tokenizer_source: 'union'"),
        (("dtype: float16", "chat_template: chatml"), "chat_template"),
        (
            ("dtype: float16", "parameters: {lambda: 2}"),
            "parameters.lambda: not a parameter of linear",
        ),
    ],
)
def test_refusals_name_the_key(change: tuple[str, str], fragment: str) -> None:
    _refused(LINEAR.replace(*change), fragment)


def test_tokenizer_source_base_is_what_an_adapter_gives() -> None:
    assert _spec(LINEAR + "tokenizer_source: base\n")["method"] == "ta"
    assert _spec(LINEAR + "tokenizer:\n  source: base\n")["method"] == "ta"
    _refused(LINEAR + "tokenizer:\n  source: union\n", "tokenizer: adapters keep")
    both = LINEAR + "tokenizer:\n  source: base\ntokenizer_source: base\n"
    _refused(both, "tokenizer: give tokenizer or tokenizer_source, not both")


def test_slices_are_refused_with_the_equivalent() -> None:
    text = """
        slices:
          - sources:
              - model: org/a
                layer_range: [0, 40]
              - model: org/b
                layer_range: [0, 40]
        merge_method: slerp
        base_model: org/a
        parameters:
          t: [0, 0.5, 1]
        dtype: float16
    """
    _refused(text, "slices: layer slicing has no equivalent")


def test_coremerges_own_methods_and_block() -> None:
    text = """
        models:
          - model: org/a
          - model: org/b
            parameters: {weight: 2}
        merge_method: tsv
        parameters: {alpha: 0.5, isotropize: true}
        coremerge:
          space: full
          seed: 3
          layers: 32
          modules: {exclude: [k_proj]}
          output: {uri: s3://merged/run/, rank: 16}
    """
    spec = _spec(text)
    assert spec["method"] == "tsv" and spec["params"] == {"alpha": 0.5, "isotropize": True}
    assert "weight" not in spec["adapters"][0] and spec["adapters"][1]["weight"] == 2.0
    assert (spec["space"], spec["seed"], spec["layers"]) == ("full", 3, 32)
    assert spec["output"] == {"uri": "s3://merged/run/", "rank": 16}
    assert MergeSpec.model_validate(spec).modules.exclude == ["k_proj"]
    _refused(text.replace("seed: 3", "sed: 3"), "coremerge.sed: not a coremerge setting")
    _refused(text.replace("rank: 16", "dtype: bf16"), "coremerge.output.dtype")


@given(
    flt=st.text(alphabet="abcdehiklmoprsqtw_.0123456789*", min_size=0, max_size=12),
    module=st.sampled_from([
        "model.layers.0.self_attn.q_proj", "model.layers.11.mlp.down_proj", "lm_head",
        "transformer.h.3.attn.c_attn", "model.layers.2.self_attn.o_proj",
    ]),
)  # fmt: skip
def test_filters_match_as_mergekit_matches_tensor_names(flt: str, module: str) -> None:
    """mergekit: ``filter == "*" or filter in "<module>.weight"``; here a pattern searched
    in the module's name must say the same."""
    pattern = filter_pattern(flt)
    ours = pattern is None or regex.search(pattern, module) is not None
    assert ours == (flt == "*" or flt in f"{module}.weight")


def test_the_config_reader_imports_without_torch() -> None:
    """The client's ``submit --config`` reads configurations in a process without torch."""
    import subprocess
    import sys

    code = "import sys, jobs.mergekit, jobs.spec; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
