"""The oracle: the composition as the readable per-source loop.

    out = Σ_i c_i ⊙ (W_up_i · act(W_down_i · z + b_down_i) + b_up_i) + residual,   c_i = w[:, i]·ω_i

(with a task bank, ω_i is each row's Ω[task_index[t], i]).

This is what `adapters` computes, one adapter at a time, each materialising a [T, d] output.
It is slow on purpose and differentiable by plain autograd; every fast backend is tested
against it in float64. As a backend (``forward``/``backward`` over a ``Composition``) it also
runs calls whose ω was applied beforehand (``scaled_up``), block by block.
"""

from __future__ import annotations

import torch

from .activations import activation_fn, activation_grad  # noqa: F401  (re-exported)
from .composition import GRAD_FIELDS, Composition, Gradients
from .packing import PackedSources

Tensor = torch.Tensor


def _blocks(ranks_or_index: tuple[int, ...]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for r in ranks_or_index:
        bounds.append((start, start + r))
        start += r
    return bounds


def _ranks(source_index: Tensor, num_sources: int) -> tuple[int, ...]:
    return tuple(torch.bincount(source_index, minlength=num_sources).tolist())


def compose(call: Composition, ranks: tuple[int, ...] | None = None) -> Tensor:
    """The loop over sources for one call (differentiable by autograd)."""
    n = call.num_sources
    ranks = _ranks(call.source_index, n) if ranks is None else ranks
    z = call.z
    out = torch.zeros_like(z) if call.residual is None else call.residual.clone()
    if call.scaled_up is not None:
        out = out + call.scaled_bias
    for i, (lo, hi) in enumerate(_blocks(ranks)):
        hidden = activation_fn(call.activation, z @ call.w_down[lo:hi].T + call.b_down[lo:hi])
        if call.scaled_up is not None:  # ω applied beforehand (its bias is already in)
            adapter_out = hidden @ call.scaled_up[:, lo:hi].T
        else:
            adapter_out = hidden @ call.w_up[:, lo:hi].T + call.b_up[i]
        if call.row_scale is not None:
            adapter_out = adapter_out * call.row_scale[..., i : i + 1]
        out = out + (adapter_out if call.scaled_up is not None else _coefficient(call, i) * adapter_out)
    return out


def _coefficient(call: Composition, i: int) -> Tensor:
    """ω_i [d|1], or with a task bank each row's Ω[k(t), i] [..., d|1]."""
    if call.omega_bank is None:
        return call.omega[i]
    rows = call.omega_bank[call.task_index.reshape(-1), i]
    return rows.reshape(*call.z.shape[:-1], rows.shape[-1])


def forward(call: Composition) -> tuple[Tensor, Tensor]:
    """``(out, pre)``; ``pre`` is an empty tensor: ``backward`` recomputes the loop."""
    return compose(call), call.z.new_empty(0)


def backward(call: Composition, pre: Tensor, grad_out: Tensor, needs: Gradients) -> Gradients:
    """Autograd through the loop, recomputed from the call's inputs."""
    wanted = [name for name in GRAD_FIELDS if getattr(needs, name)]
    with torch.enable_grad():
        leaves = {name: getattr(call, name).detach().requires_grad_() for name in wanted}
        out = compose(call._replace(**leaves))
        grads = torch.autograd.grad(out, list(leaves.values()), grad_out, allow_unused=True)
    return Gradients(**dict(zip(wanted, grads, strict=True)))


def scaled_adapter_sum_reference(
    z: torch.Tensor,
    packed: PackedSources,
    omega: torch.Tensor,
    residual: torch.Tensor | None = None,
    *,
    activation: str = "relu",
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loop for ``z [..., d]``; ``row_scale [..., N]`` optionally weights each source's output
    per token (a router, a gate, AdapterFusion's softmax): ``Σ_i row_scale[t, i] · ω_i ⊙ A_i(z_t)``."""
    call = Composition(
        z, packed.w_down, packed.b_down, packed.w_up, packed.b_up, packed.source_index,
        omega, None, None, row_scale, residual, activation=activation,
    )  # fmt: skip
    return compose(call, packed.ranks)
