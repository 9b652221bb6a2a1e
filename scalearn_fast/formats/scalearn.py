"""ScaLearn checkpoints: the file format of a ``save_scalearn`` folder, with no model in sight.

A folder holds ``scalearn.safetensors`` (ω per site as ``omega.{stack}.{index}`` or the one
shared ``omega``; the task head as ``head.{name}``; with ``sources_included`` the frozen sources
as ``source.{i}.{stack}.{index}.{w_down|b_down|w_up|b_up}``) and ``scalearn_config.json``.

The weights file is the unit of truth: its header metadata holds the config too, so one atomic
``os.replace`` publishes weights and config together. ``scalearn_config.json`` is a readable copy
written after it; a folder whose copy differs from the weights' own config (a save killed
between the two files, or files mixed from two checkpoints) is refused. Files written before the
config moved into the header (``format_version`` 1) have no such copy and load from the JSON.
The reading and writing is ``scalearn_fast.formats.unit``'s, shared with router checkpoints.
"""

from __future__ import annotations

from typing import Any

from ..layers import VARIANTS
from .unit import STACKS, Fail, UnitCheckpoint, UnitFormat, embedded_sources

ScaLearnCheckpoint = UnitCheckpoint  # a read and checked ``save_scalearn`` folder

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SCALEARN_CONFIG",
    "SCALEARN_WEIGHTS",
    "STACKS",
    "ScaLearnCheckpoint",
    "check_scalearn_config",
    "embedded_sources",
    "read_scalearn_checkpoint",
    "read_scalearn_config",
    "write_scalearn_checkpoint",
]


def _check_omega_dropout(config: dict[str, Any], fail: Fail) -> None:
    dropout = config.get("omega_dropout")
    if dropout is not None and (not isinstance(dropout, int | float) or isinstance(dropout, bool)
                                or not 0.0 <= dropout < 1.0):  # fmt: skip
        raise fail(f"omega_dropout is {dropout!r}; expected null or a number in [0, 1)")


_FORMAT = UnitFormat(
    "scalearn",
    format="scalearn_fast",
    version=2,
    choices={"variant": VARIANTS},
    check_kind=_check_omega_dropout,
    header_required=False,  # format_version 1 files have no config in the header
)
SCALEARN_CONFIG = _FORMAT.config_name  # scalearn_config.json
SCALEARN_WEIGHTS = _FORMAT.weights_name  # scalearn.safetensors
FORMAT = _FORMAT.format
FORMAT_VERSION = _FORMAT.version


# What a ``save_scalearn`` folder is read and written with (``UnitFormat``'s methods, documented there).
check_scalearn_config = _FORMAT.check
write_scalearn_checkpoint = _FORMAT.write
read_scalearn_checkpoint = _FORMAT.read
read_scalearn_config = _FORMAT.read_config
