"""AdapterHub source adapters: ``adapters``' ``save_adapter`` folders, read and written.

A folder holds ``adapter_config.json`` and the weights as ``pytorch_adapter.bin`` or
``adapter.safetensors``, keyed (BERT-like models)
``[prefix.]encoder.layer.{l}.output.adapters.{name}.adapter_down.0.weight`` [r, d],
``...adapter_down.0.bias`` [r], ``...adapter_up.weight`` [d, r], ``...adapter_up.bias`` [d]
(BART, mBART: ``{encoder|decoder}.layers.{l}.output_adapters.adapters.{name}...``; T5, mT5:
``encoder.block.{l}.layer.1.adapters.{name}...``, ``decoder.block.{l}.layer.2...``). Only
Pfeiffer / ``SeqBnConfig`` adapters (one adapter after each FFN output) are accepted; a config
that computes something else (gating, extra LayerNorms, attention adapters, ...) is refused.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..ops.activations import check_activation
from .atomic import atomic_write_bytes, atomic_write_json, atomic_write_tensors, clean_stale_temps
from .files import read_json, read_tensors, weights_file
from .keys import SiteKey, site_key

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_BIN = "pytorch_adapter.bin"
ADAPTER_SAFE = "adapter.safetensors"

# The SeqBn (Pfeiffer) settings the composition computes (docs/design.md); anything else
# changes the function.
REQUIRED_CONFIG = {
    "original_ln_before": True,
    "original_ln_after": True,
    "residual_before_ln": True,
    "adapter_residual_before_ln": False,
    "ln_before": False,
    "ln_after": False,
    "mh_adapter": False,
    "output_adapter": True,
    "use_gating": False,
    "phm_layer": False,
    "is_parallel": False,
    "cross_adapter": False,
}

# The `adapters` library's non-linearity names (transformers' ACT2FN) -> ops.activations names.
LIBRARY_ACTIVATIONS = {
    name: check_activation(ours)
    for name, ours in {
        "relu": "relu",
        "gelu": "gelu",
        "swish": "silu",
        "silu": "silu",
        "tanh": "tanh",
        "linear": "identity",
        "identity": "identity",
    }.items()
}

# AdapterHub's SeqBnConfig as the library writes it (adapters 1.3), for stage-1 saving.
SEQ_BN_CONFIG: dict[str, Any] = {
    "adapter_residual_before_ln": False,
    "cross_adapter": False,
    "dropout": 0.0,
    "factorized_phm_W": True,
    "factorized_phm_rule": False,
    "hypercomplex_nonlinearity": "glorot-uniform",
    "init_weights": "bert",
    "init_weights_seed": None,
    "inv_adapter": None,
    "inv_adapter_reduction_factor": None,
    "is_parallel": False,
    "learn_phm": True,
    "leave_out": [],
    "ln_after": False,
    "ln_before": False,
    "mh_adapter": False,
    "non_linearity": "relu",
    "original_ln_after": True,
    "original_ln_before": True,
    "output_adapter": True,
    "phm_bias": True,
    "phm_c_init": "normal",
    "phm_dim": 4,
    "phm_init_range": 0.0001,
    "phm_layer": False,
    "phm_rank": 1,
    "reduction_factor": 16,
    "residual_before_ln": True,
    "scaling": 1.0,
    "shared_W_phm": False,
    "shared_phm_rule": True,
    "stochastic_depth": 0.0,
    "use_gating": False,
}

_PARAM = re.compile(
    r"\.adapters\.(?P<name>.+?)\.(?P<param>adapter_down\.0\.(?:weight|bias)|adapter_up\.(?:weight|bias))$"
)
_OUTPUT_SLOTS = (".output", ".output_adapters")  # BERT-like; BART, mBART, M2M100, Marian
# T5 / mT5: the FFN sub-layer is the block's last, ``layer.1`` in the encoder (``layer.0`` is
# self-attention) and ``layer.2`` in the decoder (``layer.1`` is cross-attention).
_T5_FFN_SLOT = re.compile(r"(?:^|\.)block\.\d+\.layer\.(\d+)$")
_T5_FFN_INDEX = {"encoder": 1, "decoder": 2}
_PARAMS = ("adapter_down.0.weight", "adapter_down.0.bias", "adapter_up.weight", "adapter_up.bias")


class AdapterWeights(NamedTuple):
    """One layer of one bottleneck adapter, in nn.Linear layout (a tuple: unpacks in this order)."""

    w_down: torch.Tensor  # [r, d]
    b_down: torch.Tensor  # [r]
    w_up: torch.Tensor  # [d, r]
    b_up: torch.Tensor  # [d]


def check_adapter_weights(
    weights: Sequence[Any], where: str, hidden_size: int | None = None
) -> AdapterWeights:
    """``weights`` as ``AdapterWeights`` after checking every shape against the others (and
    ``hidden_size``); the error names the tensor that does not fit."""
    if not isinstance(weights, Sequence) or len(weights) != 4:
        raise ValueError(f"{where}: expected (w_down, b_down, w_up, b_up), got {type(weights).__name__}")
    names = AdapterWeights._fields
    for name, t in zip(names, weights, strict=True):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: {name} is a {type(t).__name__}, expected a tensor")
    w_down, b_down, w_up, b_up = weights
    if w_down.dim() != 2:
        raise ValueError(f"{where}: w_down has shape {list(w_down.shape)}, expected [r, d]")
    r, d = w_down.shape
    if hidden_size is not None and d != hidden_size:
        raise ValueError(
            f"{where}: w_down has shape {list(w_down.shape)}, expected [r, {hidden_size}] (hidden size)"
        )
    for name, t, expect in (("b_down", b_down, (r,)), ("w_up", w_up, (d, r)), ("b_up", b_up, (d,))):
        if tuple(t.shape) != expect:
            raise ValueError(
                f"{where}: {name} has shape {list(t.shape)}, expected {list(expect)} "
                f"(w_down is {list(w_down.shape)})"
            )
    return AdapterWeights(w_down, b_down, w_up, b_up)


@dataclass
class AdapterSource:
    """A source adapter: its name, activation and weights per site ``(stack, layer index)``.
    ``path`` is the folder it was read from (None when built in memory)."""

    name: str
    layers: dict[SiteKey, AdapterWeights]
    activation: str = "relu"
    config: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    layout: str | None = None  # where its keys put it (SOURCE_LAYOUTS); None when built from tensors

    @property
    def hidden_size(self) -> int:
        return next(iter(self.layers.values())).w_down.shape[1]


def _fail(where: str, message: str) -> ValueError:
    return ValueError(f"{where}: {message}")


def check_adapter_config(config: Mapping[str, Any], where: str = "adapter") -> str:
    """Validate a SeqBn config dict; returns the activation name (one of ``ops.activations``)."""
    for key, expect in REQUIRED_CONFIG.items():
        if key in config and config[key] != expect:
            raise _fail(
                where,
                f"adapter config has {key}={config[key]!r}, but only Pfeiffer/SeqBnConfig adapters "
                f"({key}={expect!r}) are supported",
            )
    if config.get("inv_adapter"):
        raise _fail(
            where,
            f"adapter config has inv_adapter={config['inv_adapter']!r} (an invertible adapter on the "
            "embeddings, as MAD-X's pfeiffer+inv); only plain Pfeiffer/SeqBnConfig adapters are supported",
        )
    if config.get("leave_out"):
        raise _fail(where, f"adapter config leaves out layers {config['leave_out']}; not supported")
    act = config.get("non_linearity", "relu")
    act = "identity" if act is None else str(act).lower()
    if act not in LIBRARY_ACTIVATIONS:
        raise _fail(where, f"adapter non_linearity {act!r} is not one of {sorted(LIBRARY_ACTIVATIONS)}")
    scaling = config.get("scaling", 1.0)
    if not isinstance(scaling, int | float) or isinstance(scaling, bool):
        raise _fail(where, f"adapter scaling {scaling!r} (learned scaling) is not supported")
    return LIBRARY_ACTIVATIONS[act]


# The library's key layouts of FFN-output adapters, by the registry site styles that use them.
SOURCE_LAYOUTS = {
    "output": "output",  # BERT-like: ...layer.{l}.output.adapters...
    "post_ln": "output_adapters",  # BART, Marian: ...layers.{l}.output_adapters.adapters...
    "pre_ln_layer": "output_adapters",  # mBART, M2M100
    "pre_ln_ff": "t5_block",  # T5, mT5: ...block.{l}.layer.{1|2}.adapters...
}


def _ffn_output_layout(head: str, site: SiteKey) -> str | None:
    """The layout (``SOURCE_LAYOUTS``) of ``head`` (a key up to ``.adapters.``) when it is where
    the library keeps FFN-output adapters, else None."""
    t5 = _T5_FFN_SLOT.search(head)
    if t5 is not None:
        return "t5_block" if int(t5.group(1)) == _T5_FFN_INDEX[site[0]] else None
    if head.endswith("attention.output"):
        return None
    if head.endswith(".output_adapters"):
        return "output_adapters"
    return "output" if head.endswith(".output") else None


def adapter_from_state_dict(
    state: Mapping[str, torch.Tensor],
    name: str | None = None,
    config: Mapping[str, Any] | None = None,
    where: str = "state dict",
) -> AdapterSource:
    """Parse AdapterHub-keyed tensors (as in ``pytorch_adapter.bin``) into an ``AdapterSource``.

    ``name`` picks one adapter when the dict holds several; ``config`` (the ``config`` entry of
    ``adapter_config.json``) is checked and its ``scaling`` folded into the up projection.
    """
    config = dict(config or {})
    activation = check_adapter_config(config, where)
    scaling = float(config.get("scaling", 1.0))
    found: dict[str, dict[SiteKey, dict[str, torch.Tensor]]] = {}
    layouts: set[str] = set()
    for key, tensor in state.items():
        match = _PARAM.search(key)
        if match is None:
            continue
        head = key[: match.start()]
        site = site_key(head + ".")
        layout = None if site is None else _ffn_output_layout(head, site)
        if layout is None:
            raise _fail(
                where, f"key {key!r} is not an FFN-output adapter (only Pfeiffer/SeqBn are supported)"
            )
        layouts.add(layout)
        found.setdefault(match["name"], {}).setdefault(site, {})[match["param"]] = tensor
    if len(layouts) > 1:
        raise _fail(where, f"mixes the key layouts of different models: {sorted(layouts)}")
    if not found:
        raise _fail(where, "no '...adapters.<name>.adapter_down.0.weight' keys (not an AdapterHub adapter)")
    if name is None:
        if len(found) > 1:
            raise _fail(where, f"holds adapters {sorted(found)}; pass name= to pick one")
        name = next(iter(found))
    if name not in found:
        raise _fail(where, f"holds adapters {sorted(found)}, not {name!r}")
    layers: dict[SiteKey, AdapterWeights] = {}
    for site, params in sorted(found[name].items()):
        missing = set(_PARAMS) - set(params)
        if missing:
            raise _fail(where, f"layer {site} of adapter {name!r} lacks {sorted(missing)}")
        w = check_adapter_weights([params[p] for p in _PARAMS], f"{where}: layer {site} of adapter {name!r}")
        layers[site] = AdapterWeights(w.w_down, w.b_down, w.w_up * scaling, w.b_up * scaling)
    dims = {w.w_down.shape[1] for w in layers.values()}
    if len(dims) != 1:
        raise _fail(where, f"adapter {name!r} has different hidden sizes across layers: {sorted(dims)}")
    return AdapterSource(
        name=name, layers=layers, activation=activation, config=config, layout=next(iter(layouts))
    )


def _from_layer_tensors(name: str, layers: Mapping[Any, Sequence[torch.Tensor]]) -> AdapterSource:
    """``{layer index or (stack, index): (w_down, b_down, w_up, b_up)}`` -> ``AdapterSource``."""
    out: dict[SiteKey, AdapterWeights] = {}
    for key, weights in layers.items():
        site = ("encoder", key) if isinstance(key, int) else key
        if not isinstance(site, tuple) or len(site) != 2 or not isinstance(site[1], int):
            raise ValueError(
                f"source {name!r}: expected {{layer index or (stack, index): (w_down, b_down, w_up, b_up)}}, "
                f"got key {key!r}"
            )
        out[site] = check_adapter_weights(weights, f"source {name!r} layer {site}")
    if not out:
        raise ValueError(f"source {name!r} has no layers")
    return AdapterSource(name=name, layers=out)


def _adapter_folders_below(path: Path) -> list[str]:
    try:
        return sorted(str(p.parent) for p in path.glob(f"*/{ADAPTER_CONFIG}"))[:5]
    except OSError:
        return []


def load_adapterhub_source(
    folder: str | os.PathLike[str], name: str | None = None, *, trust_pickle: bool = False
) -> AdapterSource:
    """Read one ``save_adapter`` folder (safetensors preferred over the .bin)."""
    path = Path(folder)
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        below = _adapter_folders_below(path) if path.is_dir() else []
        hint = f"; it holds adapter folders {below}: pass them as a list" if below else ""
        raise ValueError(f"{path}: no {ADAPTER_CONFIG} (expected an AdapterHub save_adapter folder){hint}")
    meta = read_json(config_file)
    weights = weights_file(path, ADAPTER_SAFE, ADAPTER_BIN, f"{path}:")
    config = meta.get("config", {})
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: 'config' is {config!r}; expected the adapter's config dict")
    stored_name = meta.get("name")
    if stored_name is not None and not isinstance(stored_name, str):
        raise ValueError(f"{config_file}: 'name' is {stored_name!r}; expected a string")
    state = read_tensors(weights, trust_pickle=trust_pickle)
    source = adapter_from_state_dict(state, stored_name, config, where=str(path))
    if name is not None:
        source.name = name
    declared = meta.get("hidden_size")
    if declared is not None and declared != source.hidden_size:
        raise ValueError(
            f"{path}: config says hidden_size {declared} but the weights have d={source.hidden_size}"
        )
    source.path = str(path.resolve())
    return source


SourceSpec = AdapterSource | str | os.PathLike[str] | Mapping[str, torch.Tensor]


def load_adapterhub_sources(
    sources: Sequence[SourceSpec] | Mapping[str, SourceSpec] | str | os.PathLike[str],
    *,
    trust_pickle: bool = False,
) -> list[AdapterSource]:
    """Normalise ``sources`` to a list of ``AdapterSource``.

    Accepts a list of folders / ``AdapterSource`` / AdapterHub-keyed state dicts, or a dict
    ``{name: any of those}`` (the key renames the source). One folder (a string or path) is one
    source. Names must be unique.
    """
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    if isinstance(sources, AdapterSource):
        sources = [sources]
    if (
        isinstance(sources, Mapping)
        and sources
        and all(isinstance(v, torch.Tensor) for v in sources.values())
    ):
        raise ValueError("sources is a single state dict; pass a list of sources or {name: state_dict}")
    if not isinstance(sources, Mapping | Sequence):
        raise ValueError(
            f"sources is a {type(sources).__name__}; expected a list of adapter folders, "
            "{name: folder}, AdapterSource objects or state dicts"
        )
    items = list(sources.items()) if isinstance(sources, Mapping) else [(None, s) for s in sources]
    if not items:
        raise ValueError("sources is empty; at least one source adapter is needed")
    out = []
    for name, spec in items:
        if name is not None and not isinstance(name, str):
            raise ValueError(f"source name {name!r} is a {type(name).__name__}; expected a string")
        if isinstance(spec, AdapterSource):
            src = AdapterSource(
                name or spec.name, spec.layers, spec.activation, spec.config, spec.path, spec.layout
            )
        elif isinstance(spec, Mapping) and spec and all(isinstance(k, str) for k in spec):
            src = adapter_from_state_dict(spec, None, None, where=f"source {name!r}")
            src.name = name or src.name
        elif isinstance(spec, Mapping):
            if name is None:
                raise ValueError("per-layer tensor sources need a name: pass {name: {layer: (...)}}")
            src = _from_layer_tensors(name, spec)
        elif isinstance(spec, str | os.PathLike):
            src = load_adapterhub_source(spec, trust_pickle=trust_pickle)
            src.name = name or src.name
        else:
            raise ValueError(
                f"source {name!r} is a {type(spec).__name__}; expected a folder, dict or AdapterSource"
            )
        out.append(src)
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique; got {names} (pass a dict to rename)")
    return out


def adapter_key_prefix(site_name: str, style: str) -> str:
    """Where ``adapters`` keeps a layer's output adapters, from a registry site's qualified name:
    ``bert.encoder.layer.0.output`` -> itself; BART ``...layers.0.final_layer_norm`` ->
    ``...layers.0.output_adapters``; mBART ``...layers.0`` -> ``...layers.0.output_adapters``;
    T5 ``encoder.block.0.layer.1`` -> itself."""
    if style in ("output", "pre_ln_ff"):
        return site_name
    if style == "post_ln":
        return site_name.rsplit(".", 1)[0] + ".output_adapters"
    if style == "pre_ln_layer":
        return site_name + ".output_adapters"
    raise ValueError(f"unknown site style {style!r}")


def save_adapterhub_adapter(
    folder: str | os.PathLike[str],
    name: str,
    layers: Mapping[str, AdapterWeights],
    *,
    model_type: str,
    hidden_size: int,
    reduction_factor: float,
    non_linearity: str = "relu",
    model_class: str = "",
    model_name: str = "",
    safetensors: bool = False,
) -> Path:
    """Write one adapter as ``adapters``' ``save_adapter`` does: ``adapter_config.json`` plus
    ``pytorch_adapter.bin`` (or ``adapter.safetensors``), keys
    ``{prefix}.adapters.{name}.adapter_down.0.weight`` etc.

    ``layers`` maps each site's key prefix (see ``adapter_key_prefix``) to its weights.
    """
    path = Path(folder)
    clean_stale_temps(path, (ADAPTER_CONFIG, ADAPTER_BIN, ADAPTER_SAFE))
    config = dict(SEQ_BN_CONFIG, reduction_factor=reduction_factor, non_linearity=non_linearity)
    meta = {
        "config": config,
        "hidden_size": hidden_size,
        "model_class": model_class,
        "model_name": model_name,
        "model_type": model_type,
        "name": name,
        "version": "adapters.1.3.0",
    }
    state: dict[str, torch.Tensor] = {}
    for prefix, w in layers.items():
        base = f"{prefix}.adapters.{name}"
        for param, tensor in zip(_PARAMS, w, strict=True):
            state[f"{base}.{param}"] = tensor.detach().cpu().contiguous()
    if safetensors:
        atomic_write_tensors(path / ADAPTER_SAFE, state)
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(path / ADAPTER_BIN, buffer.getvalue())
    stale = path / (ADAPTER_BIN if safetensors else ADAPTER_SAFE)
    stale.unlink(missing_ok=True)  # an older file of the other format would shadow (or be) this one
    atomic_write_json(path / ADAPTER_CONFIG, meta)
    return path
