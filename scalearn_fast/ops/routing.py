"""The ops of router-weighted composition (docs/routing.md): gates, masked pooling, and the
exact per-row parameter merge of N equal-rank bottleneck adapters.

Gates. A router gives logits ``[..., N]``; ``gates`` turns them into coefficients:

- ``softmax``: softmax over the N sources;
- ``sigmoid``: an independent sigmoid per source (not normalised);
- ``topk``: the k largest logits, softmax over those k (renormalised), zeros elsewhere: a dense
  ``[..., N]`` tensor, so the composition stays two GEMMs.

Merge. With gates g [T, N] and equal ranks r, row t uses the merged adapter
``D̄ = Σ_i g_i D_i``, ``b̄ = Σ_i g_i b_i``, ``Ū = Σ_i g_i U_i``, ``B̄ = Σ_i g_i B_i``:

    out[t] = act(z·D̄ᵀ + b̄)·Ūᵀ + B̄ + residual

It is computed without building any merged weight:

    P  = z·Dᵀ + b_D                       one GEMM over the packed sources    [T, N·r]
    P̄  = Σ_i g_i P[:, i]                  a weighted reduce of P as [T, N, r]  [T, r]
    S  = [g_1 act(P̄), ..., g_N act(P̄)]   block i of S                        [T, N·r]
    out = S·Wᵀ + g·B + residual           one GEMM                            [T, d]

``merged_adapter_sum`` is that form (gradients for z, the gates and, when they require one, the
sources; the backward for frozen sources is written out in ``ops/routing_merge.py``);
``merged_adapter_sum_reference`` builds the merged weights row by row, the oracle the tests
compare against. The three forms share one signature and their checks (``_merge_form``).

With one gate vector per sequence (``gates [B, N]`` for ``z [B, L, d]``) the B merged adapters
are cheaper to build than the rank-N·r GEMMs are to run once L is larger than a few tokens
(``B·N·2·r·d`` multiply-adds to build, ``B·L·2·r·d`` to apply, against ``B·L·N·2·r·d``):
``merged_adapter_sum_per_sequence`` does that, with two batched rank-r GEMMs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import torch

from .activations import activation_fn, check_activation
from .packing import PackedSources, z_width_error
from .routing_merge import merged_rows

Tensor = torch.Tensor

GATES = ("softmax", "sigmoid", "topk")


def check_gate(gate: str, k: int | None, num_sources: int) -> int | None:
    """``k`` as the gate uses it (``None`` unless ``topk``); a ValueError naming the argument
    for an unknown gate, a missing or out-of-range ``k``, or a ``k`` given to another gate."""
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}; got {gate!r}")
    if gate != "topk":
        if k is not None:
            raise ValueError(f"k={k} is only used by gate='topk'; got gate={gate!r}")
        return None
    if k is None or isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"gate='topk' needs an integer k (1 <= k <= N={num_sources}); got k={k!r}")
    if not 1 <= k <= num_sources:
        raise ValueError(f"k={k} must be between 1 and the number of sources N={num_sources}")
    return k


def gates(logits: Tensor, gate: str, k: int | None = None) -> Tensor:
    """Coefficients ``[..., N]`` from router logits ``[..., N]`` (dense; zeros outside the top-k)."""
    n = logits.shape[-1]
    k = check_gate(gate, k, n)
    if gate == "softmax":
        return torch.softmax(logits, dim=-1)
    if gate == "sigmoid":
        return torch.sigmoid(logits)
    assert k is not None
    if k == n:
        return torch.softmax(logits, dim=-1)
    top, idx = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, dim=-1))


def masked_mean(z: Tensor, attention_mask: Tensor | None) -> Tensor:
    """The mean of ``z [B, L, d]`` over the real tokens of each sequence -> ``[B, d]``.

    ``attention_mask [B, L]`` is 1 (or True) for real tokens and 0 for padding; ``None`` means
    every token is real. A sequence with no real token pools to zeros.
    """
    if z.dim() != 3:
        raise ValueError(f"sequence pooling needs z as [batch, length, d]; got z of shape {list(z.shape)}")
    if attention_mask is None:
        return z.mean(dim=1)
    if tuple(attention_mask.shape) != tuple(z.shape[:2]):
        raise ValueError(
            f"attention_mask has shape {list(attention_mask.shape)}, expected {list(z.shape[:2])} "
            f"(the [batch, length] of z {list(z.shape)})"
        )
    m = attention_mask.to(device=z.device, dtype=z.dtype)
    total = (z * m.unsqueeze(-1)).sum(dim=1)
    return total / m.sum(dim=1, keepdim=True).clamp_min(1.0)


def check_gates(gates_: Tensor, z: Tensor, num_sources: int, name: str = "gates") -> None:
    """``gates`` must be a floating tensor ``[..., N]`` with z's leading dims, dtype and device."""
    if not isinstance(gates_, torch.Tensor):
        raise ValueError(f"{name} must be a tensor; got {type(gates_).__name__}")
    expect = (*z.shape[:-1], num_sources)
    if tuple(gates_.shape) != expect:
        raise ValueError(
            f"{name} has shape {list(gates_.shape)}, expected {list(expect)} "
            f"(z's leading dims {list(z.shape[:-1])} and N={num_sources} sources)"
        )
    if gates_.dtype != z.dtype or gates_.device != z.device:
        raise ValueError(f"{name} ({gates_.dtype}, {gates_.device}) must match z ({z.dtype}, {z.device})")


