"""``ScaLearnLayer``: N frozen source adapters and learned scales ω for one transformer layer.

Sub-layer form (docs/design.md), with ``h`` the FFN output, ``x`` its residual input and
``LN`` the layer's own pre-trained output LayerNorm:

    z = LN(h + x)
    y = LN(Σ_i ω_i ⊙ A_i(z) + h + x)

At a pre-LN site (``pre_ln=True``: mBART, T5, ...; the LayerNorm runs before the FFN) there is
no LayerNorm around the composition, as in the `adapters` library there:

    y = Σ_i ω_i ⊙ A_i(h + x) + h + x

Variants: ``scalearn`` (ω [N, d] per layer), ``scalearn_uniform`` (ω [N, 1] per layer),
``scalearn++`` and ``scalearn_uniform++`` (one ω shared by every layer: pass the same
Parameter to each layer, e.g. from ``init_omega``). ω is unconstrained, initialised
N(2/N, 0.001), and dropped out in training (p = 0.3; 0.0 for ``scalearn_uniform++``).

In eval mode with no gradient needed, the ω-scaled up projections and bias are folded
once and cached with everything else a call needs (``_inference_plan``); the cache is
invalidated when ω or the sources change (in place or replaced).
"""

from __future__ import annotations

from typing import NamedTuple, Unpack

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import layers_base
from .layers_base import (
    FrozenSources,
    SiteOptions,
    check_matches_z,
    check_residual_pair,
    check_sublayer_inputs,
    layer_norm_of,
    layer_norm_parts,
)
from .ops.algebra import scale_up_projections
from .ops.backends import resolve_backend
from .ops.composition import Composition
from .ops.dispatch import inference_runner
from .ops.packing import TensorOrList, check_inputs
from .ops.scaled_adapter_sum import scaled_adapter_sum_packed
from .ops.torch_backend import Runner


class _InferencePlan(NamedTuple):
    """What an eval-mode call needs besides z and the residual, checked and cast once."""

    run: Runner  # ``ops.dispatch.inference_runner`` over the fields below: run(z, residual)
    sources_and_coefficients: tuple  # Composition's fields from w_down through row_scale
    backend: str  # the resolved backend ``run`` computes on

    def folded_weights(self) -> tuple[torch.Tensor, ...] | None:
        """``(D, b_D, U, c)`` when ``run`` is ``torch_backend.folded_runner`` over them (the torch
        backend, ω applied, no per-row scale), else None: what the native site computes with."""
        w_down, b_down, _, _, _, _, up, bias, row_scale = self.sources_and_coefficients
        if self.backend != "torch" or up is None or row_scale is not None:
            return None
        return w_down, b_down, up, bias


