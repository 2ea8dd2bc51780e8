"""``coremerge demo``: a merge you can watch work on a fresh machine, no download needed.

It builds a tiny Llama-style model from a config (random weights, nothing from a hub), makes
three real PEFT LoRA adapters on it with different ranks and scalings, merges them in core
space, loads the result with stock ``PeftModel.from_pretrained`` and checks that its layer
outputs equal the base weights plus the merged update.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

__all__ = ["make_tiny_adapters", "run_demo", "tiny_base_model"]


TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 64,
}


def tiny_base_model(seed: int = 0, **config: int):
    """A small Llama-style causal LM with random weights, built from a config (``TINY_LLAMA``
    with ``config`` overriding it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **config})).eval()


def make_tiny_adapters(
    workdir: Path, specs: list[dict], seed: int = 0, model: dict | None = None
) -> list[Path]:
    """Save one PEFT LoRA adapter per ``LoraConfig`` kwargs dict in ``specs`` on
    ``tiny_base_model(seed, **model)``; return their dirs (``task-0``, ``task-1``, …).

    PEFT initialises lora_B to zero (a no-op adapter), so B is filled with random values, as
    training would have moved it.
    """
    from peft import LoraConfig, get_peft_model

    dirs = []
    for i, kwargs in enumerate(specs):
        model_i = get_peft_model(tiny_base_model(seed, **(model or {})), LoraConfig(**kwargs))
        gen = torch.Generator().manual_seed(seed + 100 + i)
        with torch.no_grad():
            for name, param in model_i.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
        out = workdir / f"task-{i}"
        model_i.save_pretrained(out)
        # The base model has no hub name; give the adapters the same one, as real ones share it.
        cfg_path = out / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = "coremerge/tiny-llama-demo"
        cfg_path.write_text(json.dumps(cfg, indent=2))
        dirs.append(out)
    return dirs


def make_tiny_vera(
    workdir: Path,
    *,
    r: int,
    seed: int,
    save_projection: bool,
    target_modules: list[str],
    base_model_name_or_path: str = "coremerge/tiny-llama-demo",
) -> Path:
    """Save one PEFT VeRA adapter on the tiny model (λ vectors randomised: PEFT starts λ_b
    at zero, a no-op) under ``workdir``; returns its folder."""
    from peft import VeraConfig, get_peft_model

    config = VeraConfig(
        r=r,
        target_modules=target_modules,
        save_projection=save_projection,
        projection_prng_key=seed,
    )
    model = get_peft_model(tiny_base_model(), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vera_lambda" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    out = workdir / f"vera-{seed}-{'saved' if save_projection else 'regenerated'}"
    model.save_pretrained(out)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_model_name_or_path
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


DEMO_ADAPTERS = [
    {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "task_type": "CAUSAL_LM",
    },
    {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "task_type": "CAUSAL_LM",
    },
    {
        "r": 8,
        "lora_alpha": 8,
        "use_rslora": True,
        "target_modules": ["q_proj", "k_proj"],
        "task_type": "CAUSAL_LM",
    },
]


def run_demo(workdir: Path | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)

    from jobs.spec import MergeSpec
    from worker.merge.runner import run_merge

    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="coremerge-demo-")
        workdir = Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"making 3 LoRA adapters (ranks 4, 8, 8; one rslora) on a tiny Llama in {workdir}")
    dirs = make_tiny_adapters(workdir, DEMO_ADAPTERS)
    out = workdir / "merged"
    spec = MergeSpec.model_validate(
        {
            "adapters": [{"uri": str(d)} for d in dirs],
            "method": "tsv",
            "space": "core",
            "output": {"uri": str(out)},
        }
    )
    outcome = run_merge(spec, dirs, out, device="auto")
    report = outcome.report
    print(
        f"merged with tsv in core space → {out}: rank {outcome.rank}, {outcome.modules} modules, {outcome.seconds:.2f} s"
    )
    print(
        json.dumps(
            {
                k: report[k]
                for k in ("method", "space", "params", "output", "self_check", "timings")
            },
            indent=2,
        )
    )

    worst = _round_trip_error(out, report["modules"])
    print(f"loaded with PeftModel.from_pretrained; max |layer output − (W + ΔW)x| = {worst:.2e}")
    if tmp is not None:
        tmp.cleanup()
    return 0


def _round_trip_error(out: Path, modules: list[dict]) -> float:
    """Load the merged adapter in stock PEFT; the largest gap, over every merged layer, between
    its output and (W + B A)x: the adapter adds exactly its update to each layer."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_base_model(), out).eval()
    worst = 0.0
    gen = torch.Generator().manual_seed(1)
    for record in modules:
        layer = model.base_model.model.get_submodule(record["module"])
        x = torch.randn(3, layer.in_features, generator=gen)
        delta = (
            layer.lora_B["default"].weight
            @ layer.lora_A["default"].weight
            * layer.scaling["default"]
        )
        with torch.no_grad():
            worst = max(
                worst, float((layer(x) - x @ (layer.base_layer.weight + delta).T).abs().max())
            )
    return worst
