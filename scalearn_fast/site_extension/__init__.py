"""The optional C++ extension: eval-mode sites with an AdapterFusion or a ScaLearn sub-layer as
one call — the BERT-like output site and the translation models' summed sites (``sites.cpp``;
docs/architecture.md, "The native sites"). Not to be confused with the top-level ``native/``
(the C++ runner of exported packages).

Nothing here is needed: without the extension every path runs in Python, with bitwise the same
results. It is built with ``torch.utils.cpp_extension`` (a C++ compiler and ninja) into a cache
folder keyed by the source, the torch version and the Python version, and then loaded without
a compiler. ``SCALEARN_FAST_NATIVE`` chooses:

* unset or ``auto``: use the extension if it has been built (a build that does not load warns
  once and is not used); never compile on a model's call;
* ``1``: build it if needed (the first time takes about a minute) and fail if that fails;
* ``0``: never use it.

``python -m scalearn_fast.site_extension`` builds it (``scripts/setup.sh`` does, where a
compiler is found). ``SCALEARN_FAST_CACHE`` moves the cache folder (default ``~/.cache/scalearn_fast``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("sites.cpp")
_MODES = ("auto", "0", "1")
_loaded: dict[str, ModuleType | None] = {}


def mode() -> str:
    """``SCALEARN_FAST_NATIVE``: ``auto`` (the default), ``0`` or ``1``."""
    value = os.environ.get("SCALEARN_FAST_NATIVE", "auto") or "auto"
    if value not in _MODES:
        raise ValueError(f"SCALEARN_FAST_NATIVE must be one of {_MODES}; got {value!r}")
    return value


def build_directory() -> Path:
    """Where this source, torch and Python build to: a new folder when any of them changes."""
    tag = hashlib.sha256(
        SOURCE.read_bytes() + f"{torch.__version__}|{sys.version_info[:2]}".encode()
    ).hexdigest()[:16]
    root = Path(os.environ.get("SCALEARN_FAST_CACHE", Path.home() / ".cache" / "scalearn_fast"))
    return root / "site_extension" / tag


def _name() -> str:
    return "scalearn_fast_site_extension_" + build_directory().name


def _import_built() -> ModuleType | None:
    """The built module if its library is in the build folder (no compiler, no ninja)."""
    if not built():
        return None
    path = build_directory() / f"{_name()}.so"
    spec = importlib.util.spec_from_file_location(_name(), path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def built() -> bool:
    """Whether the extension for this source, torch and Python is in its cache folder."""
    return (build_directory() / f"{_name()}.so").is_file()


def build(verbose: bool = False) -> ModuleType:
    """Compile the extension into ``build_directory()`` (a no-op when it is up to date) and load
    it. Raises what the compiler or ninja raise."""
    from torch.utils.cpp_extension import load

    folder = build_directory()
    folder.mkdir(parents=True, exist_ok=True)
    module = load(_name(), [str(SOURCE)], build_directory=str(folder), extra_cflags=["-O2"], verbose=verbose)
    _loaded[mode()] = module
    return module


def extension() -> ModuleType | None:
    """The loaded extension, or None when it is switched off or (under ``auto``) not built. Looked
    up once per process and mode."""
    current = mode()
    if current in _loaded:
        return _loaded[current]
    if current == "0":
        module = None
    elif current == "1":
        module = _import_built() or build()
    else:
        try:
            module = _import_built()
        except ImportError as error:  # a library that does not load here: Python serves, and says so
            warnings.warn(
                f"scalearn_fast: the built native sites in {build_directory()} do not load "
                f"({error}); every site runs in Python (same results). Rebuild with "
                "`python -m scalearn_fast.site_extension`, or set SCALEARN_FAST_NATIVE=0.",
                RuntimeWarning,
                stacklevel=2,
            )
            module = None
    _loaded[current] = module
    return module
