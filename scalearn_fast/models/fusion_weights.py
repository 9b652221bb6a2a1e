"""The `adapters` AdapterFusion checkpoint format lives in ``scalearn_fast.formats.fusion``;
these names stay importable from here."""

from ..formats.fusion import (  # noqa: F401
    CONFIG_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    FusionCheckpoint,
    load_fusion_checkpoint,
    split_fusion_state_dict,
)
