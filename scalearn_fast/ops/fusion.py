"""``adapter_fusion``: the `adapters` library's AdapterFusion over N frozen bottleneck adapters.

Exact semantics (``adapters`` 1.3: ``BertFusion.forward`` fed by ``BottleneckLayer.compose_fuse``).
Per token t, with z_t the adapter input (``LN(h + x)``), c_t the query input (z_t, or h_t when
the config has ``query_before_ln``), ρ_t the residual (h_t for Pfeiffer adapters), s_i the
adapters' ``scaling``:

    a_ti  = s_i ⊙ (W_up_i · act(W_down_i · z_t + b_down_i) + b_up_i)   (no residual)
    e_ti  = a_ti + ρ_t  if residual_before  else a_ti                 (keys AND values)
    σ_ti  = (W_q · c_t + b_q) · (W_k · e_ti + b_k)                   (a missing projection is
                                                                      the identity)
    p_t   = softmax_i(dropout_p(σ_t) / τ)                            (dropout: training only,
                                                                      on the [T, N] scores)
    out_t = Σ_i p_ti · W_v e_ti  (+ ρ_t unless residual_before)      (W_v: no bias)

Where each part lives:
- ``fusion_args``: ``FusionWeights`` (the weights and settings of one call) and the checks;
- ``fusion_reference``: the loop above (the oracle);
- ``fusion_math``: the shared algebra (scores through one GEMM of width R, the dropout shift,
  the weight folds);
- ``fusion_autograd``: the differentiable fast path (``torch``, ``triton``, ``auto``);
- ``fusion_infer``: the eval path on weights folded once (``AdapterFusionLayer``).
docs/fusion.md derives the rewrites (R1-R5) from the two-GEMM layout of docs/design.md and says
when each is exact. Dropout draws its mask with ``F.dropout`` on the ``[T, N]`` scores in every
backend, as the library does on its ``[B, S, N]`` scores: under one RNG state all backends (and
the library) drop the same entries.
"""

from __future__ import annotations

import torch

from .backends import resolve_backend
from .fusion_args import FusionCall, FusionWeights, check_fusion_inputs, scaling_as_omega
from .fusion_autograd import adapter_fusion_autograd
from .fusion_reference import adapter_fusion_reference
from .packing import PackedSources, check_activation, check_inputs, taking_weights

__all__ = ["FusionWeights", "adapter_fusion", "adapter_fusion_packed", "adapter_fusion_weights"]


def adapter_fusion_weights(
    z: torch.Tensor,
    packed: PackedSources,
    weights: FusionWeights,
    residual: torch.Tensor | None = None,
    *,
    query_input: torch.Tensor | None = None,
    training: bool = False,
    activation: str = "relu",
    backend: str = "auto",
) -> torch.Tensor:
    """``adapter_fusion`` on packed sources and a ``FusionWeights``, after checking them all."""
    if not isinstance(z, torch.Tensor):
        raise ValueError(f"z must be a tensor; got {type(z).__name__}")
    check_activation(activation)
    check_inputs(z, packed, weights.scaling, residual)
    check_fusion_inputs(z, weights, residual, query_input)
    backend = resolve_backend(backend, z.device)
    d = packed.hidden_size
    z2 = z.reshape(-1, d)
    c2 = z2 if query_input is None else query_input.reshape(-1, d)
    rho2 = None if residual is None else residual.reshape(-1, d)
    dropping = training and weights.dropout_p > 0.0
    call = FusionCall(z2, c2, rho2, packed, weights, dropping, activation, backend)
    path = adapter_fusion_reference if backend == "reference" else adapter_fusion_autograd
    return path(call).reshape(z.shape)


def adapter_fusion_packed(
    z: torch.Tensor,
    packed: PackedSources,
    query_weight: torch.Tensor | None,
    query_bias: torch.Tensor | None,
    key_weight: torch.Tensor | None,
    key_bias: torch.Tensor | None,
    value_weight: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    *,
    query_input: torch.Tensor | None = None,
    scaling: float | torch.Tensor = 1.0,
    temperature: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = False,
    residual_before: bool = False,
    activation: str = "relu",
    backend: str = "auto",
) -> torch.Tensor:
    """AdapterFusion of N bottleneck adapters, exactly as ``adapters``' ``BertFusion`` (module doc).

    Args:
        z: adapter input ``[..., d]`` (``LN(h + x)`` in a transformer layer).
        packed: the N sources, packed by ``pack_sources``.
        query_weight, query_bias, key_weight, key_bias: ``nn.Linear(d, d)`` weights ``[d, d]``
            and biases ``[d]``; ``None`` weights mean the config's query/key=False (identity).
        value_weight: ``[d, d]`` (no bias), or ``None`` for value=False ("static" fusion).
        residual: ``ρ`` (h for Pfeiffer adapters), added to the output, or with
            ``residual_before`` to every key and value.
        query_input: the query's input when it is not z (``query_before_ln``: h).
        scaling: the adapters' output scaling (float, ``[N]``, ``[N, 1]`` or ``[N, d]``).
        temperature: τ dividing the (dropped-out) scores.
        dropout_p, training: dropout on the scores, applied only when ``training``.
        activation: the adapters' non-linearity.
        backend: ``reference``, ``torch``, ``triton`` or ``auto``.
    """
    if not isinstance(z, torch.Tensor):
        raise ValueError(f"z must be a tensor; got {type(z).__name__}")
    check_activation(activation)
    weights = FusionWeights(
        query_weight, query_bias, key_weight, key_bias, value_weight, scaling_as_omega(scaling, packed, z),
        temperature, dropout_p, residual_before,
    )  # fmt: skip
    return adapter_fusion_weights(
        z, packed, weights, residual, query_input=query_input, training=training, activation=activation,
        backend=backend,
    )  # fmt: skip


adapter_fusion = taking_weights(adapter_fusion_packed, "adapter_fusion")
