"""The host side every kernel file shares: autotune configs and launcher utilities (plain
Python). The device side, the jit helpers called from inside kernels, is ``tiles.py``.

* ``KernelOperands``: the keyword arguments of a kernel's tensors in one place: a pointer and
  one stride per named axis for each tensor, and for each *optional* tensor the constexpr
  ``HAS_<NAME>`` flag. An absent input is ``None`` (pointer and strides) with its flag
  False: no stand-in tensors, no flags set by hand.
* ``check_operands`` / ``check_same_dtype`` / ``check_bias``: ValueErrors naming the operand
  for dtypes the kernels cannot compute correctly, GEMM operands of different dtypes, and a
  bias of the wrong shape; ``bias_rows`` views a bias as ``[1 or T, d]``.
* ``autotune_enabled`` / ``configs``: the autotune config lists, written as tables (tile names
  once, then one tuple of sizes, num_warps and num_stages per config); one small config for
  tests and the interpreter.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton

# --------------------------------------------------------------------------- configs


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    """``SCALEARN_FAST_AUTOTUNE=0`` (tests) pins one small config; so does the interpreter
    (``TRITON_INTERPRET=1``), where the autotuner has no device to time configs on."""
    if interpreting():
        return False
    return os.environ.get("SCALEARN_FAST_AUTOTUNE", "1") != "0"


def configs(tiles: str, full: list[tuple[int, ...]], small: tuple[int, ...]) -> list[triton.Config]:
    """A kernel's autotune list. ``tiles`` names its tile constexprs once (``"BLOCK_T BLOCK_D
    BLOCK_K"``); each row of ``full`` is their sizes in that order, then num_warps and num_stages.
    When autotuning is off the list is the one config ``small`` (sizes only; 4 warps, 1 stage)."""
    names = tiles.split()
    if not autotune_enabled():
        return [triton.Config(dict(zip(names, small, strict=True)), num_warps=4, num_stages=1)]
    return [
        triton.Config(dict(zip(names, row[:-2], strict=True)), num_warps=row[-2], num_stages=row[-1])
        for row in full
    ]


# [BLOCK_T, BLOCK_R] output tiles over a K-loop on d (the down projection and grad_pre); Hopper-sensible
# 64/128-row tiles. Rows: BLOCK_T, BLOCK_R, BLOCK_K, num_warps, num_stages.
T_BY_R_TILES: tuple[str, list[tuple[int, ...]], tuple[int, ...]] = (
    "BLOCK_T BLOCK_R BLOCK_K",
    [(128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 4), (64, 32, 128, 4, 3)],
    (16, 16, 32),
)


# --------------------------------------------------------------------------- launcher utilities

class KernelOperands:
    """The tensor operands of one kernel, declared once next to it; calling it with the tensors
    by name gives the kernel's keyword arguments.

    ``KernelOperands("z:td wd:rd bd", optional="rs:tn pre:tr")`` declares tensors ``z`` (axes
    t, d), ``wd`` (r, d), the vector ``bd`` and the optional ``rs`` and ``pre``. Each tensor
    gives ``<name>_ptr`` and ``stride_<name>_<a>`` for each axis letter ``a`` (a broadcast
    axis has stride 0: ``broadcast_omega``). A vector (no axes) is indexed with unit stride,
    so it is made contiguous (a no-op for the contiguous vectors the op layer passes).
    Each optional tensor also gives the constexpr ``HAS_<NAME>``: when it is None, the flag is
    False and its pointer and strides are None. The key strings are built here, once, so a
    launch costs a few dict stores per tensor.
    """

    __slots__ = ("_slots",)

    def __init__(self, required: str, optional: str = "") -> None:
        slots = []
        for flagged, spec in ((False, required), (True, optional)):
            for item in spec.split():
                name, _, axes = item.partition(":")
                strides = tuple(f"stride_{name}_{a}" for a in axes)
                slots.append((name, f"{name}_ptr", strides, f"HAS_{name.upper()}" if flagged else None))
        self._slots = tuple(slots)

    def __call__(self, **tensors: torch.Tensor | None) -> dict[str, Any]:
        if len(tensors) != len(self._slots):
            raise TypeError(f"internal: kernel operands {[s[0] for s in self._slots]}; got {sorted(tensors)}")
        args: dict[str, Any] = {}
        for name, ptr, strides, flag in self._slots:
            x = tensors[name]
            if x is None:
                if flag is None:
                    raise ValueError(f"internal: the kernel operand {name!r} is required")
                args[ptr] = None
                args[flag] = False
                args.update(dict.fromkeys(strides))
                continue
            if strides:
                args.update(zip(strides, x.stride()))  # noqa: B905 (a kernel bug if the ranks differ)
            else:
                x = x.contiguous()
            args[ptr] = x
            if flag is not None:
                args[flag] = True
        return args


_ALWAYS_OK = frozenset((torch.float32, torch.float16))


def check_operands(launcher: str, **operands: torch.Tensor | None) -> None:
    """Refuse operand dtypes the kernels cannot compute correctly, naming the operand.

    float64: the kernels accumulate in fp32 and do not compile for fp64 operands on a GPU;
    under ``TRITON_INTERPRET=1`` the interpreter's ``tl.dot`` gives wrong results for float64
    and bfloat16 operands, so both are refused there (run the torch backend for them).
    """
    for name, x in operands.items():
        if x is None or x.dtype in _ALWAYS_OK:
            continue
        if x.dtype == torch.bfloat16 and not interpreting():
            continue
        where = " under TRITON_INTERPRET=1" if interpreting() else ""
        ok = "float32 or float16" if interpreting() else "float32, float16 or bfloat16"
        raise ValueError(
            f"{launcher}: {name} is {x.dtype}; the Triton kernels{where} take {ok} operands "
            "(use the torch backend for other dtypes)"
        )


def check_same_dtype(launcher: str, **operands: torch.Tensor) -> None:
    """The operands of one ``tl.dot`` must share a dtype: a ValueError naming them if not."""
    dtypes = {name: x.dtype for name, x in operands.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{name} {dtype}" for name, dtype in dtypes.items())
        raise ValueError(f"{launcher}: operands must share one dtype; got {listed}")


def check_bias(bias: torch.Tensor | None, t: int, d: int) -> None:
    """``bias`` is None, ``[d]`` or ``[T, d]`` (per row)."""
    if bias is not None and tuple(bias.shape) not in ((d,), (t, d)):
        raise ValueError(f"bias has shape {list(bias.shape)}; expected [d={d}] or [T={t}, d={d}] (per row)")


def broadcast_omega(omega: torch.Tensor | None, d: int) -> torch.Tensor | None:
    """A uniform ω ``[N, 1]`` as an ``[N, d]`` view with stride 0 over d (no copy)."""
    return omega.expand(-1, d) if omega is not None and omega.shape[1] == 1 else omega


def bias_rows(bias: torch.Tensor | None, d: int) -> torch.Tensor | None:
    """``bias`` as a ``[1 or T, d]`` view (a ``[d]`` bias is one row, broadcast over T)."""
    return None if bias is None else bias.reshape(-1, d)
