"""Running a training command on several processes (``torchrun --nproc_per_node N``).

The launcher's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) says whether a run is
distributed; ``start(device)`` then joins the process group through Accelerate's
``PartialState`` (gloo on CPU, NCCL on CUDA) and returns the device of this process.

Every rank builds the same global batches (same seed, same length bucketing) and takes its own
contiguous rows of each (``shard_rows``), so a run on N processes sees the batches a single
process would, whatever N. Evaluation splits the examples across ranks as a distributed
sampler does (padding with the first examples so every rank gets as many), gathers the
predictions back in example order and drops the padded duplicates (``gather_predictions``),
so every rank computes the same metric from the whole set. Only rank 0 writes files, prints
log lines and shows progress (``is_main_process``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def launched() -> bool:
    """Whether a launcher (torchrun, ``accelerate launch``) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_and_size() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) outside a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes outputs, logs and progress."""
    return int(os.environ.get("RANK", "0")) == 0 and rank_and_size()[0] == 0


def start(device: str) -> str:
    """The device this process trains on. Under a launcher, join the process group first:
    ``device`` names the kind (``cpu`` or ``cuda``); each rank gets its own GPU."""
    if not launched():
        return device
    from accelerate import PartialState

    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: a distributed run trains on cpu or cuda")
    state = PartialState(cpu=kind == "cpu")
    if state.num_processes < 2:
        raise ValueError(f"WORLD_SIZE is {os.environ.get('WORLD_SIZE')} but the process group has 1 process")
    return str(state.device)


def shard_rows(batch: dict[str, torch.Tensor], rank: int, size: int) -> tuple[dict[str, torch.Tensor], float]:
    """This rank's contiguous rows of a global batch and the factor its mean loss is scaled by,
    ``rows here * size / rows in all``: DDP averages the ranks' gradients, so the scaled mean
    losses give the gradient of the global batch's mean loss. A rank left without rows (a last
    batch smaller than ``size``) gets the first row with factor 0, so it still joins the
    gradient all-reduce."""
    if size == 1:
        return batch, 1.0
    n = next(iter(batch.values())).shape[0]
    bounds = [n * r // size for r in range(size + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    if hi == lo:
        return {k: v[:1] for k, v in batch.items()}, 0.0
    return {k: v[lo:hi] for k, v in batch.items()}, (hi - lo) * size / n


def gather_predictions(predict: Callable[[list[T]], Sequence[Any]], items: Sequence[T]) -> list[Any]:
    """``predict`` (one prediction per item, in order) over ``items``, split across the ranks:
    each rank predicts every ``size``-th item of the list padded with its first items, the
    predictions are gathered and the padding's duplicates dropped. One process: ``predict(items)``."""
    rank, size = rank_and_size()
    if size == 1 or not items:
        return list(predict(list(items)))
    from accelerate.utils import gather_object

    padded = list(range(len(items)))
    padded += padded[: (-len(padded)) % size]  # as torch's DistributedSampler pads
    positions = list(range(rank, len(padded), size))
    local = list(predict([items[padded[p]] for p in positions]))
    if len(local) != len(positions):
        raise ValueError(f"predict returned {len(local)} predictions for {len(positions)} items")
    gathered = gather_object([list(zip(positions, local, strict=True))])  # one list per rank
    out: list[Any] = [None] * len(items)
    for part in gathered:
        for position, prediction in part:
            if position < len(items):  # past the end: a padded duplicate
                out[position] = prediction
    return out


def all_mean(value: float, weight: float) -> float:
    """The ``weight``-weighted mean of ``value`` over the ranks (``value`` on one process)."""
    rank, size = rank_and_size()
    if size == 1:
        return value
    t = torch.tensor([value * weight, weight], dtype=torch.float64)
    backend = torch.distributed.get_backend()
    if backend == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return float(t[0] / t[1]) if t[1] > 0 else value
