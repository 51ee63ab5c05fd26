#!/usr/bin/env python3
"""Applies a LoRA adapter directory (as `llmops-worker finetune` writes it) to its base
model with Hugging Face transformers + peft, and dumps the logits of one forward pass, so
that the candle implementation can be checked against the reference one. Runs in the venv
of scripts/peft-env:

    $(scripts/peft-env) benches/finetune/interop.py --gguf MODEL.gguf --adapter DIR \\
        --prompt "TEXT" [--out FILE]

The base model is read from the GGUF file by transformers (which dequantizes every tensor
to float32 and undoes the GGUF row order of q_proj and k_proj), the tokenizer too. The
prompt is tokenized without special tokens. Writes JSON (to --out, or stdout):

    {"tokens": [ids], "logits_last": [vocab floats, with the adapter],
     "logits_base_last": [vocab floats, same model with the adapter disabled],
     "adapter_warnings": [warnings raised while peft loaded the adapter]}

Before the forward pass it checks that peft really took the adapter: every tensor of
adapter_model.safetensors must have landed, unchanged, in a LoRA parameter of the model,
and every LoRA parameter of the model must have come from the file. peft itself warns
about missing keys but silently ignores unexpected ones (a misspelt name would leave
lora_B at zero, i.e. no adapter at all), so a mismatch here exits with status 1.
"""

import argparse
import json
import logging
import os
import sys
import time
import warnings

# Everything is local: never ask the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF conversion bar

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402


def log(msg):
    print(f"interop: {msg}", file=sys.stderr, flush=True)


class Collect(logging.Handler):
    """Keeps the WARNING (and worse) records of the loggers it is attached to."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(f"{record.name}: {record.getMessage()}")


def load_base(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return tokenizer, model.eval()


def load_adapter(base, adapter_dir):
    """PeftModel.from_pretrained, with the warnings and log records it produces."""
    from peft import PeftModel

    handler = Collect()
    loggers = [logging.getLogger(n) for n in ("peft", "transformers", "accelerate")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(base, adapter_dir)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    found = [f"{w.category.__name__}: {w.message}" for w in caught] + handler.messages
    return model.eval(), found


def check_loaded(model, adapter_dir):
    """Compares the adapter file with the LoRA parameters of the peft model; returns a
    list of problems (empty when every tensor was taken as it is)."""
    state = model.state_dict()
    # peft names a loaded tensor `<module>.lora_A.<adapter name>.weight`; the file has
    # `<module>.lora_A.weight`.
    lora = {}
    for key in state:
        for part in (".lora_A.", ".lora_B."):
            if part in key:
                head, _, tail = key.partition(part)
                adapter_name, _, rest = tail.partition(".")
                if adapter_name == "default":
                    lora[f"{head}{part}{rest}"] = key
    problems = []
    seen = set()
    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            target = lora.get(key)
            if target is None:
                if key in state:
                    # peft takes `<module>.lora_A.default.weight` too, but writes and
                    # documents the name without the adapter name; other readers may not.
                    problems.append(f"non-standard key (peft took it; peft's own name has no "
                                    f"adapter name in it): {key}")
                    seen.add(key.replace(".default.", "."))
                else:
                    problems.append(f"unexpected key (ignored by peft): {key}")
                continue
            seen.add(key)
            want = f.get_tensor(key).to(torch.float32)
            have = state[target].to(torch.float32)
            if want.shape != have.shape:
                problems.append(f"{key}: shape {list(want.shape)} in the file, "
                                f"{list(have.shape)} in the model")
            elif not torch.equal(want, have):
                problems.append(f"{key}: the model's values differ from the file's")
    for key in sorted(set(lora) - seen):
        problems.append(f"missing key (left at its initial value): {key}")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True, help="base model, a Llama-family GGUF file")
    ap.add_argument("--adapter", required=True, help="PEFT adapter directory")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--out", help="JSON file to write (default: stdout)")
    args = ap.parse_args()

    t0 = time.monotonic()
    tokenizer, base = load_base(args.gguf)
    log(f"base model loaded in {time.monotonic() - t0:.1f}s")
    model, found = load_adapter(base, args.adapter)
    for w in found:
        log(f"warning while loading the adapter: {w if len(w) <= 400 else w[:400] + ' ...'}")
    problems = check_loaded(model, args.adapter)
    if problems:
        for p in problems[:20]:
            log(p)
        log(f"{len(problems)} problem(s) with the adapter's tensors; nothing written")
        return 1

    tokens = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    if not tokens:
        log("the prompt has no tokens")
        return 1
    ids = torch.tensor([tokens], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].float()
        with model.disable_adapter():
            logits_base = model(input_ids=ids).logits[0, -1].float()
    diff = (logits - logits_base).abs().max().item()
    log(f"{len(tokens)} tokens; max |adapter - base| over the last logits: {diff:.6g}")

    result = {
        "tokens": tokens,
        "logits_last": logits.tolist(),
        "logits_base_last": logits_base.tolist(),
        "adapter_warnings": found,
    }
    if args.out:
        tmp = f"{args.out}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, args.out)
    else:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
