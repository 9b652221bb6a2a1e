"""AdapterHub-format source adapters in, ScaLearn checkpoints out.

Source adapters: an ``adapters`` ``save_adapter`` folder holds ``adapter_config.json`` and the
weights as ``pytorch_adapter.bin`` or ``adapter.safetensors``, keyed (BERT-like models)
``[prefix.]encoder.layer.{l}.output.adapters.{name}.adapter_down.0.weight`` [r, d],
``...adapter_down.0.bias`` [r], ``...adapter_up.weight`` [d, r], ``...adapter_up.bias`` [d]
(BART: ``{encoder|decoder}.layers.{l}.output_adapters.adapters.{name}...``). Only
Pfeiffer / ``SeqBnConfig`` adapters (one adapter after each FFN output) are accepted; a config
that computes something else (gating, extra LayerNorms, attention adapters, ...) is refused.

ScaLearn checkpoints: ``save_scalearn`` writes ``scalearn_config.json`` and
``scalearn.safetensors`` (ω per layer or the one shared ω, plus the task head), each written to a
temporary file and moved into place with ``os.replace``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .models.registry import site_key

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_BIN = "pytorch_adapter.bin"
ADAPTER_SAFE = "adapter.safetensors"
SCALEARN_CONFIG = "scalearn_config.json"
SCALEARN_WEIGHTS = "scalearn.safetensors"
FORMAT_VERSION = 1

# The SeqBn (Pfeiffer) settings that DESIGN.md §1 computes; anything else changes the function.
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
_NON_LINEARITY = {"relu": "relu", "gelu": "gelu", "swish": "silu", "silu": "silu", "tanh": "tanh"}

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
_OUTPUT_SLOTS = (".output", ".output_adapters")  # BERT-like, BART

SiteKey = tuple[str, int]


class AdapterWeights(NamedTuple):
    """One layer of one bottleneck adapter, in nn.Linear layout (a tuple: unpacks in this order)."""

    w_down: torch.Tensor  # [r, d]
    b_down: torch.Tensor  # [r]
    w_up: torch.Tensor  # [d, r]
    b_up: torch.Tensor  # [d]


@dataclass
class AdapterSource:
    """A source adapter: its name, activation and weights per site ``(stack, layer index)``."""

    name: str
    layers: dict[SiteKey, AdapterWeights]
    activation: str = "relu"
    config: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    @property
    def hidden_size(self) -> int:
        return next(iter(self.layers.values())).w_down.shape[1]


def _fail(where: str, message: str) -> ValueError:
    return ValueError(f"{where}: {message}")


def check_adapter_config(config: Mapping[str, Any], where: str = "adapter") -> str:
    """Validate a SeqBn config dict; returns our activation name. Folds nothing."""
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
    act = str(config.get("non_linearity", "relu")).lower()
    if act not in _NON_LINEARITY:
        raise _fail(where, f"adapter non_linearity {act!r} is not one of {sorted(_NON_LINEARITY)}")
    scaling = config.get("scaling", 1.0)
    if not isinstance(scaling, int | float):
        raise _fail(where, f"adapter scaling {scaling!r} (learned scaling) is not supported")
    return _NON_LINEARITY[act]


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
    for key, tensor in state.items():
        match = _PARAM.search(key)
        if match is None:
            continue
        head = key[: match.start()]
        site = site_key(head + ".")
        if site is None or not head.endswith(_OUTPUT_SLOTS) or head.endswith("attention.output"):
            raise _fail(
                where, f"key {key!r} is not an FFN-output adapter (only Pfeiffer/SeqBn are supported)"
            )
        found.setdefault(match["name"], {}).setdefault(site, {})[match["param"]] = tensor
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
        missing = {
            "adapter_down.0.weight",
            "adapter_down.0.bias",
            "adapter_up.weight",
            "adapter_up.bias",
        } - set(params)
        if missing:
            raise _fail(where, f"layer {site} of adapter {name!r} lacks {sorted(missing)}")
        w_down, b_down = params["adapter_down.0.weight"], params["adapter_down.0.bias"]
        w_up, b_up = params["adapter_up.weight"], params["adapter_up.bias"]
        r, d = w_down.shape if w_down.dim() == 2 else (None, None)
        if (
            r is None
            or tuple(b_down.shape) != (r,)
            or tuple(w_up.shape) != (d, r)
            or tuple(b_up.shape) != (d,)
        ):
            raise _fail(
                where,
                f"layer {site} of adapter {name!r} has inconsistent shapes: down {list(w_down.shape)}, "
                f"bias {list(b_down.shape)}, adapter_up {list(w_up.shape)}, bias {list(b_up.shape)}",
            )
        layers[site] = AdapterWeights(w_down, b_down, w_up * scaling, b_up * scaling)
    dims = {w.w_down.shape[1] for w in layers.values()}
    if len(dims) != 1:
        raise _fail(where, f"adapter {name!r} has different hidden sizes across layers: {sorted(dims)}")
    return AdapterSource(name=name, layers=layers, activation=activation, config=config)


def _from_layer_tensors(name: str, layers: Mapping[Any, Sequence[torch.Tensor]]) -> AdapterSource:
    """``{layer index or (stack, index): (w_down, b_down, w_up, b_up)}`` -> ``AdapterSource``."""
    out: dict[SiteKey, AdapterWeights] = {}
    for key, weights in layers.items():
        site = ("encoder", key) if isinstance(key, int) else tuple(key)
        if len(site) != 2 or not isinstance(site[1], int) or len(weights) != 4:
            raise ValueError(
                f"source {name!r}: expected {{layer index or (stack, index): (w_down, b_down, w_up, b_up)}}, "
                f"got key {key!r} with {len(weights)} tensors"
            )
        w_down, b_down, w_up, b_up = weights
        r, d = w_down.shape
        if tuple(b_down.shape) != (r,) or tuple(w_up.shape) != (d, r) or tuple(b_up.shape) != (d,):
            raise ValueError(f"source {name!r} layer {site}: inconsistent shapes")
        out[site] = AdapterWeights(w_down, b_down, w_up, b_up)  # type: ignore[index]
    if not out:
        raise ValueError(f"source {name!r} has no layers")
    return AdapterSource(name=name, layers=out)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated file
        raise ValueError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc


def load_adapterhub_source(folder: str | os.PathLike[str], name: str | None = None) -> AdapterSource:
    """Read one ``save_adapter`` folder (safetensors preferred over the .bin)."""
    path = Path(folder)
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise ValueError(f"{path}: no {ADAPTER_CONFIG} (expected an AdapterHub save_adapter folder)")
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file}: not valid JSON ({exc})") from exc
    if (path / ADAPTER_SAFE).is_file():
        weights = path / ADAPTER_SAFE
    elif (path / ADAPTER_BIN).is_file():
        weights = path / ADAPTER_BIN
    else:
        raise ValueError(f"{path}: holds neither {ADAPTER_SAFE} nor {ADAPTER_BIN}")
    config = meta.get("config", {})
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: 'config' is {config!r}; expected the adapter's config dict")
    source = adapter_from_state_dict(_load_tensors(weights), meta.get("name"), config, where=str(path))
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


def load_adapterhub_sources(sources: Sequence[SourceSpec] | Mapping[str, SourceSpec]) -> list[AdapterSource]:
    """Normalise ``sources`` to a list of ``AdapterSource``.

    Accepts a list of folders / ``AdapterSource`` / AdapterHub-keyed state dicts, or a dict
    ``{name: any of those}`` (the key renames the source). Names must be unique.
    """
    if isinstance(sources, Mapping) and all(isinstance(v, torch.Tensor) for v in sources.values()):
        raise ValueError("sources is a single state dict; pass a list of sources or {name: state_dict}")
    items = list(sources.items()) if isinstance(sources, Mapping) else [(None, s) for s in sources]
    if not items:
        raise ValueError("sources is empty; ScaLearn needs at least one source adapter")
    out = []
    for name, spec in items:
        if isinstance(spec, AdapterSource):
            src = AdapterSource(name or spec.name, spec.layers, spec.activation, spec.config, spec.path)
        elif isinstance(spec, Mapping) and spec and all(isinstance(k, str) for k in spec):
            src = adapter_from_state_dict(spec, None, None, where=f"source {name!r}")
            src.name = name or src.name
        elif isinstance(spec, Mapping):
            if name is None:
                raise ValueError("per-layer tensor sources need a name: pass {name: {layer: (...)}}")
            src = _from_layer_tensors(name, spec)
        elif isinstance(spec, str | os.PathLike):
            src = load_adapterhub_source(spec)
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


# ---------------------------------------------------------------------------------------------
# Atomic writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the mode open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
):
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


# ---------------------------------------------------------------------------------------------
# Stage-1 adapters in AdapterHub format


def adapter_key_prefix(site_name: str, style: str) -> str:
    """Where ``adapters`` keeps a layer's output adapters, from a registry site's qualified name:
    ``bert.encoder.layer.0.output`` -> itself; BART ``...layers.0.final_layer_norm`` ->
    ``...layers.0.output_adapters``."""
    if style == "output":
        return site_name
    if style == "post_ln":
        return site_name.rsplit(".", 1)[0] + ".output_adapters"
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
        state[f"{base}.adapter_down.0.weight"] = w.w_down.detach().cpu().contiguous()
        state[f"{base}.adapter_down.0.bias"] = w.b_down.detach().cpu().contiguous()
        state[f"{base}.adapter_up.weight"] = w.w_up.detach().cpu().contiguous()
        state[f"{base}.adapter_up.bias"] = w.b_up.detach().cpu().contiguous()
    if safetensors:
        atomic_write_tensors(path / ADAPTER_SAFE, state)
    else:
        import io as _bytes_io

        buffer = _bytes_io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(path / ADAPTER_BIN, buffer.getvalue())
    stale = path / (ADAPTER_BIN if safetensors else ADAPTER_SAFE)
    stale.unlink(missing_ok=True)  # an older file of the other format would shadow (or be) this one
    atomic_write_json(path / ADAPTER_CONFIG, meta)
    return path


# ---------------------------------------------------------------------------------------------
# ScaLearn checkpoints


def _site_tag(key: SiteKey) -> str:
    return f"{key[0]}.{key[1]}"


def _shared_omega(layers: Sequence[Any], variant: str) -> torch.Tensor:
    """The one ω of a ``++`` variant, read from the layers (not from the attach record): a
    ``load_state_dict(..., assign=True)`` gives every layer a Parameter of its own, so the
    layers must be checked to still agree."""
    first = layers[0].omega
    for i, layer in enumerate(layers[1:], start=1):
        if layer.omega is not first and not torch.equal(layer.omega, first):
            raise ValueError(
                f"{variant} shares one omega across layers, but layer {i} holds a different one "
                f"(was the model loaded with load_state_dict(..., assign=True) or trained with "
                "per-layer copies?); load it with load_scalearn, or re-attach"
            )
    return first


def save_scalearn(
    model: torch.nn.Module,
    directory: str | os.PathLike[str],
    *,
    source_paths: Sequence[str | None] | None = None,
    include_sources: bool = False,
    include_head: bool = True,
) -> Path:
    """Save ω (per layer, or the one shared ω of the ++ variants) and the task head of a model
    prepared by ``attach_scalearn`` as ``scalearn_config.json`` + ``scalearn.safetensors``.

    ``source_paths`` (in source order) are recorded so ``load_scalearn`` can find the sources
    again; ``include_sources`` stores the frozen source weights too (self-contained file).
    """
    from .models.registry import hidden_size as model_hidden_size
    from .models.scalearn import attach_state, head_parameters, scalearn_layers

    state = attach_state(model)
    layers = scalearn_layers(model)
    out = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    if state.shared_omega is not None:
        tensors["omega"] = _shared_omega(layers, state.variant)
    for site, layer in zip(state.sites, layers, strict=True):
        if state.shared_omega is None:
            tensors[f"omega.{_site_tag(site.key)}"] = layer.omega
        if include_sources:
            packed = layer.packed()
            offsets = [0]
            for r in layer.ranks:
                offsets.append(offsets[-1] + r)
            for i in range(layer.num_sources):
                lo, hi = offsets[i], offsets[i + 1]
                tag = f"source.{i}.{_site_tag(site.key)}"
                tensors[f"{tag}.w_down"] = packed.w_down[lo:hi]
                tensors[f"{tag}.b_down"] = packed.b_down[lo:hi]
                tensors[f"{tag}.w_up"] = packed.w_up[:, lo:hi]
                tensors[f"{tag}.b_up"] = packed.b_up[i]
    head_names = []
    if include_head:
        for name, param in head_parameters(model):
            tensors[f"head.{name}"] = param
            head_names.append(name)
    first = layers[0]
    paths = list(source_paths) if source_paths is not None else [None] * len(state.source_names)
    if len(paths) != len(state.source_names):
        raise ValueError(f"source_paths has {len(paths)} entries for {len(state.source_names)} sources")
    config = {
        "format": "scalearn_fast",
        "format_version": FORMAT_VERSION,
        "variant": state.variant,
        "num_sources": len(state.source_names),
        "source_names": list(state.source_names),
        "source_paths": paths,
        "sources_included": include_sources,
        "hidden_size": model_hidden_size(model),
        "model_type": getattr(model.config, "model_type", None),
        "sites": [list(site.key) for site in state.sites],
        "activation": first.activation,
        "omega_dropout": first.omega_dropout,
        "head": head_names,
    }
    atomic_write_tensors(out / SCALEARN_WEIGHTS, tensors, metadata={"format": "scalearn_fast"})
    atomic_write_json(out / SCALEARN_CONFIG, config)
    return out


def read_scalearn_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / SCALEARN_CONFIG
    if not path.is_file():
        raise ValueError(f"{directory}: no {SCALEARN_CONFIG} (not a save_scalearn folder)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt JSON ({exc})") from exc
    for key in ("variant", "num_sources", "source_names", "hidden_size", "sites"):
        if key not in config:
            raise ValueError(f"{path}: missing {key!r}")
    if len(config["source_names"]) != config["num_sources"]:
        raise ValueError(
            f"{path}: num_sources={config['num_sources']} but {len(config['source_names'])} names"
        )
    return config


def _embedded_sources(config: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> list[AdapterSource]:
    sources = []
    for i, name in enumerate(config["source_names"]):
        layers = {}
        for stack, index in config["sites"]:
            tag = f"source.{i}.{stack}.{index}"
            try:
                layers[(stack, index)] = AdapterWeights(
                    *(tensors[f"{tag}.{p}"] for p in ("w_down", "b_down", "w_up", "b_up"))
                )
            except KeyError as exc:
                raise ValueError(f"checkpoint says sources are included but lacks {exc}") from exc
        sources.append(AdapterSource(name, layers, config.get("activation", "relu")))
    return sources


def load_scalearn(
    model: torch.nn.Module,
    directory: str | os.PathLike[str],
    sources: Sequence[SourceSpec] | Mapping[str, SourceSpec] | None = None,
    *,
    backend: str = "auto",
    load_head: bool = True,
) -> torch.nn.Module:
    """Attach ScaLearn to ``model`` from a ``save_scalearn`` folder and load ω (and the head).

    ``sources`` default to the ones stored in the checkpoint, else the recorded folders. A
    checkpoint that does not fit (wrong number of sources, hidden size, source names, layers,
    or a corrupt file) raises ``ValueError`` saying which.
    """
    from .models.registry import ffn_sites
    from .models.registry import hidden_size as model_hidden_size
    from .models.scalearn import attach_scalearn, attach_state, head_parameters, scalearn_layers

    folder = Path(directory)
    config = read_scalearn_config(folder)
    weights = folder / SCALEARN_WEIGHTS
    if not weights.is_file():
        raise ValueError(f"{folder}: no {SCALEARN_WEIGHTS}")
    tensors = _load_tensors(weights)
    d = model_hidden_size(model)
    if config["hidden_size"] != d:
        raise ValueError(
            f"{folder}: checkpoint has hidden size d={config['hidden_size']}, the model has d={d}"
        )
    names = list(config["source_names"])
    if sources is None:
        if config.get("sources_included"):
            srcs = _embedded_sources(config, tensors)
        else:
            paths = config.get("source_paths") or []
            if not paths or any(p is None for p in paths):
                raise ValueError(f"{folder}: sources are neither stored nor recorded; pass sources=")
            srcs = load_adapterhub_sources(dict(zip(names, paths, strict=True)))
    else:
        srcs = load_adapterhub_sources(sources)
    if len(srcs) != len(names):
        raise ValueError(
            f"{folder}: checkpoint was trained over N={len(names)} sources {names}, got N={len(srcs)}"
        )
    given = [s.name for s in srcs]
    if given != names:
        raise ValueError(
            f"{folder}: checkpoint source names {names} (in order) do not match the given {given}"
        )
    sites = [list(s.key) for s in ffn_sites(model)]
    if sites != [list(s) for s in config["sites"]]:
        raise ValueError(
            f"{folder}: checkpoint has {len(config['sites'])} layers, the model has {len(sites)}"
        )
    attach_scalearn(model, srcs, config["variant"], backend, omega_dropout=config.get("omega_dropout"))
    try:
        state = attach_state(model)
        with torch.no_grad():
            if state.shared_omega is not None:
                _copy_checked(state.shared_omega, tensors, "omega", folder)
            else:
                for site, layer in zip(state.sites, scalearn_layers(model), strict=True):
                    _copy_checked(layer.omega, tensors, f"omega.{_site_tag(site.key)}", folder)
            if load_head:
                for name, param in head_parameters(model):
                    if f"head.{name}" in tensors:
                        _copy_checked(param, tensors, f"head.{name}", folder)
    except BaseException:
        from .models.scalearn import detach_scalearn

        detach_scalearn(model)
        raise
    return model


def _copy_checked(dst: torch.Tensor, tensors: Mapping[str, torch.Tensor], key: str, folder: Path) -> None:
    if key not in tensors:
        raise ValueError(f"{folder}: {SCALEARN_WEIGHTS} lacks {key!r}")
    src = tensors[key]
    if src.shape != dst.shape:
        what = "N (sources)" if key.startswith("omega") and src.shape[:1] != dst.shape[:1] else "shape"
        raise ValueError(
            f"{folder}: {key} has shape {list(src.shape)}, expected {list(dst.shape)} (wrong {what})"
        )
    dst.copy_(src.to(dtype=dst.dtype, device=dst.device))
