"""Reading the files every format is made of, with errors that name the file.

``read_json`` and ``read_tensors`` are the only places a JSON config or a weights file is
parsed. A ``.bin`` is read with ``torch.load(weights_only=True)``, which refuses pickled Python
objects (unpickling can run code); ``trust_pickle=True`` lifts that for a file you trust.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def read_json(path: str | os.PathLike[str], *, object_required: bool = True) -> Any:
    """The JSON in ``path``; a ValueError naming the file when it is missing, unreadable, not
    JSON, or (``object_required``) not a JSON object."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt JSON, not valid ({exc})") from exc
    if object_required and not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__} {value!r:.60}")
    return value


def _check_tensor_dict(path: Path, value: Any) -> dict[str, torch.Tensor]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{path}: holds a {type(value).__name__}, expected a dict of named tensors")
    bad = [k for k, v in value.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(
            f"{path}: entry {bad[0]!r} is a {type(value[bad[0]]).__name__}, expected a dict of named tensors"
        )
    return dict(value)


def _safetensors_metadata(path: Path, data: bytes) -> dict[str, str]:
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return dict(header.get("__metadata__") or {})


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file, read in one go (one version of the file
    even while a writer replaces it)."""
    from safetensors.torch import load

    path = Path(path)
    try:
        data = path.read_bytes()
        tensors = load(data)
        metadata = _safetensors_metadata(path, data)
    except Exception as exc:  # missing, truncated or corrupt
        raise ValueError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    return _check_tensor_dict(path, tensors), metadata


def read_tensors(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` from a ``.safetensors`` file or a ``torch.save`` file (``.bin``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    try:
        value = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:  # corrupt, truncated, empty, or refused
        if "Unsupported global" in str(exc):
            raise ValueError(
                f"{path}: holds pickled Python objects beyond plain tensors, which safe loading "
                "refuses (unpickling can run code). If you trust this file, pass trust_pickle=True"
            ) from exc
        raise ValueError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    return _check_tensor_dict(path, value)


def weights_file(folder: Path, safe_name: str, bin_name: str, where: str) -> Path:
    """The weights file of a saved folder: ``safe_name`` (safetensors) when present, else
    ``bin_name``; a ValueError starting with ``where`` when it holds neither."""
    for name in (safe_name, bin_name):
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"{where} holds neither {safe_name} nor {bin_name}")