def check_equal_ranks(packed: PackedSources) -> int:
    """The common rank r; a ValueError listing the ranks when they differ (merge mode)."""
    r = packed.equal_rank
    if r is None:
        raise ValueError(
            f"merge mode needs sources of equal rank (the merged adapter is Σ_i g_i·A_i's parameters); "
            f"got ranks {list(packed.ranks)}"
        )
    return r


def _check_merge(
    z: Tensor, packed: PackedSources, g: Tensor, residual: Tensor | None, activation: str
) -> int:
    check_activation(activation)
    r = check_equal_ranks(packed)
    if z.shape[-1] != packed.hidden_size:
        raise z_width_error(z, packed.hidden_size)
    check_gates(g, z, packed.num_sources)
    if residual is not None and (residual.shape != z.shape or residual.dtype != z.dtype):
        raise ValueError(
            f"residual ({list(residual.shape)}, {residual.dtype}) must match z ({list(z.shape)}, {z.dtype})"
        )
    return r


class MergeForm(Protocol):
    """What the merge forms below share: ``(z, packed, gates, residual=None, *, activation)``."""

    def __call__(
        self, z: Tensor, packed: PackedSources, gates_: Tensor, residual: Tensor | None = None, *,
        activation: str = "relu",
    ) -> Tensor: ...  # fmt: skip


MergeCore = Callable[[Tensor, PackedSources, Tensor, "Tensor | None", int, str], Tensor]


def _merge_form(core: MergeCore, *, per_sequence: bool = False) -> MergeForm:
    """The public form of a merge ``core``: the checks, then ``core(z, packed, gates, residual,
    r, activation)`` on rows ``[T, d]`` and gates ``[T, N]`` (z's own layout ``[B, L, d]`` with
    gates ``[B, N]`` for ``per_sequence``), the output in z's shape."""

    def form(
        z: Tensor, packed: PackedSources, gates_: Tensor, residual: Tensor | None = None, *,
        activation: str = "relu",
    ) -> Tensor:  # fmt: skip
        if per_sequence:
            r = _check_per_sequence(z, packed, gates_, residual, activation)
            return core(z, packed, gates_, residual, r, activation)
        r = _check_merge(z, packed, gates_, residual, activation)
        d, n = packed.hidden_size, packed.num_sources
        res = None if residual is None else residual.reshape(-1, d)
        return core(z.reshape(-1, d), packed, gates_.reshape(-1, n), res, r, activation).reshape(z.shape)

    form.__name__ = form.__qualname__ = core.__name__
    form.__doc__ = core.__doc__
    return form


