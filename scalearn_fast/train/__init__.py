"""Two-stage ScaLearn training on GLUE: stage 1 adapters (``train_adapter``), stage 2 ω + head
(``train_scalearn``), L2R routers over a task sequence (``train_router``), GLUE readers and
metrics. Needs ``transformers`` and ``accelerate`` (the ``hf`` extra)."""

from .data import TASKS, Example, read_glue, task_spec
from .metrics import compute_metrics
from .router import train_router
from .stages import (
    FUSION_LR,
    STAGE1_LR,
    STAGE2_LR,
    default_model_dir,
    train_adapter,
    train_fusion,
    train_scalearn,
)

__all__ = [
    "FUSION_LR",
    "STAGE1_LR",
    "STAGE2_LR",
    "TASKS",
    "Example",
    "compute_metrics",
    "default_model_dir",
    "read_glue",
    "task_spec",
    "train_adapter",
    "train_fusion",
    "train_router",
    "train_scalearn",
]
