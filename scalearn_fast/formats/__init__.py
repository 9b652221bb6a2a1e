"""The file formats: AdapterHub adapter folders, `adapters` fusion folders, ScaLearn
checkpoints, and the atomic writes and checked reads they are built on.

Nothing here knows about models: ``scalearn_fast.models`` turns these into attached layers.
"""

from .adapterhub import (
    ADAPTER_BIN,
    ADAPTER_CONFIG,
    ADAPTER_SAFE,
    LIBRARY_ACTIVATIONS,
    REQUIRED_CONFIG,
    SEQ_BN_CONFIG,
    AdapterSource,
    AdapterWeights,
    SourceSpec,
    adapter_from_state_dict,
    adapter_key_prefix,
    check_adapter_config,
    check_adapter_weights,
    load_adapterhub_source,
    load_adapterhub_sources,
    save_adapterhub_adapter,
)
from .atomic import atomic_write_bytes, atomic_write_json, atomic_write_tensors, clean_stale_temps
from .files import read_json, read_safetensors, read_tensors
from .fusion import (
    FUSION_CONFIGS,
    FusionCheckpoint,
    fusion_from_state_dict,
    load_fusion_checkpoint,
    resolve_fusion_config,
    split_fusion_state_dict,
)
from .keys import SiteKey, site_key, site_tag
from .scalearn import (
    FORMAT_VERSION,
    SCALEARN_CONFIG,
    SCALEARN_WEIGHTS,
    ScaLearnCheckpoint,
    check_scalearn_config,
    embedded_sources,
    read_scalearn_checkpoint,
    read_scalearn_config,
    write_scalearn_checkpoint,
)

__all__ = [
    "ADAPTER_BIN",
    "ADAPTER_CONFIG",
    "ADAPTER_SAFE",
    "FORMAT_VERSION",
    "FUSION_CONFIGS",
    "LIBRARY_ACTIVATIONS",
    "REQUIRED_CONFIG",
    "SCALEARN_CONFIG",
    "SCALEARN_WEIGHTS",
    "SEQ_BN_CONFIG",
    "AdapterSource",
    "AdapterWeights",
    "FusionCheckpoint",
    "ScaLearnCheckpoint",
    "SiteKey",
    "SourceSpec",
    "adapter_from_state_dict",
    "adapter_key_prefix",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_tensors",
    "check_adapter_config",
    "check_adapter_weights",
    "check_scalearn_config",
    "clean_stale_temps",
    "embedded_sources",
    "fusion_from_state_dict",
    "load_adapterhub_source",
    "load_adapterhub_sources",
    "load_fusion_checkpoint",
    "read_json",
    "read_safetensors",
    "read_scalearn_checkpoint",
    "read_scalearn_config",
    "read_tensors",
    "resolve_fusion_config",
    "save_adapterhub_adapter",
    "site_key",
    "site_tag",
    "split_fusion_state_dict",
    "write_scalearn_checkpoint",
]