def _plan(fields: tuple, activation: str, backend: str) -> _InferencePlan:
    """The plan of ``fields`` (Composition's fields from w_down through row_scale, ω applied)."""
    template = Composition(None, *fields, None, activation)  # type: ignore[arg-type]
    return _InferencePlan(inference_runner(template, backend), fields, backend)


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
        pre_ln: ``forward`` is the pre-LN sub-layer ``Σ ω_i ⊙ A_i(h + x) + h + x`` (no
            LayerNorm; ``layer_norm`` must be None).
    """

    def __init__(
        self,
        *sources: TensorOrList,
        variant: str = "scalearn",
        omega: nn.Parameter | None = None,
        omega_dropout: float | None = None,
        pre_ln: bool = False,
        **site: Unpack[SiteOptions],
    ) -> None:
        super().__init__(*sources, pre_ln=pre_ln, **site)
        self.variant = check_variant(variant)
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

    def effective_omega(self) -> torch.Tensor:
        """ω with dropout applied in training (each call draws its own mask)."""
        return F.dropout(self.omega, self.omega_dropout, self.training)

    def _inference_plan(self, z: torch.Tensor, *others: torch.Tensor | None) -> _InferencePlan | None:
        """The plan of an eval-mode call with nothing to differentiate (eval mode, a fused
        backend, no input or parameter needing a gradient, eager), else ``None``: the sources
        with ω folded in, in z's dtype, contiguous, and the inference runner over them on the
        resolved backend, built (and checked) once. Rebuilt when ω or the sources change (in
        place or replaced), after an optimizer step, or when z's dtype or device, the backend or
        the activation does; a call then only checks z and the residual. This keeps the layer's
        host time per call near that of its two GEMMs (a model at the default shape is host-bound on a GPU):
        attributes are read from ``__dict__`` and ``_parameters`` (``nn.Module.__getattr__``
        costs per access), in one frame."""
        attrs = self.__dict__
        backend = attrs["backend"]
        if attrs["training"] or backend == "reference" or torch.compiler.is_compiling():
            return None
        params = attrs["_parameters"]
        if torch.is_grad_enabled() and (
            any(t is not None and t.requires_grad for t in (z, *others))
            or any(p.requires_grad for p in params.values())
        ):
            return None
        # weights_key of the five weights, written out: a loop over them costs several times more
        omega, w_down, b_down, w_up, b_up = (
            params["omega"], params["w_down"], params["b_down"], params["w_up"], params["b_up"],
        )  # fmt: skip
        try:
            key = (
                z.dtype, z.device, backend, attrs["activation"], layers_base._optimizer_steps,
                omega.data_ptr(), omega._version, w_down.data_ptr(), w_down._version,
                b_down.data_ptr(), b_down._version, w_up.data_ptr(), w_up._version,
                b_up.data_ptr(), b_up._version,
            )  # fmt: skip
        except RuntimeError:  # inference tensors have no version counter: nothing is cached
            return self._build_plan(z)
        folded = attrs["_folded"]
        if folded is None or folded[0] != key:
            folded = attrs["_folded"] = (key, self._build_plan(z))
        return folded[1]

    def _build_plan(self, z: torch.Tensor) -> _InferencePlan:
        if not z.is_floating_point():  # checked here: z's dtype is part of the plan's key
            raise ValueError(f"z must be a floating-point tensor; got dtype {z.dtype}")
        omega = self._parameters["omega"]
        backend = resolve_backend(self.backend, z.device)
        packed = self.packed().to(z.dtype)
        check_inputs(z, packed, omega.to(z.dtype), None)  # devices and dtypes, once
        with torch.no_grad():
            up, bias = scale_up_projections(self.w_up, self.b_up, omega, self.source_index)
        fields = (
            packed.w_down.detach().contiguous(), packed.b_down.detach().contiguous(),
            packed.w_up.detach(), packed.b_up.detach(), self.source_index,
            None, up.to(z.dtype).contiguous(), bias.to(z.dtype).contiguous(), None,
        )  # fmt: skip
        return _plan(fields, self.activation, backend)

    def compose(self, z: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``Σ_i ω_i ⊙ A_i(z) + residual`` for ``z [..., d]``."""
        if not isinstance(z, torch.Tensor):
            raise ValueError(f"z must be a tensor; got {type(z).__name__}")
        if residual is not None and not isinstance(residual, torch.Tensor):
            raise ValueError(f"residual must be a tensor or None; got {type(residual).__name__}")
        plan = self._inference_plan(z, residual)
        if plan is not None:
            check_matches_z("residual", residual, z)
            return plan.run(z, residual)
        packed = self.packed().to(z.dtype)
        omega = self.effective_omega().to(z.dtype)
        return scaled_adapter_sum_packed(
            z, packed, omega, residual, activation=self.activation, backend=self.backend
        )

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        """The full sub-layer ``LN(Σ ω_i ⊙ A_i(LN(h + x)) + h + x)``; needs ``layer_norm``.
        With ``pre_ln``: ``forward_pre_ln``."""
        if self.__dict__["pre_ln"]:
            return self.forward_pre_ln(hidden_states, input_tensor)
        if hidden_states.shape != input_tensor.shape:  # forward_summed checks the LayerNorm
            check_sublayer_inputs("ScaLearnLayer", layer_norm_of(self), hidden_states, input_tensor)
        return self.forward_summed(hidden_states + input_tensor)

    def forward_pre_ln(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        """The pre-LN sub-layer ``Σ ω_i ⊙ A_i(h + x) + h + x`` (no LayerNorm): ``compose(s, s)``
        with ``s = h + x``."""
        check_residual_pair(hidden_states, input_tensor)
        return self.forward_summed(hidden_states + input_tensor)

    def forward_summed(self, summed: torch.Tensor) -> torch.Tensor:
        """The sub-layer given the FFN's residual sum ``s = h + x`` only (sites that see h + x
        and not h apart: mBART's layer, BART's and Marian's final LayerNorm): ``forward`` or
        ``forward_pre_ln`` without the addition, so a decoding step spends no op on adding zeros."""
        s = summed
        if self.__dict__["pre_ln"]:
            plan = self._inference_plan(s)
            if plan is not None:
                return plan.run(s, s)
            return self.compose(s, residual=s)
        layer_norm, ln = layer_norm_parts(self)
        if layer_norm is None:
            check_sublayer_inputs("ScaLearnLayer", layer_norm, s, s)  # raises: names what is missing
        z = layer_norm(s) if ln is None else torch.layer_norm(s, *ln)
        plan = self._inference_plan(z)  # of z: the LayerNorm's weights may train
        out = plan.run(z, s) if plan is not None else self.compose(z, residual=s)
        return layer_norm(out) if ln is None else torch.layer_norm(out, *ln)

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant!r}, num_sources={self.num_sources}, ranks={list(self.ranks)}, "
            f"hidden_size={self.hidden_size}, omega_dropout={self.omega_dropout}, backend={self.backend!r}"
            + (", pre_ln=True" if self.pre_ln else "")
        )
