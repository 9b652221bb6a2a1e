"""GLUE TSV readers for folders in the standard GLUE download layout (``<TASK>/{train,dev}.tsv``).

Quirks handled: MRPC starts with a UTF-8 BOM; CoLA has no header; MNLI keeps the 12-column train
layout (premise col 8, hypothesis col 9, label last); no quoting anywhere (split on tabs). The
``datasets`` library is used only when asked (``--data hub``). With no folder given, the readers
use ``$SCALEARN_FAST_GLUE_DIR`` or else the few-hundred-row sample shipped with the package
(``glue_sample/``, see its README for provenance and licence notes).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

ENV_GLUE_DIR = "SCALEARN_FAST_GLUE_DIR"
SAMPLE_GLUE_DIR = Path(__file__).resolve().parent / "glue_sample"
WHERE_TO_GET_GLUE = (
    f"pass --glue-dir DIR (a folder in the GLUE download layout, <TASK>/train.tsv and <TASK>/dev.tsv), "
    f"set {ENV_GLUE_DIR}, or use --data hub (reads GLUE with the `datasets` package)"
)


@dataclass(frozen=True)
class TaskSpec:
    folder: str
    text_a: int
    text_b: int | None
    label: int  # column; -1 = last
    labels: tuple[str, ...] | None  # None = regression
    header: bool = True

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None


TASKS: dict[str, TaskSpec] = {
    "rte": TaskSpec("RTE", 1, 2, 3, ("entailment", "not_entailment")),
    "mrpc": TaskSpec("MRPC", 3, 4, 0, ("0", "1")),
    "sts-b": TaskSpec("STS-B", 7, 8, 9, None),
    "cola": TaskSpec("CoLA", 3, None, 1, ("0", "1"), header=False),
    "sst-2": TaskSpec("SST-2", 0, None, 1, ("0", "1")),
    "qnli": TaskSpec("QNLI", 1, 2, 3, ("entailment", "not_entailment")),
    "mnli": TaskSpec("MNLI", 8, 9, -1, ("entailment", "neutral", "contradiction")),
    # not in the shipped sample: read from a full GLUE copy (same layout) or --data hub
    "qqp": TaskSpec("QQP", 3, 4, 5, ("0", "1")),
    "wnli": TaskSpec("WNLI", 1, 2, 3, ("0", "1")),
}


def task_spec(task: str) -> TaskSpec:
    key = task.lower().replace("_", "-").replace("stsb", "sts-b").replace("sst2", "sst-2")
    if key not in TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; known: {sorted(TASKS)}")
    return TASKS[key]


def canonical_task(task: str) -> str:
    spec = task_spec(task)
    return next(k for k, v in TASKS.items() if v is spec)


def default_glue_dir() -> Path:
    """``$SCALEARN_FAST_GLUE_DIR`` if set, else the GLUE sample shipped with the package."""
    env = os.environ.get(ENV_GLUE_DIR)
    return Path(env) if env else SAMPLE_GLUE_DIR


def is_sample(glue_dir: str | os.PathLike[str] | None) -> bool:
    """Whether ``glue_dir`` (None: the default) is the shipped few-hundred-row sample."""
    folder = Path(glue_dir) if glue_dir else default_glue_dir()
    return folder.resolve() == SAMPLE_GLUE_DIR


@dataclass
class Example:
    text_a: str
    text_b: str | None
    label: float | int


def read_glue(
    task: str,
    split: str = "train",
    glue_dir: str | os.PathLike[str] | None = None,
    *,
    max_samples: int | None = None,
    seed: int = 0,
) -> list[Example]:
    """Read ``<glue_dir>/<TASK>/<split>.tsv``; ``max_samples`` keeps a seeded random subset."""
    spec = task_spec(task)
    folder = Path(glue_dir) if glue_dir else default_glue_dir()
    path = folder / spec.folder / f"{split}.tsv"
    if not path.is_file():
        what = "the GLUE sample shipped with the package lacks this task" if is_sample(folder) else "no file"
        raise FileNotFoundError(f"{path} not found ({what}): {WHERE_TO_GET_GLUE}")
    examples: list[Example] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = f.read().split("\n")
    if spec.header:
        lines = lines[1:]
    for lineno, line in enumerate(lines, start=2 if spec.header else 1):
        if not line.strip():
            continue
        cols = line.rstrip("\r").split("\t")
        needed = max(spec.text_a, spec.text_b or 0, spec.label)
        if len(cols) <= needed:
            raise ValueError(f"{path}:{lineno}: {len(cols)} columns, expected more than {needed}")
        raw = cols[spec.label].strip()
        if spec.labels is None:
            label: float | int = float(raw)
        elif raw in spec.labels:
            label = spec.labels.index(raw)
        else:
            raise ValueError(f"{path}:{lineno}: label {raw!r} not in {spec.labels}")
        text_b = cols[spec.text_b] if spec.text_b is not None else None
        examples.append(Example(cols[spec.text_a], text_b, label))
    if max_samples is not None and max_samples < len(examples):
        examples = random.Random(seed).sample(examples, max_samples)
    return examples


def read_hub(task: str, split: str, *, max_samples: int | None = None, seed: int = 0) -> list[Example]:
    """The same examples from the ``datasets`` hub copy of GLUE (needs ``datasets`` and access)."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("--data hub needs the 'datasets' package (pip install datasets)") from exc
    name = canonical_task(task)
    hub_name = {"sts-b": "stsb", "sst-2": "sst2"}.get(name, name)
    hub_split = (
        "validation_matched" if (name == "mnli" and split == "dev") else split.replace("dev", "validation")
    )
    ds = datasets.load_dataset("glue", hub_name, split=hub_split)
    keys = [k for k in ds.column_names if k not in ("label", "idx")]
    examples = [Example(row[keys[0]], row[keys[1]] if len(keys) > 1 else None, row["label"]) for row in ds]
    if max_samples is not None and max_samples < len(examples):
        examples = random.Random(seed).sample(examples, max_samples)
    return examples