def _check_per_sequence(
    z: Tensor, packed: PackedSources, gates_: Tensor, residual: Tensor | None, activation: str
) -> int:
    if z.dim() != 3:
        raise ValueError(f"per-sequence merge needs z as [batch, length, d]; got z of shape {list(z.shape)}")
    b, n = z.shape[0], packed.num_sources
    if tuple(gates_.shape) != (b, n):
        raise ValueError(
            f"gates has shape {list(gates_.shape)}, expected {[b, n]} (one gate vector per sequence of "
            f"z {list(z.shape)}, N={n} sources)"
        )
    r = _check_merge(
        z[:, :1], packed, gates_[:, None, :], None if residual is None else residual[:, :1], activation
    )
    if residual is not None and residual.shape != z.shape:
        raise ValueError(f"residual has shape {list(residual.shape)}, expected z's {list(z.shape)}")
    return r


@_merge_form
def merged_adapter_sum(
    rows: Tensor, packed: PackedSources, g: Tensor, residual: Tensor | None, r: int, activation: str
) -> Tensor:
    """``act(z·D̄ᵀ + b̄)·Ūᵀ + B̄ + residual`` per row, with the merged parameters ``Σ_i g_i θ_i``
    of the row's gates ``gates_ [..., N]``, for ``z [..., d]``; no merged weight is built
    (two GEMMs over the packed sources, ``ops/routing_merge.py``)."""
    return merged_rows(rows, packed, g, residual, r, activation)


@functools.partial(_merge_form, per_sequence=True)
def merged_adapter_sum_per_sequence(
    z: Tensor, packed: PackedSources, gates_: Tensor, residual: Tensor | None, r: int, activation: str
) -> Tensor:
    """``merged_adapter_sum`` for one gate vector per sequence: ``gates_ [B, N]``, ``z [B, L, d]``.
    Builds each sequence's merged ``D̄ [r, d]``, ``b̄``, ``Ū [d, r]``, ``B̄`` (``[B, ...]`` tensors,
    one weighted sum each) and applies them with two batched GEMMs; differentiable by autograd."""
    b, n, d = z.shape[0], packed.num_sources, packed.hidden_size
    w_down = (gates_ @ packed.w_down.reshape(n, r * d)).view(b, r, d)
    b_down = gates_ @ packed.b_down.view(n, r)
    w_up = (gates_ @ packed.w_up.view(d, n, r).transpose(0, 1).reshape(n, d * r)).view(b, d, r)
    b_up = gates_ @ packed.b_up
    hidden = activation_fn(activation, torch.baddbmm(b_down.unsqueeze(1), z, w_down.transpose(1, 2)))
    out = torch.baddbmm(b_up.unsqueeze(1), hidden, w_up.transpose(1, 2))
    return out if residual is None else out + residual


@_merge_form
def merged_adapter_sum_reference(
    rows: Tensor, packed: PackedSources, g: Tensor, residual: Tensor | None, r: int, activation: str
) -> Tensor:
    """The oracle: for every row, build D̄, b̄, Ū, B̄ = Σ_i g_i·(D_i, b_i, U_i, B_i) and run that
    one adapter (slow on purpose; differentiable by autograd)."""
    n = packed.num_sources
    outs = []
    for t in range(rows.shape[0]):
        w_down = sum(g[t, i] * packed.w_down[i * r : (i + 1) * r] for i in range(n))
        b_down = sum(g[t, i] * packed.b_down[i * r : (i + 1) * r] for i in range(n))
        w_up = sum(g[t, i] * packed.w_up[:, i * r : (i + 1) * r] for i in range(n))
        b_up = sum(g[t, i] * packed.b_up[i] for i in range(n))
        outs.append(activation_fn(activation, rows[t] @ w_down.T + b_down) @ w_up.T + b_up)
    out = torch.stack(outs) if outs else torch.zeros_like(rows)
    return out if residual is None else out + residual
