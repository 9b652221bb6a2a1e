"""``scalearn-fast export``: a model folder with a ScaLearn or AdapterFusion checkpoint attached,
written as an AOTInductor package for ``scalearn-run`` (docs/deploy.md).

    scalearn-fast export --model DIR --scalearn DIR --output model.pt2
    scalearn-fast export --model DIR --fusion DIR --sources A B C --output model.pt2

The package takes ``input_ids`` and ``attention_mask`` [batch, seq] (any batch, any length up to
the model's maximum unless ``--static``) and returns the model's outputs (the logits).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..cli_options import add_sources_option


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local Hugging Face model folder (sequence classification)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--scalearn", help="save_scalearn folder (ω and the task head)")
    which.add_argument("--fusion", help="AdapterFusion folder (the adapters library's save_adapter_fusion)")
    add_sources_option(
        p, "AdapterHub source folders (needed with --fusion; --scalearn defaults to the ones it recorded)"
    )
    p.add_argument("--output", required=True, help="the .pt2 package to write")
    p.add_argument("--device", default="cpu", help="device the package runs on: cpu (default) or cuda")
    p.add_argument("--batch-size", type=int, default=2, help="batch of the example input traced")
    p.add_argument("--seq-len", type=int, default=16, help="sequence length of the example input traced")
    p.add_argument("--static", action="store_true", help="fix the batch and sequence length to the example's")


def _num_labels(scalearn_dir: str) -> int | None:
    """The label count of a save_scalearn folder's task head: the output rows of its last layer
    (``classifier.weight`` for BERT, ``classifier.out_proj.weight`` for RoBERTa)."""
    from ..formats import read_scalearn_checkpoint

    tensors = read_scalearn_checkpoint(scalearn_dir).tensors
    for last in ("classifier.out_proj.weight", "classifier.weight"):
        found = [t for k, t in tensors.items() if k.startswith("head.") and k.endswith(last) and t.dim() == 2]
        if found:
            return int(found[0].shape[0])
    return None


def build_model(a: argparse.Namespace):
    """The model of ``--model`` on ``--device`` in eval mode, with the checkpoint attached."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification

    from ..hf_quiet import transformers_errors_only
    from ..models import attach_fusion, load_scalearn

    if not Path(a.model).is_dir():
        raise FileNotFoundError(f"--model {a.model}: no such folder (a local Hugging Face model folder)")
    if a.fusion is not None and not a.sources:
        raise ValueError("--fusion needs --sources (the AdapterHub folders the fusion was trained over)")
    kwargs = {}
    if a.scalearn is not None:
        labels = _num_labels(a.scalearn)
        if labels is not None:
            kwargs["num_labels"] = labels
    with transformers_errors_only():  # a head the checkpoint replaces is "newly initialized"
        model = AutoModelForSequenceClassification.from_pretrained(a.model, local_files_only=True, **kwargs)
    model = model.to(a.device).eval()
    if a.scalearn is not None:
        load_scalearn(model, a.scalearn, a.sources)
    else:
        attach_fusion(model, a.sources, a.fusion)
    return model.eval()


def run(a: argparse.Namespace) -> int:
    import torch

    from .export import export

    if a.batch_size < 1 or a.seq_len < 1:
        raise ValueError(f"--batch-size and --seq-len must be >= 1; got {a.batch_size}, {a.seq_len}")
    model = build_model(a)
    vocab = int(getattr(model.config, "vocab_size", 2))
    ids = torch.arange(a.batch_size * a.seq_len).reshape(a.batch_size, a.seq_len) % vocab
    example = {"input_ids": ids.to(a.device), "attention_mask": torch.ones_like(ids).to(a.device)}
    path = export(model, example, a.output, dynamic_batch=not a.static, dynamic_seq=not a.static)
    print(f"wrote {path}")
    return 0
