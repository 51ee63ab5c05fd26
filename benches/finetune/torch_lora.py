#!/usr/bin/env python3
"""LoRA training throughput of PyTorch + peft on the CPU: the reference half of the
fine-tuning benchmark. Runs in the venv of scripts/peft-env:

    $(scripts/peft-env) benches/finetune/torch_lora.py --gguf MODEL.gguf \\
        [--batch 4] [--seq 128] [--steps 5] [--threads 2]

The base model is read from the GGUF file by transformers and dequantized to float32. It
is wrapped with a LoRA adapter (r 8, alpha 16, dropout 0, on q_proj, k_proj, v_proj,
o_proj, gate_proj, up_proj and down_proj of every layer; the base weights frozen) and
trained with AdamW (lr 1e-4, no weight decay, no gradient accumulation) on random token
batches of a fixed shape [batch, seq], the labels being the inputs (causal LM loss, so
seq - 1 predicted positions per row). A step is forward, backward, optimizer step and
zeroing the gradients. One untimed warm-up step comes first; then --steps timed ones.

Prints one JSON line on stdout:

    {"impl": "torch+peft", "sec_per_step": median seconds, "tokens_per_s": batch*seq /
     sec_per_step, "peak_rss_mib": ru_maxrss of this process, "step_seconds": [...], ...}

The load average before and after the run is included, since the figure means little on
a busy machine.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(msg):
    print(f"torch_lora: {msg}", file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True, help="base model, a Llama-family GGUF file")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.steps < 1 or args.batch < 1 or args.seq < 2:
        ap.error("--steps and --batch must be at least 1, --seq at least 2")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load_before = os.getloadavg()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    t0 = time.monotonic()
    folder, name = os.path.split(os.path.abspath(args.gguf))
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    base.config.use_cache = False
    config = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0,
                        target_modules=TARGETS, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    log(f"model loaded in {time.monotonic() - t0:.1f}s; {n_trainable} trainable of "
        f"{n_total} parameters; attention {base.config._attn_implementation}")

    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
               for _ in range(args.steps + 1)]

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    t = time.monotonic()
    first_loss = step(batches[0])
    log(f"warm-up step: {time.monotonic() - t:.2f}s, loss {first_loss:.4f}")
    times, losses = [], []
    for i, ids in enumerate(batches[1:], 1):
        t = time.monotonic()
        losses.append(step(ids))
        times.append(time.monotonic() - t)
        log(f"step {i}/{args.steps}: {times[-1]:.2f}s, loss {losses[-1]:.4f}")

    median = statistics.median(times)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result = {
        "impl": "torch+peft",
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "threads": args.threads,
        "r": args.r,
        "alpha": args.alpha,
        "targets": TARGETS,
        "trainable_params": n_trainable,
        "sec_per_step": round(median, 4),
        "tokens_per_s": round(args.batch * args.seq / median, 1),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "step_seconds": [round(x, 4) for x in times],
        "loss_warmup": round(first_loss, 4),
        "loss_last": round(losses[-1], 4),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "attention": base.config._attn_implementation,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
