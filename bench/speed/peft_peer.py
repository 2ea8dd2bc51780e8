"""The peer: PEFT's ``add_weighted_adapter`` on a Llama skeleton with the adapters' shapes.

    python bench/speed/peft_peer.py --combination ties_svd --hidden 1024 --kv 256 --mlp 3584 \\
        --layers 4 --json OUT.json -o OUT_DIR ADAPTER_DIR...

The base model is a ``transformers`` ``LlamaForCausalLM`` whose q/k/v/o/gate/up/down layers
have the adapters' shapes (vocabulary 32: only the decoder layers matter). It is built on the
meta device and materialised with ``to_empty`` (real, uninitialised memory: PEFT's merge never
reads the base weights, and random initialisation would only add time no user pays after
loading a checkpoint). Then PEFT's real code: ``PeftModel.from_pretrained`` for the first
adapter, ``load_adapter`` for the others, ``add_weighted_adapter(adapters, [1.0] * T,
"merged", combination_type=…, density=…)`` with PEFT's other defaults (``svd_rank`` = the
largest input rank, ``svd_full_matrices=True``), and ``save_pretrained(selected_adapters=
["merged"])``. Writes JSON with the seconds of each phase.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

T_START = time.perf_counter()

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

IMPORT_S = time.perf_counter() - T_START
HEAD_DIM = 64
#: combinations whose density parameter must be given
NEEDS_DENSITY = {"ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd"}


def skeleton(hidden: int, kv: int, mlp: int, layers: int, device: str) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=hidden // HEAD_DIM,
        num_key_value_heads=kv // HEAD_DIM,
        head_dim=HEAD_DIM,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return model.to_empty(device=device).eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapters", nargs="+", type=Path)
    ap.add_argument("--combination", required=True)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--kv", type=int, required=True)
    ap.add_argument("--mlp", type=int, required=True)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    t0 = clock()
    with torch.no_grad():
        model = skeleton(args.hidden, args.kv, args.mlp, args.layers, args.device)
        t1 = clock()
        names = [f"a{i}" for i in range(len(args.adapters))]
        peft_model = PeftModel.from_pretrained(
            model, str(args.adapters[0]), adapter_name=names[0], torch_device=args.device
        )
        for name, path in zip(names[1:], args.adapters[1:], strict=True):
            peft_model.load_adapter(str(path), adapter_name=name, torch_device=args.device)
        t2 = clock()
        extra = {"density": args.density} if args.combination in NEEDS_DENSITY else {}
        peft_model.add_weighted_adapter(
            names, [1.0] * len(names), "merged", combination_type=args.combination, **extra
        )
        t3 = clock()
        peft_model.save_pretrained(str(args.output), selected_adapters=["merged"])
        t4 = clock()
    rank = peft_model.peft_config["merged"].r
    result = {
        "combination": args.combination,
        "density": extra.get("density"),
        "adapters": len(names),
        "rank": rank,
        "import_s": IMPORT_S,
        "build_base_s": t1 - t0,
        "load_adapters_s": t2 - t1,
        "merge_s": t3 - t2,
        "save_s": t4 - t3,
        "in_process_s": time.perf_counter() - T_START,
        "threads": torch.get_num_threads(),
        "cuda_max_memory_allocated": torch.cuda.max_memory_allocated() if cuda else None,
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
