#!/usr/bin/env python3
"""Writes a random LoRA adapter in the PEFT on-disk format, for checking interop.py (and
any other reader of PEFT adapters) without a trained one. Runs in the venv of
scripts/peft-env:

    $(scripts/peft-env) benches/finetune/synth_adapter.py --out DIR \\
        [--targets q_proj,v_proj] [--r 8] [--alpha 16] [--seed 0] [--dtype F32]

The shapes are those of SmolLM2-135M (hidden 576, 9 query heads and 3 key/value heads of
64, MLP 1536, 30 layers) unless overridden. DIR gets

* adapter_model.safetensors: for each layer L and target module M,
  `base_model.model.model.layers.L.<self_attn|mlp>.M.lora_A.weight` [r, in] and
  `...lora_B.weight` [out, r]; both are drawn from N(0, --std), so that, unlike a freshly
  initialised adapter (B = 0), it changes the model's output;
* adapter_config.json: the fields that llmops-worker writes.
"""

import argparse
import json
import os

import torch
from safetensors.torch import save_file

# Where each projection lives in a Llama decoder layer, and its (in, out) features as a
# function of the model's sizes.
MODULES = {
    "q_proj": ("self_attn", lambda s: (s["hidden"], s["heads"] * s["head_dim"])),
    "k_proj": ("self_attn", lambda s: (s["hidden"], s["kv_heads"] * s["head_dim"])),
    "v_proj": ("self_attn", lambda s: (s["hidden"], s["kv_heads"] * s["head_dim"])),
    "o_proj": ("self_attn", lambda s: (s["heads"] * s["head_dim"], s["hidden"])),
    "gate_proj": ("mlp", lambda s: (s["hidden"], s["intermediate"])),
    "up_proj": ("mlp", lambda s: (s["hidden"], s["intermediate"])),
    "down_proj": ("mlp", lambda s: (s["intermediate"], s["hidden"])),
}
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def adapter_config(targets, r, alpha, base):
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "bias": "none",
        "base_model_name_or_path": base,
        "use_rslora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="adapter directory to write")
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="F32")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--base", default="SmolLM2-135M-Instruct.Q4_1.gguf",
                    help="base_model_name_or_path to record (peft does not use it)")
    args = ap.parse_args()

    sizes = {"hidden": args.hidden, "heads": args.heads, "kv_heads": args.kv_heads,
             "head_dim": args.head_dim, "intermediate": args.intermediate}
    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in MODULES]
    if unknown:
        ap.error(f"unknown target modules {unknown}; known: {sorted(MODULES)}")

    gen = torch.Generator().manual_seed(args.seed)
    tensors = {}
    for layer in range(args.layers):
        for name in targets:
            block, shape = MODULES[name]
            fan_in, fan_out = shape(sizes)
            prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
            a = torch.randn(args.r, fan_in, generator=gen) * args.std
            b = torch.randn(fan_out, args.r, generator=gen) * args.std
            tensors[f"{prefix}.lora_A.weight"] = a.to(DTYPES[args.dtype]).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.to(DTYPES[args.dtype]).contiguous()

    os.makedirs(args.out, exist_ok=True)
    save_file(tensors, os.path.join(args.out, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    alpha = int(args.alpha) if float(args.alpha).is_integer() else args.alpha
    with open(os.path.join(args.out, "adapter_config.json"), "w") as f:
        json.dump(adapter_config(targets, args.r, alpha, args.base), f, indent=2)
        f.write("\n")
    print(f"wrote {len(tensors)} tensors to {args.out}")


if __name__ == "__main__":
    main()
