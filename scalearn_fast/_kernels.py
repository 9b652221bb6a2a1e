"""Import the Triton kernels package wherever it lives.

Installed, kernels/ is ``scalearn_fast.kernels`` (pyproject's package-dir mapping);
run from a source tree (``PYTHONPATH=.``) it is the top-level ``kernels`` package.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.cache  # a failed import is not cached by Python, and this runs on every call
def load_kernels() -> ModuleType:
    try:
        return importlib.import_module("scalearn_fast.kernels")
    except ModuleNotFoundError:
        return importlib.import_module("kernels")
