"""What every training entry point (``train_adapter``, ``train_scalearn``, ``train_fusion``,
``train_task_bank``, ``train_router``) takes besides its method's own options: where the model
and data come from, the device, the output policy and the log (``RunOptions``), and the loop's
settings (``TrainConfig``). The entry points take both as keyword arguments and split them
with ``RunOptions.split``."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .data import default_glue_dir, is_sample, read_glue, read_hub
from .distributed import start
from .loop import TrainConfig, log_line
from .output import check_output
from .translation import is_translation, read_pairs


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class RunOptions:
    model_dir: str | None = None  # local HF model folder (None: the MiniLM package's)
    glue_dir: str | None = None  # GLUE download layout (None: $SCALEARN_FAST_GLUE_DIR or the sample)
    data: str = "glue"  # 'glue': TSV files; 'hub': the `datasets` copy of GLUE
    data_dir: str | None = None  # translation: train.tsv and dev.tsv
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    log: Callable[[str], None] = log_line
    device: str | None = None  # None: cuda if available; under a launcher, the kind (each rank its own)
    overwrite: bool = False

    @classmethod
    def split(cls, task: str, lr: float, options: dict[str, Any]) -> tuple[RunOptions, TrainConfig]:
        """``options`` (an entry point's keyword arguments) as run options and the loop's
        ``TrainConfig`` for ``task`` (``lr`` unless ``options`` name one); an unknown keyword is a
        TypeError naming it."""
        names = {f.name for f in fields(cls)}
        given = {k: v for k, v in options.items() if k in names and not (k == "log" and v is None)}
        run = cls(**given)
        train = {k: v for k, v in options.items() if k not in names}
        unknown = sorted(set(train) - {f.name for f in fields(TrainConfig)} - {"task"})
        if unknown:
            raise TypeError(f"unexpected keyword arguments {unknown}")
        return run, TrainConfig(task=task, **{"lr": lr, **train})

    def check(self, output_dir: str | os.PathLike[str]) -> str:
        """What a run can check before it loads or trains anything; returns this process's
        device (under a launcher, after joining the process group)."""
        device = self.device or default_device()
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"--device {device!r}: {exc}") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: this torch build or machine has no CUDA device")
        if self.model_dir is not None and not Path(self.model_dir).is_dir():
            raise FileNotFoundError(
                f"--model {self.model_dir}: no such folder (a local Hugging Face model folder)"
            )
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1; got {value}")
        check_output(output_dir, self.overwrite)
        return start(device)

    def glue_only(self, what: str) -> None:
        """Refuse ``data_dir`` (translation's) for a command that trains GLUE tasks only."""
        if self.data_dir is not None:
            raise ValueError(f"--data-dir is for --task translation; {what} trains GLUE tasks (--glue-dir)")

    def load_data(self, task: str, seed: int) -> tuple[list[Any], list[Any]]:
        """(train, dev) examples of ``task``, each subset to ``max_*_samples`` with ``seed``."""
        sizes = {"train": self.max_train_samples, "dev": self.max_eval_samples}
        if is_translation(task):
            return tuple(read_pairs(self.data_dir, s, max_samples=n, seed=seed) for s, n in sizes.items())
        self.glue_only("a GLUE task")
        if self.data not in ("glue", "hub"):
            raise ValueError(f"data must be 'glue' or 'hub'; got {self.data!r}")
        if self.data == "hub":
            return tuple(read_hub(task, s, max_samples=n, seed=seed) for s, n in sizes.items())
        return tuple(read_glue(task, s, self.glue_dir, max_samples=n, seed=seed) for s, n in sizes.items())

    def describe_data(self) -> str:
        """Where the run's examples come from, for the log and results.json."""
        if self.data_dir is not None:
            return str(self.data_dir)
        if self.data == "hub":
            return "hub (datasets: glue)"
        folder = Path(self.glue_dir) if self.glue_dir else default_glue_dir()
        if is_sample(folder):
            return f"the GLUE sample shipped with scalearn_fast ({folder}; for trying the commands only)"
        return str(folder)
