"""Where the adapters go: one registry from ``config.model_type`` to the FFN output sub-layers.

The design (docs/design.md) puts every source adapter after the FFN output sub-layer of each transformer
layer. Post-LN models have two site styles:

* ``"output"`` (BERT, RoBERTa, XLM-RoBERTa, DeBERTa-v2): a module with ``dense``,
  ``dropout`` and ``LayerNorm`` whose ``forward(hidden_states, input_tensor)`` returns
  ``LayerNorm(dropout(dense(hidden_states)) + input_tensor)``.
* ``"post_ln"`` (BART and Marian encoder and decoder layers): the layer's ``final_layer_norm``,
  whose input is already ``h + x`` (FFN output plus its residual). Patching it is exact for
  adapters with ``residual_before_ln=True`` and ``original_ln_before/after=True``, which only
  ever see ``h + x``.

Pre-LN models run the LayerNorm before the FFN (``h = FFN(LN(x))``, output ``h + x``), so there
is no LayerNorm around the adapters: the `adapters` library's SeqBn there computes
``A(h + x) + h + x`` (its ``original_ln_before/after`` add the residual and find no LayerNorm).
The sub-layers run their ``pre_ln`` form (``layers.ScaLearnLayer``):

* ``"pre_ln_ff"`` (T5, mT5, encoder and decoder): the block's FFN sub-layer ``T5LayerFF``, whose
  ``forward(x)`` returns ``x + dropout(DenseReluDense(layer_norm(x)))``; the patch computes
  ``h`` the same way and hands the sub-layer ``h`` and ``x``.
* ``"pre_ln_layer"`` (mBART, M2M100/NLLB, encoder and decoder): the FFN is written inline in
  the layer's forward, so the patched module is the layer itself. Its first output is already
  ``h + x``, and the sub-layer gets it as ``h`` with ``x = 0``. The one difference from the
  library: in fp16 the encoder layer clamps ``h + x`` to the fp16 range before the adapters
  (the library clamps after them), which only matters for values already near overflow.

``"post_ln"`` and ``"pre_ln_layer"`` see ``h + x`` only, not ``h`` and ``x`` apart
(``FFNSite.splits_residual``); a composition that needs them apart (AdapterFusion's
``residual_before`` or ``query_before_ln``) is refused there.

Submodules are found by attribute walks with ``getattr`` (no version-specific imports), so the
same code runs on transformers 4.x and 5.x.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from ..formats.keys import site_key  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class FFNSite:
    """One FFN output sub-layer: where to patch and which LayerNorm it owns."""

    name: str  # qualified module name inside the model
    module: nn.Module  # the module whose forward gets patched
    layer_norm: nn.Module  # post-LN: the LayerNorm after the FFN residual; pre-LN: the one before the FFN
    style: str  # "output", "post_ln", "pre_ln_ff" or "pre_ln_layer" (see module docstring)
    stack: str  # "encoder" or "decoder"
    index: int  # layer index inside its stack

    @property
    def key(self) -> tuple[str, int]:
        return (self.stack, self.index)

    @property
    def pre_ln(self) -> bool:
        """No LayerNorm around the adapters: the sub-layer runs its ``pre_ln`` form."""
        return self.style in PRE_LN_STYLES

    @property
    def splits_residual(self) -> bool:
        """Whether the sub-layer gets the FFN output ``h`` and its residual ``x`` apart (else
        ``h + x`` as ``h`` and ``x = 0``)."""
        return self.style in ("output", "pre_ln_ff")


PRE_LN_STYLES = ("pre_ln_ff", "pre_ln_layer")


def _qualified(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def _layer_lists(model: nn.Module, stack_names: tuple[str, ...], layer_attrs: tuple[str, ...]):
    """Yield (stack, ModuleList of layers) for every stack found (encoder, decoder)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None) or model
    for root in (base, model):
        found = []
        for stack in stack_names:
            holder = getattr(root, stack, None)
            if holder is None:
                continue
            for attr in layer_attrs:
                layers = getattr(holder, attr, None)
                if isinstance(layers, nn.ModuleList):
                    found.append((stack, layers))
                    break
        if found:
            return found
    return []


SiteOf = Callable[[nn.Module, str, int], tuple[nn.Module, nn.Module]]


def _collect_sites(
    model: nn.Module, stacks: tuple[str, ...], layer_attrs: tuple[str, ...], style: str, site_of: SiteOf
) -> list[FFNSite]:
    """One ``FFNSite`` of ``style`` per layer of the stacks found; ``site_of(layer, stack, index)``
    gives the layer's adapted module and its LayerNorm, or raises ``ValueError`` naming what is
    missing."""
    names = _qualified(model)
    sites = []
    for stack, layers in _layer_lists(model, stacks, layer_attrs):
        for index, layer in enumerate(layers):
            module, ln = site_of(layer, stack, index)
            sites.append(FFNSite(names[id(module)], module, ln, style, stack, index))
    return sites


