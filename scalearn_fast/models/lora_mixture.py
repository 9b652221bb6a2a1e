"""``attach_lora_mixture`` / ``detach_lora_mixture``: a mixture of LoRA experts beside named
``nn.Linear`` layers of any model (MoSLD; routed mixtures of PEFT LoRA folders), per instance.

Sites are matched by suffix on module names: ``"query"`` matches ``encoder.layer.0.attention.
self.query`` (BERT), ``"q_proj"`` every LLaMA ``...self_attn.q_proj``. Every matched Linear keeps
its weights (frozen) and gets a ``LoRAMixture`` as its submodule ``lora_mixture``; its forward
becomes ``W0·x (+ bias) + lora_mixture(x)``. Parameter names of the model stay as they were.

Training loop (docs/lora_mixture.md)::

    out = model(**batch)
    loss = out.loss + lora_mixture_loss(model)    # Σ over sites of balance_loss · L_bal
    loss.backward()
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..formats.peft_lora import PeftLora, read_peft_lora
from ..layers_lora_mixture import LoRAMixture
from .patching import is_patched, original_forward, patch_forward, unpatch

ATTR = "lora_mixture"
_RECORD = "_scalearn_fast_lora_mixture"


@dataclass
class LoRAMixtureRecord:
    """What ``attach_lora_mixture`` did: the patched modules by name, the ``requires_grad`` flags
    it replaced, its options and the source folders (empty for MoSLD)."""

    modules: dict[str, nn.Module]
    requires_grad: dict[str, bool]
    config: dict[str, Any]
    source_paths: list[str] = field(default_factory=list)


class MixtureForward:
    """The patched forward of one Linear: ``W0·x (+ bias) + lora_mixture(x)``. A plain object
    holding the module, so a patched model copies and pickles (``models/patching.py``)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = original_forward(self.module)(x, *args, **kwargs)
        return base + self.module._modules[ATTR](x).to(base.dtype)


def has_lora_mixture(model: nn.Module) -> bool:
    return _RECORD in model.__dict__


def lora_mixture_state(model: nn.Module) -> LoRAMixtureRecord:
    """The attach record (a ValueError when no mixture is attached)."""
    record = model.__dict__.get(_RECORD)
    if record is None:
        raise ValueError(
            f"{type(model).__name__} has no LoRA mixture attached; call attach_lora_mixture first"
        )
    return record


def lora_mixture_layers(model: nn.Module) -> list[LoRAMixture]:
    """The ``LoRAMixture`` of every patched Linear, in module order."""
    return [m._modules[ATTR] for m in lora_mixture_state(model).modules.values()]


def lora_mixture_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The mixture's trainable parameters (MoSLD: A, the B_n and the router; sources: the router)."""
    return [p for layer in lora_mixture_layers(model) for p in layer.parameters()]


def lora_mixture_loss(model: nn.Module) -> torch.Tensor:
    """``Σ_sites balance_loss · L_bal`` of the last forward in training mode (a 0-dim tensor; 0
    in eval mode or with fixed gates). Add it to the task loss before ``backward``."""
    layers = lora_mixture_layers(model)
    terms = [
        layer.balance_weight * layer.last_balance_loss
        for layer in layers
        if layer.last_balance_loss is not None and layer.balance_weight > 0
    ]
    if not terms:
        ref = layers[0].router.weight if layers else next(model.parameters())
        return ref.new_zeros(())
    return torch.stack([t.float() for t in terms]).sum()


def set_lora_mixture_gates(model: nn.Module, gates: torch.Tensor | Sequence[float] | None) -> None:
    """Fix every site's gates to ``gates [N]`` for every token, bypassing the routers (e.g. to
    compare with PEFT: ones = all LoRAs summed, one-hot = one LoRA); None restores the routers."""
    for layer in lora_mixture_layers(model):
        layer.set_fixed_gates(gates)


def match_linear_sites(model: nn.Module, sites: Sequence[str]) -> dict[str, nn.Linear]:
    """``{name: module}`` of the ``nn.Linear`` modules whose name is a pattern of ``sites`` or ends
    with ``"." + pattern``; a ValueError listing some Linear names for a pattern matching none."""
    if isinstance(sites, str) or not sites or not all(isinstance(s, str) and s for s in sites):
        raise ValueError(f"sites must be a non-empty sequence of module-name suffixes; got {sites!r}")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    found: dict[str, nn.Linear] = {}
    for pattern in sites:
        hits = {n: m for n, m in linears.items() if n == pattern or n.endswith("." + pattern)}
        if not hits:
            some = sorted({n.rsplit(".", 1)[-1] for n in linears})[:12]
            examples = [n for n in linears][:4]
            raise ValueError(
                f"sites pattern {pattern!r} matches no nn.Linear of {type(model).__name__}; its Linear "
                f"names end in {some} (e.g. {examples})"
            )
        found.update(hits)
    return dict(sorted(found.items(), key=lambda kv: list(linears).index(kv[0])))


def _same_module(key: str, name: str) -> bool:
    """Whether a source's module path and a model's module name are the same module (one may
    sit inside a wrapper: ``bert.encoder.layer.0...`` saved, ``encoder.layer.0...`` patched)."""
    return key == name or name.endswith("." + key) or key.endswith("." + name)


