"""``scalearn-fast params``: transfer parameters per variant vs AdapterFusion for a local model.

The counts come from ``scalearn_fast.models.model_transfer_parameters``; the model is built from
its config on the meta device, so no weights are read.
"""

from __future__ import annotations


def model_on_meta(model_dir: str):
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):
        return AutoModel.from_config(config)


def format_table(model, num_sources: int) -> str:
    from ..models.params import model_transfer_parameters
    from ..models.registry import ffn_sites, hidden_size

    counts = model_transfer_parameters(model, num_sources)
    fusion = counts["adapter_fusion"]
    lines = [
        f"model_type={model.config.model_type}  adapter sites L={len(ffn_sites(model))}  "
        f"d={hidden_size(model)}  sources N={num_sources}",
        f"{'method':<20}{'transfer params':>16}{'vs AdapterFusion':>18}",
    ]
    for name, count in counts.items():
        lines.append(f"{name:<20}{count:>16,}{count / fusion:>17.4%}")
    return "\n".join(lines)
