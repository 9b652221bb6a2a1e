"""``AdapterFusionLayer``: N frozen source adapters fused by the `adapters` library's AdapterFusion.

Sub-layer form (the same as ``ScaLearnLayer``; docs/design.md), with ``h`` the FFN output, ``x`` its
residual input and ``LN`` the layer's own pre-trained output LayerNorm (Pfeiffer sources:
``residual_before_ln=True``, so the fusion residual is h):

    z = LN(h + x)
    y = LN(fusion(z, query_input = h if query_before_ln else z, residual = h) + x)

At a pre-LN site (``pre_ln=True``: mBART, T5, ...) there is no LayerNorm around it, as in the
`adapters` library there: ``z = h + x`` and ``y = fusion(z, ..., residual = h) + x``.

``fusion`` is ``ops.fusion.adapter_fusion`` (its docstring has the exact math; docs/fusion.md the
rewrites). In eval mode the fixed weights are folded once (``ops.fusion_infer``) and cached.
The trainable parameters are named as in the library's ``BertFusion`` (``query.weight``,
``query.bias``, ``key.weight``, ``key.bias``, ``value.weight``), so its state dict loads as is.

Temperature: with ``temperature=True`` the library starts at τ = 50 and lowers τ by 0.05 after
EVERY forward call (training or not) down to 1; this layer does the same. Like the library it
keeps τ outside the state dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Unpack

import torch
import torch.nn as nn

from . import layers_base
from .layers_base import (
    FrozenSources,
    SiteOptions,
    apply_layer_norm,
    check_matches_z,
    check_residual_pair,
    check_sublayer_inputs,
    layer_norm_parts,
)
from .ops.backends import resolve_backend
from .ops.fusion import adapter_fusion_weights
from .ops.fusion_args import FusionWeights, scaling_as_omega
from .ops.fusion_infer import FusionFold, FusionRunner, fold_fusion, folded_runner
from .ops.packing import TensorOrList, check_inputs

_PROJECTIONS = ("query", "key", "value")
_FOLDING_BACKENDS = ("auto", "torch")  # the backends whose eval path runs on the cached fold
START_TEMPERATURE = 50.0  # the library's annealing start; it falls by START / 1000 per call


class _FusionPlan(NamedTuple):
    """The eval path's cache: the inference fold and the runner over it (``ops.fusion_infer``)."""

    fold: FusionFold
    run: FusionRunner


