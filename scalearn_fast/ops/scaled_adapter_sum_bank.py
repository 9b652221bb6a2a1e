"""``scaled_adapter_sum_bank``: the ScaLearn composition for many target tasks in one call.

    out[t] = Σ_i Ω[k(t), i] ⊙ (W_up_i · act(W_down_i · z[t] + b_down_i) + b_up_i) + residual[t]

All targets share the N source adapters (so the down projection is one GEMM for the whole
batch); only their ω differs. ``omega_bank`` stacks the K targets' ω ([K, N, d] for ScaLearn,
[K, N, 1] for the uniform variants) and ``task_index`` names each row's target. The gradient
reaches the bank rows of the targets present, so several targets train in one mixed batch.
How each backend runs it: ``ops/bank.py``.
"""

from __future__ import annotations

import torch

from .backends import resolve_backend
from .packing import PackedSources, check_activation, check_inputs, taking_weights
from .scaled_adapter_sum import compose_packed


def _shape(t: torch.Tensor) -> str:
    return f"[{', '.join(str(s) for s in t.shape)}]"


def check_bank(
    z: torch.Tensor, packed: PackedSources, omega_bank: torch.Tensor, task_index: torch.Tensor
) -> None:
    """Shapes, dtypes and values of a bank and its task ids, with errors naming the argument.
    The task-id range check reads the ids on the host (skipped while ``torch.compile`` traces)."""
    n, d = packed.num_sources, packed.hidden_size
    if not isinstance(omega_bank, torch.Tensor):
        kind = type(omega_bank).__name__
        raise ValueError(f"omega_bank must be a tensor [K, N, d] or [K, N, 1]; got {kind}")
    if omega_bank.dim() != 3 or omega_bank.shape[1] != n or omega_bank.shape[2] not in (1, d):
        raise ValueError(
            f"omega_bank has shape {_shape(omega_bank)}, expected [K, N={n}, d={d}] (vector) or "
            f"[K, N={n}, 1] (uniform)"
        )
    if omega_bank.shape[0] == 0:
        raise ValueError("omega_bank has no task (K = 0)")
    if not isinstance(task_index, torch.Tensor):
        raise ValueError(f"task_index must be an int64 tensor; got {type(task_index).__name__}")
    if task_index.dtype != torch.int64:
        raise ValueError(f"task_index must have dtype torch.int64; got {task_index.dtype}")
    if task_index.device != z.device:
        raise ValueError(f"task_index is on {task_index.device}, z on {z.device}")
    rows = tuple(z.shape[:-1])
    if tuple(task_index.shape) != rows and not (z.dim() >= 3 and tuple(task_index.shape) == rows[:1]):
        raise ValueError(
            f"task_index has shape {_shape(task_index)}, expected one id per row {list(rows)}"
            + (f" or one per sequence {list(rows[:1])}" if z.dim() >= 3 else "")
        )
    if task_index.numel() and not torch.compiler.is_compiling():
        lo, hi = int(task_index.min()), int(task_index.max())
        if lo < 0 or hi >= omega_bank.shape[0]:
            bad = lo if lo < 0 else hi
            k = omega_bank.shape[0]
            raise ValueError(f"task_index holds id {bad}; the bank has K={k} tasks (ids 0..K-1)")


def _task_rows(z: torch.Tensor, task_index: torch.Tensor) -> torch.Tensor:
    """One id per row of ``z.reshape(-1, d)`` (per-sequence ids repeated over their tokens)."""
    if task_index.dim() == 1 and z.dim() >= 3:
        per_seq = z.shape[1:-1].numel()
        return task_index.repeat_interleave(per_seq)
    return task_index.reshape(-1)


def scaled_adapter_sum_bank_packed(
    z: torch.Tensor,
    packed: PackedSources,
    omega_bank: torch.Tensor,
    task_index: torch.Tensor,
    residual: torch.Tensor | None = None,
    *,
    activation: str = "relu",
    backend: str = "auto",
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """ScaLearn composition with a per-row target task: ``Σ_i Ω[k(t), i] ⊙ A_i(z_t) + residual``.

    Args as ``scaled_adapter_sum_packed``'s, with a bank in place of ``omega``:
        omega_bank: the K targets' scales, ``[K, N, d]`` (ScaLearn) or ``[K, N, 1]`` (uniform).
        task_index: int64 target ids in ``0..K-1``: one per row (``z.shape[:-1]``), or for
            ``z [B, L, ..., d]`` one per sequence (``[B]``), repeated over its tokens.
        row_scale: optional per-token source weights ``[..., N]``, multiplied with the bank's.

    Raises:
        ValueError: a bank of the wrong N or d, task ids of the wrong shape, dtype or range.
    """
    check_activation(activation)
    check_bank(z, packed, omega_bank, task_index)
    check_inputs(z, packed, omega_bank[0], residual, row_scale=row_scale)  # dtypes and devices
    return compose_bank(
        z, packed, omega_bank, task_index, residual, activation, resolve_backend(backend, z.device), row_scale
    )


def compose_bank(
    z: torch.Tensor,
    packed: PackedSources,
    omega_bank: torch.Tensor,
    task_index: torch.Tensor,
    residual: torch.Tensor | None,
    activation: str,
    backend: str,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The call itself, on inputs already checked (``check_bank``, ``check_inputs``) and a
    resolved backend: what the task-bank layers run per site."""
    return compose_packed(
        z, packed, residual, activation=activation, backend=backend, row_scale=row_scale,
        omega_bank=omega_bank, task_index=_task_rows(z, task_index),
    )  # fmt: skip


scaled_adapter_sum_bank = taking_weights(scaled_adapter_sum_bank_packed, "scaled_adapter_sum_bank")
