"""The jit helpers every kernel file shares, called from inside kernels (inlined when compiled).

* ``mma(a, b, acc)``: acc += a·b, exact IEEE fp32 for fp32 operands, the default
  (tensor-core) path otherwise. The precision follows the operand dtype at compile time.
* ``activation(x, ACT)`` / ``activation_grad(x, ACT)``: act(x) and act'(x) in fp32 for the ids
  of ``scalearn_fast.ops.activations`` (relu 0, gelu 1 with the exact erf, silu 2, tanh 3,
  identity 4), matching its torch functions, NaN included.
* ``tile_mask`` / ``load_tile`` / ``store_tile``: 2-D tiles addressed by two index vectors and
  two strides, with int64 offsets (T·d may pass 2³¹). An index vector may be gathered (the
  source id s(c) of each packed unit, ``source_ids``), so ``ω[s(c), j]`` is
  ``load_tile(omega, source_ids(src, c, R), j, ...)``.

The host side (autotune configs, launcher utilities) is ``common.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
def source_ids(src_ptr, offs_c, R):
    """s(c) of the packed units ``offs_c`` (0 for c >= R): the row of ω or the column of row_scale
    that scales unit c, for ``load_tile``'s gathered index vector."""
    return tl.load(src_ptr + offs_c, mask=offs_c < R, other=0)


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
