"""The names this module used to define, kept importable: the file formats live in
``scalearn_fast.formats``, ``save_scalearn`` / ``load_scalearn`` in ``scalearn_fast.models``."""

from .formats import (  # noqa: F401
    ADAPTER_BIN,
    ADAPTER_CONFIG,
    ADAPTER_SAFE,
    FORMAT_VERSION,
    REQUIRED_CONFIG,
    SCALEARN_CONFIG,
    SCALEARN_WEIGHTS,
    SEQ_BN_CONFIG,
    AdapterSource,
    AdapterWeights,
    SiteKey,
    SourceSpec,
    adapter_from_state_dict,
    adapter_key_prefix,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_tensors,
    check_adapter_config,
    load_adapterhub_source,
    load_adapterhub_sources,
    read_scalearn_config,
    save_adapterhub_adapter,
)
from .models.checkpoint import load_scalearn, save_scalearn  # noqa: F401