def _source_weights(src: PeftLora, name: str, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    keys = [k for k in src.layers if _same_module(k, name)]
    if len(keys) != 1:
        what = "no LoRA weights" if not keys else f"several candidate LoRAs {keys}"
        raise ValueError(f"source {src.name!r} ({src.path}) has {what} for the patched module {name!r}")
    a, b = src.layers[keys[0]]
    if a.shape[1] != linear.in_features or b.shape[0] != linear.out_features:
        raise ValueError(
            f"source {src.name!r}: the LoRA of {name!r} maps {a.shape[1]} -> {b.shape[0]}, the model's "
            f"Linear maps {linear.in_features} -> {linear.out_features}"
        )
    return a, b


def _read_sources(sources: Sequence[str | os.PathLike[str]], sites: Sequence[str], names: list[str]):
    if isinstance(sources, (str, os.PathLike)) or not sources:
        raise ValueError(f"sources must be a non-empty list of PEFT LoRA folders; got {sources!r}")
    srcs = [read_peft_lora(s) for s in sources]
    for src in srcs:
        tm = src.target_modules
        if isinstance(tm, (list, tuple, set)) and set(tm) != set(sites):
            raise ValueError(
                f"source {src.name!r} ({src.path}): its target_modules {sorted(tm)} differ from "
                f"sites {sorted(sites)}; pass sites=({', '.join(repr(t) for t in sorted(tm))})"
            )
        unused = sorted(k for k in src.layers if not any(_same_module(k, n) for n in names))
        if unused:
            raise ValueError(
                f"source {src.name!r} ({src.path}) has LoRAs on modules the sites do not patch: {unused[:4]}"
            )
    return srcs


def attach_lora_mixture(
    model: nn.Module,
    *,
    sites: Sequence[str] = ("query", "value"),
    num_experts: int | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    shared_down: bool = True,
    top_k: int = 2,
    dropconnect: float = 0.1,
    balance_loss: float = 0.01,
    sources: Sequence[str | os.PathLike[str]] | None = None,
    backend: str = "torch",
) -> nn.Module:
    """Put a LoRA mixture beside every ``nn.Linear`` of ``model`` matched by ``sites`` and freeze
    the rest of the model (docs/lora_mixture.md). Returns ``model``, patched in place.

    MoSLD (``sources=None``): ``num_experts`` experts of rank ``rank``, ``scaling = alpha / rank``,
    one shared down matrix (``shared_down=True``) or one per expert; a per-token router keeps
    ``top_k`` experts; ``dropconnect`` on the down matrix in training; ``balance_loss`` weighs
    each site's load-balancing loss in ``lora_mixture_loss``.

    ``sources``: PEFT LoRA folders as N fixed experts (own A, B and scaling each, frozen), with a
    trainable router; ``num_experts`` may be given (it must equal the number of folders),
    ``rank`` and ``alpha`` come from the folders and must not be given. Their
    ``target_modules`` must be ``sites``; each folder must hold a LoRA for every patched module.
    """
    if has_lora_mixture(model):
        raise RuntimeError("a LoRA mixture is already attached to this model; detach_lora_mixture it first")
    found = match_linear_sites(model, sites)
    taken = [n for n, m in found.items() if is_patched(m) or hasattr(m, ATTR)]
    if taken:
        raise RuntimeError(f"module {taken[0]!r} is already patched; detach what holds it first")
    srcs: list[PeftLora] = []
    if sources is not None:
        srcs = _read_sources(sources, sites, list(found))
        if num_experts is not None and num_experts != len(srcs):
            raise ValueError(f"num_experts={num_experts} but {len(srcs)} sources were given")
        if rank is not None or alpha is not None:
            raise ValueError(
                f"rank and alpha come from the sources' adapter_config.json; got {rank=}, {alpha=}"
            )
        num_experts = len(srcs)
    elif num_experts is None or rank is None or alpha is None:
        raise ValueError(
            f"num_experts, rank and alpha are required without sources; got {num_experts=}, {rank=}, {alpha=}"
        )
    layers: dict[str, LoRAMixture] = {}
    options = {"top_k": top_k, "dropconnect": dropconnect, "balance_loss": balance_loss, "backend": backend}
    for name, linear in found.items():
        w = linear.weight
        if srcs:
            ws = [_source_weights(s, name, linear) for s in srcs]
            layer = LoRAMixture.from_experts(
                [a for a, _ in ws], [b for _, b in ws], [s.scaling for s in srcs], dtype=w.dtype, **options
            ).to(w.device)
        else:
            layer = LoRAMixture(
                linear.in_features, linear.out_features, num_experts=num_experts, rank=rank, alpha=alpha,
                shared_down=shared_down, device=w.device, dtype=w.dtype, **options,
            )  # fmt: skip
        layers[name] = layer.train(linear.training)  # an eval-mode model stays in eval mode
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in found.items():
        linear.add_module(ATTR, layers[name])
        patch_forward(linear, MixtureForward(linear))
        for p in layers[name].parameters():
            p.requires_grad_(True)
    config = {"sites": list(sites), "num_experts": num_experts, "rank": rank, "alpha": alpha,
              "shared_down": shared_down if not srcs else False, **options}  # fmt: skip
    model.__dict__[_RECORD] = LoRAMixtureRecord(dict(found), requires_grad, config, [s.path for s in srcs])
    return model


def detach_lora_mixture(model: nn.Module) -> nn.Module:
    """Undo ``attach_lora_mixture``: the Linears' own forwards and ``requires_grad`` flags come back."""
    record = lora_mixture_state(model)
    for module in record.modules.values():
        unpatch(module)
        module._modules.pop(ATTR, None)
    for name, p in model.named_parameters():
        if name in record.requires_grad:
            p.requires_grad_(record.requires_grad[name])
    del model.__dict__[_RECORD]
    return model