def batch_order(
    n: int,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    length: Callable[[int], int] | None = None,
    bucket: int = 8,
) -> list[list[int]]:
    """The indices of each batch over ``n`` examples, in the order they are used: in order, or
    shuffled with ``seed``; with ``length`` (an example's length by index) and ``bucket`` > 0,
    shuffled examples are length-sorted within pools of ``bucket`` batches and the batches
    shuffled (less padding, still random batches). The same arguments give the same batches on
    every process of a distributed run, which then splits each batch (``distributed.shard_rows``)."""
    order = list(range(n))
    bucketed = shuffle and bucket and length is not None
    if shuffle:
        rng = random.Random(seed)
        rng.shuffle(order)
        if bucketed:
            pool = batch_size * bucket
            order = [i for s in range(0, n, pool) for i in sorted(order[s : s + pool], key=length)]
    starts = list(range(0, n, batch_size))
    if bucketed:
        rng.shuffle(starts)
    return [order[start : start + batch_size] for start in starts]


def encode_examples(
    chunk: Sequence[Example], tokenizer, *, max_length: int, regression: bool = False
) -> dict[str, torch.Tensor]:
    """One batch: the tokenizer's tensors, padded to the longest example, and ``labels``."""
    pairs = [e.text_b is not None for e in chunk]
    if all(pairs) or not any(pairs):
        a = [e.text_a for e in chunk]
        b = [e.text_b for e in chunk] if pairs[0] else None
        enc = tokenizer(a, b, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    else:  # a batch mixing single sentences and pairs (several tasks' examples): one input each
        inputs = [(e.text_a, e.text_b) if e.text_b is not None else e.text_a for e in chunk]
        enc = tokenizer(inputs, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    dtype = torch.float32 if regression else torch.long
    enc["labels"] = torch.tensor([e.label for e in chunk], dtype=dtype)
    return dict(enc)


def batches(
    examples: Sequence[Example],
    tokenizer,
    *,
    batch_size: int = 32,
    max_length: int = 128,
    shuffle: bool = False,
    seed: int = 0,
    regression: bool = False,
    bucket: int = 8,
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenised batches, padded to the longest sequence in each batch (cheaper on CPU). When
    shuffling, examples are length-sorted within pools of ``bucket`` batches (0: off; see
    ``batch_order``)."""

    def length(i: int) -> int:
        e = examples[i]
        return len(e.text_a) + len(e.text_b or "")

    order = batch_order(len(examples), batch_size, shuffle=shuffle, seed=seed, length=length, bucket=bucket)
    for rows in order:
        chunk = [examples[i] for i in rows]
        yield encode_examples(chunk, tokenizer, max_length=max_length, regression=regression)


def majority_baseline(examples: Sequence[Example]) -> float:
    """Accuracy of always predicting the most frequent label."""
    counts: dict[float | int, int] = {}
    for e in examples:
        counts[e.label] = counts.get(e.label, 0) + 1
    return max(counts.values()) / len(examples) if examples else float("nan")