def _bert_like(model: nn.Module) -> list[FFNSite]:
    def site_of(layer: nn.Module, stack: str, index: int) -> tuple[nn.Module, nn.Module]:
        out = getattr(layer, "output", None)
        ln = getattr(out, "LayerNorm", None)
        if out is None or ln is None or not {"dense", "dropout"} <= out._modules.keys():
            raise ValueError(
                f"layer {index} of {type(model).__name__} has no output.dense/dropout/LayerNorm submodules"
            )
        return out, ln

    return _collect_sites(model, ("encoder",), ("layer", "layers"), "output", site_of)


def _t5_like(model: nn.Module) -> list[FFNSite]:
    def site_of(block: nn.Module, stack: str, index: int) -> tuple[nn.Module, nn.Module]:
        sub = getattr(block, "layer", None)
        ff = sub[-1] if isinstance(sub, nn.ModuleList) and len(sub) else None
        ln = getattr(ff, "layer_norm", None)
        if ln is None or any(getattr(ff, a, None) is None for a in ("DenseReluDense", "dropout")):
            raise ValueError(
                f"{stack} block {index} of {type(model).__name__} has no FFN sub-layer "
                "(layer[-1] with layer_norm, DenseReluDense, dropout)"
            )
        return ff, ln

    return _collect_sites(model, ("encoder", "decoder"), ("block",), "pre_ln_ff", site_of)


def _pre_ln_layers(model: nn.Module) -> list[FFNSite]:
    def site_of(layer: nn.Module, stack: str, index: int) -> tuple[nn.Module, nn.Module]:
        ln = getattr(layer, "final_layer_norm", None)
        if ln is None or getattr(layer, "fc2", None) is None:
            raise ValueError(f"{stack} layer {index} of {type(model).__name__} has no final_layer_norm/fc2")
        return layer, ln

    return _collect_sites(model, ("encoder", "decoder"), ("layers",), "pre_ln_layer", site_of)


def _bart_like(model: nn.Module) -> list[FFNSite]:
    def site_of(layer: nn.Module, stack: str, index: int) -> tuple[nn.Module, nn.Module]:
        ln = getattr(layer, "final_layer_norm", None)
        if ln is None:
            raise ValueError(f"{stack} layer {index} of {type(model).__name__} has no final_layer_norm")
        return ln, ln

    return _collect_sites(model, ("encoder", "decoder"), ("layers", "layer"), "post_ln", site_of)


REGISTRY: dict[str, Callable[[nn.Module], list[FFNSite]]] = {
    "bert": _bert_like,
    "roberta": _bert_like,
    "xlm-roberta": _bert_like,
    "deberta-v2": _bert_like,
    "bart": _bart_like,
    "marian": _bart_like,
    "mbart": _pre_ln_layers,
    "m2m_100": _pre_ln_layers,
    "t5": _t5_like,
    "mt5": _t5_like,
}
POST_LN_TYPES = ("bert", "roberta", "xlm-roberta", "deberta-v2", "bart", "marian")
PRE_LN_TYPES = ("mbart", "m2m_100", "t5", "mt5")


def model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind is None:
        raise ValueError(f"{type(model).__name__} has no config.model_type; expected a transformers model")
    return kind


def ffn_sites(model: nn.Module) -> list[FFNSite]:
    """Every FFN output sub-layer of ``model``, encoder first, in layer order."""
    kind = model_type(model)
    if kind not in REGISTRY:
        raise ValueError(
            f"model_type {kind!r} is not supported; supported: {sorted(REGISTRY)}: post-LN "
            f"{list(POST_LN_TYPES)} (a LayerNorm after each FFN residual) and pre-LN {list(PRE_LN_TYPES)} "
            "(a LayerNorm before each FFN). Another model needs its FFN sites registered "
            "(scalearn_fast.models.registry)"
        )
    sites = REGISTRY[kind](model)
    if not sites:
        raise ValueError(f"found no transformer layers in {type(model).__name__} (model_type {kind!r})")
    return sites


def ffn_output_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(qualified name, module to patch)]`` for every FFN output sub-layer (see ``ffn_sites``
    for the layer index, stack and LayerNorm of each)."""
    return [(s.name, s.module) for s in ffn_sites(model)]


def hidden_size(model: nn.Module) -> int:
    config = model.config
    for attr in ("hidden_size", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot read the hidden size from {type(config).__name__}")
