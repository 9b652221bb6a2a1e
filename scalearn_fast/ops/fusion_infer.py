"""AdapterFusion inference on weights folded once (docs/fusion.md, R5): the eval path of
``AdapterFusionLayer`` (no score dropout, nothing to differentiate).

The fold lays every source out as one block of ``b = max r_i + 1`` units: its r_i bottleneck
units, zero padding up to ``max r_i``, and one constant unit whose pre-activation is 1 (weight
0, bias 1). With ``fold_weights``' score weight X' = W_qᵀ·W_k·[U | Cᵀ], score bias b_q·W_k·[U | Cᵀ],
``up_value = W_v·U`` and ``bias_value = C·W_vᵀ``, per source i and unit k:

    pre[i, k]   = D_i[k]·z + b_D_i[k]   (constant unit: 1)
    Π[i, k]     = X'_i[k]·c + bias[k]   (constant unit: the bias score u·C_i)
    value[i, k] = up_value_i[:, k]      (constant unit: bias_value_i)

so that, with S = act(pre) (the constant unit stays 1; padding stays 0 and meets zero rows),

    σ_ti = Σ_k S[t, i, k]·Π[t, i, k]            one batched dot product, [T, N]
    out_t = Σ_{i,k} p_ti·S[t, i, k]·value[i, k] (+ ρ_t, or W_v·ρ_t under residual_before)

A call is one GEMM for S and Π (two with a separate query input), a dot product per source,
a ``[T, N]`` softmax, an in-place scaling and one GEMM; no Q, K or V GEMM, no index lookups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .activations import activation_fn, overwriting_activation
from .fusion_args import FusionWeights
from .fusion_math import fold_weights
from .packing import PackedSources, z_width_error

_KEEPS_ONE = ("relu", "identity")  # act(1) == 1 and act(0) == 0: applied to whole blocks


@dataclass(frozen=True)
class FusionFold:
    """AdapterFusion's fixed weights folded for inference (the module docstring's layout).

    ``merged`` (the query input is z): ``weight [d, 2·N·b]`` = [pre | Π], one GEMM. Otherwise
    ``weight [d, N·b]`` (pre) and ``score_weight [d, N·b]`` (Π, applied to the query input)."""

    weight: torch.Tensor  # [d, N·b] or [d, 2·N·b]
    bias: torch.Tensor
    score_weight: torch.Tensor | None  # [d, N·b] when not merged
    score_bias: torch.Tensor | None
    value: torch.Tensor  # [N·b, d]
    residual_value: torch.Tensor | None  # W_vᵀ [d, d], for W_v·ρ under residual_before
    hidden_size: int
    num_sources: int
    block: int  # b = max r_i + 1
    merged: bool
    residual_before: bool
    activation: str


def _blocks(packed: PackedSources) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(unit columns [R], constant columns [N], b)``: where each bottleneck unit and each
    source's constant unit sit in the ``N·b`` block layout."""
    b = max(packed.ranks) + 1
    device = packed.w_down.device
    units = [i * b + k for i, r in enumerate(packed.ranks) for k in range(r)]
    const = [i * b + b - 1 for i in range(packed.num_sources)]
    # dtype given: an empty list (every rank 0) would otherwise make a float index tensor
    index = dict(dtype=torch.long, device=device)
    return torch.tensor(units, **index), torch.tensor(const, **index), b


