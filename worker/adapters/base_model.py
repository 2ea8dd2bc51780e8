"""Input sizes of a base model's linear layers from its config alone (no weights).

VeRA adapters do not record their layers' input sizes (see ``worker.adapters.vera``). When
``base_model_name_or_path`` is a local folder with the model's ``config.json``, the model is
built on the meta device, where a layer has shapes but no storage, and the sizes are read off
it. Nothing is downloaded.

The class to build is named by the adapter (PEFT's ``auto_mapping.base_model_class``), so it
is untrusted text: it is never looked up as an attribute of ``transformers`` (that would let
an adapter call ``transformers.pipeline`` or any other callable the package exports). The
class is instead resolved from the *config's* model type through a fixed set of
transformers' auto mappings (causal LM, seq2seq, classification, QA, base model), and the
adapter's name only chooses among those candidates; anything else is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jobs.errors import reason

__all__ = ["ALLOWED_AUTO_MAPPINGS", "BaseModelRefused", "linear_input_sizes"]

#: The transformers auto mappings (config class → model class) a base model may come from, in
#: the order tried when the adapter names no class: PEFT's VeRA targets language models.
ALLOWED_AUTO_MAPPINGS = (
    "MODEL_FOR_CAUSAL_LM_MAPPING",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING",
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING",
    "MODEL_FOR_QUESTION_ANSWERING_MAPPING",
    "MODEL_MAPPING",
)


class BaseModelRefused(ValueError):
    """The base model named by an adapter cannot be used (the message says why); the caller
    adds the adapter's name."""


def _candidates(config: Any) -> list[type]:
    """The model classes the allowed auto mappings give for ``config``'s type, in order."""
    import transformers

    found: list[type] = []
    for mapping_name in ALLOWED_AUTO_MAPPINGS:
        mapping = getattr(transformers, mapping_name)
        if type(config) not in mapping:
            continue
        classes = mapping[type(config)]
        for cls in classes if isinstance(classes, tuple) else (classes,):
            if issubclass(cls, transformers.PreTrainedModel) and cls not in found:
                found.append(cls)
    return found


def resolve_model_class(config: Any, model_class: str | None) -> type:
    """The allowed model class for ``config``: the one named ``model_class`` among the
    candidates of :data:`ALLOWED_AUTO_MAPPINGS`, or the first candidate when none is named."""
    candidates = _candidates(config)
    if not candidates:
        raise BaseModelRefused(
            f"the base model's model_type {getattr(config, 'model_type', None)!r} has no "
            "causal-LM, seq2seq, classification or base model class in transformers"
        )
    if model_class is None:
        return candidates[0]
    for cls in candidates:
        if cls.__name__ == model_class:
            return cls
    allowed = ", ".join(sorted(c.__name__ for c in candidates))
    raise BaseModelRefused(
        f"base_model_class {model_class[:100]!r} is not an allowed model class for model_type "
        f"{config.model_type!r} (allowed: {allowed})"
    )


def linear_input_sizes(
    name_or_path: str | None, model_class: str | None, modules: Iterable[str]
) -> dict[str, int] | None:
    """``{module: in_features}`` from the base model's local config, or None if unavailable.

    Raises :class:`BaseModelRefused` when the config cannot be read or ``model_class`` is not
    an allowed class for it (:func:`resolve_model_class`).
    """
    if not name_or_path or not (Path(name_or_path) / "config.json").is_file():
        return None
    import torch
    import transformers

    try:  # trust_remote_code stays False: a config asking for custom code is refused
        config = transformers.AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BaseModelRefused(
            f"the base model's config.json cannot be read ({reason(exc)})"
        ) from None
    cls = resolve_model_class(config, model_class)
    with torch.device("meta"):  # shapes only: no parameter gets storage
        model = cls(config)
    sizes = {}
    for module in modules:
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            return None
        in_features = getattr(layer, "in_features", None)
        if in_features is None:  # a GPT-2 style Conv1D keeps (in, out) in its weight
            in_features = layer.weight.shape[0]
        sizes[module] = int(in_features)
    return sizes
