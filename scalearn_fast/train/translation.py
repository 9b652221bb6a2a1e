"""Translation tasks for both training stages: a folder of ``train.tsv`` / ``dev.tsv`` (one pair
per line, ``source<TAB>target``, no header), an encoder-decoder model (mBART, T5, mT5, M2M100,
Marian, BART), teacher-forced cross-entropy for training and greedy ``generate`` for dev
scores: corpus BLEU (the main metric) and chrF from ``sacrebleu``.

``TaskIO`` is what the shared loop (``loop.fit``) needs from a task: its batches and its dev
metrics. ``task_io(task)`` gives GLUE's or this module's.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .data import batch_order
from .distributed import gather_predictions

TRANSLATION = "translation"
SPLITS = ("train", "dev")


def is_translation(task: str) -> bool:
    return task.lower() == TRANSLATION


@dataclass
class Pair:
    source: str
    target: str


def read_pairs(
    folder: str | Path | None, split: str, *, max_samples: int | None = None, seed: int = 0
) -> list[Pair]:
    """``folder/<split>.tsv`` as (source, target) pairs; ``max_samples`` keeps a seeded subset."""
    if folder is None:
        raise ValueError("--task translation needs --data-dir DIR, a folder with train.tsv and dev.tsv")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    path = Path(folder) / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: --data-dir must hold train.tsv and dev.tsv (source<TAB>target)"
        )
    pairs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != 2:
            raise ValueError(
                f"{path}:{lineno}: {len(cols)} tab-separated columns; expected 2 (source, target)"
            )
        pairs.append(Pair(cols[0], cols[1]))
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    if max_samples is not None and max_samples < len(pairs):
        pairs = random.Random(seed).sample(pairs, max_samples)
    return pairs


def pair_batches(
    pairs: Sequence[Pair], tokenizer, *, max_length: int = 128, **order: Any
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenised batches: ``input_ids``, ``attention_mask`` and ``labels`` (the target ids, padding
    set to -100 so the loss skips it); the model makes its decoder inputs from the labels.
    ``order``: ``batch_size`` (32), ``shuffle``, ``seed`` as ``data.batch_order`` takes them."""
    for rows in batch_order(len(pairs), order.pop("batch_size", 32), **order):
        chunk = [pairs[i] for i in rows]
        enc = tokenizer(
            [p.source for p in chunk],
            text_target=[p.target for p in chunk],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        labels = enc["labels"]
        pad = tokenizer.pad_token_id
        if pad is not None:
            labels = labels.masked_fill(labels == pad, -100)
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


@torch.no_grad()
def translate(
    model, sources: Sequence[str], tokenizer, *, max_length: int = 128, batch_size: int = 64
) -> list[str]:
    """Greedy translations of ``sources`` (cached key/values, ``max_length`` new tokens at most)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    for start in range(0, len(sources), batch_size):
        enc = tokenizer(
            list(sources[start : start + batch_size]),
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        ids = model.generate(
            **{k: enc[k].to(device) for k in ("input_ids", "attention_mask")},
            max_new_tokens=max_length,
            num_beams=1,
            do_sample=False,
        )
        out += tokenizer.batch_decode(ids, skip_special_tokens=True)
    model.train(was_training)
    return out


def translation_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu's defaults), and ``main`` = BLEU."""
    try:
        import sacrebleu
    except ImportError as exc:
        raise ImportError("translation metrics need sacrebleu (pip install 'scalearn-fast[mt]')") from exc
    refs = [list(references)]
    bleu = sacrebleu.corpus_bleu(list(hypotheses), refs).score
    chrf = sacrebleu.corpus_chrf(list(hypotheses), refs).score
    return {"bleu": float(bleu), "chrf": float(chrf), "main": float(bleu)}


def evaluate_translation(
    model, pairs: Sequence[Pair], tokenizer, *, max_length: int = 128
) -> dict[str, float]:
    """Dev BLEU and chrF of greedy translations of ``pairs``' sources against their targets."""
    sources = [p.source for p in pairs]
    hyps = gather_predictions(lambda part: translate(model, part, tokenizer, max_length=max_length), sources)
    return translation_metrics(hyps, [p.target for p in pairs])


def load_seq2seq_model(model_dir: str, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of an encoder-decoder from a local HF folder, offline."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
    return model, tokenizer


class TaskIO(Protocol):
    """What ``loop.fit`` needs from a task."""

    def batches(self, examples: Sequence[Any], tokenizer, *, batch_size: int, max_length: int,
                shuffle: bool, seed: int) -> Iterator[dict[str, torch.Tensor]]: ...  # fmt: skip

    def evaluate(self, model, examples: Sequence[Any], tokenizer, *, max_length: int) -> dict[str, float]: ...


class TranslationIO:
    """Translation pairs: teacher-forced batches, greedy-decoding BLEU/chrF."""

    def batches(self, examples, tokenizer, *, batch_size, max_length, shuffle, seed):
        return pair_batches(
            examples, tokenizer, batch_size=batch_size, max_length=max_length, shuffle=shuffle, seed=seed
        )

    def evaluate(self, model, examples, tokenizer, *, max_length):
        return evaluate_translation(model, examples, tokenizer, max_length=max_length)