def fold_fusion(
    packed: PackedSources,
    weights: FusionWeights,
    *,
    merged: bool,
    dtype: torch.dtype,
    activation: str,
) -> FusionFold:
    """Fold AdapterFusion's weights for inference, in float64 on CPU or float32 elsewhere, then
    cast to ``dtype``. The key bias drops out: it adds the same score to every adapter, which
    softmax ignores without score dropout (R2)."""
    acc = torch.float64 if packed.w_down.device.type == "cpu" else torch.float32
    n, d, r = packed.num_sources, packed.hidden_size, packed.total_rank
    units, const, b = _blocks(packed)
    with torch.no_grad():
        score_weight, score_bias, up_value, bias_value = fold_weights(packed, weights, acc)
        pre_w = score_weight.new_zeros(d, n * b)
        pre_w[:, units] = packed.w_down.to(acc).T
        pre_b = score_weight.new_zeros(n * b)
        pre_b[units] = packed.b_down.to(acc)
        pre_b[const] = 1.0
        pi_w = score_weight.new_zeros(d, n * b)
        pi_w[:, units], pi_w[:, const] = score_weight[:, :r], score_weight[:, r:]
        pi_b = score_weight.new_zeros(n * b)
        if score_bias is not None:
            pi_b[units], pi_b[const] = score_bias[:r], score_bias[r:]
        value = score_weight.new_zeros(n * b, d)
        value[units], value[const] = up_value.T, bias_value
        if merged:
            weight, bias = torch.cat([pre_w, pi_w], 1), torch.cat([pre_b, pi_b])
            score_w = score_b = None
        else:
            weight, bias, score_w, score_b = pre_w, pre_b, pi_w, pi_b
        vw = weights.value_weight
        residual_value = vw.detach().T if weights.residual_before and vw is not None else None

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dtype).contiguous()

    return FusionFold(
        cast(weight), cast(bias), cast(score_w), cast(score_b), cast(value), cast(residual_value),
        d, n, b, merged, weights.residual_before, activation,
    )  # fmt: skip


FusionRunner = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None, float], torch.Tensor]


def folded_runner(fold: FusionFold) -> FusionRunner:
    """Inference AdapterFusion on ``fold`` (module docstring) prepared once:
    ``run(z, residual, query_input, temperature)``. The layers' eval path keeps one per cached
    fold, so a call is the ATen operations below and nothing else. The caller checks the
    residual and the query input against z (shapes, dtype, device)."""
    d, n, b = fold.hidden_size, fold.num_sources, fold.block
    weight, bias, value = fold.weight, fold.bias, fold.value
    score_weight, score_bias, residual_value = fold.score_weight, fold.score_bias, fold.residual_value
    merged, activation = fold.merged, fold.activation
    whole_blocks = activation in _KEEPS_ONE
    act = overwriting_activation(activation)
    softmax, vecdot, addmm = torch.softmax, torch.linalg.vecdot, torch.addmm

    def run(
        z: torch.Tensor,
        residual: torch.Tensor | None,
        query_input: torch.Tensor | None,
        temperature: float,
    ) -> torch.Tensor:
        if z.shape[-1] != d:
            raise z_width_error(z, d)
        flat = z.dim() == 2  # no reshapes in or out
        z2 = z if flat else z.reshape(-1, d)
        t = z2.shape[0]
        y = addmm(bias, z2, weight)
        if merged:
            hidden, projected = y.view(t, 2, n, b).unbind(1)
        else:
            hidden = y.view(t, n, b)
            c2 = query_input.reshape(-1, d)  # type: ignore[union-attr]
            projected = addmm(score_bias, c2, score_weight).view(t, n, b)
        if whole_blocks:  # act(1) == 1, act(0) == 0: the constant and padding units stay
            hidden = act(hidden)
        else:
            units = hidden[..., :-1]
            units.copy_(activation_fn(activation, units))
        scores = vecdot(hidden, projected)  # [T, N]
        if temperature != 1.0:
            scores = scores / temperature
        hidden.mul_(softmax(scores, -1).unsqueeze(-1))  # S ⊙ p[src]
        mixed = hidden.view(t, n * b)
        if residual is None:
            out = mixed @ value
        else:
            rho = residual if flat else residual.reshape(-1, d)
            if residual_value is not None:  # Σ p_i (a_i + ρ) = Σ p_i a_i + ρ, then W_v
                rho = rho @ residual_value
            out = addmm(rho, mixed, value)
        return out if flat else out.view_as(z)

    return run


def adapter_fusion_folded(
    z: torch.Tensor,
    fold: FusionFold,
    residual: torch.Tensor | None = None,
    query_input: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Inference AdapterFusion on folded weights (module docstring): ``folded_runner(fold)``
    for one call. The caller checks z, the residual and the query input against the fold."""
    return folded_runner(fold)(z, residual, query_input, temperature)
