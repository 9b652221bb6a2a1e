"""``ScaLearnLayer``: N frozen source adapters and learned scales ω for one transformer layer.

Sub-layer form (DESIGN.md §1), with ``h`` the FFN output, ``x`` its residual input and
``LN`` the layer's own pre-trained output LayerNorm:

    z = LN(h + x)
    y = LN(Σ_i ω_i ⊙ A_i(z) + h + x)

Variants: ``scalearn`` (ω [N, d] per layer), ``scalearn_uniform`` (ω [N, 1] per layer),
``scalearn++`` and ``scalearn_uniform++`` (one ω shared by every layer: pass the same
Parameter to each layer, e.g. from ``init_omega``). ω is unconstrained, initialised
N(2/N, 0.001), and dropped out in training (p = 0.3; 0.0 for ``scalearn_uniform++``).

In eval mode with no gradient needed, the ω-scaled up projections and bias are folded
once and cached; the cache is invalidated when ω changes (in place or replaced).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers_base import FrozenSources, check_sublayer_inputs
from .ops.packing import TensorOrList, check_activation
from .ops.scaled_adapter_sum import scaled_adapter_sum_folded, scaled_adapter_sum_packed
from .ops.torch_backend import fold_omega

VARIANTS = ("scalearn", "scalearn_uniform", "scalearn++", "scalearn_uniform++")


def is_uniform(variant: str) -> bool:
    return check_variant(variant).startswith("scalearn_uniform")


def is_shared(variant: str) -> bool:
    return check_variant(variant).endswith("++")


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    return variant


def default_omega_dropout(variant: str) -> float:
    return 0.0 if check_variant(variant) == "scalearn_uniform++" else 0.3


def init_omega(
    num_sources: int,
    hidden_size: int,
    variant: str = "scalearn",
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> nn.Parameter:
    """A fresh ω Parameter, N(2/N, 0.001), of shape [N, d] or [N, 1] (uniform variants)."""
    cols = 1 if is_uniform(variant) else hidden_size
    omega = torch.empty(num_sources, cols, dtype=dtype, device=device)
    omega.normal_(2.0 / num_sources, 0.001, generator=generator)
    return nn.Parameter(omega)


class ScaLearnLayer(FrozenSources):
    """ScaLearn composition of N frozen bottleneck adapters for one layer.

    Args:
        w_down, b_down, w_up, b_up: the sources in nn.Linear layout, stacked
            (``[N, r, d]``, ``[N, r]``, ``[N, d, r]``, ``[N, d]``) or per-source lists.
        variant: one of ``VARIANTS``.
        omega: a shared ω Parameter (the ``++`` variants pass the same one to every layer);
            a fresh one is made when omitted.
        activation: the adapters' non-linearity.
        omega_dropout: dropout probability on ω in training (default by variant).
        backend: ``auto``, ``torch``, ``triton`` or ``reference``.
        layer_norm: the layer's pre-trained output LayerNorm, used by ``forward``.
        source_names: optional names of the N sources, in order.
    """

    def __init__(
        self,
        w_down: TensorOrList,
        b_down: TensorOrList,
        w_up: TensorOrList,
        b_up: TensorOrList,
        *,
        variant: str = "scalearn",
        omega: nn.Parameter | None = None,
        activation: str = "relu",
        omega_dropout: float | None = None,
        backend: str = "auto",
        layer_norm: nn.Module | None = None,
        source_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(w_down, b_down, w_up, b_up, source_names)
        self.variant = check_variant(variant)
        self.activation = check_activation(activation)
        self.backend = backend
        n, d = self.num_sources, self.hidden_size
        if omega is None:
            omega = init_omega(n, d, variant, dtype=self.w_down.dtype, device=self.w_down.device)
        expect = (n, 1 if is_uniform(variant) else d)
        if tuple(omega.shape) != expect:
            raise ValueError(f"omega has shape {list(omega.shape)}, expected {list(expect)} for {variant}")
        self.omega = omega if isinstance(omega, nn.Parameter) else nn.Parameter(omega)
        self.omega_dropout = default_omega_dropout(variant) if omega_dropout is None else omega_dropout
        if not 0.0 <= self.omega_dropout < 1.0:
            raise ValueError(f"omega_dropout must be in [0, 1); got {self.omega_dropout}")
        self.layer_norm = layer_norm
        self._folded: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def effective_omega(self) -> torch.Tensor:
        """ω with dropout applied in training (each call draws its own mask)."""
        return F.dropout(self.omega, self.omega_dropout, self.training)

    def _needs_grad(self, *inputs: torch.Tensor | None) -> bool:
        tensors = (*inputs, self.omega, self.w_down, self.b_down, self.w_up, self.b_up)
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)

    def _folded_up(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached (U, bias) for inference; rebuilt when ω, the sources or the dtype change."""
        key = (
            self.omega._version,
            self.omega.data_ptr(),
            self.w_up._version,
            self.w_up.data_ptr(),
            self.b_up._version,
            dtype,
            self.omega.device,
        )
        if self._folded is None or self._folded[0] != key:
            with torch.no_grad():
                u, bias = fold_omega(self.w_up, self.b_up, self.omega, self.source_index)
            self._folded = (key, u.to(dtype), bias.to(dtype))
        return self._folded[1], self._folded[2]

    def compose(self, z: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``Σ_i ω_i ⊙ A_i(z) + residual`` for ``z [..., d]``."""
        packed = self.packed().to(z.dtype)
        fold = self.backend != "reference"  # the reference backend stays the literal loop
        if (
            fold
            and not self.training
            and not self._needs_grad(z, residual)
            and not torch.compiler.is_compiling()
        ):
            u, bias = self._folded_up(z.dtype)
            return scaled_adapter_sum_folded(
                z, packed, u, bias, residual, activation=self.activation, backend=self.backend
            )
        omega = self.effective_omega().to(z.dtype)
        return scaled_adapter_sum_packed(
            z, packed, omega, residual, activation=self.activation, backend=self.backend
        )

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        """The full sub-layer ``LN(Σ ω_i ⊙ A_i(LN(h + x)) + h + x)``; needs ``layer_norm``."""
        layer_norm = check_sublayer_inputs("ScaLearnLayer", self.layer_norm, hidden_states, input_tensor)
        pre_ln = hidden_states + input_tensor
        return layer_norm(self.compose(layer_norm(pre_ln), residual=pre_ln))

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant!r}, num_sources={self.num_sources}, ranks={list(self.ranks)}, "
            f"hidden_size={self.hidden_size}, omega_dropout={self.omega_dropout}, backend={self.backend!r}"
        )
