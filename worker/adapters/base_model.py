"""Input sizes of a base model's linear layers from its config alone (no weights).

VeRA adapters do not record their layers' input sizes (see ``worker.adapters.vera``). When
``base_model_name_or_path`` is a local folder with the model's ``config.json``, the model is
built on the meta device, where a layer has shapes but no storage, and the sizes are read off
it. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

__all__ = ["linear_input_sizes"]


def linear_input_sizes(
    name_or_path: str | None, model_class: str | None, modules: Iterable[str]
) -> dict[str, int] | None:
    """``{module: in_features}`` from the base model's local config, or None if unavailable."""
    if not name_or_path or not (Path(name_or_path) / "config.json").is_file():
        return None
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    cls = getattr(transformers, model_class or "", None) or transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config) if cls is transformers.AutoModelForCausalLM else cls(config)
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
