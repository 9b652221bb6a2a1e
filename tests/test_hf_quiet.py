"""``transformers_errors_only`` quiets transformers inside the block and restores its level after,
also when the block raises."""

from __future__ import annotations

import pytest
from transformers.utils import logging as hf_logging

from scalearn_fast.hf_quiet import transformers_errors_only


def test_errors_only_inside_and_restored_after_a_raise() -> None:
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    try:
        with pytest.raises(RuntimeError, match="boom"), transformers_errors_only():
            assert hf_logging.get_verbosity() == hf_logging.ERROR
            raise RuntimeError("boom")
        assert hf_logging.get_verbosity() == hf_logging.INFO
    finally:
        hf_logging.set_verbosity(before)
