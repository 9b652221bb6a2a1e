"""``scalearn-fast convert``: a ScaLearn folder of the official ScaLearn code as a ``save_scalearn``
folder.

    scalearn-fast convert runs/rte/0 out/rte --sources mnli=adapters/mnli ... rte=adapters/rte

The official folder (``scalearn_config.json`` + ``pytorch_model_scalearn.bin``) holds ω and the
source names only. ``--sources`` (``NAME=FOLDER`` or AdapterHub folders) records where the
sources are, so ``load_scalearn(model, OUTPUT)`` finds them; their names must be the official
ones, in the same order. A ``++`` folder holds no ω (the official saver misses it): give the
trained ω with ``--omega FILE`` (a ``.safetensors``, ``.pt`` or ``.bin`` holding one tensor, read
without unpickling objects); the number of layers then comes from the sources (or
``--num-layers``). No head is written: the official folder has none.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .cli_options import add_sources_option


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("official", help="folder written by the official code's save_scalearn")
    p.add_argument("output", help="save_scalearn folder to write")
    add_sources_option(
        p, "the source adapters, NAME=FOLDER or AdapterHub folders, recorded for load_scalearn"
    )
    p.add_argument("--omega", default=None, help="the shared ω of a ++ folder (one tensor in a file)")
    p.add_argument("--num-layers", type=int, default=None, help="model layers (++, no --sources)")


def read_omega_file(path: str | Path) -> Any:
    """The one tensor in ``path`` (a dict holding one tensor, or ``omega``, or a bare tensor)."""
    import torch

    from .formats.files import read_safetensors

    path = Path(path)
    if path.suffix == ".safetensors":
        value: object = read_safetensors(path)[0]
    else:
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"--omega {path}: cannot read a tensor ({type(exc).__name__}: {exc})") from exc
    if isinstance(value, dict):
        if "omega" in value:
            value = value["omega"]
        elif len(value) == 1:
            value = next(iter(value.values()))
        else:
            raise ValueError(f"--omega {path}: holds {sorted(value)!r:.80}; expected one tensor (or 'omega')")
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"--omega {path}: holds a {type(value).__name__}; expected a tensor")
    return value


def _sources(specs: list[str]) -> list:
    from .formats.adapterhub import load_adapterhub_sources

    if all("=" in s for s in specs):
        return load_adapterhub_sources(dict(s.split("=", 1) for s in specs))
    if any("=" in s for s in specs):
        raise ValueError("--sources: give all as NAME=FOLDER or all as folders, not a mix")
    return load_adapterhub_sources(specs)


def run(a: argparse.Namespace) -> int:
    from .formats.official import read_official_checkpoint
    from .formats.scalearn import write_scalearn_checkpoint

    srcs = _sources(a.sources) if a.sources else None
    omega = read_omega_file(a.omega) if a.omega is not None else None
    sites = None
    if omega is not None:
        if srcs:
            sites = sorted(next(iter(srcs)).layers)
        elif a.num_layers is not None and a.num_layers > 0:
            sites = [("encoder", i) for i in range(a.num_layers)]
        else:
            raise ValueError("--omega needs the model's layer count: pass --sources or --num-layers (> 0)")
    ckpt = read_official_checkpoint(a.official, omega=omega, sites=sites)
    config = dict(ckpt.config)
    if srcs is not None:
        names = [s.name for s in srcs]
        if names != config["source_names"]:
            raise ValueError(
                f"--sources are named {names}; the official folder's sources are {config['source_names']} "
                "(in that order; use NAME=FOLDER to name them)"
            )
        config["source_paths"] = [str(Path(s.path).resolve()) if s.path else None for s in srcs]
    write_scalearn_checkpoint(a.output, config, ckpt.tensors)
    print(f"wrote {a.output}: {config['variant']} over {config['source_names']}")
    return 0
