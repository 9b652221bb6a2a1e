"""``transformers_errors_only``: transformers' own logging held at error level while a command
loads a model whose head it replaces (the "newly initialized" warning would be noise there)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def transformers_errors_only() -> Iterator[None]:
    """Within the block, transformers logs errors only; its verbosity is restored on exit."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
