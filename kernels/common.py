"""Pieces every kernel file shares: jit helpers, autotune configs, launcher utilities.

Jit helpers (called from inside kernels):

* ``mma(a, b, acc)``: acc += a·b, exact IEEE fp32 for fp32 operands, the default
  (tensor-core) path otherwise. The precision follows the operand dtype at compile time.
* ``activation(x, ACT)`` / ``activation_grad(x, ACT)``: act(x) and act'(x) in fp32 for the ids
  of ``scalearn_fast.ops.activations`` (relu 0, gelu 1 with the exact erf, silu 2, tanh 3,
  identity 4), matching its torch functions, NaN included.
* ``tile_mask`` / ``load_tile`` / ``store_tile``: 2-D tiles addressed by two index vectors and
  two strides, with int64 offsets (T·d may pass 2³¹). An index vector may be gathered (the
  source id s(c) of each packed unit), so ``ω[s(c), j]`` is ``load_tile(omega, src, j, ...)``.

Launcher utilities (plain Python):

* ``KernelOperands``: the keyword arguments of a kernel's tensors in one place: a pointer and
  one stride per named axis for each tensor, and for each *optional* tensor the constexpr
  ``HAS_<NAME>`` flag. An absent input is ``None`` (pointer and strides) with its flag
  False: no stand-in tensors, no flags set by hand.
* ``check_operands`` / ``check_same_dtype`` / ``check_bias``: ValueErrors naming the operand
  for dtypes the kernels cannot compute correctly, GEMM operands of different dtypes, and a
  bias of the wrong shape; ``bias_rows`` views a bias as ``[1 or T, d]``.
* ``autotune_enabled`` / ``configs``: the autotune config lists (one small config for tests
  and the interpreter).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

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


def configs(full: list[tuple[dict, int, int]], small: dict) -> list[triton.Config]:
    """``full`` as ``(tiles, num_warps, num_stages)`` configs, or only ``small`` when
    autotuning is off."""
    if not autotune_enabled():
        return [triton.Config(small, num_warps=4, num_stages=1)]
    return [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in full]


# [BLOCK_T, BLOCK_R] output tiles over a K-loop on d (the down projection and grad_pre): full
# list (tiles, num_warps, num_stages) and the small config; Hopper-sensible 64/128-row tiles.
T_BY_R_TILES: tuple[list[tuple[dict, int, int]], dict] = (
    [
        ({"BLOCK_T": 128, "BLOCK_R": 64, "BLOCK_K": 64}, 4, 3),
        ({"BLOCK_T": 128, "BLOCK_R": 128, "BLOCK_K": 64}, 8, 3),
        ({"BLOCK_T": 64, "BLOCK_R": 64, "BLOCK_K": 64}, 4, 4),
        ({"BLOCK_T": 64, "BLOCK_R": 32, "BLOCK_K": 128}, 4, 3),
    ],
    {"BLOCK_T": 16, "BLOCK_R": 16, "BLOCK_K": 32},
)


# --------------------------------------------------------------------------- jit helpers


@triton.jit
def mma(a, b, acc):
    """acc += a·b; fp32 operands in exact IEEE fp32, others on the default path."""
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def tanh(x):
    """tanh from one exp of a non-positive argument (no overflow), odd by construction."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def activation(x, ACT: tl.constexpr):
    """act(x) in fp32 for the activation id ``ACT``."""
    if ACT == 0:  # relu
        y = tl.where(x < 0, 0.0, x)  # NaN < 0 is false: NaN passes through, like torch.relu
    elif ACT == 1:  # gelu (erf)
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:  # silu
        y = x * tl.sigmoid(x)
    elif ACT == 3:  # tanh
        y = tanh(x)
    else:  # identity
        y = x
    return y


@triton.jit
def activation_grad(x, ACT: tl.constexpr):
    """act'(x) in fp32, matching ``scalearn_fast.ops.activations.activation_grad``."""
    if ACT == 0:
        y = tl.where(x > 0, 1.0, 0.0)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        y = cdf + x * pdf
    elif ACT == 2:
        sig = tl.sigmoid(x)
        y = sig * (1.0 + x * (1.0 - sig))
    elif ACT == 3:
        th = tanh(x)
        y = 1.0 - th * th
    else:
        y = tl.zeros_like(x) + 1.0  # not x*0+1: a NaN P must not poison dP here
    return y


@triton.jit
def tile_mask(rows, cols, n_rows, n_cols):
    """[len(rows), len(cols)] mask of the entries inside [0, n_rows) x [0, n_cols)."""
    return (rows[:, None] < n_rows) & (cols[None, :] < n_cols)


@triton.jit
def load_tile(ptr, rows, cols, stride_row, stride_col, mask):
    """ptr[rows[i]·stride_row + cols[j]·stride_col] as a [len(rows), len(cols)] tile in the
    pointer's dtype, 0 where ``mask`` is False."""
    offs = rows[:, None].to(tl.int64) * stride_row + cols[None, :].to(tl.int64) * stride_col
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def store_tile(ptr, value, rows, cols, stride_row, stride_col, mask):
    """Store ``value`` where ``mask`` is True, cast to the pointer's dtype (see ``load_tile``)."""
    offs = rows[:, None].to(tl.int64) * stride_row + cols[None, :].to(tl.int64) * stride_col
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


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