def _bert_linear(d: int, bias: bool, like: torch.Tensor) -> nn.Linear:
    """nn.Linear(d, d) initialised as ``Adapter.init_bert_weights``: N(0, 0.02), zero bias."""
    lin = nn.Linear(d, d, bias=bias, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        lin.weight.normal_(0.0, 0.02)
        if bias:
            lin.bias.zero_()
    return lin


def fusion_options_from_config(config: Mapping[str, Any], default_dropout: float = 0.1) -> dict[str, Any]:
    """``AdapterFusionLayer`` keyword arguments from an ``adapters`` fusion config dict
    (``adapter_fusion_config.json``'s ``config``). ``dropout_prob=None`` means the model's
    ``attention_probs_dropout_prob``, passed here as ``default_dropout``."""
    dropout = config.get("dropout_prob")
    return dict(
        query=bool(config.get("query", True)),
        key=bool(config.get("key", True)),
        value=bool(config.get("value", True)),
        value_initialized=bool(config.get("value_initialized", True)),
        temperature=bool(config.get("temperature", False)),
        residual_before=bool(config.get("residual_before", False)),
        query_before_ln=bool(config.get("query_before_ln", False)),
        dropout=default_dropout if dropout is None else float(dropout),
    )


class AdapterFusionLayer(FrozenSources):
    """AdapterFusion of N frozen bottleneck adapters for one layer ("dynamic" config by default).

    Args:
        w_down, b_down, w_up, b_up: the sources in nn.Linear layout, stacked
            (``[N, r, d]``, ``[N, r]``, ``[N, d, r]``, ``[N, d]``) or per-source lists.
        query, key, value: whether the fusion has that projection (config ``query``/``key``/``value``).
        value_initialized: value starts as the identity with 1e-6 off the diagonal (library default).
        temperature: anneal τ from 50 to 1 (config ``temperature``); else τ = 1.
        dropout: dropout probability on the scores in training (``dropout_prob``, default the
            model's attention dropout, 0.1 for BERT).
        residual_before, query_before_ln: the library's config flags of the same names.
        scaling: the sources' output scaling (1.0 for Pfeiffer adapters).
        activation: the sources' non-linearity.
        backend: ``auto``, ``torch``, ``triton`` or ``reference``.
        layer_norm: the layer's pre-trained output LayerNorm, used by ``forward``.
        source_names: optional names of the N sources, in order.
        pre_ln: ``forward`` is the pre-LN sub-layer (no LayerNorm; ``layer_norm`` must be None).
    """

    def __init__(
        self,
        *sources: TensorOrList,
        query: bool = True,
        key: bool = True,
        value: bool = True,
        value_initialized: bool = True,
        temperature: bool = False,
        dropout: float = 0.1,
        residual_before: bool = False,
        query_before_ln: bool = False,
        scaling: float | torch.Tensor = 1.0,
        pre_ln: bool = False,
        **site: Unpack[SiteOptions],
    ) -> None:
        super().__init__(*sources, pre_ln=pre_ln, **site)
        d = self.hidden_size
        self.scaling = scaling
        like = self.w_down
        self.query = _bert_linear(d, True, like) if query else None
        self.key = _bert_linear(d, True, like) if key else None
        self.value = _bert_linear(d, False, like) if value else None
        if self.value is not None and value_initialized:
            with torch.no_grad():
                self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        self.dropout = dropout
        self.temperature = temperature
        self.T = START_TEMPERATURE if temperature else 1.0
        self.reduction = self.T / 1000.0
        self.residual_before = residual_before
        self.query_before_ln = query_before_ln

    def fusion_parameters(self) -> list[nn.Parameter]:
        """The trainable fusion weights (query, key, value)."""
        return [p for m in (self.query, self.key, self.value) if m is not None for p in m.parameters()]

    def regularization_loss(self) -> torch.Tensor | None:
        """The library's fusion regularisation ``0.01·‖I - W_v‖²`` (``get_fusion_regularization_loss``)."""
        if self.value is None or not self.value.weight.requires_grad:
            return None
        eye = torch.eye(self.hidden_size, dtype=self.value.weight.dtype, device=self.value.weight.device)
        return 0.01 * (eye - self.value.weight).pow(2).sum()

    def fusion_weights(self, like: torch.Tensor) -> FusionWeights:
        """This layer's weights and settings for one call, in ``like``'s dtype (differentiable
        casts; a float scaling becomes ω on ``like``'s device)."""
        query, key, value = self.query, self.key, self.value
        dtype, scaling = like.dtype, self.scaling
        if isinstance(scaling, torch.Tensor):
            scaling = scaling.to(dtype)
        omega = scaling_as_omega(scaling, self.packed(), like)
        return FusionWeights(
            None if query is None else query.weight.to(dtype),
            None if query is None or query.bias is None else query.bias.to(dtype),
            None if key is None else key.weight.to(dtype),
            None if key is None or key.bias is None else key.bias.to(dtype),
            None if value is None else value.weight.to(dtype),
            omega,
            self.T,
            self.dropout,
            self.residual_before,
        )

    def _weights(self) -> list[torch.Tensor | None]:
        """Every tensor the inference fold is made from (``None`` for an absent bias), read through
        ``_parameters`` and ``_modules`` (no module traversal or ``__getattr__``: this runs on
        every eval call)."""
        attrs = self.__dict__
        modules = attrs["_modules"]
        weights = [*attrs["_parameters"].values()]
        for name in _PROJECTIONS:
            module = modules.get(name)
            if module is not None:
                weights += module._parameters.values()
        scaling = attrs.get("scaling")  # a Parameter is in _parameters
        if isinstance(scaling, torch.Tensor):
            weights.append(scaling)
        return weights

    def _eval_fold(
        self, z: torch.Tensor, residual: torch.Tensor | None, query_input: torch.Tensor | None
    ) -> _FusionPlan | None:
        """The cached inference fold and its runner when this call may use it (eval, backend
        ``torch`` or ``auto``, nothing to differentiate, not under ``torch.compile``), else
        ``None``. Rebuilt when a source or fusion weight changes (in place or replaced), after an
        optimizer step, when the scaling, ``residual_before``, the activation or z's dtype or
        device changes."""
        attrs = self.__dict__
        if attrs["training"] or attrs["backend"] not in _FOLDING_BACKENDS or torch.compiler.is_compiling():
            return None
        if not z.is_floating_point():
            return None
        if torch.is_grad_enabled() and (
            z.requires_grad
            or (residual is not None and residual.requires_grad)
            or (query_input is not None and query_input.requires_grad)
            or any(w is not None and w.requires_grad for w in self._weights())
        ):
            return None
        merged = query_input is None
        scaling = attrs.get("scaling")  # a Parameter is in _parameters (and so in the key below)
        # what the fold is made from (the fold depends on residual_before and the activation,
        # plain attributes a user may set), then each weight's storage and version: written out
        # as one flat list (no per-weight tuples, no second walk over the weights)
        key: list = [
            z.dtype, z.device, merged, None if isinstance(scaling, torch.Tensor) else scaling,
            attrs["residual_before"], attrs["activation"], layers_base._optimizer_steps,
        ]  # fmt: skip
        try:
            for t in self._weights():
                if t is not None:
                    key += (t.data_ptr(), t._version)
        except RuntimeError:  # inference tensors have no version counter: nothing is cached
            return self._build_fold(z, merged)
        folded = attrs["_folded"]
        if folded is None or folded[0] != key:
            folded = attrs["_folded"] = (key, self._build_fold(z, merged))
        return folded[1]

    def _build_fold(self, z: torch.Tensor, merged: bool) -> _FusionPlan:
        resolve_backend(self.backend, z.device)  # a bad name fails here as elsewhere
        dtype = z.dtype
        packed = self.packed().to(dtype)
        fusion = self.fusion_weights(z)
        check_inputs(z, packed, fusion.scaling, None)  # devices and dtypes, once
        fold = fold_fusion(packed, fusion, merged=merged, dtype=dtype, activation=self.activation)
        return _FusionPlan(fold, folded_runner(fold))

    def compose(
        self,
        z: torch.Tensor,
        residual: torch.Tensor | None = None,
        query_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The library's ``BertFusion.forward`` on adapter input ``z [..., d]`` (anneals τ).

        In eval mode with nothing to differentiate (and not under ``torch.compile``), backends
        ``torch`` and ``auto`` fold the fixed weights once (``ops.fusion_infer``) and a call is
        two GEMMs and a softmax; ``triton`` keeps its kernels, ``reference`` its loop."""
        for name, t in (("z", z), ("residual", residual), ("query_input", query_input)):
            if not isinstance(t, torch.Tensor) and (t is not None or name == "z"):
                raise ValueError(
                    f"{name} must be a tensor{'' if name == 'z' else ' or None'}; got {type(t).__name__}"
                )
        return self._compose(z, residual, query_input)

    def _compose(
        self,
        z: torch.Tensor,
        residual: torch.Tensor | None,
        query_input: torch.Tensor | None,
        *,
        residual_checked: bool = False,
    ) -> torch.Tensor:
        """``compose`` without the type checks. ``residual_checked``: the caller made z from the
        residual (``forward_summed``), so they match by construction."""
        return self._compose_on(
            self._eval_fold(z, residual, query_input), z, residual, query_input, residual_checked
        )

    def _compose_on(
        self,
        plan: _FusionPlan | None,
        z: torch.Tensor,
        residual: torch.Tensor | None,
        query_input: torch.Tensor | None,
        residual_checked: bool,
    ) -> torch.Tensor:
        """``_compose`` given this call's ``_eval_fold`` (looked up once per call)."""
        attrs = self.__dict__
        temperature = attrs["T"]
        if plan is not None:
            if not residual_checked:
                check_matches_z("residual", residual, z)
            if query_input is not None:
                check_matches_z("query_input", query_input, z)
            if residual is None and plan.fold.residual_before:
                raise ValueError("residual_before=True adds the residual to keys and values; pass residual")
            out = plan.run(z, residual, query_input, temperature)
        else:
            out = adapter_fusion_weights(
                z,
                self.packed().to(z.dtype),
                self.fusion_weights(z),
                residual,
                query_input=query_input,
                training=self.training,
                activation=self.activation,
                backend=self.backend,
            )
        if temperature > 1.0:  # annealed down to 1 (nn.Module.__setattr__ is slow: skip it after)
            attrs["T"] = max(temperature - attrs["reduction"], 1.0)
        return out

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        """The full sub-layer ``LN(fusion(LN(h + x), residual=h) + x)``; needs ``layer_norm``.
        With ``pre_ln``: ``forward_pre_ln``."""
        if self.pre_ln:
            return self.forward_pre_ln(hidden_states, input_tensor)
        layer_norm = check_sublayer_inputs("AdapterFusionLayer", self.layer_norm, hidden_states, input_tensor)
        pre_ln = hidden_states + input_tensor
        if self.residual_before:  # h joins the keys and values; x comes after
            query_input = hidden_states if self.query_before_ln else None
            z = apply_layer_norm(layer_norm, pre_ln)
            return apply_layer_norm(layer_norm, self._compose(z, hidden_states, query_input) + input_tensor)
        if self.query_before_ln:
            z = apply_layer_norm(layer_norm, pre_ln)
            return apply_layer_norm(layer_norm, self._compose(z, pre_ln, hidden_states))
        return self.forward_summed(pre_ln)

    def forward_pre_ln(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        """The pre-LN sub-layer ``fusion(h + x, residual=h) + x`` (no LayerNorm)."""
        check_residual_pair(hidden_states, input_tensor)
        z = hidden_states + input_tensor
        query_input = hidden_states if self.query_before_ln else None
        if self.residual_before:  # h joins the keys and values; x comes after
            return self.compose(z, residual=hidden_states, query_input=query_input) + input_tensor
        return self.compose(z, residual=z, query_input=query_input)

    def forward_summed(self, summed: torch.Tensor) -> torch.Tensor:
        """The sub-layer given the FFN's residual sum ``s = h + x`` only (sites that see h + x
        and not h apart): ``forward`` or ``forward_pre_ln`` without the addition. Refused for
        ``residual_before`` and ``query_before_ln``, which need h apart."""
        attrs = self.__dict__
        if attrs["residual_before"] or attrs["query_before_ln"]:
            raise ValueError(
                "AdapterFusionLayer.forward_summed: residual_before and query_before_ln need the FFN "
                "output h apart from its residual; call forward(h, x)"
            )
        s = summed
        if attrs["pre_ln"]:
            plan = self._eval_fold(s, s, None)
            if plan is not None and attrs["T"] == 1.0:  # ``_compose``'s checks hold by construction
                return plan.run(s, s, None, 1.0)
            return self._compose_on(plan, s, s, None, True)
        layer_norm, ln = layer_norm_parts(self)
        if layer_norm is None:
            check_sublayer_inputs("AdapterFusionLayer", layer_norm, s, s)  # raises: names what is missing
        flat = s.reshape(-1, s.shape[-1])  # [T, d] throughout: one view in, one out
        z = layer_norm(flat) if ln is None else torch.layer_norm(flat, *ln)
        plan = self._eval_fold(z, flat, None)
        if plan is not None and attrs["T"] == 1.0:  # ``_compose``'s checks hold by construction
            out = plan.run(z, flat, None, 1.0)
        else:
            out = self._compose_on(plan, z, flat, None, True)
        return (layer_norm(out) if ln is None else torch.layer_norm(out, *ln)).view_as(s)

    def extra_repr(self) -> str:
        parts = [name for name in ("query", "key", "value") if getattr(self, name) is not None]
        return (
            f"num_sources={self.num_sources}, ranks={list(self.ranks)}, hidden_size={self.hidden_size}, "
            f"projections={parts}, dropout={self.dropout}, temperature={self.temperature}, "
            f"residual_before={self.residual_before}, query_before_ln={self.query_before_ln}, "
            f"backend={self.backend!r}" + (", pre_ln=True" if self.pre_ln else "")
        )
